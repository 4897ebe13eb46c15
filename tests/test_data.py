"""The data schema, loader and validator (`meav data validate`), on the shipped files and broken ones."""

import json
from pathlib import Path

import pytest

from meav_merge.cli.main import main
from meav_merge.data.schema import (split_of, DataError, assign_splits, load_records, read_jsonl, validate_file)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

GOOD = {"id": "a", "domain": "medical", "persona": "A nurse.", "query": "My question about 20 mg of drug X?",
        "expert": "Take 20 mg at night with water; check levels in 6 weeks and report dizziness.",
        "generic": "Medicines can have side effects; a pharmacist or doctor can advise you.",
        "avoidance": "I'm sorry, I can't help with this. Please ask a qualified professional.", "split": "train"}


def _write(tmp_path, rows, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_shipped_files_pass_with_counts_and_length_statistics(capsys):
    files = sorted(str(p) for p in DATA.glob("*.jsonl") if p.name != "movie_review_openings.jsonl")
    assert main(["data", "validate", *files]) == 0
    out = capsys.readouterr().out
    for domain in ("medical", "financial", "legal"):
        recs = load_records(DATA, domain)
        assert len(recs) >= 400
        assert f"{domain:<12} expert longest" in out
        report = validate_file(DATA / f"{domain}.jsonl")
        st = report.length_stats()[domain]
        assert st["expert_longest"] <= 0.6 and st["avoidance_shortest"] <= 0.6
        splits = report.counts()[domain]
        # enough held-out queries that a fraction is not a coin flip (issue 13)
        assert splits["test"] >= 80 and splits["validation"] >= 40
        assert all(r.split == split_of(r.id) for r in report.records)
    assert len(load_records(DATA, "safety")) >= 150
    assert len(load_records(DATA, "helpfulness")) >= 100


@pytest.mark.parametrize("row,needle", [
    ("{not json", "f.jsonl:2: invalid JSON"),
    ({**GOOD, "id": "b", "query": ""}, "f.jsonl:2: missing or empty field 'query'"),
    ({k: v for k, v in GOOD.items() if k != "expert"} | {"id": "b"}, "f.jsonl:2: missing or empty field 'expert'"),
    ({**GOOD, "id": "b", "domain": "astrology"}, "f.jsonl:2: unknown domain 'astrology'"),
    ({**GOOD}, "f.jsonl:2: duplicate id 'a' (first at line 1)"),
    ({**GOOD, "id": "b", "generic": GOOD["avoidance"].upper()}, "f.jsonl:2: levels 'generic' and 'avoidance' have identical text"),
    ({**GOOD, "id": "b", "split": "dev"}, "f.jsonl:2: split must be one of"),
])
def test_each_error_names_its_line(tmp_path, row, needle, capsys):
    path = _write(tmp_path, [GOOD, row])
    report = validate_file(path)
    assert any(needle in e for e in report.errors), report.errors
    assert main(["data", "validate", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_near_duplicates_and_length_shortcut_are_reported(tmp_path):
    rows = []
    for i in range(10):
        rows.append({**GOOD, "id": f"r{i}", "query": f"Unique question number {i} about topic {i * 7} here?",
                     "expert": f"A long expert answer {i} " + "with many many specific words " * 3,
                     "generic": f"Generic {i} says see someone about case {i}.",
                     "avoidance": f"No {i}."})
    rows[7]["query"] = rows[3]["query"] + " Thanks."
    path = _write(tmp_path, rows)
    errors = validate_file(path).errors
    assert any(e.startswith(f"{path}:8: near-duplicate of line 4 in 'query'") for e in errors), errors
    assert any("expert is the longest response in 100%" in e for e in errors)
    assert any("avoidance is the shortest response in 100%" in e for e in errors)


def test_splits_are_deterministic_and_order_independent(tmp_path):
    recs = read_jsonl(DATA / "medical.jsonl")
    stored = {r.id: r.split for r in recs}
    shuffled = list(reversed(recs))
    for r in shuffled:
        r.split = ""
    assign_splits(shuffled)
    assert {r.id: r.split for r in shuffled} == stored
    # a user file without splits gets the same rule on load; mixing is an error
    plain = [{k: v for k, v in GOOD.items() if k != "split"} | {"id": f"x{i}"} for i in range(40)]
    first = {r.id: r.split for r in read_jsonl(_write(tmp_path, plain))}
    assert set(first.values()) == {"train", "test", "validation"}
    # growing the file never moves a record to another split (no test query leaks into training)
    grown = {r.id: r.split for r in read_jsonl(_write(tmp_path, plain + [{**plain[0], "id": f"z{i}"} for i in range(50)],
                                                      "grown.jsonl"))}
    assert {k: grown[k] for k in first} == first
    mixed = plain[:5] + [{**GOOD, "id": "y"}]
    with pytest.raises(DataError, match=r"f2.jsonl:1: missing field 'split'"):
        read_jsonl(_write(tmp_path, mixed, "f2.jsonl"))


def test_split_command_writes_the_field(tmp_path):
    plain = [{k: v for k, v in GOOD.items() if k != "split"} | {"id": f"x{i}"} for i in range(10)]
    path = _write(tmp_path, plain)
    assert main(["data", "split", str(path), "--write"]) == 0
    assert all("split" in json.loads(line) for line in path.read_text().splitlines())
    # match the message, not the path: pytest's tmp dir name contains "split" too
    assert not [e for e in validate_file(path).errors if "field 'split'" in e or "split must be" in e]

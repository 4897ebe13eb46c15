"""The preference-data schema: one JSON object per line, in one of three shapes.

Proficiency domains (medical, financial, legal, or any name you add with levels):
    {"id", "domain", "persona", "query", "expert", "generic", "avoidance", "split"}
Safety:       {"id", "domain": "safety", "query", "safe", "unsafe", "split"}
Helpfulness:  {"id", "domain": "helpfulness", "query", "helpful", "unhelpful", "split"}

Levels are listed best first; DPO pairs are adjacent levels (expert ≻ generic,
generic ≻ avoidance; safe ≻ unsafe). ``split`` is train / validation / test, fixed
and stored with the data (about 22% test, 12% validation, the rest train; see split_of);
files without it get the same deterministic assignment on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PROFICIENCY_LEVELS = ("expert", "generic", "avoidance")
DOMAIN_LEVELS: Dict[str, Tuple[str, ...]] = {
    "medical": PROFICIENCY_LEVELS,
    "financial": PROFICIENCY_LEVELS,
    "legal": PROFICIENCY_LEVELS,
    "safety": ("safe", "unsafe"),
    "helpfulness": ("helpful", "unhelpful"),
}
SPLITS = ("train", "validation", "test")
# Of all records, in expectation. Larger than the paper's 20% / 3%-of-train so that 400
# records per domain give >= 80 test and >= 40 validation queries: fractions on 4
# validation queries moved in steps of 0.25 and could not be told from noise.
TEST_FRACTION = 0.22
VALIDATION_FRACTION = 0.12
DOMAIN_FILES = {d: f"{d}.jsonl" for d in DOMAIN_LEVELS}


class DataError(ValueError):
    """Bad preference data; the message starts with file:line."""


def levels_for(domain: str) -> Tuple[str, ...]:
    return DOMAIN_LEVELS.get(domain, PROFICIENCY_LEVELS)


# A dataclass checked by hand (parse_record) rather than a pydantic model, on purpose: the
# checks that matter are across fields and lines (one response per level of the record's
# domain, the persona only on proficiency domains, unknown fields kept byte-exactly for
# `data split --write`, NaN and repeated keys refused while the line is parsed) and every
# error must be one line naming file:line and key; pydantic would cover the type checks
# only and report them as multi-line ValidationErrors.
@dataclass
class Record:
    id: str
    domain: str
    query: str
    responses: Dict[str, str]  # level -> text, best level first
    persona: str = ""
    split: str = ""
    source: str = ""  # "file:line", for messages
    # The object as read: every field (known or not) with its exact text, so rewriting
    # a user's file (`meav data split --write`) changes only `split`.
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def levels(self) -> Tuple[str, ...]:
        return tuple(self.responses)

    def pairs(self) -> List[Tuple[str, str]]:
        """(chosen, rejected) level pairs: adjacent levels, best first."""
        lv = self.levels
        return [(lv[i], lv[i + 1]) for i in range(len(lv) - 1)]

    def to_json(self) -> dict:
        if self.raw:
            out = dict(self.raw)
            if self.split:
                out["split"] = self.split
            return out
        out = {"id": self.id, "domain": self.domain}
        if self.persona:
            out["persona"] = self.persona
        out["query"] = self.query
        out.update(self.responses)
        if self.split:
            out["split"] = self.split
        return out


def _split_key(record_id: str) -> str:
    # surrogatepass: an id may hold a lone surrogate (a JSON "\ud800" escape reads back as one), which
    # plain UTF-8 refuses to encode; every other id hashes to the same bytes as before
    return hashlib.sha256(record_id.encode("utf-8", "surrogatepass")).hexdigest()


def split_of(record_id: str) -> str:
    """The split a record belongs to, from its id alone.

    A threshold on the id's hash (not a rank among the file's records) keeps every
    record's split fixed when records are added, so growing a dataset never moves a
    test query into training.
    """
    u = int(_split_key(record_id)[:12], 16) / 16 ** 12
    return "test" if u < TEST_FRACTION else "validation" if u < TEST_FRACTION + VALIDATION_FRACTION else "train"


def assign_splits(records: Sequence[Record]) -> None:
    """Deterministic split by the hash of each id (order-independent, stable under additions)."""
    for r in records:
        r.split = split_of(r.id)


def parse_record(obj, source: str, known_domains: Optional[Dict[str, Tuple[str, ...]]] = None) -> Record:
    domains = known_domains or DOMAIN_LEVELS
    if not isinstance(obj, dict):
        raise DataError(f"{source}: a record must be a JSON object")
    for key in ("id", "domain", "query"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise DataError(f"{source}: missing or empty field '{key}'")
    domain = obj["domain"]
    if domain not in domains:
        raise DataError(f"{source}: unknown domain {domain!r} (known: {', '.join(domains)})")
    levels = domains[domain]
    responses = {}
    for level in levels:
        value = obj.get(level)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source}: missing or empty field '{level}'")
        responses[level] = value.strip()
    if levels == PROFICIENCY_LEVELS and not (isinstance(obj.get("persona"), str) and obj["persona"].strip()):
        raise DataError(f"{source}: missing or empty field 'persona'")
    split = obj.get("split", "")
    if not isinstance(split, str) or (split and split not in SPLITS):
        raise DataError(f"{source}: split must be one of {', '.join(SPLITS)}, not {split!r}")
    texts = list(responses.values())
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if _normalize(texts[i]) == _normalize(texts[j]):
                raise DataError(f"{source}: levels '{levels[i]}' and '{levels[j]}' have identical text")
    return Record(id=obj["id"], domain=domain, query=obj["query"].strip(), responses=responses,
                  persona=(obj.get("persona") or "").strip(), split=split, source=source, raw=obj)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def jsonl_lines(data: bytes) -> List[str]:
    """A JSONL file's lines: UTF-8, split at "\\n" only (a leading BOM is ignored).

    Not ``str.splitlines``, which also splits at U+2028, U+0085, \\x1c and more, all of
    which JSON allows raw inside strings; not text-mode reading either, which turns a
    lone "\\r" (JSON whitespace) into a line break.
    """
    text = data.decode("utf-8")
    return text[1:].split("\n") if text.startswith("\ufeff") else text.split("\n")


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")  # json keeps the last one: the first would be lost
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_line(line: str):
    """One JSONL line as strict JSON: no NaN/Infinity, no repeated keys."""
    return json.loads(line, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps_line(obj) -> str:
    """One JSONL line (no "\\n" inside, any Unicode kept as is); a lone surrogate, which
    UTF-8 cannot hold, is written as its \\u escape, so the line reads back equal."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def iter_jsonl(path: str | os.PathLike, error: type = None, strict: bool = True):
    """Yield (line number, object, error message) for each non-blank line of a JSONL file.

    With ``strict`` the first unreadable file or invalid line raises ``error`` (a
    ValueError subclass) naming file:line; otherwise invalid lines come back with the
    message and object None, so a validator can report them all.
    """
    error = error or DataError
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: {e.strerror}") from None
    try:
        lines = jsonl_lines(data)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    for ln, line in enumerate(lines, 1):
        if not line.strip(" \t\r"):  # JSON's whitespace only
            continue
        try:
            yield ln, loads_line(line), None
        except ValueError as e:
            detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            msg = f"{path}:{ln}: invalid JSON ({detail})"
            if strict:
                raise error(msg) from None
            yield ln, None, msg


def read_jsonl(path: str | os.PathLike) -> List[Record]:
    """Parse one file strictly; the first problem raises DataError naming file:line."""
    path = Path(path)
    records, ids = [], {}
    for ln, obj, _ in iter_jsonl(path):
        src = f"{path}:{ln}"
        rec = parse_record(obj, src)
        if rec.id in ids:
            raise DataError(f"{src}: duplicate id {rec.id!r} (first at line {ids[rec.id]})")
        ids[rec.id] = ln
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    missing = [r for r in records if not r.split]
    if missing and len(missing) < len(records):
        raise DataError(f"{missing[0].source}: missing field 'split' (give it for every record or for none)")
    if missing:
        assign_splits(records)
    return records


def resolve_data_files(data: str | os.PathLike, domain: Optional[str] = None) -> List[Path]:
    """A file, or a directory (its ``<domain>.jsonl``, or every *.jsonl)."""
    p = Path(data)
    if p.is_file():
        return [p]
    if p.is_dir():
        if domain is not None and (p / DOMAIN_FILES.get(domain, f"{domain}.jsonl")).is_file():
            return [p / DOMAIN_FILES.get(domain, f"{domain}.jsonl")]
        files = sorted(f for f in p.glob("*.jsonl") if not f.name.startswith("_"))
        if files:
            return files
    raise DataError(f"{p}: no such data file or directory with .jsonl files")


def load_records(data: str | os.PathLike, domain: Optional[str] = None, split: Optional[str] = None) -> List[Record]:
    """Records of one domain (and split) from a file or a data directory."""
    records: List[Record] = []
    for f in resolve_data_files(data, domain):
        records.extend(read_jsonl(f))
    if domain is not None:
        records = [r for r in records if r.domain == domain]
        if not records:
            raise DataError(f"{data}: no records for domain '{domain}'")
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"{data}: no '{split}' records" + (f" for domain '{domain}'" if domain else ""))
    return records


def file_sha256(paths: Iterable[str | os.PathLike]) -> str:
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        h.update(Path(p).read_bytes())
    return "sha256:" + h.hexdigest()


# --- validation -----------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def _grams(text: str, n: int = 5) -> set:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


NEAR_DUP_THRESHOLD = 0.5  # share of the smaller text's 5-grams


def near_duplicates(records: Sequence[Record], fields: Sequence[str]) -> List[Tuple[Record, Record, str, float]]:
    """Pairs of records whose query or same-level response share most word 5-grams.

    An inverted index over 5-grams keeps this near-linear for large files.
    """
    found = []
    for fld in fields:
        index: Dict[tuple, List[int]] = defaultdict(list)
        grams = []
        for i, r in enumerate(records):
            text = r.query if fld == "query" else r.responses.get(fld)
            g = _grams(text) if text else set()
            grams.append(g)
            shared: Counter = Counter()
            for gram in g:
                bucket = index[gram]
                if len(bucket) < 200:  # boilerplate grams say nothing about templating
                    shared.update(bucket)
                bucket.append(i)
            for j, count in shared.items():
                smaller = min(len(g), len(grams[j]))
                if smaller and count / smaller > NEAR_DUP_THRESHOLD:
                    found.append((records[j], r, fld, count / smaller))
    return found


@dataclass
class FileReport:
    path: Path
    records: List[Record] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    def counts(self) -> Dict[str, Counter]:
        out: Dict[str, Counter] = defaultdict(Counter)
        for r in self.records:
            out[r.domain][r.split] += 1
        return out

    def length_stats(self) -> Dict[str, dict]:
        """Per 3-level domain: how often expert is longest / avoidance shortest."""
        out = {}
        by_domain: Dict[str, List[Record]] = defaultdict(list)
        for r in self.records:
            if r.levels == PROFICIENCY_LEVELS:
                by_domain[r.domain].append(r)
        for d, recs in by_domain.items():
            lens = [[len(words(r.responses[lv])) for lv in PROFICIENCY_LEVELS] for r in recs]
            out[d] = {
                "expert_longest": sum(e > max(g, a) for e, g, a in lens) / len(lens),
                "avoidance_shortest": sum(a < min(e, g) for e, g, a in lens) / len(lens),
                "mean_words": {lv: sum(x[i] for x in lens) / len(lens) for i, lv in enumerate(PROFICIENCY_LEVELS)},
            }
        return out


MAX_SHORTCUT = 0.60


def validate_file(path: str | os.PathLike) -> FileReport:
    """Collect every problem in one file (not only the first), each as file:line."""
    path = Path(path)
    rep = FileReport(path)
    first_line: Dict[str, int] = {}
    try:
        lines = list(iter_jsonl(path, strict=False))
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    for ln, obj, bad_json in lines:
        src = f"{path}:{ln}"
        if bad_json:
            rep.errors.append(bad_json)
            continue
        try:
            rec = parse_record(obj, src)
        except DataError as e:
            rep.errors.append(str(e))
            continue
        if rec.id in first_line:
            rep.errors.append(f"{src}: duplicate id {rec.id!r} (first at line {first_line[rec.id]})")
            continue
        first_line[rec.id] = ln
        if not rec.split:
            rep.errors.append(f"{src}: missing field 'split' (run `meav data split {path}` to assign it)")
        rep.records.append(rec)
    if not rep.records and not rep.errors:
        rep.errors.append(f"{path}: no records")
    fields = ["query"] + sorted({lv for r in rep.records for lv in r.levels})
    for a, b, fld, share in near_duplicates(rep.records, fields):
        rep.errors.append(f"{b.source}: near-duplicate of line {a.source.rsplit(':', 1)[-1]} in '{fld}' "
                          f"({share:.0%} of word 5-grams shared; templated text?)")
    for d, st in rep.length_stats().items():
        if st["expert_longest"] > MAX_SHORTCUT:
            rep.errors.append(f"{path}: domain '{d}': expert is the longest response in {st['expert_longest']:.0%} "
                              f"of records (at most {MAX_SHORTCUT:.0%}; length would give the level away)")
        if st["avoidance_shortest"] > MAX_SHORTCUT:
            rep.errors.append(f"{path}: domain '{d}': avoidance is the shortest response in "
                              f"{st['avoidance_shortest']:.0%} of records (at most {MAX_SHORTCUT:.0%})")
    return rep


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records (all their fields, exact text) through a temp file; keeps the file's mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(dumps_line(r.to_json()) + "\n")
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

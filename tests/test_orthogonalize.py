"""`meav vector orthogonalize`: the vector stops moving the other domain's margins (to first
order, and measurably at small λ) while its own domain's expert−avoidance effect is kept."""

import json

import pytest
import torch

from meav_merge.cli import main
from meav_merge.data.schema import PROFICIENCY_LEVELS, load_records
from meav_merge.evaluation.scoring import prepare
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.vectors.alignment_vector import META_NAME, AlignmentVector
from meav_merge.vectors.orthogonalize import margin_gradients

LAYERS = 2


def _records(domain, n):
    # each domain's answers in their own letters, so the two domains are told apart
    e, g, a = {"medical": "qwx", "financial": "bnm"}[domain]
    out = []
    for i in range(n):
        word = lambda ch, k: " ".join(ch * (2 + (i + k) % 3) for _ in range(3 + i % 3))  # noqa: E731
        out.append({"id": f"{domain[:3]}-{i}", "domain": domain, "persona": "p", "split": "train",
                    "query": f"{domain} question {i}, what should I do?", "expert": word(e, 0),
                    "generic": word(g, 1), "avoidance": word(a, 2)})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from tiny import build_model, save, top_layer_delta

    root = tmp_path_factory.mktemp("ortho")
    model = build_model(tiny_tokenizer, seed=3, layers=LAYERS)
    base = save(model, tiny_tokenizer, root / "base")
    delta = top_layer_delta(model, seed=7, scale=0.05)
    vec = AlignmentVector(delta, meta={"domain": "medical", "architecture": "LlamaForCausalLM"})
    vec_dir = vec.save(root / "vector", base_config_dir=base)
    data = root / "data"
    data.mkdir()
    for d in ("medical", "financial"):
        (data / f"{d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(d, 6)))
    return base, vec_dir, data, root


def _margins(rm, prepared, lam):
    rm.set([lam])
    s = torch.tensor(rm.scorer.score(prepared), dtype=torch.float64)
    e, g, a = (PROFICIENCY_LEVELS.index(lv) for lv in ("expert", "generic", "avoidance"))
    return torch.stack([s[:, e] - s[:, a], s[:, g] - s[:, a]], 1)


def test_orthogonalized_vector_holds_the_other_domain(setup):
    base, vec_dir, data, root = setup
    out = root / "ortho"
    main(["vector", "orthogonalize", str(vec_dir), "--model", str(base), "--data", str(data),
          "--against", "financial", "--queries", "6", "--out", str(out)])
    meta = json.loads((out / META_NAME).read_text())
    assert meta["orthogonalized"]["against"] == ["financial"] and meta["orthogonalized"]["constraints"] == 12
    assert "calibration" not in meta

    effects = {}
    for name, path in (("plain", vec_dir), ("ortho", out)):
        rm = ReweightableModel(base, [AlignmentVector.load(path)])
        prep = {d: prepare(rm.tokenizer, load_records(data, d, "train")) for d in ("medical", "financial")}
        # central difference of each query's margins around λ = 0, per unit λ
        effects[name] = {d: (_margins(rm, p, 0.02) - _margins(rm, p, -0.02)) / 0.04 for d, p in prep.items()}
    plain, ortho = effects["plain"], effects["ortho"]
    assert plain["financial"].abs().mean() > 0.05  # the planted vector does move the other domain
    assert ortho["financial"].abs().mean() < 0.05 * plain["financial"].abs().mean()
    # its own domain's mean expert−avoidance effect is kept (rescaled to the first-order value)
    assert ortho["medical"][:, 0].mean() == pytest.approx(plain["medical"][:, 0].mean().item(), rel=0.1)


def test_margin_gradients_match_finite_differences(setup):
    base, vec_dir, data, _ = setup
    vec = AlignmentVector.load(vec_dir)
    rm = ReweightableModel(base, [vec])
    names = list(rm.changing)
    params = {rm.scorer.local_name(n): rm._base[n].float().clone().requires_grad_(True) for n in names}
    prepared = prepare(rm.tokenizer, load_records(data, "financial", "train")[:3])
    rows = margin_gradients(rm, params, prepared)
    flat = torch.cat([vec[n].float().reshape(-1) for n in names])
    predicted = (rows.double() @ flat.double()).view(-1, 2)
    fd = (_margins(rm, prepared, 1e-3) - _margins(rm, prepared, -1e-3)) / 2e-3
    assert torch.allclose(predicted, fd, atol=0.02 * fd.abs().max().item() + 1e-4), (predicted, fd)


def test_orthogonalize_refuses_a_vector_without_domain(setup, capsys):
    base, vec_dir, data, root = setup
    vec = AlignmentVector.load(vec_dir)
    bare = AlignmentVector({n: t for n, t in vec.items()}, meta={"architecture": "LlamaForCausalLM"})
    bare_dir = bare.save(root / "bare", base_config_dir=base)
    code = main(["vector", "orthogonalize", str(bare_dir), "--model", str(base), "--data", str(data),
                 "--out", str(root / "never")])
    err = capsys.readouterr().err
    assert code != 0 and "needs a proficiency domain" in err and len(err.strip().splitlines()) == 1
    assert not (root / "never").exists()

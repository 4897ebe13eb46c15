"""Domain-specific vectors: remove a vector's first-order effect on the other domains.

A vector trained on one domain's preferences moves every domain (its spill-over, paper
Table 2): on the embedded model the medical vector at λ = +1 turns financial and legal
expert too, so no choice of scalar λs sets the domains independently. Here the vector
is changed, after training, to the closest one (in weight space) that leaves the other
domains' level margins unchanged to first order:

    v' = argmin ‖v' − v‖  s.t.  J v' = 0,   i.e.   v' = v − Jᵀ (J Jᵀ + ε·I)⁻¹ J v

J has one row per other-domain train query and margin: the gradient, at θ_target, of
(token-mean log p(expert) − log p(avoidance)) and of (generic − avoidance). Those two
margins decide which level wins a query, so J v' = 0 holds each query's ranking where
the target model has it, for small λ. What is left of v is its part that only its own
domain's queries feel; it is rescaled so that its first-order effect on its own
domain's expert−avoidance margin is what v had, so λ keeps its meaning.

Exact only to first order: at large |λ| the second-order effect spills. The spill-over
table (``meav eval spillover``) on the test split says how much is left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from meav_merge.data.schema import DOMAIN_LEVELS, PROFICIENCY_LEVELS, load_records
from meav_merge.evaluation.scoring import PreparedQuery, prepare
from meav_merge.vectors.alignment_vector import AlignmentVector, VectorError

logger = logging.getLogger(__name__)

_E, _G, _A = (PROFICIENCY_LEVELS.index(lv) for lv in ("expert", "generic", "avoidance"))
_CHUNK = 1 << 20  # columns of the bf16 gradient rows turned into float64 at a time


def margin_gradients(rm, params: Dict[str, torch.Tensor], queries: Sequence[PreparedQuery],
                     desc: str = "gradients") -> torch.Tensor:
    """[2·len(queries), P] bf16: per query, ∇(expert − avoidance) and ∇(generic − avoidance),
    flattened over ``params`` (the changing tensors, by their names inside the top stack)."""
    leaves = list(params.values())
    size = sum(p.numel() for p in leaves)
    # bf16 keeps 2·n·P within memory for a few hundred rows; a projection needs ~3 digits
    rows = torch.empty(2 * len(queries), size, dtype=torch.bfloat16)
    for i, q in enumerate(tqdm(queries, desc=desc, leave=False)):
        s = rm.scorer.scores_with(params, [q])[0]
        for j, m in enumerate((s[_E] - s[_A], s[_G] - s[_A])):
            grads = torch.autograd.grad(m, leaves, retain_graph=j == 0)
            rows[2 * i + j] = torch.cat([g.reshape(-1) for g in grads]).to(torch.bfloat16)
    return rows


def _gram(rows: torch.Tensor) -> torch.Tensor:
    k = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    for s in range(0, rows.shape[1], _CHUNK):
        block = rows[:, s:s + _CHUNK].double()
        k += block @ block.T
    return k


def _times(rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """rows @ flat, in column chunks (rows is bf16)."""
    out = torch.zeros(len(rows), dtype=torch.float64)
    for s in range(0, rows.shape[1], _CHUNK):
        out += rows[:, s:s + _CHUNK].double() @ flat[s:s + _CHUNK].double()
    return out


def project_out(flat: torch.Tensor, rows: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """flat − rowsᵀ (rows rowsᵀ + ε I)⁻¹ rows·flat, with ε = ridge · mean diagonal (rows may be dependent)."""
    k = _gram(rows)
    eps = ridge * float(k.diagonal().mean()) if len(k) else 0.0
    c = torch.linalg.solve(k + eps * torch.eye(len(k), dtype=k.dtype), _times(rows, flat))
    out = flat.double().clone()
    for s in range(0, rows.shape[1], _CHUNK):
        out[s:s + _CHUNK] -= rows[:, s:s + _CHUNK].double().T @ c
    return out.to(flat.dtype)


def orthogonalize(vector_dir: str | os.PathLike, model_dir: str | os.PathLike, data: str | os.PathLike,
                  domain: Optional[str] = None, others: Optional[Sequence[str]] = None, queries: int = 32,
                  split: str = "train", ridge: float = 1e-4, keep_own_effect: bool = True,
                  transfer: bool = False) -> AlignmentVector:
    """The domain-specific version of the vector in ``vector_dir`` (see the module doc)."""
    from meav_merge.evaluation.sweep import ReweightableModel

    vec = AlignmentVector.load(vector_dir)
    domain = domain or vec.meta.get("domain")
    if domain not in DOMAIN_LEVELS or DOMAIN_LEVELS[domain] != PROFICIENCY_LEVELS:
        raise VectorError(f"{vector_dir}: orthogonalizing needs a proficiency domain (got {domain!r}); pass --domain")
    others = [d for d in (others or [d for d, lv in DOMAIN_LEVELS.items() if lv == PROFICIENCY_LEVELS]) if d != domain]
    rm = ReweightableModel(model_dir, [vec], transfer=transfer)
    if rm.scorer is None:
        raise VectorError(f"{vector_dir}: orthogonalizing needs a vector that changes only the top layers "
                          "of a supported model (the CPU preset's)")
    names = list(rm.changing)
    params = {rm.scorer.local_name(n): rm._base[n].float().clone().requires_grad_(True) for n in names}
    flat = torch.cat([vec[n].float().reshape(-1) for n in names])

    def picked(d: str) -> List[PreparedQuery]:
        return prepare(rm.tokenizer, load_records(data, d, split)[:queries])

    rows = torch.cat([margin_gradients(rm, params, picked(d), desc=f"∇ {d}") for d in others])
    own = margin_gradients(rm, params, picked(domain), desc=f"∇ {domain}")
    own_mean = torch.stack([own[j::2].float().mean(0) for j in range(2)]).double()  # [2, P]: mean E−A, G−A
    del own
    before = {"own": (own_mean @ flat.double()).tolist(), "others": _times(rows, flat).abs().mean().item()}
    new = project_out(flat, rows, ridge)
    after = {"own": (own_mean @ new.double()).tolist(), "others": _times(rows, new).abs().mean().item()}
    scale = before["own"][0] / after["own"][0] if keep_own_effect and after["own"][0] else 1.0
    new = new * scale
    logger.info("%s: first-order margin change per unit λ — own (E−A, G−A) %s -> %s; others |mean| %.4g -> %.4g; "
                "rescaled by %.3g; norm %.4g -> %.4g", domain, [round(x, 4) for x in before["own"]],
                [round(x * scale, 4) for x in after["own"]], before["others"], after["others"] * abs(scale),
                scale, flat.norm().item(), new.norm().item())
    tensors = {n: vec[n].clone() for n in vec.keys()}
    at = 0
    for n in names:  # ``flat``'s order
        t = tensors[n]
        tensors[n] = new[at: at + t.numel()].view_as(t).to(t.dtype)
        at += t.numel()
    meta = dict(vec.meta)
    meta.pop("calibration", None)  # the λ of each level changes: calibrate again
    meta["orthogonalized"] = {
        "against": others, "split": split, "queries_per_domain": queries, "constraints": len(rows),
        "ridge": ridge, "rescaled_by": scale, "source": str(vector_dir),
        "own_margin_change_per_lambda": {"before": before["own"], "after": [x * scale for x in after["own"]]},
        "other_margin_change_per_lambda": {"before": before["others"], "after": after["others"] * abs(scale)},
    }
    return AlignmentVector(tensors, meta)


def add_vector_cli(vector_sub) -> None:
    """``meav vector orthogonalize``."""
    from meav_merge.cli.options import add_data, add_model, add_output
    from meav_merge.coefficients import number_arg

    def _cmd(args) -> None:
        from meav_merge.io.checkpoint import check_output_dir

        check_output_dir(args.out, args.force)
        others = [d.strip() for d in args.against.split(",")] if args.against else None
        vec = orthogonalize(args.vector, args.model, args.data, domain=args.domain, others=others,
                            queries=args.queries, ridge=args.ridge, transfer=args.transfer)
        vec.save(args.out, args.vector, force=args.force)
        o = vec.meta["orthogonalized"]
        print(f"other domains' first-order margin change per unit λ: {o['other_margin_change_per_lambda']['before']:.4g}"
              f" -> {o['other_margin_change_per_lambda']['after']:.4g} ({o['constraints']} constraints)")
        print(f"wrote {args.out} (calibrate it again: meav calibrate {args.out})")

    p = vector_sub.add_parser("orthogonalize", help="remove a vector's first-order effect on the other domains")
    p.add_argument("vector", help="alignment-vector directory (top-layer vector, e.g. from the CPU preset)")
    add_model(p, "target model the vector was measured on")
    add_data(p)
    add_output(p, "output vector directory")
    p.add_argument("--domain", help="the vector's domain (default: from its metadata)")
    p.add_argument("--against", help="comma-separated domains to hold (default: the other proficiency domains)")
    p.add_argument("--queries", type=number_arg("--queries", integer=True, positive=True), default=32,
                   help="train queries per domain whose margins are held (default: %(default)s)")
    p.add_argument("--ridge", type=number_arg("--ridge", minimum=0), default=1e-4,
                   help="ridge of the projection, relative to the mean squared gradient norm (default: %(default)s)")
    p.add_argument("--transfer", action="store_true", help="allow a vector measured from another model")
    p.set_defaults(func=_cmd)

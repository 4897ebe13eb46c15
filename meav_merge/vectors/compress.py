"""Low-rank alignment vectors (``meav compress``) and their export as a PEFT LoRA adapter.

Each changed matrix Δ is factored by truncated SVD, Δ ≈ B A with B = U_r diag(S_r)
[out, r] and A = V_rᵀ [r, in]. The rank is fixed (``rank``) or the smallest that keeps
a fraction ``energy`` of Σ S² per matrix. A matrix whose factors would not be smaller
than itself, and every 1-D tensor (norms, biases), stays dense. The factors go to
``lowrank.safetensors`` in the vector directory, beside the dense ``model.safetensors``,
so ``AlignmentVector``, the ``meav`` merge method and ``meav serve`` read the result as
any other vector (B @ A when a dense tensor is needed).

The PEFT export writes B and A as ``lora_B``/``lora_A`` with ``lora_alpha = r`` (scale 1),
so ``PeftModel.from_pretrained(base, adapter)`` computes W x + λ B A x. 1-D tensors of
norm layers go into ``modules_to_save`` as base + λ·Δ (vLLM serves LoRA weights only:
``lora_only`` leaves them out and reports the share of ‖v‖ dropped).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from meav_merge.coefficients import is_finite_number
from meav_merge.io.checkpoint import atomic_output_dir, copy_model_files, write_safetensors
from meav_merge.vectors.alignment_vector import LOWRANK_NAME, META_NAME, AlignmentVector, VectorError

logger = logging.getLogger(__name__)


def _check_settings(rank: Optional[int], energy: Optional[float]) -> None:
    if (rank is None) == (energy is None):
        raise VectorError("compress: give exactly one of rank and energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise VectorError(f"compress: rank must be a positive integer, got {rank!r}")
    if energy is not None:
        if not is_finite_number(energy) or not 0 < energy <= 1:
            raise VectorError(f"compress: energy must be a number in (0, 1], got {energy!r}")


def factor(delta: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None
           ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, r], A [r, in], kept energy) of a truncated SVD of a 2-D tensor."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    sq = s.double().pow(2)
    total = float(sq.sum())
    if rank is not None:
        r = min(rank, s.numel())
    else:
        cum = torch.cumsum(sq, 0) / total if total > 0 else torch.ones_like(sq)
        r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
        r = min(max(r, 1), s.numel())
    kept = float(sq[:r].sum()) / total if total > 0 else 1.0
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous(), kept


def compress_vector(vector: str | os.PathLike, out: str | os.PathLike, *, rank: Optional[int] = None,
                    energy: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                    force: bool = False) -> AlignmentVector:
    """Write a low-rank copy of the vector at ``vector`` into ``out``."""
    _check_settings(rank, energy)
    vec = AlignmentVector.load(vector)
    dense: Dict[str, torch.Tensor] = {}
    lowrank: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    kept_sq = total_sq = 0.0
    for name in vec.keys():
        d = vec.read(name)
        store = dtype or d.dtype
        total_sq += float(d.double().pow(2).sum())
        if d.dim() != 2:
            dense[name] = d.to(store)
            kept_sq += float(d.double().pow(2).sum())
            continue
        b, a, kept = factor(d, rank, energy)
        r = a.shape[0]
        if r * (d.shape[0] + d.shape[1]) >= d.numel():  # factors would not be smaller
            dense[name] = d.to(store)
            kept_sq += float(d.double().pow(2).sum())
            continue
        lowrank[f"{name}.B"], lowrank[f"{name}.A"] = b.to(store), a.to(store)
        ranks[name] = r
        kept_sq += kept * float(d.double().pow(2).sum())
    meta = dict(vec.meta)
    meta.update(storage="lowrank", format_version=2, source_vector=str(vector),
                lowrank={"rank": rank, "energy": energy, "ranks": ranks,
                         "kept_energy": kept_sq / total_sq if total_sq > 0 else 1.0},
                tensors={n: list(vec.shape(n)) for n in vec.keys()})
    with atomic_output_dir(out, force=force) as tmp:
        write_safetensors(dense.items(), tmp)
        save_file(lowrank, str(tmp / LOWRANK_NAME), metadata={"format": "pt"})
        copy_model_files(vec.path, tmp, ["config.json"])
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    logger.info("compressed %s: %d factored, %d dense, kept energy %.4f", vector, len(ranks), len(dense),
                meta["lowrank"]["kept_energy"])
    return AlignmentVector.load(out)


def vector_bytes(path: str | os.PathLike) -> int:
    """Bytes of the tensor files in a vector or model directory."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


# --- command line ------------------------------------------------------------------------
def _cmd_compress(args) -> None:
    from meav_merge.vectors.peft_export import adapter_bytes, export_peft

    dtypes = {"same": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    vec = compress_vector(args.vector, args.out, rank=args.rank, energy=args.energy, dtype=dtypes[args.dtype],
                          force=args.force)
    lr = vec.meta["lowrank"]
    ranks = sorted(lr["ranks"].values())
    before, after = vector_bytes(args.vector), vector_bytes(args.out)
    print(f"compressed vector written to {args.out}: {len(ranks)} factored matrices "
          f"(rank {ranks[0] if ranks else '-'}..{ranks[-1] if ranks else '-'}), kept energy "
          f"{lr['kept_energy']:.4f}, {after / 1e6:.2f} MB vs {before / 1e6:.2f} MB ({after / max(before, 1):.1%})")
    if args.peft:
        rep = export_peft(args.out, args.base, args.peft, scale=args.scale, lora_only=args.lora_only,
                          force=args.force)
        print(f"PEFT LoRA adapter written to {args.peft}: {rep['lora_modules']} LoRA modules, "
              f"{rep['modules_to_save']} norm modules saved whole, {adapter_bytes(args.peft) / 1e6:.2f} MB"
              + (f", dropped {rep['dropped_norm_share']:.2%} of ‖v‖ (1-D tensors)" if args.lora_only else ""))


def add_cli(subparsers) -> None:
    from meav_merge.cli.options import add_model

    p = subparsers.add_parser("compress", help="low-rank (truncated SVD) copy of a vector; optional PEFT LoRA export")
    p.add_argument("vector", help="alignment-vector directory")
    p.add_argument("--out", required=True, help="output vector directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank of every factored matrix")
    how.add_argument("--energy", type=float, help="per matrix, the smallest rank keeping this share of Σ S² (0-1]")
    p.add_argument("--dtype", default="same", choices=["same", "float32", "bfloat16", "float16"],
                   help="dtype of the stored factors (default: the vector's)")
    p.add_argument("--peft", metavar="DIR", help="also export the compressed vector as a PEFT LoRA adapter here")
    add_model(p, "model the adapter is for", flag="--base")
    p.add_argument("--scale", type=float, default=1.0, help="λ baked into the adapter (default: %(default)s)")
    p.add_argument("--lora-only", action="store_true",
                   help="leave 1-D tensors (norms) out of the adapter, for servers that load LoRA weights only (vLLM)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=_cmd_compress)

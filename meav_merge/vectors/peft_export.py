"""Export a compressed (low-rank) alignment vector as a PEFT LoRA adapter.

Factored matrices become ``lora_B``/``lora_A`` with ``lora_alpha = r`` so PEFT's scale
alpha/r is 1 and the adapter computes W x + λ B A x exactly as the vector does. Norm
weights (1-D) cannot be LoRA weights; PEFT keeps them in ``modules_to_save`` as base +
λ·Δ. vLLM's LoRA support loads LoRA weights only, so ``lora_only`` leaves those out
and reports the share of ‖λ v‖ dropped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, List

import torch

from meav_merge.coefficients import is_finite_number
from meav_merge.io.checkpoint import atomic_output_dir, copy_model_files
from meav_merge.vectors.alignment_vector import AlignmentVector, VectorError

logger = logging.getLogger(__name__)


def _plan(vec: AlignmentVector, modules: Dict[str, torch.nn.Module], lora_only: bool):
    """(LoRA module names, modules_to_save names, dropped squared norm) for ``vec``."""
    lora: List[str] = []
    save: List[str] = []
    dropped = 0.0
    for name in vec.keys():
        mod_name, _, pname = name.rpartition(".")
        mod = modules.get(mod_name)
        if vec.factors(name) is not None:
            if pname != "weight" or not isinstance(mod, torch.nn.Linear):
                raise VectorError(f"{name}: only nn.Linear weights can be exported as LoRA factors "
                                  f"(this is a {type(mod).__name__})")
            lora.append(mod_name)
        elif len(vec.shape(name)) == 1 and pname == "weight" and mod is not None \
                and [n for n, _ in mod.named_parameters()] == ["weight"]:
            if lora_only:
                dropped += float(vec.read(name).double().pow(2).sum())
            else:
                save.append(mod_name)
        else:
            raise VectorError(f"{name}: dense tensor of shape {tuple(vec.shape(name))} cannot be a LoRA weight; "
                              "compress the vector first (meav compress) or export without it")
    if not lora:
        raise VectorError(f"{vec.path}: no low-rank factors (run `meav compress` first)")
    return lora, save, dropped


def export_peft(vector: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                scale: float = 1.0, lora_only: bool = False, force: bool = False) -> dict:
    """Write a PEFT adapter for ``base`` equal to ``scale`` × the compressed vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not is_finite_number(scale):
        raise VectorError(f"export: scale must be a finite number, got {scale!r}")
    vec = AlignmentVector.load(vector)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora, save, dropped = _plan(vec, dict(model.named_modules()), lora_only)
    ranks = {m: vec.factors(m + ".weight")[1].shape[0] for m in lora}
    r = max(ranks.values())
    # Full module names (PEFT matches them as regexes: escape the dots).
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=lora, bias="none",
                        rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
                        modules_to_save=save or None, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    inner = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for m in lora:
            b, a = vec.factors(m + ".weight")
            inner[m].lora_A["default"].weight.copy_(a.to(torch.float32))
            inner[m].lora_B["default"].weight.copy_(b.to(torch.float32) * float(scale))
        for m in save:
            target = inner[m].modules_to_save["default"].weight
            target.add_(vec.read(m + ".weight").to(torch.float32), alpha=float(scale))
    total = float(vec.norm()) ** 2
    report = {"lora_modules": len(lora), "modules_to_save": len(save), "max_rank": r,
              "dropped_norm_share": math.sqrt(dropped / total) if total > 0 else 0.0, "scale": float(scale)}
    with atomic_output_dir(out, force=force) as tmp:
        peft_model.save_pretrained(str(tmp))
        copy_model_files(base, tmp, ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    logger.info("exported %s as a PEFT adapter: %s", vector, report)
    return report


def adapter_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("adapter_model.*"))

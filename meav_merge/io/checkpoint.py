"""Reading and writing Hugging Face checkpoints as safetensors, safely.

Only safetensors are ever read (never pickle). Outputs are written into a temporary
sibling directory and renamed into place at the end, so a crash or a bad input never
leaves a half-written output, and an existing output is kept unless ``force``. ``force``
never replaces a directory that holds an input or the current directory. SIGTERM
removes the temporary directory as SIGINT does; one left by a killed process (SIGKILL)
is named after its process id and removed by the next run into the same output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the path."""


PICKLE_ADVICE = ("pickle files can run code when loaded, so only safetensors are read; convert a model you trust "
                 "with: python -c \"from transformers import AutoModelForCausalLM as M; "
                 "M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors')\"")


def pickle_files(path: str | os.PathLike) -> list[str]:
    """Names of pickle weight files in a model directory that has no safetensors."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return []
    return sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))


class Checkpoint:
    """Lazy, read-only view of the safetensors weights in a model directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: " + ("not a directory" if self.path.exists() else "no such directory"))
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: self.path / fn for name, fn in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        elif (self.path / SINGLE_NAME).is_file():
            self._files = None  # filled from the header below
        else:
            pickles = pickle_files(self.path)
            hint = f" (found {', '.join(pickles)}: {PICKLE_ADVICE.format(dir=self.path)})" if pickles else ""
            raise CheckpointError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._handles: Dict[Path, object] = {}
        if self._files is None:
            single = self.path / SINGLE_NAME
            self._files = {name: single for name in self._open(single).keys()}

    def verify(self) -> None:
        """Every tensor the index lists is in the file it names (headers only, no tensor data)."""
        for file in sorted(set(self._files.values())):
            if not file.is_file():
                raise CheckpointError(f"{self.path}: {INDEX_NAME} names {file.name}, which does not exist")
        present = {file: set(self._open(file).keys()) for file in set(self._files.values())}
        for name, file in self._files.items():
            if name not in present[file]:
                raise CheckpointError(f"{self.path}: {INDEX_NAME} lists tensor {name} but {file.name} lacks it")

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
    Kept per process while the weight files' sizes and modification times stay the same
    (a meav merge asks for its base's three times: the recipe check, the vectors, the card).
    """
    files = sorted(Path(path).glob("*.safetensors"))
    return _fingerprint(str(Path(path).resolve()), tuple((f.name, *_stat(f)) for f in files))


def _stat(file: Path) -> Tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _fingerprint(path: str, files: tuple) -> str:
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


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9]*)-")
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_stale(out: Path) -> None:
    """Temp dirs of earlier runs into ``out`` whose process is gone (SIGKILL, power loss)."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    for d in out.parent.iterdir():
        if not d.name.startswith(prefixes) or not d.is_dir() or d.is_symlink():
            continue
        m = _TMP_RE.match(d.name)
        if m and m["name"] == out.name:
            if m["host"] == _HOST and not _owner_alive(int(m["pid"])):
                shutil.rmtree(d, ignore_errors=True)
                log.warning("removed %s, left by an interrupted run (process %s)", d, m["pid"])
        else:
            log.warning("%s looks left by an interrupted run; remove it if nothing is writing %s", d, out)


def check_output_dir(out: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output that cannot be written safely, before any work is done.

    An existing ``out`` needs ``force``; even then it may not be the current directory
    (or hold it), nor hold any of ``inputs``: replacing it would delete them.
    """
    if not str(out).strip():
        raise ValueError("output path is empty")
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"{out}: is the current directory or holds it; --force will not replace it")
    for inp in inputs:
        if not str(inp).strip():
            continue
        p = Path(inp).resolve()
        if p == real or real in p.parents:
            raise ValueError(f"{out}: holds the input {inp}; --force will not replace it (choose another output)")
    return out


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM unwinds like SIGINT, so the ``except`` below removes the temp dir."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    received = []

    def terminate(signum, frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except BaseException as e:
        # raised inside a C extension's callback (torch building a tensor from a sequence), our
        # SystemExit comes back as that extension's own error ("could not determine the shape ..."):
        # exit as terminated, not as a failed merge
        if received and not isinstance(e, SystemExit):
            raise SystemExit(128 + received[0]) from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:  # swallowed altogether: still do not publish a run that was told to stop
        raise SystemExit(128 + received[0])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """mkdtemp makes 0700; give the output the modes any other file here gets (0755/0644 under umask 022)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            fp = os.path.join(dirpath, f)
            if not os.path.islink(fp):
                os.chmod(fp, (0o777 if os.stat(fp).st_mode & 0o100 else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only on success."""
    out = check_output_dir(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    # pid and host in the name: a later run can tell a dead run's leftovers from a live one's
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-{_HOST}-", dir=out.parent))
    try:
        with _sigterm_cleans_up():
            yield tmp
        _publish_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-{_HOST}-", dir=out.parent))
        os.replace(out, old / "x")
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

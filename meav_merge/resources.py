"""Where the files the project ships live, in a checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    # A wheel carries them under meav_merge/_shipped/; a checkout (and an editable
    # install) has them at the repository root.
    for candidate in (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"meav_merge: shipped folder {name!r} not found next to {_PACKAGE}")


def data_dir() -> Path:
    return _shipped("data")


def eval_tasks_dir() -> Path:
    return _shipped("eval_tasks")


DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")

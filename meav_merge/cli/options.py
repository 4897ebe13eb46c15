"""Flags every ``meav`` command shares, declared once (as mergekit's ``options.py`` does).

One syntax everywhere: a vector is ``--vector NAME=DIR`` (repeat the flag or comma-separate),
a per-vector number is ``--lambda NAME=VALUE``, ``--data`` defaults to the shipped data
folder and ``--model`` to the embedded base model.

argparse is kept rather than typer/click or transformers' ``HfArgumentParser``: it is the
standard library, every subcommand (and every feature that registers one with ``add_cli``)
already builds on it, and ``HfArgumentParser`` makes a whole parser, not a subcommand.
``add_config_args`` is the part of ``HfArgumentParser``/``TrlParser`` this project needs: a
config dataclass's fields become flags, with help text from the fields' metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from meav_merge.coefficients import number_arg, parse_number
from meav_merge.resources import DEFAULT_MODEL_DIR, data_dir

VECTOR_HELP = "NAME=DIR, e.g. medical=runs/medical/vector; repeat the flag or comma-separate"


def parse_named(specs: Optional[Sequence[str]], key: str) -> Dict[str, str]:
    """``["a=1,b=2", "c=3"]`` -> ``{"a": "1", "b": "2", "c": "3"}``; a name given twice is an error."""
    from meav_merge.cli.search import parse_named as _parse  # the one k=v parser (meav search's)

    out: Dict[str, str] = {}
    for spec in specs or ():
        for name, value in _parse([spec], key.lstrip("-")).items():
            if name in out:
                raise ValueError(f"{key}: {name!r} given twice")
            out[name] = value
    return out


def named_vectors(specs: Optional[Sequence[str]]) -> Dict[str, str]:
    """``--vector NAME=DIR`` values as {name: directory}."""
    return parse_named(specs, "--vector")


def one_vector(specs: Optional[Sequence[str]]) -> Tuple[str, str]:
    """``--vector NAME=DIR`` where exactly one vector is meant: (name, directory)."""
    vectors = named_vectors(specs)
    if len(vectors) != 1:
        raise ValueError(f"--vector: give exactly one NAME=DIR, not {len(vectors)}")
    return next(iter(vectors.items()))


def named_numbers(specs: Optional[Sequence[str]], key: str, names: Iterable[str]) -> Dict[str, float]:
    """``--lambda NAME=VALUE`` for exactly the given vector names, each a finite number."""
    values = {k: parse_number(v, f"{key} {k}") for k, v in parse_named(specs, key).items()}
    names = list(names)
    if set(values) != set(names):
        raise ValueError(f"{key}: give one NAME=VALUE per --vector (vectors: {', '.join(names) or 'none'}; "
                         f"got: {', '.join(values) or 'none'})")
    return {n: values[n] for n in names}


def named_number_arg(key: str):
    """An argparse ``type=`` that checks ``NAME=VALUE[,NAME=VALUE...]`` while the command line is
    read (a NaN is 'argument --lambda: ...' before any model loads); the text is kept as given."""

    def check(text: str) -> str:
        try:
            for name, value in parse_named([text], key).items():
                parse_number(value, f"{key} {name}")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(key + ": ").removeprefix(key + " ")) from None
        return text

    check.__name__ = "NAME=VALUE"
    return check


def _local_dir(path: Path) -> bool:
    return path.is_dir()


def model_dir_arg(flag: str):
    """An argparse ``type=`` for a local model directory, checked while the command line is read.

    transformers takes any path that is not a directory for a Hub repo id, so a typo used to
    end minutes later in "couldn't connect to huggingface.co"; this names the path and the
    folder a relative one was resolved against, before anything loads."""

    def check(text: str) -> str:
        path = Path(text)
        if _local_dir(path):
            return text
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        hint = "; `meav base` materializes it" if path == DEFAULT_MODEL_DIR else ""
        raise argparse.ArgumentTypeError(f"{text}: {'not a directory' if path.exists() else 'no such directory'}"
                                          f"{where}{hint}")

    check.__name__ = "DIR"
    return check


def add_model(p: argparse.ArgumentParser, help: str = "target model directory", flag: str = "--model") -> None:
    p.add_argument(flag, default=str(DEFAULT_MODEL_DIR), type=model_dir_arg(flag), help=f"{help} (default: %(default)s)")


def add_data(p: argparse.ArgumentParser, help: str = "data folder or JSONL file") -> None:
    p.add_argument("--data", default=str(data_dir()), help=f"{help} (default: the shipped data, %(default)s)")


def add_vectors(p: argparse.ArgumentParser, required: bool = True, help: str = VECTOR_HELP) -> None:
    p.add_argument("--vector", action="append", required=required, default=None if required else [],
                   metavar="NAME=DIR", help=help)


def add_output(p: argparse.ArgumentParser, what: str = "output directory", required: bool = True) -> None:
    p.add_argument("--out", required=required, help=what)
    p.add_argument("--force", action="store_true", help="replace an existing --out")


# --- config dataclasses as flags ---------------------------------------------------------------
def _unwrap_optional(tp):
    """``Optional[X]`` -> ``X`` (a flag left out keeps the field's default)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _tuple_parser(flag: str, item_type):
    def parse(text: str):
        try:
            return tuple(parse_number(x, flag, integer=item_type is int) if item_type in (int, float) else x.strip()
                         for x in text.split(","))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(flag + ": ")) from None

    parse.__name__ = "list"
    return parse


def _kwargs_for(f: dataclasses.Field, tp, flag: str, default: Any) -> dict:
    meta = f.metadata
    kw: dict = {"dest": f.name, "default": default}
    base = _unwrap_optional(tp)
    if "type" in meta:  # a field whose flag text is not its Python type (e.g. "4" or "all")
        kw["type"], kw["metavar"] = meta["type"], meta.get("metavar")
        return kw
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        return kw
    if base in (int, float):
        kw["type"] = number_arg(flag, integer=base is int, minimum=meta.get("minimum"),
                                positive=meta.get("positive", False))
        kw["metavar"] = "N" if base is int else "X"
    elif typing.get_origin(base) is tuple or base is tuple:
        items = typing.get_args(base)
        kw["type"] = meta.get("parse") or _tuple_parser(flag, items[0] if items else float)
        kw["metavar"] = "A,B,..."
    elif base is Path:
        kw["type"] = Path
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    return kw


def add_config_args(p: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (), defaults: Optional[dict] = None):
    """One flag per field of the dataclass ``cls`` (``--field-name``, or ``metadata["flags"]``).

    Help comes from ``metadata["help"]``; ints and floats go through ``number_arg`` (finite,
    ``metadata["minimum"]``/``["positive"]``), bools become switches, tuples comma lists.
    ``defaults`` overrides a field's default for this command only.
    """
    hints = typing.get_type_hints(cls)
    skip, defaults = set(skip), defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flags = list(f.metadata.get("flags", ())) or ["--" + f.name.replace("_", "-")]
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kw = _kwargs_for(f, hints[f.name], flags[0], default)
        text = f.metadata.get("help", f.name.replace("_", " "))
        if kw.get("action") != "store_true" and default is not None and "default:" not in text:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else "%(default)s"
            text += f" (default: {shown})"
        p.add_argument(*flags, help=text, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` built from the flags ``add_config_args`` added (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**values, **overrides})

"""The one place user-given numbers and switches are checked.

Every coefficient the tool accepts (a recipe's ``lambda``, ``meav sweep --lambdas``,
``meav awot --alpha/--steps/--penalty``, search ranges, lm-eval task options) goes
through these functions, so each is a finite number of the right type or the
command stops with one line naming the key. Python's ``float()`` accepts "nan",
"inf" and "1e999", and YAML reads ``.nan``, ``true`` and ``"0.5"`` as float, bool
and str; none of those is a coefficient.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, List, Optional

MAX_POINTS = 10_000  # a start:stop:step range longer than this is a typo, not a sweep


class CoefficientError(ValueError):
    """A number or switch that is not usable; the message starts with the key."""


def _bounds(x: float, key: str, minimum: Optional[float], positive: bool) -> None:
    if positive and not x > 0:
        raise CoefficientError(f"{key}: must be greater than 0, not {x:g}")
    if minimum is not None and x < minimum:
        raise CoefficientError(f"{key}: must be at least {minimum:g}, not {x:g}")


def _finite(x: float | int) -> bool:
    # an int past float's range (a 400-digit `lambda:` in YAML) makes math.isfinite raise
    # OverflowError; as a coefficient it is as unusable as inf
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def is_finite_number(value: Any) -> bool:
    """A real int or float and finite: YAML's ``true`` and ``"0.5"`` and JSON's ``NaN`` are not.

    For callers that raise their own error type (HTTP settings, vector tools); the rest
    use ``check_number``, which also names the key and checks bounds."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and _finite(value)


def check_number(value: Any, key: str, *, integer: bool = False, minimum: Optional[float] = None,
                 positive: bool = False) -> float | int:
    """An already-parsed value (YAML/JSON): a real int or float, finite, within bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise CoefficientError(f"{key}: must be {'an integer' if integer else 'a number'}, not {what}")
    if integer and not isinstance(value, int):
        if not (_finite(value) and float(value).is_integer()):
            raise CoefficientError(f"{key}: must be an integer, not {value!r}")
        value = int(value)
    if not integer and not _finite(value):
        raise CoefficientError(f"{key}: must be a finite number, not {value!r}")
    _bounds(value, key, minimum, positive)
    return value


def parse_number(text: str, key: str, *, integer: bool = False, minimum: Optional[float] = None,
                 positive: bool = False) -> float | int:
    """A number typed on a command line."""
    s = str(text).strip()
    try:
        value = int(s, 10) if integer else float(s)
    except ValueError:
        kind = "an integer" if integer else "a finite number"
        raise CoefficientError(f"{key}: must be {kind}, not {text!r}") from None
    if not integer and not math.isfinite(value):
        raise CoefficientError(f"{key}: must be a finite number, not {text!r}")
    _bounds(value, key, minimum, positive)
    return value


def _without_key(message: str, key: str) -> str:
    """argparse puts 'argument KEY: ' in front itself."""
    for prefix in (key + ": ", key + " "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def number_arg(key: str, *, integer: bool = False, minimum: Optional[float] = None,
               positive: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type=``: argparse prints 'argument KEY: ...' on one line and exits 2."""

    def parse(text: str):
        try:
            return parse_number(text, key, integer=integer, minimum=minimum, positive=positive)
        except CoefficientError as e:
            raise argparse.ArgumentTypeError(_without_key(str(e), key)) from None

    parse.__name__ = "integer" if integer else "number"
    return parse


def parse_lambdas(spec: str, key: str = "--lambdas") -> List[float]:
    """'start:stop:step' (inclusive) or a comma list; every value finite, at most MAX_POINTS."""
    s = str(spec).strip()
    if not s:
        raise CoefficientError(f"{key}: empty (use start:stop:step or a comma list)")
    if ":" in s:
        parts = s.split(":")
        if len(parts) != 3:
            raise CoefficientError(f"{key}: {spec!r} is not start:stop:step")
        start, stop, step = (parse_number(p, f"{key} {name}") for p, name in zip(parts, ("start", "stop", "step")))
        if step <= 0:
            raise CoefficientError(f"{key}: step must be greater than 0, not {step:g}")
        if stop < start:
            raise CoefficientError(f"{key}: stop {stop:g} is below start {start:g}")
        n = (stop - start) / step
        if not math.isfinite(n) or n + 1 > MAX_POINTS:
            raise CoefficientError(f"{key}: {spec!r} has more than {MAX_POINTS} points")
        values = [round(start + i * step, 10) for i in range(int(round(n)) + 1)]
    else:
        items = s.split(",")
        if any(not x.strip() for x in items):
            raise CoefficientError(f"{key}: empty item in {spec!r}")
        if len(items) > MAX_POINTS:
            raise CoefficientError(f"{key}: more than {MAX_POINTS} values")
        values = [parse_number(x, key) for x in items]
    if not all(math.isfinite(v) for v in values):  # start + i·step can overflow near the float limit
        raise CoefficientError(f"{key}: {spec!r} reaches a non-finite value")
    return values


def lambdas_arg(key: str = "--lambdas") -> Callable[[str], List[float]]:
    """An argparse ``type=`` for a λ list or range, checked when the command line is read."""

    def parse(text: str) -> List[float]:
        try:
            return parse_lambdas(text, key)
        except CoefficientError as e:
            raise argparse.ArgumentTypeError(_without_key(str(e), key)) from None

    parse.__name__ = "lambdas"
    return parse


def check_bool(value: Any, key: str) -> bool:
    """A real YAML/JSON boolean: ``"false"`` is a non-empty string, which Python calls true."""
    if not isinstance(value, bool):
        what = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise CoefficientError(f"{key}: must be true or false (unquoted), not {what}")
    return value


def check_string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise CoefficientError(f"{key}: must be a string (a path), not {value!r}")
    return value


def check_config_fields(config: Any) -> None:
    """Every field of a ``*Config`` dataclass checked as its flag would be: one of the
    ``choices`` in its metadata; an int/float also for type, finiteness and the
    ``minimum``/``positive`` in its metadata. So the Python API refuses what the CLI refuses."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise CoefficientError(f"{f.name}: one of {', '.join(map(str, choices))}, got {value!r}")
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        if value is None or not kinds & {int, float}:
            continue
        check_number(value, f.name, integer=float not in kinds, minimum=f.metadata.get("minimum"),
                     positive=f.metadata.get("positive", False))

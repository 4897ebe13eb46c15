"""Coefficient settings for ``meav serve``: which λ each vector gets in one request.

A setting comes from the request's ``model`` (``base``, a preset registered with
``--recipe name=yaml``, or ``base+medical=-1,legal=0.6``) and its optional ``meav``
body field ({"medical": -1.0}), whose entries override the model's. Settings are
canonical tuples of (vector, λ) with zeros dropped, so equal settings compare equal
and the scheduler can group requests by them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import yaml

from meav_merge.coefficients import is_finite_number

Setting = Tuple[Tuple[str, float], ...]
BASE_NAMES = ("base",)


class SettingError(ValueError):
    """A bad request setting; ``field`` names the request field (OpenAI's ``param``)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


def canonical(coefficients: Mapping[str, float]) -> Setting:
    return tuple(sorted((k, float(v)) for k, v in coefficients.items() if v != 0))


def check_coefficient(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(field, f"{field}: coefficient must be a number, got {value!r}")
    if not is_finite_number(value):
        raise SettingError(field, f"{field}: coefficient must be finite, got {value!r}")
    return float(value)


class Registry:
    """Vector names and presets known to the server, and request -> setting resolution."""

    def __init__(self, vectors: Mapping[str, str], presets: Optional[Mapping[str, Setting]] = None,
                 served_name: str = "base"):
        self.vectors = dict(vectors)  # name -> directory
        self.presets: Dict[str, Setting] = dict(presets or {})
        self.served_name = served_name

    def _check_vector(self, name: str, field: str) -> None:
        if name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none"
            raise SettingError(field, f"{field}: unknown vector {name!r} (served vectors: {known})")

    def parse_model(self, model) -> Dict[str, float]:
        if not isinstance(model, str) or not model.strip():
            raise SettingError("model", f"model: must be a non-empty string, got {model!r}")
        model = model.strip()
        if model in BASE_NAMES or model == self.served_name:
            return {}
        if model in self.presets:
            return dict(self.presets[model])
        head, plus, spec = model.partition("+")
        if not plus or (head not in BASE_NAMES and head != self.served_name):
            known = ", ".join(["base", *sorted(self.presets)])
            raise SettingError("model", f"model: unknown model or preset {model!r} (known: {known}; or "
                                        "base+VECTOR=λ,...)", status=404)
        out: Dict[str, float] = {}
        for item in spec.split(","):
            name, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not name:
                raise SettingError("model", f"model: {item!r} is not VECTOR=λ")
            self._check_vector(name, "model")
            try:
                lam = float(value)
            except ValueError:
                raise SettingError("model", f"model: coefficient of {name} must be a number, got {value!r}") from None
            out[name] = check_coefficient(lam, "model")
        return out

    def resolve(self, model, meav=None) -> Setting:
        coefficients = self.parse_model(model)
        if meav is not None:
            if not isinstance(meav, dict):
                raise SettingError("meav", f"meav: must be an object of vector: λ, got {meav!r}")
            for name, value in meav.items():
                self._check_vector(name, f"meav.{name}")
                coefficients[name] = check_coefficient(value, f"meav.{name}")
        return canonical(coefficients)


def parse_named(spec: str, what: str) -> Tuple[str, str]:
    name, eq, path = spec.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise ValueError(f"--{what} {spec!r}: expected NAME=PATH")
    if not _servable_name(name.strip()):
        raise ValueError(f"--{what} {spec!r}: name may not be 'base' nor contain + , =")
    return name.strip(), path.strip()


def _servable_name(name: str) -> bool:
    """A name that ``model: base+NAME=λ,...`` can spell."""
    return bool(name) and name not in BASE_NAMES and not any(c in name for c in "+,=")


def _entry_lambda(params: dict, model: str, where: str) -> float:
    """A recipe entry's λ: its ``lambda``, or its ``level`` resolved from the vector's calibration."""
    if "level" in params and "lambda" not in params:
        from meav_merge.vectors.alignment_vector import AlignmentVector
        from meav_merge.vectors.calibration import resolve_level

        return resolve_level(AlignmentVector.load(model).meta, str(params["level"]), where)
    lam = params.get("lambda")
    if not is_finite_number(lam):
        raise ValueError(f"{where}: lambda must be one finite number to serve it, got {lam!r}")
    return float(lam)


def _vector_name(model: str) -> str:
    """The name a recipe's vector is served under: its recorded domain (``vector`` folders of
    different runs share a folder name), else its folder's name."""
    from meav_merge.vectors.alignment_vector import AlignmentVector, is_vector_dir

    domain = AlignmentVector.load(model).meta.get("domain") if is_vector_dir(model) else None
    if isinstance(domain, str) and domain != "joint" and _servable_name(domain):
        return domain
    return Path(model).name


def preset_from_recipe(path: str | os.PathLike, vectors: Dict[str, str],
                       served_model: Optional[str | os.PathLike] = None) -> Setting:
    """The setting of a ``meav`` mergekit recipe; vectors it names that are not served yet
    are added to ``vectors`` under their recorded domain (else their folder's name).

    With ``served_model``, the recipe's ``base_model`` must be that model: the preset would
    otherwise add its λ to another model than the one it was written for (the insurance
    recipe's composed vectors belong on ``runs/composed/centered``, not on the base)."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read recipe ({e})") from None
    if not isinstance(recipe, dict) or recipe.get("merge_method") != "meav":
        raise ValueError(f"{path}: not a meav recipe (merge_method: meav)")
    base = recipe.get("base_model")
    if served_model is not None and isinstance(base, str) and Path(base).resolve() != Path(served_model).resolve():
        raise ValueError(f"{path}: base_model {base} is not the served model {served_model}; "
                         f"serve it with --model {base}")
    by_dir = {str(Path(d).resolve()): n for n, d in vectors.items()}
    out: Dict[str, float] = {}
    for i, entry in enumerate(recipe.get("models") or []):
        model = (entry or {}).get("model")
        if not isinstance(model, str) or model == recipe.get("base_model"):
            continue
        params = entry.get("parameters") or {}
        where = f"{path}: models[{i}] ({model})"
        if params.get("unaligned"):
            raise ValueError(f"{where}: full checkpoints (unaligned:) cannot be served; extract a vector first")
        lam = _entry_lambda(params, model, where)
        name = by_dir.get(str(Path(model).resolve()))
        if name is None:
            name = _vector_name(model)
            if name in vectors:
                raise ValueError(f"{where}: vector name {name!r} is taken by {vectors[name]}; "
                                 "serve this vector with --vector NAME=DIR first")
            vectors[name] = model
            by_dir[str(Path(model).resolve())] = name
        out[name] = out.get(name, 0.0) + float(lam)
    if not out:
        raise ValueError(f"{path}: the recipe names no vector")
    return canonical(out)

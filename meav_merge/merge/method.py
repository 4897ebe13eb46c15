"""The ``meav`` mergekit method: θ_out = θ_target + Σ_i λ_i · v_i.

Recipe::

    merge_method: meav
    base_model: models/smollm2-135m-instruct        # θ_target
    models:
      - model: vectors/medical                      # an alignment-vector directory
        parameters: {lambda: 0.5}
      - model: runs/legal/aligned                   # or a full aligned checkpoint,
        parameters:                                 # measured from the model it was
          lambda: -0.3                              # trained from
          unaligned: models/smollm2-135m-instruct

Parameters (per model entry): ``lambda`` (required, any sign, no normalisation),
``unaligned`` (path; marks the entry as a full checkpoint, v = θ_entry − θ_unaligned),
``transfer`` (true to allow a vector measured from a model other than the target).
Unknown parameter names are errors, unlike mergekit's default of ignoring them.
"""

from __future__ import annotations

import sys

import functools
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from meav_merge.coefficients import CoefficientError, check_bool, check_number, check_string
from meav_merge.io.checkpoint import Checkpoint, CheckpointError, fingerprint
from meav_merge.vectors.alignment_vector import (AlignmentVector, VectorError, all_finite, check_vector_against,
                                                 is_vector_dir)

METHOD_NAME = "meav"
PARAMETERS = ("lambda", "level", "unaligned", "transfer")
RESOLVED_LEVELS: Dict[str, Tuple[str, float]] = {}  # vector path -> (level, λ) resolved by validate_recipe


class RecipeError(ValueError):
    """A ``meav`` recipe that cannot be merged; the message names the key or entry."""


@functools.lru_cache(maxsize=8)
def _reference_weights(path: str):
    """Name -> WeightInfo for the unaligned model, so tied/aliased names resolve the
    same way mergekit resolves them for the aligned entry."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModelArchitecture
    from mergekit.common import ModelReference

    ref = ModelReference.parse(path)
    cfg = ref.config()
    arch = ConfiguredModelArchitecture(info=arch_info_for_config(cfg), config=cfg)
    return ref, {w.name: w for w in arch.all_weights()}


def _load_reference_tensor(path: str, name: str) -> torch.Tensor:
    from mergekit.io.tasks import LoadTensor

    ref, weights = _reference_weights(path)
    info = weights.get(name)
    return LoadTensor(
        model=ref,
        tensor=name,
        aliases=info.aliases if info else None,
        tied_names=info.tied_names if info else None,
    ).execute()


def _entry_path(entry_id: Any) -> str:
    model = getattr(entry_id, "model", None)
    return getattr(model, "path", str(entry_id))


@functools.lru_cache(maxsize=32)
def _vector(path: str) -> AlignmentVector:
    return AlignmentVector.load(path)


def _load_vector_tensor(task) -> Optional[torch.Tensor]:
    """mergekit's LoadTensor for an alignment-vector directory.

    A vector stores only the tensors that changed (and may keep a matrix as low-rank
    factors), so a tensor it lacks is zero: None here, and the entry is left out of
    the kernel's group. Read through ``AlignmentVector`` so factors come back as B @ A.
    """
    from mergekit.common import dtype_from_name

    vec = _vector(task.model.model.path)
    for name in [task.tensor, *(task.aliases or ()), *(task.tied_names or ())]:
        if name in vec:
            x = vec.read(name).to(task.device or "cpu")
            if task.dtype and (dtype := dtype_from_name(task.dtype)) != x.dtype:
                x = x.to(dtype=dtype)
            return x
    return None


def _patch_load_tensor() -> None:
    """Route LoadTensor for vector directories through ``_load_vector_tensor``; every
    other model (the base included, where a missing tensor stays an error) is untouched."""
    from mergekit.io.tasks import LoadTensor

    original = LoadTensor.execute
    if getattr(original, "_meav_wrapped", False):
        return

    def execute(self):
        if self.model.lora is None and is_vector_dir(self.model.model.path):
            return _load_vector_tensor(self)
        return original(self)

    execute._meav_wrapped = True
    LoadTensor.execute = execute


def meav_kernel(group: TensorGroup, /, **params: Any) -> torch.Tensor:
    # Vectors that lack this tensor (sparse storage: unchanged = zero) are not in the group.
    if group.base is None:
        raise VectorError(f"tensor {group.metadata.name} is missing from the base model")
    target = group.base.tensor
    name = group.metadata.name
    wide = any(e.tensor.dtype == torch.float64 for e in group.entries)
    acc_dtype = torch.float64 if wide else torch.float32
    # No copy of the base up front: the first nonzero λ writes the sum into a new tensor (one pass
    # over base and vector instead of a clone pass and an add pass), and a tensor no vector changes
    # is the base's own, which the writer saves without a copy (a CPU-preset vector touches ~10%).
    out = None
    for entry in group.non_base:
        lam = params["lambda"][entry.id]
        if abs(float(lam)) > torch.finfo(acc_dtype).max:  # add_ would raise a bare overflow error
            raise VectorError(f"{_entry_path(entry.id)}: `lambda` {float(lam):g} is too large for {acc_dtype}")
        delta = _delta(entry, name, acc_dtype, params)
        if lam == 0:
            if not all_finite(delta):  # λ = 0 leaves no trace in the sum the check below reads
                raise VectorError(f"{_entry_path(entry.id)}: tensor {name} contains NaN or Inf")
        elif out is None:
            out = torch.add(target.to(acc_dtype), delta, alpha=float(lam))
        else:
            out.add_(delta, alpha=float(lam))
    merged = target if out is None else out.to(target.dtype)
    # One pass over the result instead of one per vector and one for the result: a NaN or Inf in a
    # vector reaches the sum, so only a non-finite result needs to find its cause.
    if not all_finite(merged):
        for entry in group.non_base:
            if not all_finite(_delta(entry, name, acc_dtype, params)):
                raise VectorError(f"{_entry_path(entry.id)}: tensor {name} contains NaN or Inf")
        if not all_finite(target):
            raise VectorError(f"tensor {name} of the base model contains NaN or Inf")
        # a finite but huge λ (1e308) would write inf, exit 0
        raise VectorError(f"tensor {name}: the merged values overflow {str(target.dtype).replace('torch.', '')}; "
                          "`lambda` is too large")
    return merged


def _delta(entry, name: str, acc_dtype, params: dict) -> torch.Tensor:
    """This entry's alignment vector for tensor ``name``: the vector's own tensor, or aligned − unaligned."""
    delta = entry.tensor.to(acc_dtype)
    unaligned = params["unaligned"][entry.id]
    if unaligned:
        delta = delta - _load_reference_tensor(unaligned, name).to(device=delta.device, dtype=acc_dtype)
    return delta


def build_method() -> FunctionalGroupMergeMethod:
    # Built by hand rather than with @merge_method because the paper's knob is named
    # `lambda`, which cannot be a Python argument name.
    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="MEAV (alignment vectors)",
        reference_url="https://github.com/meav-merge/meav_merge",
        parameters=(
            # A default only for mergekit's Python API (merge_state_dicts, whose generic tests call
            # every registered method with no parameters); recipes must state lambda, which
            # validate_recipe enforces for meav merge and plain mergekit-yaml alike.
            ParameterSpec("lambda", float, ParameterScope.NON_BASE, default=1.0,
                          description="signed coefficient of this entry's alignment vector"),
            ParameterSpec("level", str, ParameterScope.NON_BASE, default="",
                          description="a calibrated level (expert, generic, avoidance); the merge resolves it to λ"),
            ParameterSpec("unaligned", str, ParameterScope.NON_BASE, default="",
                          description="unaligned model a full aligned checkpoint is measured from"),
            ParameterSpec("transfer", bool, ParameterScope.NON_BASE, default=False,
                          description="allow a vector measured from a model other than the target"),
        ),
        # No minimum of non-base inputs per tensor: where every vector lacks a tensor
        # (sparse storage), the base passes through. validate_recipe demands at least
        # one vector in the recipe.
        contract=InputContract(base=BasePolicy.REQUIRED),
    )
    return FunctionalGroupMergeMethod(spec, meav_kernel)


def register(merge_methods_module=None) -> None:
    """Add ``meav`` to mergekit's registry (idempotent)."""
    from mergekit.merge_methods import registry

    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(build_method())
    _patch_load_tensor()


if "mergekit.merge_methods.registry" in sys.modules:
    register()  # imported before mergekit.merge_methods finished: the import hook skipped it


# --- recipe validation ----------------------------------------------------------------------
def iter_parameter_blocks(config) -> Iterable[Tuple[str, Optional[str], dict]]:
    """(where, model path or None, parameters) for every parameters: block in a recipe."""
    if config.parameters:
        yield "parameters", None, config.parameters
    for i, m in enumerate(config.models or []):
        yield f"models[{i}] ({m.model.model.path})", m.model.model.path, m.parameters or {}
    slices = [(f"slices[{si}]", s) for si, s in enumerate(config.slices or [])]
    for mname, mod in (config.modules or {}).items():
        if mod.parameters:
            yield f"modules.{mname}.parameters", None, mod.parameters
        for i, m in enumerate(mod.models or []):
            yield f"modules.{mname}.models[{i}] ({m.model.model.path})", m.model.model.path, m.parameters or {}
        slices += [(f"modules.{mname}.slices[{si}]", s) for si, s in enumerate(mod.slices or [])]
    for label, s in slices:
        if s.parameters:
            yield f"{label}.parameters", None, s.parameters
        for j, src in enumerate(s.sources):
            yield f"{label}.sources[{j}] ({src.model.model.path})", src.model.model.path, src.parameters or {}


def setting_leaves(setting) -> Iterable[Any]:
    """Every scalar of a mergekit parameter setting: a value, a gradient list, or
    ``{filter, value}`` conditions (each of which may hold a gradient)."""
    for item in setting if isinstance(setting, list) else [setting]:
        value = getattr(item, "value", item)  # ConditionalParameter
        yield from value if isinstance(value, list) else [value]


def _scalar(value, where: str, key: str):
    if isinstance(value, (str, bool, int, float)):
        return value
    raise RecipeError(f"meav recipe: {where}: `{key}` must be a single value, not {value!r}")


def _check_types(where: str, params: dict) -> None:
    """lambda: finite numbers (gradients and filters allowed); transfer: a real boolean; unaligned: a path."""
    try:
        for key, setting in params.items():
            label = f"meav recipe: {where}: `{key}`"
            if key == "lambda":
                for leaf in setting_leaves(setting):
                    check_number(leaf, label)
            elif key == "transfer":
                check_bool(_scalar(setting, where, key), label)
            elif key in ("unaligned", "level"):
                check_string(_scalar(setting, where, key), label)
    except CoefficientError as e:
        raise RecipeError(str(e)) from None


def _resolve(config, path: str, key: str, entry_params: dict, default=None):
    """Entry value, else the recipe-wide value, as mergekit resolves precedence."""
    for block in (entry_params, config.parameters or {}):
        if key in block:
            return block[key]
    return default


def validate_recipe(config) -> None:
    """Check a parsed ``MergeConfiguration`` before mergekit plans anything."""
    if config.base_model is None:
        raise RecipeError("meav recipe: `base_model` (the target model θ_target) is required")
    target = config.base_model.model.path
    try:
        Checkpoint(target).verify()
    except CheckpointError as e:
        raise RecipeError(f"meav recipe: base_model: {e}") from None
    seen = 0
    for where, path, params in iter_parameter_blocks(config):
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise RecipeError(
                f"meav recipe: {where}: unknown parameter {', '.join(repr(u) for u in unknown)} "
                f"(meav takes {', '.join(PARAMETERS)})")
        _check_types(where, params)
        if path is None or path == target:
            continue
        seen += 1
        if "level" in (config.parameters or {}):
            raise RecipeError("meav recipe: parameters: give `level` per entry (each vector has its own calibration)")
        if "level" in params:
            # mergekit knows only `lambda`: the level becomes its calibrated value here, and is
            # remembered so the model card can say which level the λ stands for
            params["lambda"] = _level_lambda(where, path, params)
            RESOLVED_LEVELS[str(path)] = (params.pop("level"), params["lambda"])
        if _resolve(config, path, "lambda", params) is None:
            raise RecipeError(f"meav recipe: {where}: missing `lambda` (the signed coefficient of this vector)")
        transfer = _resolve(config, path, "transfer", params, False)
        unaligned = _resolve(config, path, "unaligned", params, "")
        if not Path(path).exists():
            raise RecipeError(f"meav recipe: {where}: no such directory")
        if is_vector_dir(path):
            if unaligned:
                raise RecipeError(f"meav recipe: {where}: is an alignment vector; `unaligned` applies only "
                                  "to full aligned checkpoints")
            _check_vector(where, path, target, transfer)
        elif unaligned:
            _check_checkpoint_pair(where, path, unaligned, target, transfer)
        else:
            raise RecipeError(
                f"meav recipe: {where}: is not an alignment vector (no meav_vector.json); for a full aligned "
                "checkpoint add `unaligned: <path of the model it was trained from>`")
    if seen == 0:
        raise RecipeError("meav recipe: `models` lists no vector besides the base model")


def _level_lambda(where: str, path: str, params: dict) -> float:
    """``level: generic`` -> the λ the vector's calibration recorded for it, written into the entry."""
    from meav_merge.vectors.calibration import resolve_level

    if "lambda" in params:
        raise RecipeError(f"meav recipe: {where}: give `lambda` or `level`, not both")
    if not Path(path).exists():
        raise RecipeError(f"meav recipe: {where}: no such directory")
    if not is_vector_dir(path):
        raise RecipeError(f"meav recipe: {where}: `level` needs an alignment vector with a calibration")
    try:
        return resolve_level(AlignmentVector.load(path).meta, params["level"], f"meav recipe: {where}")
    except VectorError as e:
        raise RecipeError(str(e)) from None


def _check_vector(where: str, path: str, target: str, transfer: bool) -> None:
    """The vector's files hold every tensor its metadata lists, and it fits the target."""
    label = f"meav recipe: {where}"
    try:
        Checkpoint(path).verify()
        vec = AlignmentVector.load(path)
        listed = vec.meta.get("tensors")
        if isinstance(listed, dict):
            missing = sorted(set(listed) - set(vec.keys()))
            if missing:
                raise RecipeError(f"{label}: meav_vector.json lists tensor {missing[0]}, which the vector's "
                                  f"files lack ({len(missing)} missing); re-extract the vector")
        check_vector_against(vec, target, transfer=transfer, label=label)
    except (VectorError, CheckpointError) as e:
        raise RecipeError(e if str(e).startswith(label) else f"{label}: {e}") from None


def _check_checkpoint_pair(where: str, aligned: str, unaligned: str, target: str, transfer: bool) -> None:
    try:
        a, u, t = Checkpoint(aligned), Checkpoint(unaligned), Checkpoint(target)
        a.verify()
        u.verify()
    except CheckpointError as e:
        raise RecipeError(f"meav recipe: {where}: {e}") from None
    for other, label in ((u, f"unaligned {unaligned}"), (t, f"target {target}")):
        for n in a.keys():
            if n in other and a.shape(n) != other.shape(n):
                raise RecipeError(f"meav recipe: {where}: tensor {n} has shape {a.shape(n)} but {label} has "
                                  f"{other.shape(n)}")
    if not transfer and Path(unaligned).resolve() != Path(target).resolve():
        if fingerprint(unaligned) != fingerprint(target):
            raise RecipeError(
                f"meav recipe: {where}: unaligned model {unaligned} is not the target {target}; set "
                "`transfer: true` on this entry to apply its alignment to a different model on purpose")

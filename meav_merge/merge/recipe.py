"""Run a mergekit recipe atomically: validate, merge into a temp dir, rename.

Plain ``mergekit-yaml recipe.yaml OUT`` works too (the plugin hook validates
``meav`` recipes and writes the model card); this wrapper adds the guarantees the
project makes for every output: no half-written directory, no silent overwrite, no
``--force`` that deletes an input, and every check done before any tensor is read.
For recipes of every method it also refuses non-finite numbers and pickle-only models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, List

import yaml

from meav_merge.io.checkpoint import PICKLE_ADVICE, atomic_output_dir, check_output_dir, pickle_files


def load_recipe(path: str | os.PathLike):
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    path = Path(path)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{path}: {loc}: {err['msg']}") from None
    return config, text


def _local_models(config) -> List[str]:
    paths = [ref.model.path for ref in config.referenced_models()]
    paths += [ref.lora.path for ref in config.referenced_models() if ref.lora is not None]
    src = config.tokenizer_source
    if src is not None and not isinstance(src, str):
        paths.append(src.model.path)
    return sorted({p for p in paths if Path(p).exists()})


def _parameter_values(config) -> Iterator[tuple]:
    """(where, key, scalar) for every scalar of every parameters: block, any merge method."""
    from meav_merge.merge.method import iter_parameter_blocks, setting_leaves

    for where, _, params in iter_parameter_blocks(config):
        for key, setting in params.items():
            for leaf in setting_leaves(setting):
                yield where, key, leaf


def check_recipe_inputs(config) -> List[str]:
    """Checks for recipes of any method; returns the local paths the recipe reads."""
    for where, key, value in _parameter_values(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: `{key}` must be a finite number, not {value!r}")
    inputs = _local_models(config)
    for path in inputs:
        pickles = pickle_files(path) if Path(path).is_dir() else []
        if pickles:
            raise ValueError(f"{path}: holds only {', '.join(pickles)}; {PICKLE_ADVICE.format(dir=path)}")
    inputs += [str(v) for _, key, v in _parameter_values(config) if key == "unaligned" and isinstance(v, str) and v]
    return inputs


def merge_recipe(recipe: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                 cuda: bool = False, quiet: bool = False) -> Path:
    from mergekit.merge import MergeOptions, run_merge

    config, text = load_recipe(recipe)
    try:
        inputs = check_recipe_inputs(config)
    except ValueError as e:
        raise ValueError(f"{recipe}: {e}") from None
    check_output_dir(out, force=force, inputs=[recipe, *inputs])  # before any tensor is read
    if config.merge_method == "meav":
        from meav_merge.merge.method import validate_recipe

        validate_recipe(config)
    options = MergeOptions(device="cuda" if cuda else "cpu", copy_tokenizer=True, lazy_unpickle=False,
                           quiet=quiet, allow_crimes=False)
    with atomic_output_dir(out, force=force, inputs=[recipe, *inputs]) as tmp:
        run_merge(config, out_path=str(tmp), options=options, config_source=text)
    return Path(out)

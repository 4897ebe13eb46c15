"""Run a mergekit recipe atomically: validate, merge into a temp dir, rename.

Plain ``mergekit-yaml recipe.yaml OUT`` works too (the plugin hook validates
``meav`` recipes and writes the model card); this wrapper adds the guarantees the
project makes for every output: no half-written directory, no silent overwrite.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from meav_merge.io.checkpoint import atomic_output_dir


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


def merge_recipe(recipe: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                 cuda: bool = False, quiet: bool = False) -> Path:
    from mergekit.merge import MergeOptions, run_merge

    config, text = load_recipe(recipe)
    if config.merge_method == "meav":
        from meav_merge.merge.method import validate_recipe

        validate_recipe(config)
    options = MergeOptions(device="cuda" if cuda else "cpu", copy_tokenizer=True, lazy_unpickle=False,
                           quiet=quiet, allow_crimes=False)
    with atomic_output_dir(out, force=force) as tmp:
        run_merge(config, out_path=str(tmp), options=options, config_source=text)
    return Path(out)

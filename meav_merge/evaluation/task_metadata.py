"""Checks of the ``--metadata`` options the meav lm-eval tasks take.

lm-eval merges ``--model_args`` into the metadata each task's dataset builder gets,
so the builder cannot tell a misspelled option from a model argument; and it runs
only after the model has loaded. The plugin hook therefore calls
``check_before_model_load`` from ``simple_evaluate``, where the user's metadata is
still apart from the model arguments: an unknown key there is an error listing the
valid ones, before any model is loaded. The builders call ``check_task_metadata``
again (values and nested keys) for callers that bypass ``simple_evaluate``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Iterable, Optional

from meav_merge.data.schema import DOMAIN_LEVELS, SPLITS, levels_for

SHORT = {"expert": "exp", "generic": "gen", "avoidance": "avd"}
SPLIT_CHOICES = (*SPLITS, "all")
# Options of each task family (the keys of --metadata they read).
PREF_OPTIONS = ("data_file", "split", "target", "tokenizer", "system_prompt", "add_bos_token")
GEN_OPTIONS = ("data_file", "tokenizer", "system")


class TaskMetadataError(ValueError):
    """A --metadata option a meav task cannot use; the message names the key."""


def family(task_name: str) -> Optional[str]:
    """'gen' or 'pref' for the meav tasks and groups, None for any other task."""
    if not isinstance(task_name, str) or not task_name.startswith("meav_"):
        return None
    return "gen" if task_name.startswith("meav_gen") else "pref"


def _level(domain: str, value: Any, key: str) -> str:
    levels = levels_for(domain)
    aliases = {v: k for k, v in SHORT.items()}
    if not isinstance(value, str) or aliases.get(value, value) not in levels:
        raise TaskMetadataError(f"meav_pref: --metadata {key}: {value!r} is not a level of {domain} "
                                f"({', '.join(levels)})")
    return aliases.get(value, value)


def _check_target(target: Any) -> None:
    if isinstance(target, dict):
        for domain, value in target.items():
            if domain not in DOMAIN_LEVELS:
                raise TaskMetadataError(f"meav_pref: --metadata target: unknown domain {domain!r} "
                                        f"(valid: {', '.join(DOMAIN_LEVELS)})")
            _level(domain, value, f"target.{domain}")
    elif target is not None:
        # one level for every task: it must be a level of some domain
        aliases = {v: k for k, v in SHORT.items()}
        if not isinstance(target, str) or not any(aliases.get(target, target) in lv for lv in DOMAIN_LEVELS.values()):
            every = sorted({lv for lvs in DOMAIN_LEVELS.values() for lv in lvs})
            raise TaskMetadataError(f"meav_pref: --metadata target: {target!r} is not a level "
                                    f"(valid: {', '.join(every)}, or {{domain: level}})")


def _check_values(metadata: Dict[str, Any]) -> None:
    for key in ("data_file", "tokenizer", "system_prompt", "system"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise TaskMetadataError(f"meav: --metadata {key}: must be a string, not {metadata[key]!r}")
    split = metadata.get("split")
    if split is not None and split not in SPLIT_CHOICES:
        raise TaskMetadataError(f"meav_pref: --metadata split: {split!r} is not one of {', '.join(SPLIT_CHOICES)}")
    bos = metadata.get("add_bos_token")
    if bos is not None and not isinstance(bos, bool) and str(bos).strip().lower() not in ("true", "false", "1", "0"):
        raise TaskMetadataError(f"meav_pref: --metadata add_bos_token: must be true or false, not {bos!r}")
    _check_target(metadata.get("target"))


def check_task_metadata(metadata: Dict[str, Any], families: Iterable[str] = ("pref",),
                        strict_keys: bool = False, ignore: Iterable[str] = ()) -> None:
    """Check option values; with ``strict_keys`` every key must be an option of one of ``families``.

    Without it (the builders, which also see model arguments) a key that is a near
    miss of an option (``targte``) is still an error.
    """
    valid = sorted({k for f in families for k in (GEN_OPTIONS if f == "gen" else PREF_OPTIONS)})
    ignore = set(ignore)
    for key in metadata:
        if key in valid or key in ignore:
            continue
        near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.75)
        if strict_keys or near:
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise TaskMetadataError(f"meav tasks: unknown --metadata key {key!r} ({hint}valid keys: {', '.join(valid)})")
    _check_values(metadata)


def check_before_model_load(original, args: tuple, kwargs: dict) -> None:
    """From ``simple_evaluate``'s arguments: the metadata the user gave, without the model arguments."""
    bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
    tasks = bound.get("tasks") or []
    families = {family(t) if isinstance(t, str) else None for t in tasks}
    ours = families - {None}
    if not ours:
        return
    metadata = dict(bound.get("metadata") or {})
    model_args = bound.get("model_args") or {}
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    user = {k: v for k, v in metadata.items() if k not in model_args or model_args[k] != v}
    # Other tasks in the same run may read their own keys: be strict only when all are ours.
    check_task_metadata(user, ours, strict_keys=None not in families)

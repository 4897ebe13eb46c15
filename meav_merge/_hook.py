"""Plugin discovery for hosts that have none (mergekit 0.1.5, lm-eval 0.4.13).

`meav_merge_hook.pth` imports this module at interpreter start. It must stay cheap:
no torch, no mergekit, no lm_eval imports here. It installs a meta-path finder that
runs a callback right after one of a few host modules finishes executing:

- ``mergekit.merge_methods``  -> register the ``meav`` merge method.
- ``mergekit.merge``          -> check that every local path of a ``meav`` recipe exists
                                  before mergekit loads a config (a missing relative path
                                  would otherwise end as a hub connection error).
- ``mergekit.plan``           -> validate ``meav`` recipes before planning (mergekit
                                  silently ignores unknown parameter names).
- ``mergekit.scripts.run_yaml`` -> plain ``mergekit-yaml`` reports a ``meav`` recipe error
                                  as one line (exit 2), and says where it wrote.
- ``mergekit.card``           -> write MEAV model cards for ``meav`` merges.
- ``lm_eval.tasks.manager``   -> add the package's task folder to every TaskManager.
- ``lm_eval.evaluator``       -> check the meav tasks' ``--metadata`` before the model loads.
- ``lm_eval.loggers.utils``   -> ask git for the commit hash without letting it print
                                  "fatal: not a git repository" outside a repository.

Every wrapper passes straight through unless the recipe's method is ``meav`` (or,
for lm-eval, only adds a search path), so other merges are byte-for-byte unchanged.
Set ``MEAV_MERGE_NO_HOOK=1`` to disable it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys


def _register_method(module) -> None:
    method = sys.modules.get("meav_merge.merge.method")
    if method is not None and not hasattr(method, "register"):
        return  # our method module is importing mergekit right now; it registers itself when done
    from meav_merge.merge.method import register

    register(module)


def missing_path_error(config) -> str | None:
    """The first local path of a ``meav`` recipe that does not exist, as a one-line message.

    ``meav`` recipes read only local directories (the base, vectors, ``unaligned``
    checkpoints); mergekit would hand a missing one to the Hub as a repo id.
    """
    from pathlib import Path

    from meav_merge.merge.method import iter_parameter_blocks

    refs = [("base_model", config.base_model.model.path)] if config.base_model else []
    for where, path, params in iter_parameter_blocks(config):
        if path is not None:
            refs.append((where.split(" (")[0], path))
        unaligned = params.get("unaligned")
        if isinstance(unaligned, str) and unaligned:
            refs.append((f"{where.split(' (')[0]}.unaligned", unaligned))
    for where, path in refs:
        if not Path(path).exists():
            folder = "" if Path(path).is_absolute() else f" (relative to the current folder {os.getcwd()})"
            return f"meav recipe: {where}: {path}: no such directory{folder}"
    return None


def _patch(owner, attr: str, make) -> None:
    """``owner.attr = make(original)``, once: a module executed twice is not wrapped twice."""
    original = getattr(owner, attr)
    if getattr(original, "_meav_wrapped", False):
        return
    wrapped = make(original)
    wrapped._meav_wrapped = True
    setattr(owner, attr, wrapped)


_WROTE = []  # output folders of meav merges in this process, for the run_yaml wrapper's last line
# configs the run_merge wrapper has validated, while their merge runs: its planner need not read the
# vectors' metadata and fingerprint the base a second time
_VALIDATED = set()


def _run_merge_wrapper(original):
    @functools.wraps(original)
    def run_merge(merge_config, out_path, *args, **kwargs):
        if merge_config.merge_method == "meav":
            from meav_merge.merge.method import RecipeError, validate_recipe

            # before mergekit reads a single config: a missing path is reported as missing,
            # and every other recipe error before the loader cache warms up
            message = missing_path_error(merge_config)
            if message:
                raise RecipeError(message)
            validate_recipe(merge_config)
            _VALIDATED.add(id(merge_config))
        try:
            result = original(merge_config, out_path, *args, **kwargs)
        finally:
            _VALIDATED.discard(id(merge_config))
        if merge_config.merge_method == "meav":
            _WROTE.append(out_path)
        return result

    return run_merge


def _run_yaml_wrapper(original):
    @functools.wraps(original)
    def callback(*args, **kwargs):
        from meav_merge.merge.method import RecipeError

        try:
            result = original(*args, **kwargs)
        except RecipeError as e:  # ours: the message names the key and path; a traceback adds nothing
            print(f"mergekit-yaml: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        if _WROTE:
            from pathlib import Path

            print(f"merged model written to {Path(_WROTE[-1]).resolve()}")
        return result

    return callback


def _planner_wrapper(original):
    def __init__(self, config, *args, **kwargs):
        if config.merge_method == "meav" and id(config) not in _VALIDATED:  # the Python API's MergePlanner
            from meav_merge.merge.method import validate_recipe

            validate_recipe(config)
        original(self, config, *args, **kwargs)

    return __init__


def _card_wrapper(original):
    def generate_card(config, *args, **kwargs):
        if config.merge_method == "meav":
            from meav_merge.merge.card import merge_card

            return merge_card(config, *args, **kwargs)
        return original(config, *args, **kwargs)

    return generate_card


def _task_manager_wrapper(original):
    def __init__(self, *args, include_path=None, **kwargs):
        from meav_merge.resources import eval_tasks_dir

        ours = [str(eval_tasks_dir())]
        if include_path is None:
            paths = ours
        elif isinstance(include_path, (list, tuple)):
            paths = ours + list(include_path)  # the user's paths come later and win
        else:
            paths = ours + [include_path]
        original(self, *args, include_path=paths, **kwargs)

    return __init__


def _simple_evaluate_wrapper(original):
    @functools.wraps(original)
    def simple_evaluate(*args, **kwargs):
        from meav_merge.evaluation.task_metadata import check_before_model_load

        check_before_model_load(original, args, kwargs)  # passes through unless a meav task is asked for
        return original(*args, **kwargs)

    return simple_evaluate


def _quiet_git_hash(module) -> None:
    _patch(module, "get_git_commit_hash", lambda original: _git_hash_wrapper(original, module))


def _git_hash_wrapper(original, module):
    @functools.wraps(original)
    def get_git_commit_hash():
        # lm-eval's own code, with git's stderr discarded: run outside a repository (any
        # user's folder) git prints "fatal: not a git repository", which reads as an error
        import subprocess

        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return module.get_commit_from_path(os.getcwd())

    return get_git_commit_hash


CALLBACKS = {
    "mergekit.merge_methods": _register_method,
    "mergekit.merge": lambda m: _patch(m, "run_merge", _run_merge_wrapper),
    "mergekit.plan": lambda m: _patch(m.MergePlanner, "__init__", _planner_wrapper),
    # mergekit-yaml is a click command; its callback is the function click runs
    "mergekit.scripts.run_yaml": lambda m: _patch(m.main, "callback", _run_yaml_wrapper),
    "mergekit.card": lambda m: _patch(m, "generate_card", _card_wrapper),
    "lm_eval.tasks.manager": lambda m: _patch(m.TaskManager, "__init__", _task_manager_wrapper),
    "lm_eval.evaluator": lambda m: _patch(m, "simple_evaluate", _simple_evaluate_wrapper),
    "lm_eval.loggers.utils": _quiet_git_hash,
}


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        callback = CALLBACKS.get(fullname)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, callback)
        return spec


def install() -> None:
    if os.environ.get("MEAV_MERGE_NO_HOOK") == "1":
        return
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PostImportFinder())
    # Modules imported before the hook (e.g. `import meav_merge` after mergekit in
    # a notebook) get their callbacks now.
    for name, callback in CALLBACKS.items():
        if name in sys.modules:
            callback(sys.modules[name])


install()

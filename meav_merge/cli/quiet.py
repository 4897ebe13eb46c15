"""Third-party noise, filtered for the ``meav`` command only (``-v`` shows everything).

The libraries under us (transformers, trl, mergekit, lm-eval, datasets, torch) warn about
their own deprecations and internals on every run: ``torch_dtype is deprecated`` from
mergekit's and lm-eval's calls into transformers, ``numpy.core is deprecated`` from
mergekit's unpickler, tokenizer fork notices and the like. None of it is actionable for a
``meav`` user. Library code never filters anything (importing meav_merge changes no
warning settings); the CLI calls :func:`quiet_third_party` once, at start-up.

Warnings raised from our own modules are left alone on purpose: those are our bugs to fix,
not noise to hide, and the test suite checks that our call sites raise none.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers whose WARNING-level chatter is about the library itself, not the user's run.
NOISY_LOGGERS = ("transformers", "trl", "datasets", "accelerate", "mergekit", "lm-eval", "lm_eval", "huggingface_hub",
                 "torch", "urllib3", "filelock", "peft", "httpx")
# Warning categories that are a library talking about its own future.
NOISY_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)
# Modules whose warnings are ours, and so are never filtered.
OURS = r"(?!meav_merge)"


def quiet_third_party(verbose: bool = False) -> None:
    """Hide third-party warnings and library log noise below ERROR, unless ``verbose``.

    Also sets the environment that libraries read at import (and subprocesses such as
    the ``lm_eval`` and ``mergekit-yaml`` runs of ``meav demo`` inherit).
    """
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in NOISY_CATEGORIES:
        # `module` is the module a warning is attributed to; ours stay visible
        warnings.filterwarnings("ignore", category=category, module=OURS)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers reads TRANSFORMERS_VERBOSITY when imported; importing it here just to set
    # the level would cost every command (even `meav -h`) seconds, so only an already
    # imported one is set directly
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.set_verbosity_error()

"""Quiet by default (issue 19): our own call sites raise no deprecation warnings, third-party
noise is filtered by the CLI's `quiet_third_party` only (and `-v` keeps it), and lm-eval run
outside a git repository no longer prints "fatal: not a git repository"."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def no_warnings(caplog):
    """Fails the test on any Python warning or transformers log warning raised inside it."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()  # warning_once goes through the "transformers" logger
    hf_logging.set_verbosity_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            yield
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, noisy


def _records():
    from meav_merge.data.schema import parse_record

    texts = ["Take 500 mg twice a day with food.", "Please see your doctor about this soon.", "Sorry, I can't help."]
    return [parse_record({"id": f"r{i}", "domain": "medical", "persona": "p", "query": "my tax return " * (i + 1),
                          "expert": texts[i % 3], "generic": texts[(i + 1) % 3], "avoidance": texts[(i + 2) % 3]},
                         f"x:{i}") for i in range(3)]


def _model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), tok


def test_scoring_and_top_layer_scoring_raise_no_deprecation(tiny_dirs, no_warnings):
    """`past_key_values` (argument and output attribute) is deprecated in transformers 5: we use `cache`."""
    from meav_merge.evaluation.scoring import mean_logprobs, prepare
    from meav_merge.evaluation.top_layer import TopLayerScorer

    model, tok = _model(tiny_dirs["base"])
    prepared = prepare(tok, _records())
    full = mean_logprobs(model, tok, prepared, progress=False, batch_size=2)
    top = TopLayerScorer(model, 1).score(prepared)
    for got, want in zip(top, full):  # the same numbers, through the renamed cache argument
        assert got == pytest.approx(want, abs=1e-5)


def test_frozen_trunk_cache_raises_no_deprecation(tiny_dirs, no_warnings):
    from meav_merge.training.trunk import split_model

    model, tok = _model(tiny_dirs["base"])
    _, head = split_model(model, 1)
    emb = head.model.embed_tokens
    prompt = tok("my tax return", add_special_tokens=False).input_ids
    rows = [prompt + tok(" take 500 mg", add_special_tokens=False).input_ids,
            prompt + tok(" sorry", add_special_tokens=False).input_ids]
    emb.add_prefixes([prompt])
    emb.warm([(prompt, rows)])  # prompt KV repeated for the batch
    emb.clear()
    got = emb(torch.tensor([rows[0]]))  # known prefix: continues from its cache
    with torch.no_grad():
        want = model.model(input_ids=torch.tensor([rows[0]]), output_hidden_states=True).hidden_states[1]
    assert torch.allclose(got, want, atol=1e-5)


QUIET_PROBE = r"""
import logging, sys, warnings
from meav_merge.cli.quiet import quiet_third_party
quiet_third_party(verbose=sys.argv[1] == "-v")
warnings.warn_explicit("third-party deprecation", FutureWarning, "x.py", 1, module="mergekit.io.lazy_unpickle")
warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="meav_merge.evaluation.scoring")
logging.getLogger("transformers.configuration_utils").warning("`torch_dtype` is deprecated! Use `dtype` instead!")
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("loaded after quiet")
"""


@pytest.mark.parametrize("flag", ["", "-v"])
def test_cli_filter_hides_third_party_noise_and_keeps_ours(flag):
    env = {k: v for k, v in ENV.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE, flag], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ours" in proc.stderr  # our own warnings are bugs to fix, never filtered
    for noise in ("third-party deprecation", "torch_dtype", "loaded after quiet"):
        assert (noise in proc.stderr) == (flag == "-v"), (noise, proc.stderr)


def test_library_import_changes_no_warning_settings():
    """Only the CLI filters: importing meav_merge leaves a notebook's warnings alone."""
    # torch and numpy add filters of their own on import; none may hide a deprecation or come from us
    probe = ("import warnings, torch, numpy; before = list(warnings.filters); import meav_merge, meav_merge.merge.card, "
             "meav_merge.evaluation.scoring; assert warnings.filters == before, warnings.filters")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr


def test_lm_eval_outside_a_repository_prints_no_git_fatal(tmp_path):
    probe = "from lm_eval.loggers.utils import get_git_commit_hash; print(repr(get_git_commit_hash()))"
    env = {**ENV, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}  # no repository above tmp_path either
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"
    assert "fatal" not in proc.stderr and "not a git repository" not in proc.stderr

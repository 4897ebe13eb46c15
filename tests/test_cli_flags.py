"""Every ``meav`` flag has help text, and config dataclasses reach their commands through it."""

from __future__ import annotations

import argparse

import pytest

from meav_merge.cli.main import build_parser
from meav_merge.cli.options import config_from_args
from meav_merge.training.dpo import MeavTrainConfig


def _subparsers(parser: argparse.ArgumentParser, path=("meav",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, path + (name,))


def test_every_flag_of_every_command_has_help():
    missing = [f"{' '.join(path)} {a.option_strings[0]}"
               for path, p in _subparsers(build_parser()) for a in p._actions
               if a.option_strings and a.help in (None, "", argparse.SUPPRESS) and a.dest != "help"]
    assert not missing, missing


def test_every_train_config_field_is_a_train_flag_with_its_help():
    train = dict((p[-1], sub) for p, sub in _subparsers(build_parser()))["train"]
    by_dest = {a.dest: a for a in train._actions}
    for name, field in MeavTrainConfig.__dataclass_fields__.items():
        if name == "extra":  # a dict of other DPOConfig fields: Python API only
            continue
        assert name in by_dest, name
        assert by_dest[name].help.startswith(field.metadata["help"]), name


def test_train_flags_become_the_config(monkeypatch):
    # the default --base must exist to parse; that check is tests/test_fail_fast.py's, and this test
    # must not depend on another test having materialized models/ first
    monkeypatch.setattr("meav_merge.cli.options._local_dir", lambda path: True)
    args = build_parser().parse_args(["train", "--domain", "medical", "--out", "x", "--lr", "3e-4",
                                      "--trainable-layers", "all", "--epochs", "2", "--no-frozen-trunk",
                                      "--retain-records", "20", "--precision", "fp32"])
    cfg = config_from_args(MeavTrainConfig, args)
    assert (cfg.learning_rate, cfg.trainable_layers, cfg.num_train_epochs, cfg.frozen_trunk,
            cfg.retain_records, cfg.precision) == (3e-4, None, 2.0, False, 20, "fp32")
    # left out: the preset fills in (cpu: 4 layers, batch 4)
    cfg = config_from_args(MeavTrainConfig, build_parser().parse_args(["train", "--domain", "medical", "--out", "x"]))
    assert (cfg.trainable_layers, cfg.per_device_train_batch_size, cfg.learning_rate) == (4, 4, 2e-4)


@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--trainable-layers", "0"], ["--beta", "-1"],
                                  ["--precision", "fp8"], ["--batch-size", "2.5"]])
def test_bad_train_numbers_fail_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--domain", "medical", "--out", "x", *argv])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_dpo_config_keeps_checkpointing_off_without_deprecation_warnings(tmp_path):
    # trl defaults gradient checkpointing to on (slower); the deprecated name warns in transformers 5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cfg = MeavTrainConfig().dpo_config(str(tmp_path), has_eval=False)
    assert cfg.activation_checkpointing is False and cfg.gradient_checkpointing is False

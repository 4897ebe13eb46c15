"""The ``meav`` command line. Each subcommand is a thin layer over one module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meav_merge.resources import DEFAULT_MODEL_DIR


class UsageError(ValueError):
    pass


def _cmd_base(args) -> None:
    from meav_merge.base_model import materialize_base

    path = materialize_base(args.out, gguf=args.gguf, source=args.source, force=args.force)
    print(f"base model ready: {path.resolve()}")


def _cmd_extract(args) -> None:
    import torch

    from meav_merge.vectors import extract_vector

    meta = {}
    if args.domain:
        meta["domain"] = args.domain
    if args.preference:
        meta["preference"] = args.preference
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    vec = extract_vector(args.aligned, args.base, args.out, minus=args.minus, dtype=dtype, meta=meta,
                         force=args.force)
    print(f"{vec.meta['kind']} written to {args.out}: {len(vec.keys())} tensors, ‖v‖ = {vec.norm():.4f}, "
          f"base fingerprint {vec.meta['base_fingerprint']}")


def _cmd_merge(args) -> None:
    from meav_merge.merging import merge_recipe

    out = merge_recipe(args.recipe, args.out, force=args.force, cuda=args.cuda)
    print(f"merged model written to {out}")


def _cmd_card(args) -> None:
    import json

    from meav_merge.card import add_eval_results

    try:
        results = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{args.results}: cannot read results JSON ({e})") from None
    print(f"updated {add_eval_results(args.model, results)}")


def _add_common_output(p, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite an existing {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meav", description="Inference-time preference alignment as model editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("base", help="materialize the base model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="output directory (default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="convert this local GGUF file instead of the embedded model")
    src.add_argument("--source", help="convert this local Hugging Face model directory (safetensors)")
    _add_common_output(p, "model directory")
    p.set_defaults(func=_cmd_base)

    p = sub.add_parser("extract", help="alignment vector AV = aligned − base, or preference vector θ+ − θ−")
    p.add_argument("--aligned", required=True, help="aligned checkpoint (θ_aligned, or θ+ for a preference vector)")
    p.add_argument("--base", help="unaligned model the vector is measured from and meant for")
    p.add_argument("--minus", help="θ− checkpoint (trained on swapped preferences): writes θ+ − θ−")
    p.add_argument("--out", required=True, help="output vector directory")
    p.add_argument("--domain", help="domain recorded in the vector's metadata")
    p.add_argument("--preference", help="preference recorded in the metadata, e.g. 'expert>generic>avoidance'")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    _add_common_output(p, "vector directory")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("merge", help="run a mergekit recipe (same as mergekit-yaml, but atomic and validated first)")
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("--cuda", action="store_true", help="do the tensor math on the GPU")
    _add_common_output(p, "output directory")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("card", help="add lm-eval results to a merged model's card")
    p.add_argument("model")
    p.add_argument("--results", required=True, help="lm-eval results JSON")
    p.set_defaults(func=_cmd_card)

    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
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

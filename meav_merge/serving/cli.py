"""``meav serve``: start the OpenAI-compatible server (uvicorn) on one base model."""

from __future__ import annotations

import logging
from pathlib import Path


def serve(args) -> None:
    import uvicorn

    from meav_merge.serving.app import build_app
    from meav_merge.serving.engine import Engine
    from meav_merge.serving.scheduler import Scheduler
    from meav_merge.serving.settings import Registry, parse_named, preset_from_recipe

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("meav_merge.serving").addHandler(handler)
    logging.getLogger("meav_merge.serving").setLevel(logging.INFO)
    vectors: dict = {}
    for spec in args.vector or []:
        name, path = parse_named(spec, "vector")
        if name in vectors:
            raise ValueError(f"--vector {spec!r}: name {name!r} given twice")
        vectors[name] = path
    presets = {}
    for spec in args.recipe or []:
        name, path = parse_named(spec, "recipe")
        if name in presets:
            raise ValueError(f"--recipe {spec!r}: preset {name!r} given twice")
        presets[name] = preset_from_recipe(path, vectors, served_model=args.model)
    engine = Engine(args.model, vectors, dtype=args.dtype, device=args.device, transfer=args.transfer,
                    max_batch_tokens=args.max_batch_tokens)
    served_name = Path(args.model).name
    registry = Registry(vectors, presets, served_name=served_name)
    scheduler = Scheduler(engine, max_group=args.max_group)
    app = build_app(registry, scheduler)
    print(f"meav serve: {served_name} with vectors {sorted(vectors) or 'none'} and presets "
          f"{sorted(presets) or 'none'} on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, let in-flight requests finish, run shutdown.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    print("meav serve: stopped", flush=True)


def add_cli(subparsers) -> None:
    from meav_merge.coefficients import number_arg
    from meav_merge.cli.options import add_model

    p = subparsers.add_parser("serve", help="OpenAI-compatible server with per-request vector coefficients")
    add_model(p, "base model")
    p.add_argument("--vector", action="append", metavar="NAME=DIR", help="serve this vector under NAME; repeat")
    p.add_argument("--recipe", action="append", metavar="NAME=YAML",
                   help="register the setting of a meav recipe as preset NAME (its vectors are served too)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=number_arg("--port", integer=True, positive=True), default=8000,
                   help="TCP port (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: %(default)s; bf16 matmuls are ~20x slower on CPU)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)")
    p.add_argument("--transfer", action="store_true", help="allow vectors measured from another model")
    p.add_argument("--max-batch-tokens", type=number_arg("--max-batch-tokens", integer=True, positive=True),
                   default=2048, help="padded tokens per scoring batch (default: %(default)s)")
    p.add_argument("--max-group", type=number_arg("--max-group", integer=True, positive=True), default=64,
                   help="sequences run together under one setting (default: %(default)s)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=serve)

"""``meav sweep`` and ``meav eval ood | table1 | spillover``: the in-memory evaluations."""

from __future__ import annotations

import json

from meav_merge.cli.options import (add_data, add_model, add_output, add_vectors, named_number_arg, named_numbers,
                                    named_vectors, one_vector)
from meav_merge.coefficients import lambdas_arg, number_arg, parse_lambdas
from meav_merge.vectors.calibration import DEFAULT_LAMBDAS


def _cmd_sweep(args) -> None:
    from meav_merge.evaluation.tables import run_sweep

    vectors = named_vectors(args.vector)
    weights = named_numbers(args.weight, "--weight", vectors) if args.weight else None
    summaries = run_sweep(args.model, vectors, args.lambdas, args.data, args.out, weights=weights,
                          domains=[args.domain] if args.domain else None, split=args.split, transfer=args.transfer,
                          force=args.force, limit=args.limit)
    print(f"wrote {', '.join(f'sweep_{d}.csv/.json/.png' for d in summaries)} into {args.out}")


def _cmd_ood(args) -> None:
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.tables import format_wide_table, ood_table, plot_ood
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.io.rows import write_rows_csv
    from meav_merge.vectors.alignment_vector import AlignmentVector

    name, path = one_vector(args.vector)
    rm = ReweightableModel(args.model, [AlignmentVector.load(path)], transfer=args.transfer)
    domains = args.domains.split(",")
    rows = ood_table(rm, args.lambdas, args.data, domains, split=args.split, limit=args.limit)
    n = {d: len(load_records(args.data, d, args.split)[: args.limit or None]) for d in domains}
    with atomic_output_dir(args.out, force=args.force) as tmp:
        write_rows_csv(rows, tmp / "ood.csv")
        (tmp / "ood.json").write_text(json.dumps({"vector": {name: path}, "model": str(args.model), "split": args.split,
                                                  "n": n, "transfer": args.transfer, "rows": rows}, indent=2))
        plot_ood(rows, f"{name} vector on {args.model} ({args.split}; n = {', '.join(map(str, n.values()))})",
                 tmp / "ood.png")
    print(format_wide_table(rows))
    print(f"wrote {args.out}/ood.csv, ood.json and ood.png")


def _cmd_grid(args) -> None:
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.evaluation.tables import format_wide_table, grid_table, plot_grid
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.io.rows import write_rows_csv
    from meav_merge.vectors.alignment_vector import AlignmentVector

    vectors = named_vectors(args.vector)
    if len(vectors) < 2:
        raise ValueError(f"--vector: a grid needs two or more vectors, not {len(vectors)}")
    if len(args.values) ** len(vectors) > 400:
        raise ValueError(f"--values: {len(args.values)}^{len(vectors)} points is over 400; use `meav search`")
    domains = args.domains.split(",")
    rm = ReweightableModel(args.model, [AlignmentVector.load(v) for v in vectors.values()], transfer=args.transfer)
    rows = grid_table(rm, list(vectors), args.values, args.data, domains, split=args.split, limit=args.limit)
    with atomic_output_dir(args.out, force=args.force) as tmp:
        write_rows_csv(rows, tmp / "grid.csv")
        (tmp / "grid.json").write_text(json.dumps({"vectors": vectors, "split": args.split, "limit": args.limit,
                                                   "rows": rows}, indent=2))
        for col in [k for k in rows[0] if ":" in k]:
            plot_grid(rows, list(vectors), col, tmp / f"grid_{col.replace(':', '_')}.png",
                      f"{col} ({args.split}), over η of {' and '.join(list(vectors)[:2])}")
    print(format_wide_table(rows, first=next(iter(vectors))))
    print(f"wrote {args.out}/grid.csv, grid.json and one heatmap per domain level")


def _cmd_table1(args) -> None:
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.evaluation.tables import format_wide_table, table1
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.io.rows import write_rows_csv
    from meav_merge.vectors.alignment_vector import AlignmentVector

    values = parse_lambdas(args.meav_lambdas, "--meav-lambdas")  # before the model loads
    if len(values) != 3 or ":" in args.meav_lambdas:
        raise ValueError(f"--meav-lambdas: give three values (expert,generic,avoidance), not {args.meav_lambdas!r}")
    lams = dict(zip(("expert", "generic", "avoidance"), values))
    domain, path = one_vector(args.vector)
    rm = ReweightableModel(args.model, [AlignmentVector.load(path)], transfer=args.transfer)
    records = load_records(args.data, domain, "test")[: args.limit or None]
    judge = None
    if args.judged:
        from meav_merge.evaluation.level_classifier import default_classifier

        judge = default_classifier(args.data)
        print(f"judge: offline level classifier, held-out accuracy {judge.heldout['overall']:.2f}")
    rows = table1(rm, records, lams, judge=judge, max_new_tokens=args.max_new_tokens)
    with atomic_output_dir(args.out, force=args.force) as tmp:
        write_rows_csv(rows, tmp / "table1.csv")
        (tmp / "table1.json").write_text(json.dumps({"domain": domain, "rows": rows}, indent=2))
    print(format_wide_table(rows, first="technique"))
    print(f"wrote {args.out}/table1.csv and table1.json")


def _add_common(q, lambdas_default: str | None) -> None:
    add_model(q)
    add_data(q)
    if lambdas_default is not None:
        q.add_argument("--lambdas", default=lambdas_default, type=lambdas_arg(),
                       help="start:stop:step or a comma list (default: %(default)s)")
    q.add_argument("--limit", type=number_arg("--limit", integer=True, positive=True),
                   help="score only the first N queries per domain (default: all)")
    q.add_argument("--transfer", action="store_true", help="allow vectors measured from another model")


def add_cli(sub) -> None:
    p = sub.add_parser("sweep", help="preference accuracy across λ, re-weighting the model in memory")
    # the calibration grid: CPU-preset vectors reach expert near +1..+2 and avoidance near −1..−4,
    # which the old default (−1.5..1.0) missed, and 13 points cost half of its 26
    _add_common(p, ",".join(f"{x:g}" for x in DEFAULT_LAMBDAS))
    add_vectors(p, help="NAME=DIR, the name being the domain scored; several vectors sweep their weighted sum "
                        "(repeat the flag or comma-separate)")
    p.add_argument("--weight", action="append", metavar="NAME=W", type=named_number_arg("--weight"),
                   help="weight of each vector in the swept sum, by NAME (default: 1 each)")
    p.add_argument("--domain", help="domain to score (default: each vector's NAME)")
    p.add_argument("--split", default="test", help="train, validation, test or all (default: %(default)s)")
    add_output(p, "output directory (CSV, JSON and PNG per domain)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("eval", help="out-of-domain and Table-1 style evaluations")
    ev = p.add_subparsers(dest="eval_command", required=True)
    q = ev.add_parser("ood", help="one vector at several λ, scored on other domains (paper Table 2)")
    _add_common(q, "0,0.5,-0.7,-1.2")
    add_vectors(q, help="NAME=DIR, the one vector to move the model along")
    q.add_argument("--domains", default="financial,legal,safety,helpfulness",
                   help="comma-separated domains to score (default: %(default)s)")
    q.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    add_output(q, "output directory (ood.csv, ood.json, ood.png)")
    q.set_defaults(func=_cmd_ood)

    q = ev.add_parser("grid", help="every combination of coefficients for several vectors, each domain scored "
                                   "(the Preference Vectors paper's η_help × η_harm table)")
    _add_common(q, None)
    add_vectors(q, help="NAME=DIR of each vector (two or more; the first two are the heatmaps' axes)")
    q.add_argument("--values", default="-1,-0.5,0,0.5,1", type=lambdas_arg("--values"),
                   help="coefficients each vector takes (default: %(default)s, the paper's η)")
    q.add_argument("--domains", default="helpfulness,safety", help="comma-separated domains to score "
                                                                   "(default: %(default)s)")
    q.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    add_output(q, "output directory (grid.csv, grid.json, heatmaps)")
    q.set_defaults(func=_cmd_grid)

    q = ev.add_parser("table1", help="default vs prompting vs MEAV on one domain (paper Table 1)")
    _add_common(q, None)
    add_vectors(q, help="DOMAIN=DIR: the vector, and the domain whose test queries are used")
    q.add_argument("--meav-lambdas", required=True, help="λ for expert,generic,avoidance, e.g. 0.5,-0.7,-1.2")
    q.add_argument("--judged", action="store_true", help="also judged generation accuracy (offline classifier)")
    q.add_argument("--max-new-tokens", type=number_arg("--max-new-tokens", integer=True, positive=True), default=96,
                   help="longest judged answer in tokens (default: %(default)s)")
    add_output(q, "output directory (table1.csv, table1.json)")
    q.set_defaults(func=_cmd_table1)

    from meav_merge.evaluation.spillover import add_eval_cli

    add_eval_cli(ev)

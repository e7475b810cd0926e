"""``python -m benchmarks``: run the kernel and layer benchmarks, write a results file, render the report.

    python -m benchmarks --quick            tiny shapes; under two minutes on a CPU
    python -m benchmarks --full             the issue's shapes, on a GPU (bf16 by default)
    python -m benchmarks --smoke --out DIR  the CI smoke run: smallest shapes, results in DIR

On a CPU, ``TRITON_INTERPRET=1`` is set before Triton is imported (the Triton
kernels are then checked through the interpreter, not timed). See
``benchmarks/__init__.py`` for the results schema.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    suite = p.add_mutually_exclusive_group()
    suite.add_argument("--quick", dest="suite", action="store_const", const="quick", help="tiny shapes (default)")
    suite.add_argument("--full", dest="suite", action="store_const", const="full", help="the issue's shapes (GPU)")
    suite.add_argument("--smoke", dest="suite", action="store_const", const="smoke", help="smallest shapes (CI)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--only", choices=("kernels", "layers"), help="run one half only")
    p.add_argument("--filter", default="", help="only shapes whose name contains this text")
    p.add_argument("--routing", default="uniform,skewed", help="comma-separated: uniform, skewed")
    p.add_argument("--skip", default="", help="comma-separated implementations to leave out (e.g. stk,expert_loop)")
    p.add_argument("--grid", action="store_true", help="--full kernels: the whole MegaBlocks product, not the curated list")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu: stable timings)")
    p.add_argument("--no-report", action="store_true", help="do not render plots and docs/benchmarks.md")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new configuration after this many seconds (the rest is listed as not run)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="allow --full on a CPU (very slow)")
    p.add_argument("--strict", action="store_true", help="exit 1 if this library's implementations fail a check")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(suite="quick")
    return p.parse_args(argv)


def _pick_device(name: str):
    import torch  # torch does not import triton: TRITON_INTERPRET can still be set after this

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


OURS = ("bsmoe_triton", "bsmoe_torch", "dmoe")


def summarize(kernels: list, layers: list) -> dict:
    """Status counts per implementation, and every failure or error with its message."""
    statuses: dict = {"kernels": {}, "layers": {}}
    problems = []
    for section, records in (("kernels", kernels), ("layers", layers)):
        for rec in records:
            where = f"{section} {rec['shape']['name']} {rec['routing']}" + (f" {rec['product']}" if "product" in rec else "")
            for impl, r in rec["impls"].items():
                counts = statuses[section].setdefault(impl, {})
                counts[r["status"]] = counts.get(r["status"], 0) + 1
                if r["status"] in ("failed", "error"):
                    problems.append({"where": where, "impl": impl, "status": r["status"], "error": r.get("error")})
            ov = rec.get("overheads")
            if ov and ov.get("status") == "error":
                problems.append({"where": where, "impl": "overheads", "status": "error", "error": ov.get("error")})
    ours = sum(1 for p in problems if p["impl"] in OURS or p["impl"] == "overheads")
    return {"statuses": statuses, "problems": problems, "ours_failed": ours}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    device = _pick_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 with a CUDA device: unset it to time the compiled kernels")
    if args.suite == "full" and device.type == "cpu" and not args.force:
        raise SystemExit("--full is meant for a GPU (it would take hours on a CPU); use --quick, or --force")

    import torch

    from . import common, kernels, layers, shapes

    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    dtype = common.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    for r in routings:
        if r not in shapes.ROUTINGS:
            raise SystemExit(f"--routing: unknown routing {r!r}; choose from {shapes.ROUTINGS}")
    settings = {
        "smoke": common.TimerSettings(warmup_ms=1, rep_ms=5, cpu_min_reps=3, cpu_max_reps=10, cpu_warmup_calls=1),
        "quick": common.TimerSettings(warmup_ms=2, rep_ms=15, cpu_min_reps=3, cpu_max_reps=20, cpu_warmup_calls=1),
        "full": common.TimerSettings(warmup_ms=25, rep_ms=100),
    }[args.suite]
    timer = common.Timer(device, settings)
    started, t0 = common.now(), time.perf_counter()
    env = common.environment(device, dtype)

    k_shapes = [s for s in shapes.kernel_shapes(args.suite, args.grid) if args.filter in s.name]
    l_shapes = [s for s in shapes.layer_shapes(args.suite) if args.filter in s.name]
    if args.only == "layers":
        k_shapes = []
    if args.only == "kernels":
        l_shapes = []
    impls = kernels.impls_for(device, env)
    skip = tuple(x.strip() for x in args.skip.split(",") if x.strip())
    unknown = [x for x in skip if x not in kernels.IMPLS + layers.VARIANTS]
    if unknown:
        raise SystemExit(f"--skip: unknown implementation(s) {unknown}; choose from {kernels.IMPLS + layers.VARIANTS}")
    total = kernels.count_steps(k_shapes, routings, impls, skip) + layers.count_steps(l_shapes, routings, skip)
    progress = common.Progress(total, enabled=not args.quiet)
    print(f"benchmarks: {args.suite} suite on {env['device_name']} ({env['dtype']}), {len(k_shapes)} kernel and "
          f"{len(l_shapes)} layer shapes x {len(routings)} routings", file=sys.stderr)  # fmt: skip
    budget = common.Budget(args.budget_s)
    out_dir = Path(args.out) if args.out else common.RESULTS_DIR
    settings_rec = {"routings": routings, "grid": args.grid, "filter": args.filter, "only": args.only,
                    "skip": list(skip), "part": common.part_name(args.only, args.filter, routings)}  # fmt: skip
    path = common.results_path(out_dir, env, args.suite, started, settings_rec["part"])
    done: dict = {"kernels": [], "layers": []}

    def results_so_far(complete: bool) -> dict:
        return {
            "schema": common.SCHEMA,
            "suite": args.suite,
            "created": started.isoformat(),
            "argv": ["python", "-m", "benchmarks", *argv],
            "wall_s": time.perf_counter() - t0,
            "complete": complete,
            "not_run": list(budget.not_run),
            "env": env,
            "timer": timer.describe(),
            "settings": settings_rec,
            "kernels": done["kernels"],
            "layers": done["layers"],
            "summary": summarize(done["kernels"], done["layers"]),
        }

    def checkpoint(section):
        def write(records):  # after each configuration: a run killed at its time limit keeps what it did
            done[section] = records
            common.write_results(path, results_so_far(False))

        return write

    done["kernels"] = kernels.run_all(k_shapes, routings, device, dtype, timer, env, progress, skip=skip,
                                      budget=budget, on_record=checkpoint("kernels"))  # fmt: skip
    done["layers"] = layers.run_all(l_shapes, routings, device, dtype, timer, env, progress, skip=skip,
                                    budget=budget, on_record=checkpoint("layers"))  # fmt: skip
    progress.close()

    results = results_so_far(not budget.not_run)
    summary = results["summary"]
    path = common.write_results(path, results)
    print(f"benchmarks: wrote {path} in {results['wall_s']:.1f} s", file=sys.stderr)
    if budget.not_run:
        print(f"benchmarks: --budget-s spent; not run: {', '.join(budget.not_run)}", file=sys.stderr)
    for p in summary["problems"]:
        print(f"  {p['status']}: {p['where']} {p['impl']}: {p['error']}", file=sys.stderr)
    if not args.no_report:
        from . import report

        doc = report.DEFAULT_DOC if args.out is None else None
        report.render(out_dir, doc=doc, plots_dir=out_dir)
    return 1 if (args.strict and summary["ours_failed"]) else 0


if __name__ == "__main__":
    sys.exit(main())

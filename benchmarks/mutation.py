"""Mutation testing of the core modules with mutmut 3, bounded in time, outside CI (issue 18).

    python -m benchmarks.mutation --minutes 40 --out benchmarks/results
    python -m benchmarks.mutation --minutes 10 NAME [NAME ...]   # re-run named mutants only
    python -m benchmarks.mutation --report-only                  # rewrite the results from mutants/

It runs ``mutmut run --max-children N`` (configured in pyproject.toml's ``[tool.mutmut]``:
the modules, the test selection) for at most M minutes, then interrupts it and keeps what
finished: mutmut records every verdict as it comes and resumes where it stopped on the
next call. Then it reads ``mutmut results --all true`` and what ``mutmut show`` prints for each
survivor and writes ``<out>/mutmut-cpu-<date>.json`` and a markdown summary beside it.
Survivors explained as equivalent (no test can tell them apart) are listed, with their
reasons, in ``<out>/mutmut-reasons.json`` ({mutant name: reason}).

Requires ``pip install mutmut==3.8.1`` (the ``mutation`` extra); not part of CI.

This module is also the pytest plugin of mutmut's test runs (``-p benchmarks.mutation`` in
``[tool.mutmut]``): mutmut wraps every function in a trampoline defined in its own module,
and ``torch.library.custom_op`` evaluates the string annotations of the wrapped
functions (``from __future__ import annotations``) in that module's globals, so the names
those annotations use are added there before the package is imported.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("killed", "survived", "timeout", "not checked", "no tests", "suspicious", "segfault", "skipped")


def _expose_annotation_names() -> None:
    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    if trampoline is None:
        return
    import typing

    import torch

    for name, value in {"torch": torch, "Tensor": torch.Tensor, "Optional": typing.Optional}.items():
        trampoline.__dict__.setdefault(name, value)


_expose_annotation_names()


def _mutmut() -> list[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mutmut"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("BSMOE_AUTOTUNE", "0")
    return env


def run_bounded(minutes: float, max_children: int, names: list[str], log: Path) -> dict:
    """``mutmut run`` for at most ``minutes``; SIGINT (mutmut stops its workers and keeps the verdicts), then kill."""
    cmd = _mutmut() + ["run", "--max-children", str(max_children), *names]
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        try:
            rc = proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    shown = cmd[len(_mutmut()):len(cmd) - len(names)] + ([f"<{len(names)} named mutants>"] if names else [])
    return {"command": "mutmut " + " ".join(shown),
            "returncode": rc, "stopped_at_time_limit": stopped, "minutes": round((time.monotonic() - t0) / 60, 2)}


def read_results() -> dict[str, str]:
    """{mutant name: status} from ``mutmut results --all true``."""
    out = subprocess.run(_mutmut() + ["results", "--all", "true"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"^\s+(\S+__mutmut_\d+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


# What ``mutmut show NAME`` prints, for many names in one process (one ``mutmut show`` each takes a second).
_SHOW = """
import json, sys
from mutmut.__main__ import find_mutant
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in sys.argv[1:]}))
"""


def show_all(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run([sys.executable, "-c", _SHOW, *names], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def module_of(name: str) -> str:
    return name.split("__mutmut_")[0].rsplit(".", 1)[0]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("mutmut", "torch", "triton", "pytest", "hypothesis"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _config() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml as tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def summarise(results: dict[str, str], reasons: dict[str, str], runs: list[dict]) -> dict:
    per_module: dict[str, dict] = defaultdict(lambda: {s: 0 for s in STATUSES})
    for name, status in results.items():
        per_module[module_of(name)][status] = per_module[module_of(name)].get(status, 0) + 1
    total = {s: sum(m.get(s, 0) for m in per_module.values()) for s in STATUSES}

    def score(c: dict) -> float | None:
        den = c["killed"] + c["survived"]
        return round(c["killed"] / den, 4) if den else None

    for counts in per_module.values():
        counts["score"] = score(counts)
    survivors = sorted(n for n, s in results.items() if s == "survived")
    diffs = show_all(survivors)
    cfg = _config()
    return {
        "date": _dt.date.today().isoformat(),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": runs,
        "modules_mutated": cfg.get("only_mutate", []),
        "not_mutated": "kernels/ (blocksparse_moe.kernels): Triton kernels run under TRITON_INTERPRET=1, "
                       "seconds per test; they are guarded by tests/test_mutation_guards.py instead",
        "tests": cfg.get("pytest_add_cli_args_test_selection", []),
        "pytest_args": cfg.get("pytest_add_cli_args", []),
        "score_definition": "killed / (killed + survived); timeouts, unchecked and untested mutants excluded",
        "total": {**total, "score": score(total)},
        "per_module": dict(sorted(per_module.items())),
        "survivors": [{"name": n, "module": module_of(n), "explained_as_equivalent": reasons.get(n),
                       "diff": diffs[n]} for n in survivors],
        "explained_not_surviving": sorted(n for n in reasons if results.get(n) not in (None, "survived")),
    }


def markdown(report: dict) -> str:
    cols = ("killed", "survived", "timeout", "not checked", "no tests")
    lines = [f"# mutmut on the core modules, CPU, {report['date']}", "",
             f"git `{report['git_sha'][:12]}`{' (dirty)' if report['git_dirty'] else ''}, "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
             "Runs: " + (", ".join(f"{r['minutes']} min" for r in report["runs"]) or "none recorded") + " (one child). "
             f"Score = {report['score_definition']}.", "", f"Not mutated: {report['not_mutated']}.", "",
             "| module | " + " | ".join(cols) + " | score |", "|---" * (len(cols) + 2) + "|"]
    for mod, c in list(report["per_module"].items()) + [("**total**", report["total"])]:
        sc = "-" if c["score"] is None else f"{100 * c['score']:.1f}%"
        lines.append(f"| {mod} | " + " | ".join(str(c.get(k, 0)) for k in cols) + f" | {sc} |")
    surv = report["survivors"]
    explained = [s for s in surv if s["explained_as_equivalent"]]
    lines += ["", "Not checked: mutmut runs the mutants whose tests are quickest first, so what the time bound leaves "
              "is the code every test calls (plan_routing, the topology builder): rerun to continue where it stopped.",
              "", f"## Survivors: {len(surv)} ({len(explained)} with a reason: equivalent, or why no test sees it)", ""]
    open_ = [s["name"] for s in surv if not s["explained_as_equivalent"]]
    if open_:
        lines += [f"No test and no reason yet ({len(open_)}):", ""] + [f"- `{n}`" for n in open_] + [""]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for s in explained:
        by_reason[s["explained_as_equivalent"]].append(s["name"].removeprefix("blocksparse_moe."))
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {reason} ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    lines += ["", "Diffs are in the JSON file beside this one (`survivors[].diff`)."]
    if report["explained_not_surviving"]:
        lines += ["", "Reasons recorded for mutants that no longer survive: "
                  + ", ".join(f"`{n}`" for n in report["explained_not_surviving"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutant names to (re-)run; all unchecked ones when empty")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock bound of the mutmut run")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="do not run mutmut, only rewrite the results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (ROOT / "mutants").mkdir(exist_ok=True)
    runs_file = ROOT / "mutants" / "benchmark-runs.json"  # the runs accumulated since mutants/ was created
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    if not args.report_only:
        run = run_bounded(args.minutes, args.max_children, args.names, ROOT / "mutants" / "benchmark-run.log")
        run["names"] = args.names
        runs.append(run)
        runs_file.write_text(json.dumps(runs, indent=1))
        print(f"mutmut ran {run['minutes']} min, rc {run['returncode']}"
              f"{' (stopped at the time limit)' if run['stopped_at_time_limit'] else ''}")
    reasons_file = args.out / "mutmut-reasons.json"
    reasons = json.loads(reasons_file.read_text()) if reasons_file.exists() else {}
    report = summarise(read_results(), reasons, runs)
    stem = args.out / f"mutmut-cpu-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    t = report["total"]
    print(f"killed {t['killed']}, survived {t['survived']}, timeout {t['timeout']}, not checked {t['not checked']}, "
          f"no tests {t['no tests']}; score {t['score']}; wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

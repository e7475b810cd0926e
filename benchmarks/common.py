"""Shared machinery: environment capture, timing, correctness checks, input rotation, results IO.

Timing (see :class:`Timer`):

* CUDA: ``triton.testing.do_bench`` (it warms up, then clears the L2 cache before
  every timed call and times each call with CUDA events); we keep the median and
  the 20th/80th percentiles.
* CPU: ``time.perf_counter`` around single calls after a warm-up, same statistics.

Every measurement is taken twice in a row (``median_ms`` and ``repeat_median_ms``)
so a reader sees the run-to-run spread next to the figure.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

import torch

SCHEMA = "blocksparse-moe-bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.2, 0.5, 0.8)

# Tolerances against the reference, relative to the largest magnitude of the
# expected tensor, plus a relative part per element (the rule of tests/helpers.py):
# |got - expected| <= atol * max|expected| + rtol * |expected|. fp32 is looser than
# the tests' 2e-5 because benchmark reductions are longer (thousands of rows).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """A read-only git query in the repository; None when git or the repository is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU's name in lower case with dashes (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def l2_bytes(device: torch.device) -> int:
    """Last-level cache to beat with input rotation: the GPU's L2, or the CPU's largest cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Everything needed to tell two results files apart."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "stk": _version("stanford-stk"),
        "blocksparse_moe": _version("blocksparse-moe"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        # BSMOE_GIT_SHA: the commit a copied working tree was made from (the device tool's copy
        # carries a .git that may lag behind the files it ships).
        "git_sha": os.environ.get("BSMOE_GIT_SHA") or _git("rev-parse", "HEAD"),
        "git_dirty": False if os.environ.get("BSMOE_GIT_SHA") else (None if dirty is None else bool(dirty)),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "dtype": str(dtype).replace("torch.", ""),
        "timer": "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter",
        "torch_threads": torch.get_num_threads(),
        "cache_bytes": l2_bytes(device),
        "grouped_mm": grouped_mm_support(device, dtype),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["device_memory_bytes"] = int(props.total_memory)
    return env


def grouped_mm_support(device: torch.device, dtype: torch.dtype) -> dict:
    """Whether ``torch._grouped_mm`` exists and runs a tiny product on ``device`` in ``dtype``."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return {"available": False, "error": f"torch {torch.__version__} has no torch._grouped_mm"}
    try:
        a = torch.randn(32, 16, device=device, dtype=dtype)
        b = torch.randn(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([8, 32], device=device, dtype=torch.int32)
        fn(a, b, offs=offs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any failure means "not on this device"
        return {"available": False, "error": short_error(err)}
    return {"available": True, "error": None}


def short_error(err: BaseException, limit: int = 400) -> str:
    """``Type: first line(s) of the message``, cut to ``limit`` characters."""
    text = f"{type(err).__name__}: {err}".strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- checks
def check_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> dict:
    """Compare ``got`` with the reference ``expected`` under ``TOLERANCES[dtype]``.

    Returns ``{"ok", "max_abs_err", "scale", "bad", "numel", "message"}``; NaN in
    ``got`` where ``expected`` is finite never passes.
    """
    tol = TOLERANCES[dtype]
    if tuple(got.shape) != tuple(expected.shape):
        return {"ok": False, "message": f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}"}
    g = got.detach().to(expected.dtype)
    e = expected.detach()
    if e.numel() == 0:
        return {"ok": True, "max_abs_err": 0.0, "scale": 0.0, "bad": 0, "numel": 0, "message": "empty"}
    scale = float(e.abs().max())
    err = (g - e).abs()
    bound = tol["atol"] * max(scale, 1e-30) + tol["rtol"] * e.abs()
    bad = (err > bound) | (torch.isnan(g) & ~torch.isnan(e))
    n_bad = int(bad.sum())
    max_err = float(torch.nan_to_num(err, nan=float("inf")).max())
    out = {"ok": n_bad == 0, "max_abs_err": max_err, "scale": scale, "bad": n_bad, "numel": e.numel()}
    out["message"] = (
        "ok" if n_bad == 0 else f"{n_bad}/{e.numel()} elements out of tolerance {tol} (max err {max_err:.3g}, max|ref| {scale:.3g})"
    )
    return out


def ref_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The reference's dtype: float64 on the CPU; float32 on a GPU for half inputs.

    fp32 accumulation errors (~1e-6 relative) are far below the bf16/fp16 tolerance,
    and a float64 copy of the largest shapes would not fit next to the operands.
    """
    if device.type == "cpu" or dtype == torch.float32:
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------- rotation
class Rotation:
    """Cycle through ``n`` independent input sets so repeated calls do not hit a warm cache.

    ``n`` is the number of sets whose total size reaches twice the last-level cache
    (at most ``max_sets``, and 1 once one set alone is that large). ``do_bench``
    also flushes the GPU's L2 before every call; rotation additionally keeps the
    CPU's caches and the GPU's TLBs honest for small shapes.
    """

    def __init__(self, make: Callable[[int], tuple], set_bytes: int, cache_bytes: int, max_sets: int = 8):
        self.count = max(1, min(max_sets, math.ceil(2 * cache_bytes / max(set_bytes, 1))))
        self.sets = [make(i) for i in range(self.count)]
        self._i = 0

    def next(self) -> tuple:
        s = self.sets[self._i]
        self._i = (self._i + 1) % self.count
        return s


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- timing
@dataclass
class TimerSettings:
    warmup_ms: float = 25.0  # do_bench warm-up time; on CPU: minimum warm-up time
    rep_ms: float = 100.0  # do_bench repetition time; on CPU: target time per measurement
    cpu_min_reps: int = 5
    cpu_max_reps: int = 50
    cpu_warmup_calls: int = 2


class Timer:
    """One timing rule per device; ``measure`` returns median and quantiles in ms."""

    def __init__(self, device: torch.device, settings: TimerSettings):
        self.device, self.settings = device, settings

    def describe(self) -> dict:
        s = self.settings
        if self.device.type == "cuda":
            return {"timer": "triton.testing.do_bench", "warmup_ms": s.warmup_ms, "rep_ms": s.rep_ms,
                    "quantiles": list(QUANTILES), "l2_flush": True}  # fmt: skip
        return {"timer": "time.perf_counter", "warmup_ms": s.warmup_ms, "rep_ms": s.rep_ms,
                "min_reps": s.cpu_min_reps, "max_reps": s.cpu_max_reps, "warmup_calls": s.cpu_warmup_calls,
                "quantiles": list(QUANTILES)}  # fmt: skip

    def measure(self, fn: Callable[[], object], grad_to_none: Iterable[torch.Tensor] | None = None) -> dict:
        grads = list(grad_to_none or [])
        if self.device.type == "cuda":
            import triton.testing

            q20, med, q80 = triton.testing.do_bench(
                fn, warmup=self.settings.warmup_ms, rep=self.settings.rep_ms, grad_to_none=grads or None,
                quantiles=list(QUANTILES),
            )  # fmt: skip
            return {"median_ms": med, "q20_ms": q20, "q80_ms": q80, "reps": None}
        return self._cpu(fn, grads)

    def _cpu(self, fn, grads) -> dict:
        s = self.settings
        start = time.perf_counter()
        calls = 0
        while calls < s.cpu_warmup_calls or (time.perf_counter() - start) * 1e3 < s.warmup_ms:
            for g in grads:
                g.grad = None
            fn()
            calls += 1
            if calls >= 10 * max(s.cpu_warmup_calls, 1):
                break
        times = []
        budget_start = time.perf_counter()
        while len(times) < s.cpu_min_reps or (
            len(times) < s.cpu_max_reps and (time.perf_counter() - budget_start) * 1e3 < s.rep_ms
        ):
            for g in grads:
                g.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
        return {"median_ms": statistics.median(times), "q20_ms": qs[1], "q80_ms": qs[7], "reps": len(times)}

    def measure_twice(self, fn, grad_to_none=None) -> dict:
        """Time ``fn`` twice in a row; the first run is the figure, the second shows the spread."""
        first = self.measure(fn, grad_to_none)
        second = self.measure(fn, grad_to_none)
        a, b = first["median_ms"], second["median_ms"]
        first["repeat_median_ms"] = b
        first["spread"] = abs(a - b) / min(a, b) if min(a, b) > 0 else None
        return first


class QuietGate:
    """Times a call only while no other process is using the CPU, and says how busy the rest was.

    A 2-core VM shared with anything else (a test run, a build) gives a timing that says
    more about the neighbour than about the code: two MKL threads that lose a core wait at
    every barrier (measured: an expert loop 25x slower). ``timed(fn)`` waits until the
    machine has been idle for ``settle_s`` (busy CPU below ``max_other`` cores, from
    ``/proc/stat``), times ``fn``, and measures what the *other* processes used meanwhile
    (all busy CPU time minus this process's); a call during which they used more than
    ``max_other`` cores is thrown away and run again, up to ``tries`` times. Linux only;
    elsewhere it times the call once and reports ``None`` for the load.
    """

    def __init__(self, max_other: float = 0.05, settle_s: float = 0.3, tries: int = 200, children: bool = False):
        self.max_other, self.settle_s, self.tries = max_other, settle_s, tries
        self.children = children  # fn runs subprocesses: their CPU time is ours, not a neighbour's
        self.discarded = 0
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
        except OSError:
            return None
        return sum(v) - v[3] - v[4]  # everything but idle and iowait

    def _self_s(self) -> float:
        import resource  # POSIX only: imported where _busy_ticks found /proc/stat

        who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if self.children else [])
        return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, who))

    def timed(self, fn) -> tuple[float, float | None]:
        """``(milliseconds, other processes' load in cores)`` of one quiet call of ``fn``."""
        if self._busy_ticks() is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3, None
        for _ in range(self.tries):
            b0, w0 = self._busy_ticks(), time.perf_counter()
            time.sleep(self.settle_s)
            if (self._busy_ticks() - b0) / self.hz / (time.perf_counter() - w0) > self.max_other:
                continue
            b0, s0, t0 = self._busy_ticks(), self._self_s(), time.perf_counter()
            fn()
            t1 = time.perf_counter()
            other = max(0.0, ((self._busy_ticks() - b0) / self.hz - (self._self_s() - s0)) / (t1 - t0))
            if other <= self.max_other:
                return (t1 - t0) * 1e3, other
            self.discarded += 1
        raise RuntimeError(f"QuietGate: the machine was never quiet (other processes above {self.max_other} cores) "
                           f"in {self.tries} tries; stop what else runs, or raise max_other")  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- progress
class Progress:
    """One progress line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        line = f"[{self.done:>3}/{self.total}] {time.perf_counter() - self.start:6.1f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[: os.get_terminal_size(sys.stderr.fileno()).columns - 1])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------- results IO
class Budget:
    """A wall-clock allowance for a run (``--budget-s``): configurations not started in time are listed."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.not_run: list[str] = []

    def spent(self, what: str) -> bool:
        """True (and ``what`` recorded as not run) once the allowance is used up."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.not_run.append(what)
            return True
        return False


def run_grid(shapes, routings, seed: int, device, run_one, budget=None, on_record=None) -> list[dict]:
    """``run_one(shape, routing, seed)`` -> its records, for every (shape, routing) in turn.

    ``budget`` (a :class:`Budget`) stops starting new ones once spent; ``on_record(records)``
    is called after each, so a run killed at its time limit keeps what it measured.
    """
    records: list[dict] = []
    for si, shape in enumerate(shapes):
        for ri, routing in enumerate(routings):
            if budget is not None and budget.spent(f"{shape.name} {routing}"):
                continue
            records += run_one(shape, routing, seed + 100 * si + ri)
            if on_record is not None:
                on_record(records)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def part_name(only: str | None, name_filter: str, routings: list | None = None) -> str:
    """What part of a suite a run covers: ``""`` for all of it, else e.g. ``kernels``,
    ``layers-mixtral`` or ``kernels-skewed`` (a run of one routing only)."""
    bits = [only or ""] + ([re.sub(r"[^A-Za-z0-9.]+", "-", name_filter).strip("-")] if name_filter else [])
    if routings is not None and sorted(routings) != ["skewed", "uniform"]:
        bits += sorted(routings)
    return "-".join(b for b in bits if b)


def results_path(out_dir: Path, env: dict, suite: str, created: datetime, part: str = "") -> Path:
    """``<out_dir>/<device>-<date>.json`` for a whole ``--full`` run; ``-<suite>`` (unless full) and
    ``-<part>`` (for ``--only`` / ``--filter`` runs) are appended, so partial runs do not overwrite."""
    tail = ("" if suite == "full" else f"-{suite}") + (f"-{part}" if part else "")
    return Path(out_dir) / f"{env['device_slug']}-{created.strftime('%Y-%m-%d')}{tail}.json"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _clean(obj):
    """Make a results tree JSON-safe: NaN/inf floats become None, floats get 6 significant digits."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_results(path: Path, results: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(results), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_results(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data

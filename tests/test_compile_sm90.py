"""Compiled for Hopper without a GPU: every kernel, every launchable tile config, every dtype, for sm_90.

Triton compiles ahead of time for an H100 on a CPU-only machine:
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=...)``
returns the PTX and a cubin, and the wheel's own ``cuobjdump`` (``triton/backends/nvidia/bin``)
prints the SASS and the resource usage. This is how CI catches what the interpreter
forgives (it runs code the compiler would reject, and knows nothing of registers or
shared memory) before a GPU is ever lent. For each compiled kernel it checks:

* it compiles (front end, MLIR passes, LLVM, ``ptxas``);
* no spills: ``STACK:0`` and ``LOCAL:0`` in ``cuobjdump --dump-resource-usage``.
  One exception, reported but not failed (``BSMOE_STRICT_SPILLS=1`` fails it too): a
  spill of at most 32 bytes that disappears when the same PTX is assembled without
  ``--regAllocOptLevel=2``, the flag Triton 3.9 passes to every ``ptxas`` run. With
  it, ptxas 13 spills one register (one STL/LDL pair) of some kernels at 32-80
  registers, far from any register pressure, and which ones changes with unrelated
  edits: no config can avoid it, and the cost is one local store and load per thread;
* dynamic shared memory (``metadata.shared``) within the H100's 227 KB per block
  (what the launcher checks against the device's opt-in limit before a launch);
* 16-bit dots in tiles of 64 rows or more with 4 or more warps become ``HGMMA``
  (wgmma) in the SASS. Smaller tiles may use ``HMMA``; fp32 dots use
  ``input_precision="ieee"`` (``kernels.config.dot_precision``), which never runs on
  the tensor cores, so neither is asserted there.

The suite runs under ``TRITON_INTERPRET=1`` (``tests/conftest.py``), where ``@triton.jit``
functions are interpreter objects and the config functions return one pinned config.
So the compiling happens in subprocesses started without ``TRITON_INTERPRET``, running
``tests/sm90_compile_worker.py`` (``python tests/sm90_compile_worker.py --worker ...``),
which also holds the tables of kernels and launch layouts compiled. A worker enumerates
the cases, compiles its share of them, runs ``cuobjdump``, and writes one JSON record
per case; the test gathers them and fails with a listing of every (kernel, layout,
block, dtype, config) that broke and what broke.

What is compiled (the specialisation a real launch gets):

* Tile configs: for the autotuned dot kernels (``sdd``, ``dsd``, ``dsd_t``), the
  configs a launch with ``BLOCK`` in {16, 32, 64, 128} and that dtype can actually
  run: the autotuner's ``configs`` passed through its own ``early_config_prune``
  (``kernels.config.prune_by_block``), exactly as the autotuner does before timing.
* Arguments: pointers as ``*fp32`` / ``*fp16`` / ``*bf16`` (data) or ``*i32`` (indices),
  16-byte aligned (``tt.divisibility=16``), as every torch allocation is. A stride
  equal to 1 is what the JIT turns into the constexpr 1 (Triton specialises integer
  arguments equal to 1), so unit strides are passed as ``constexpr 1``; the other
  strides and the sizes ``K``/``N``/``H`` as ``i32`` divisible by 16 (hidden and ffn
  sizes are multiples of 16 in practice); counts (``R``, ``F``, ``S``, ``T``, ``top_k``)
  as plain ``i32``. Each dot kernel is compiled in two operand layouts: ``contig``
  (every operand contiguous) and ``transposed`` (the transposed weight views of the
  backward pass, ``w2^T`` into ``sdd`` and ``w1^T`` into ``dsd``; for ``dsd_t`` an
  ``out=`` view such as ``dw1.transpose(1, 2)``, which its launcher accepts), which
  move the unit stride and so change the operand layouts the MMA sees.
* Coverage, bounded for CI (about 3 minutes on two cores from a cold Triton cache,
  under a minute warm). ``BSMOE_COMPILE_ALL=1`` compiles every launchable config for
  every dtype in both layouts (~670 kernels, 10-15 minutes on two cores): run it
  after changing a kernel or ``kernels/config.py``. The default:

  - bf16, ``contig`` layout: every launchable config of every block size.
  - fp32, both layouts: for each (kernel, block, warps), the config with the most
    work per thread (biggest tile, then deepest pipeline). Its full-precision dot
    runs on the FMA units with operand slices in registers: where spills live.
  - bf16 ``transposed`` and fp16 (both layouts): for each (kernel, layout, block), the
    biggest tile with the fewest warps and the deepest pipeline (most registers per
    thread, most shared memory). fp16 takes bf16's code path instruction for
    instruction (same wgmma shapes, shared-memory footprint and registers).
* The permute kernels have no dot: each is compiled per dtype, with and without its
  optional scale/weights, for the smallest and the largest ``BLOCK_H`` the launcher
  picks (``permute._block_h``: 16 and 256), with Triton's default 4 warps and 3
  stages, which the launchers keep.

Compiled kernels go to Triton's ordinary cache (``TRITON_CACHE_DIR``), keyed on the
source, options and toolchain, so a rerun with unchanged kernels is fast. Workers run
in parallel, ``BSMOE_COMPILE_WORKERS`` of them (default: the CPUs available, at most 8),
within ``BSMOE_COMPILE_TIMEOUT`` seconds (900; 7200 with ``BSMOE_COMPILE_ALL``).
``BSMOE_COMPILE_REPORT=path.json`` saves every record (registers, stack, shared memory,
MMA instructions, compile time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

import sm90_compile_worker as worker

H100_MAX_SHARED_BYTES = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 (232448)
# Spills only Triton's `--regAllocOptLevel=2` ptxas flag causes (gone when the same PTX is
# assembled without it), up to this many bytes, are reported but do not fail the test,
# unless BSMOE_STRICT_SPILLS=1. See _spills_without_regalloc_flag in sm90_compile_worker.py.
REGALLOC_ARTEFACT_MAX_BYTES = 32
STRICT_SPILLS = os.environ.get("BSMOE_STRICT_SPILLS", "0") == "1"

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _describe(r: dict) -> str:
    cfg = r["config"]
    kw = ", ".join(f"{k}={v}" for k, v in cfg["kwargs"].items())
    extra = "".join(f", {k}={v}" for k, v in cfg.items() if k not in ("kwargs", "num_warps", "num_stages"))
    where = r["kernel"] + (f"[{r['layout']}]" if r["layout"] else "") + (f" BLOCK={r['block']}" if r["block"] else "")
    return f"{where} {r['dtype']} ({kw}, num_warps={cfg['num_warps']}, num_stages={cfg['num_stages']}{extra})"


def _regalloc_artefact(r: dict) -> bool:
    """A few bytes of spill that only Triton's ``--regAllocOptLevel=2`` ptxas flag causes."""
    res, alt = r["resources"], r.get("without_regalloc_flag")
    return bool(
        (res["stack"] or res["local"])
        and alt is not None
        and alt["stack"] == 0
        and alt["local"] == 0
        and res["stack"] + res["local"] <= REGALLOC_ARTEFACT_MAX_BYTES
    )


def _spill_text(r: dict) -> str:
    res = r["resources"]
    text = f"spills: STACK:{res['stack']} LOCAL:{res['local']} (REG:{res['reg']})"
    alt = r.get("without_regalloc_flag")
    if alt is not None:
        gone = alt["stack"] == 0 and alt["local"] == 0
        text += f"; without --regAllocOptLevel=2: STACK:{alt['stack']} LOCAL:{alt['local']} REG:{alt.get('reg', '?')}"
        text += " (a ptxas artefact of that flag)" if gone else ""
    return text


def _problems(r: dict) -> list[str]:
    if not r.get("ok"):
        return ["does not compile: " + r.get("error", "?")]
    found = []
    res = r["resources"]
    if (res["stack"] or res["local"]) and (STRICT_SPILLS or not _regalloc_artefact(r)):
        found.append(_spill_text(r))
    if r["shared"] > H100_MAX_SHARED_BYTES:
        found.append(f"shared memory {r['shared']} B > H100's {H100_MAX_SHARED_BYTES} B")
    if worker.wants_hgmma(r) and "HGMMA" not in r.get("mma", ()):
        found.append(f"16-bit dot is not HGMMA (wgmma); SASS has {r.get('mma') or 'no MMA'}")
    return found


def _run_workers(compile_all: bool, workers: int, timeout_s: float) -> tuple[list[dict], list[str]]:
    """Compile in ``workers`` subprocesses without TRITON_INTERPRET: (records, worker failures)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    deadline = time.monotonic() + timeout_s
    results, crashed = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        procs = []
        for i in range(workers):
            out_path = os.path.join(tmpdir, f"results{i}.json")
            script = os.path.abspath(worker.__file__)  # sm90_compile_worker.py, run as __main__
            cmd = [sys.executable, script, "--worker", str(i), str(workers), str(int(compile_all))]
            log = open(os.path.join(tmpdir, f"log{i}.txt"), "w+")
            proc = subprocess.Popen([*cmd, out_path], env=env, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
            procs.append((proc, log, out_path))
        for proc, log, out_path in procs:
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = f"killed after the {timeout_s:.0f} s limit (BSMOE_COMPILE_TIMEOUT)"
            log.seek(0)
            if rc != 0 or not os.path.exists(out_path):
                crashed.append(f"worker {out_path}: exit {rc}\n{log.read()[-4000:]}")
            for path in (out_path, out_path + ".tmp"):  # a killed worker leaves its partial results
                if os.path.exists(path):
                    with open(path) as f:
                        results.extend(json.load(f))
                    break
            log.close()
    return results, crashed


def test_every_kernel_compiles_for_sm90_without_spills():
    for tool in ("cuobjdump", "ptxas"):
        path = worker.triton_nvidia_bin(tool)
        if not os.access(path, os.X_OK):
            pytest.skip(f"no {tool} in the triton wheel ({path}): cannot compile or inspect sm_90 code here")
    compile_all = os.environ.get("BSMOE_COMPILE_ALL", "0") == "1"
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    workers = max(1, int(os.environ.get("BSMOE_COMPILE_WORKERS", min(cpus, 8))))
    timeout_s = float(os.environ.get("BSMOE_COMPILE_TIMEOUT", 7200 if compile_all else 900))

    t0 = time.perf_counter()
    results, crashed = _run_workers(compile_all, workers, timeout_s)
    elapsed = time.perf_counter() - t0
    if os.environ.get("BSMOE_COMPILE_REPORT"):  # every record, for a closer look
        with open(os.environ["BSMOE_COMPILE_REPORT"], "w") as f:
            json.dump(results, f, indent=1)

    failures = [f"  {_describe(r)}: {p}" for r in results for p in _problems(r)]
    counts = {}
    for r in results:
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
    print(f"\ncompiled {len(results)} kernels for sm_90 in {elapsed:.0f} s with {workers} workers ({summary})")
    worst = max((r for r in results if r.get("ok")), key=lambda r: r["resources"]["reg"], default=None)
    if worst:
        print(f"most registers: {worst['resources']['reg']} in {_describe(worst)}")
    artefacts = [r for r in results if r.get("ok") and _regalloc_artefact(r)]
    if artefacts and not STRICT_SPILLS:
        listing = "\n".join(f"  {_describe(r)}: {_spill_text(r)}" for r in artefacts)
        print(f"tolerated (BSMOE_STRICT_SPILLS=1 fails them):\n{listing}")
        warnings.warn(
            f"{len(artefacts)} sm_90 kernels spill a few bytes only because of Triton's ptxas flag "
            f"--regAllocOptLevel=2 (gone without it):\n{listing}",
            stacklevel=1,
        )
    assert not failures, f"{len(failures)} of {len(results)} sm_90 compilations failed a check:\n" + "\n".join(failures)
    assert not crashed, "compile worker failed:\n" + "\n".join(crashed)
    assert results, "no kernel was compiled"

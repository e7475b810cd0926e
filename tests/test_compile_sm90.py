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
So the compiling happens in subprocesses started without ``TRITON_INTERPRET``: this
file doubles as that worker (``python tests/test_compile_sm90.py --worker ...``). A
worker enumerates the cases, compiles its share of them, runs ``cuobjdump``, and
writes one JSON record per case; the test gathers them and fails with a listing of
every (kernel, layout, block, dtype, config) that broke and what broke.

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
import re
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

H100_MAX_SHARED_BYTES = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 (232448)
SM90 = ("cuda", 90, 32)
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = ("fp32", "fp16", "bf16")
PERMUTE_BLOCK_H = (16, 256)  # fallback: smallest and largest tile permute._block_h picks on a GPU
PERMUTE_BLOCK_M = 32  # fallback for permute._BLOCK_ROWS
HGMMA_MIN_ROWS = 64
HGMMA_MIN_WARPS = 4
# Spills only Triton's `--regAllocOptLevel=2` ptxas flag causes (gone when the same PTX is
# assembled without it), up to this many bytes, are reported but do not fail the test,
# unless BSMOE_STRICT_SPILLS=1. See _spills_without_regalloc_flag.
REGALLOC_ARTEFACT_MAX_BYTES = 32
STRICT_SPILLS = os.environ.get("BSMOE_STRICT_SPILLS", "0") == "1"

# The dot kernels: module, kernel, data pointers (the dtype under test; the other
# pointers are *i32 indices), and the unit-stride arguments of each operand layout
# they are launched with: "contig" (every operand contiguous) and "transposed" (the
# one operand the layer, or the launcher's out=, passes as a transposed view).
DOT_KERNELS = {
    "sdd": dict(
        module="sdd",
        kernel="_sdd_kernel",
        data_ptrs=("a_ptr", "b_ptr", "out_ptr"),
        layouts={
            "contig": ("stride_ak", "stride_bn"),  # forward: h = x_sorted @ w1
            "transposed": ("stride_ak", "stride_bk"),  # dsd's backward: ddata = grad @ w2^T
        },
    ),
    "dsd": dict(
        module="dsd",
        kernel="_dsd_kernel",
        data_ptrs=("data_ptr", "b_ptr", "out_ptr"),
        layouts={
            "contig": ("stride_bn", "stride_on"),  # forward: y_sorted = h @ w2
            "transposed": ("stride_bk", "stride_on"),  # sdd's backward: dx_sorted = grad @ w1^T
        },
    ),
    "dsd_t": dict(
        module="dsd_t",
        kernel="_dsd_t_kernel",
        data_ptrs=("data_ptr", "b_ptr", "out_ptr"),
        layouts={
            "contig": ("stride_bn", "stride_on"),  # backward: dw2 = h^T @ dy_sorted (and dw1^T)
            "transposed": ("stride_bn", "stride_ok"),  # out= a transposed view (dw1.transpose(1, 2))
        },
    ),
}

# The permute kernels: data pointers, unit strides, and the optional-operand flag.
PERMUTE_KERNELS = {
    "gather": dict(
        kernel="_gather_kernel",
        data_ptrs=("src_ptr", "out_ptr", "scale_ptr"),
        unit=("stride_sh", "stride_oh", "stride_wk"),
        flag="HAS_SCALE",
    ),
    "combine": dict(
        kernel="_combine_kernel",
        data_ptrs=("src_ptr", "out_ptr", "w_ptr"),
        unit=("stride_sh", "stride_oh", "stride_wk"),
        flag="HAS_WEIGHTS",
    ),
    "combine_weight_grad": dict(
        kernel="_combine_weight_grad_kernel",
        data_ptrs=("dy_ptr", "src_ptr", "out_ptr"),
        unit=("stride_dh", "stride_sh", "stride_ok"),
        flag=None,
    ),
}

# Integer arguments that are sizes in practice divisible by 16 (get tt.divisibility=16).
ALIGNED_INTS = ("K", "N", "H")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# Worker side: runs in a subprocess without TRITON_INTERPRET.
# --------------------------------------------------------------------------------------


def _triton_nvidia_bin(tool: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    root = os.path.dirname(spec.origin) if spec and spec.origin else ""
    return os.path.join(root, "backends", "nvidia", "bin", tool)


class _FakeTensor:
    """Stands in for a tensor argument in ``early_config_prune`` (it only asks the element size)."""

    def __init__(self, elem_bytes: int):
        self._elem_bytes = elem_bytes

    def element_size(self) -> int:
        return self._elem_bytes


def _config_dict(cfg) -> dict:
    d = {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        d["num_ctas"] = cfg.num_ctas
    if getattr(cfg, "maxnreg", None) is not None:
        d["maxnreg"] = cfg.maxnreg
    return d


def _tile_size(case: dict) -> int:
    return sum(v for k, v in case["config"]["kwargs"].items() if k.startswith("BLOCK"))


def _deepest(cases: list[dict], group) -> list[dict]:
    """One case per ``group(case)``: the biggest tile, fewest warps, deepest pipeline among them."""
    best = {}
    for c in cases:
        k = group(c)
        rank = (_tile_size(c), -c["config"]["num_warps"], c["config"]["num_stages"])
        if k not in best or rank > best[k][0]:
            best[k] = (rank, c)
    return [c for _, c in best.values()]


def _select(cases: list[dict]) -> list[dict]:
    """The CI subset of the dot-kernel cases (see the module docstring for why these)."""

    def key(*fields):
        return lambda c: tuple(str(c[f]) if f != "warps" else c["config"]["num_warps"] for f in fields)

    full = [c for c in cases if c["dtype"] == "bf16" and c["layout"] == "contig"]
    fp32 = [c for c in cases if c["dtype"] == "fp32"]
    rest = [c for c in cases if c["dtype"] == "fp16" or (c["dtype"] == "bf16" and c["layout"] != "contig")]
    return (
        full
        + _deepest(fp32, key("kernel", "layout", "block", "warps"))
        + _deepest(rest, key("kernel", "layout", "dtype", "block"))
    )


def _enumerate_cases(compile_all: bool) -> list[dict]:
    """Every case to compile, in a deterministic order (workers take every n-th)."""
    import importlib

    import torch

    from blocksparse_moe.kernels import config as kconfig

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert not kconfig.interpreting(), "worker must run without TRITON_INTERPRET"
    dot_cases = []
    for name, spec in DOT_KERNELS.items():
        tuner = getattr(importlib.import_module(f"blocksparse_moe.kernels.{spec['module']}"), spec["kernel"])
        for layout in spec["layouts"]:
            for dtype in DTYPES:
                elem_bytes = torch_dtype[dtype].itemsize
                for block in BLOCK_SIZES:
                    # What the autotuner would try for this launch: its configs through
                    # its own early_config_prune (kernels.config.prune_by_block).
                    configs = list(tuner.configs)
                    prune = getattr(tuner, "early_config_prune", None)
                    if prune is not None:
                        tensors = {a: _FakeTensor(elem_bytes) for a in tuner.fn.arg_names if a.endswith("_ptr")}
                        configs = prune(configs, tensors, BLOCK=block)
                    dot_cases.extend(
                        dict(
                            kind="dot",
                            kernel=name,
                            layout=layout,
                            block=block,
                            dtype=dtype,
                            config=_config_dict(c),
                            precision=kconfig.dot_precision(torch_dtype[dtype]),
                            upcast=bool(kconfig.needs_upcast(torch_dtype[dtype])),
                        )
                        for c in configs
                    )
    cases = dot_cases if compile_all else _select(dot_cases)
    permute = importlib.import_module("blocksparse_moe.kernels.permute")
    block_m = getattr(permute, "_BLOCK_ROWS", PERMUTE_BLOCK_M)
    block_h_for = getattr(permute, "_block_h", None)
    block_hs = sorted({block_h_for(1), block_h_for(1 << 20)}) if block_h_for else PERMUTE_BLOCK_H
    for name, spec in PERMUTE_KERNELS.items():
        for dtype in DTYPES:
            for block_h in block_hs:
                for flag in (False, True) if spec["flag"] else (None,):
                    kwargs = {"BLOCK_M": block_m, "BLOCK_H": block_h}
                    if spec["flag"]:
                        kwargs[spec["flag"]] = flag
                    cases.append(
                        dict(
                            kind="permute",
                            kernel=name,
                            layout=None,
                            block=None,
                            dtype=dtype,
                            config={"kwargs": kwargs, "num_warps": 4, "num_stages": 3},
                        )
                    )
    return cases


def _build_source(case: dict):
    """(JITFunction, signature, constexprs, attrs) for one case."""
    import importlib

    if case["kind"] == "dot":
        spec = DOT_KERNELS[case["kernel"]]
        module = importlib.import_module(f"blocksparse_moe.kernels.{spec['module']}")
        fn = getattr(module, spec["kernel"]).fn  # the autotuner wraps the JITFunction
        unit = spec["layouts"][case["layout"]]
        constexprs = {
            "BLOCK": case["block"],
            "UPCAST": case["upcast"],
            "PRECISION": case["precision"],
            **case["config"]["kwargs"],
        }
    else:
        spec = PERMUTE_KERNELS[case["kernel"]]
        module = importlib.import_module("blocksparse_moe.kernels.permute")
        fn = getattr(module, spec["kernel"])
        unit = spec["unit"]
        constexprs = dict(case["config"]["kwargs"])
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # any further wrapper
        fn = fn.fn
    stale = (set(unit) | set(spec["data_ptrs"])) - set(fn.arg_names)
    if stale:  # the kernel's arguments changed: this file's tables must follow
        raise KeyError(f"{fn.__name__} has no argument(s) {sorted(stale)}; update the tables in {__file__}")
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexpr_names:
            signature[arg] = "constexpr"
            if arg not in constexprs:
                # A constexpr the launcher takes from a module constant (e.g. tiling.GROUP,
                # imported by the kernel's module under the same name).
                value = getattr(module, arg, None)
                if not isinstance(value, (bool, int, float, str)):
                    raise KeyError(f"{fn.__name__}: no value for constexpr {arg}; teach {__file__} about it")
                constexprs[arg] = value
        elif arg in unit:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            signature[arg] = ("*" + case["dtype"]) if arg in spec["data_ptrs"] else "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg.startswith("stride_") or arg in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = set(constexprs) - set(fn.arg_names)
    if unknown:
        raise KeyError(f"{fn.__name__}: config sets unknown arguments {sorted(unknown)}")
    return fn, signature, constexprs, attrs


_RESOURCE_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_MMA_RE = re.compile(r"\b(HGMMA|HMMA|IMMA|DMMA)\b")


def _wants_hgmma(case: dict) -> bool:
    """16-bit dots in tiles of 64 rows or more on 4 or more warps must become wgmma."""
    return (
        case["kind"] == "dot"
        and case["dtype"] in ("fp16", "bf16")
        and case["block"] >= HGMMA_MIN_ROWS  # the tile's rows: BLOCK in every dot kernel
        and case["config"]["num_warps"] >= HGMMA_MIN_WARPS
    )


def _spills_without_regalloc_flag(kernel, tmpdir: str, cuobjdump: str) -> dict | None:
    """Resource usage of the same PTX assembled without ``--regAllocOptLevel=2``, or None.

    Triton 3.9 passes that flag to every ``ptxas`` run ("to work around ptxas 13.x
    bug"); with it, ptxas 13 was seen to spill 4-16 bytes at 32-80 registers (one
    STL/LDL pair: a value kept across the kernel), spills gone without it. None when
    this Triton does not pass the flag, or the rerun fails.
    """
    import inspect

    try:
        from triton.backends.nvidia import compiler as nv

        if "regAllocOptLevel" not in inspect.getsource(nv.CUDABackend.make_cubin):
            return None
        ptxas = nv.get_ptxas(SM90[1]).path if hasattr(nv, "get_ptxas") else _triton_nvidia_bin("ptxas")
        arch = nv.sm_arch_from_capability(SM90[1])
    except Exception:  # noqa: BLE001 - a diagnosis only
        return None
    ptx_path = os.path.join(tmpdir, f"{os.getpid()}.ptx")
    obj_path = ptx_path + ".o"
    with open(ptx_path, "w") as f:
        f.write(kernel.asm["ptx"])
    fmad = [] if getattr(kernel.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    cmd = [ptxas, "-lineinfo", *fmad, f"--gpu-name={arch}", ptx_path, "-o", obj_path]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return None
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", obj_path], capture_output=True, text=True)
    res = {k.lower(): int(v) for k, v in _RESOURCE_RE.findall(usage.stdout)}
    return res if {"stack", "local"} <= set(res) else None


def _compile_case(case: dict, tmpdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = _triton_nvidia_bin("cuobjdump")
    out = dict(case)
    t0 = time.perf_counter()
    try:
        fn, signature, constexprs, attrs = _build_source(case)
        options = {k: v for k, v in case["config"].items() if k != "kwargs"}
        try:
            src = ASTSource(fn, signature, constexprs, attrs)
        except TypeError:  # an older ASTSource without attrs
            src = ASTSource(fn, signature, constexprs)
        kernel = triton.compile(src, target=GPUTarget(*SM90), options=options)
    except Exception as e:  # noqa: BLE001 - report every failure, keep compiling the rest
        msg = f"{type(e).__name__}: {e}"
        if len(msg) > 2000:  # a CompilationError: where (first line) and what (the end)
            msg = msg.splitlines()[0] + " [...] " + msg[-1500:]
        out.update(ok=False, error=msg, seconds=round(time.perf_counter() - t0, 2))
        return out
    out["compile_seconds"] = round(time.perf_counter() - t0, 2)
    out["shared"] = int(kernel.metadata.shared)
    cubin_path = os.path.join(tmpdir, f"{os.getpid()}.cubin")
    with open(cubin_path, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path], capture_output=True, text=True)
    if usage.returncode:
        out.update(ok=False, error=f"cuobjdump --dump-resource-usage failed: {usage.stderr.strip()}")
        return out
    resources = {k.lower(): int(v) for k, v in _RESOURCE_RE.findall(usage.stdout)}
    missing = {"reg", "stack", "local"} - set(resources)
    if missing:
        out.update(ok=False, error=f"no {sorted(missing)} in cuobjdump's resource usage:\n{usage.stdout}")
        return out
    out.update(resources=resources, ok=True)
    if resources["stack"] or resources["local"]:
        out["without_regalloc_flag"] = _spills_without_regalloc_flag(kernel, tmpdir, cuobjdump)
    if _wants_hgmma(case):  # disassembling takes ~1 s a kernel: only where it is asserted
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin_path], capture_output=True, text=True)
        if sass.returncode:
            out.update(ok=False, error=f"cuobjdump --dump-sass failed: {sass.stderr.strip()}")
            return out
        out["mma"] = sorted(set(_MMA_RE.findall(sass.stdout)))
    out["ptx_bytes"] = len(kernel.asm.get("ptx", ""))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _worker(index: int, count: int, compile_all: bool, out_path: str) -> None:
    cases = _enumerate_cases(compile_all)[index::count]
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for case in cases:
            results.append(_compile_case(case, tmpdir))
            with open(out_path + ".part", "w") as f:  # partial results survive a timeout
                json.dump(results, f)
            os.replace(out_path + ".part", out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)


# --------------------------------------------------------------------------------------
# pytest side.
# --------------------------------------------------------------------------------------


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
    if _wants_hgmma(r) and "HGMMA" not in r.get("mma", ()):
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
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(i), str(workers), str(int(compile_all))]
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
        path = _triton_nvidia_bin(tool)
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


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # 3.9's notice, once per worker
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker INDEX COUNT COMPILE_ALL OUT.json (run by pytest)")

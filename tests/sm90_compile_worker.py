"""The worker of ``tests/test_compile_sm90.py``: compiles the Triton kernels for sm_90 and inspects the cubins.

The test runs under ``TRITON_INTERPRET=1``, where ``@triton.jit`` functions are
interpreter objects, so the compiling happens here, in subprocesses it starts without
it (``python tests/sm90_compile_worker.py --worker INDEX COUNT COMPILE_ALL OUT.json``).
This module holds what such a worker needs: the tables of kernels and of the layouts
they are launched with, the enumeration of the cases (tile configs, dtypes, layouts),
the ``ASTSource`` signature of each case, the compile itself and the parsing of
``cuobjdump``'s resource usage and SASS. The test's module docstring says what is
compiled and why; the checks on the records are the test's.

Importing this module imports neither triton nor torch (the test imports it under
the interpreter for ``triton_nvidia_bin`` and ``wants_hgmma``).
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

SM90 = ("cuda", 90, 32)
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = ("fp32", "fp16", "bf16")
PERMUTE_BLOCK_H = (16, 256)  # fallback: smallest and largest tile permute._block_h picks on a GPU
PERMUTE_BLOCK_M = 32  # fallback for permute._BLOCK_ROWS
HGMMA_MIN_ROWS = 64
HGMMA_MIN_WARPS = 4

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


def triton_nvidia_bin(tool: str) -> str:
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


def wants_hgmma(case: dict) -> bool:
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
        ptxas = nv.get_ptxas(SM90[1]).path if hasattr(nv, "get_ptxas") else triton_nvidia_bin("ptxas")
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

    cuobjdump = triton_nvidia_bin("cuobjdump")
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
    if wants_hgmma(case):  # disassembling takes ~1 s a kernel: only where it is asserted
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


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # 3.9's notice, once per worker
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker INDEX COUNT COMPILE_ALL OUT.json (run by pytest)")

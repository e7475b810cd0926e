"""Compiles the persistent SDD, DSD and DSD^T kernels (``kernels/sdd_persistent.py``, ``kernels/dsd_persistent.py``,
``kernels/dsd_t_persistent.py``) and the GLU backward SDD (``kernels/sdd_glu_backward.py``) for sm_90
and inspects their SASS.

Run by ``tests/test_sdd_persistent.py``, ``tests/test_dsd_persistent.py``,
``tests/test_dsd_t_persistent.py`` and ``tests/test_sdd_glu_backward.py`` in a subprocess without
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` functions cannot be compiled):
``python tests/sm90_persistent_worker.py OUT.json [all] [sdd|dsd|dsd_t|glu_bwd]`` (a family: only its
cases; none: all four). Writes one JSON record per
case: resources from ``cuobjdump --dump-resource-usage`` (REG, STACK, LOCAL), the
dynamic shared memory Triton asks for (``metadata.shared``), and counts of the SASS
instructions the checks and ``docs/perf-notes.md`` talk about (HGMMA: wgmma;
UTMALDG: TMA tile loads; LDGSTS: cp.async; STG.E.128: 16-byte stores; LDL/STL:
local memory; USETMAXREG: the register split a warp-specialized kernel would show).

The cases are the launches a bf16 Hopper run makes at BLOCK=128 (the default config,
``sdd_persistent.default_config``, of each kernel form and operand layout, the fused
gather's ``gather=`` launches among them: A by pointers through the index, B by TMA), the
schedule kernel, and the flattened persistent loop (``FLATTEN``); for the DSD, the default config
(``dsd_persistent.default_config``) with TMA (N- and K-major ``w2``, with routing weights, with a K
tail) and pointers, and its dual form (``also=``: two K loops into one accumulator, the backward's
``dx_sorted``) with TMA (both weights K-major, mixed orientations, routing weights, a K tail,
flattened) and pointers; for the DSD^T, the default config (``dsd_t_persistent.default_config``) with TMA
(``[E, ffn, N]`` and transposed ``[E, N, ffn]`` targets, flattened) and pointers, and its schedule kernel.
With ``all``, every config of ``persistent_configs(128, use_tma=...)`` (and ``dsd_persistent_configs``,
``dsd_t_persistent_configs``) in both load modes as well (about 60 SDD, 120 DSD and 110 DSD^T kernels).

Arguments are specialised as a real launch is: pointers 16-byte aligned, unit
strides as ``constexpr 1`` (the JIT specialises integers equal to 1), the other
strides and K, N divisible by 16.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SM90 = ("cuda", 90, 32)
DATA_PTRS = ("a_ptr", "b_ptr", "v_ptr", "out_ptr", "gate_ptr", "up_ptr", "data_ptr", "g_ptr", "u_ptr", "dg_ptr",
             "du_ptr", "h_ptr", "data2_ptr", "b2_ptr")
ALIGNED_INTS = ("K", "N")
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "STG.E.128", "LDL", "STL", "USETMAXREG")
BLOCK = 128


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _module():
    # By import path: the package exports the function sdd_persistent under the module's name.
    import importlib

    return importlib.import_module("blocksparse_moe.kernels.sdd_persistent")


def _dsd_module():
    import importlib

    return importlib.import_module("blocksparse_moe.kernels.dsd_persistent")


def _dsd_cases(compile_all: bool) -> list[dict]:
    D = _dsd_module()
    cases = []

    def add(name, tma, k_major=False, row_weights=False, k_tail=False, cfg=None, dual=None):
        # dual: the second pair's (TMA?, K-major?) of the also= form (None: one product).
        cfg = dict(cfg or D.default_config(BLOCK, 2))
        cases.append(dict(name=name, kernel="dsd", dtype="bf16", use_tma=tma, k_major=k_major,
                          row_weights=row_weights, k_tail=k_tail, config=cfg, dual=dual))  # fmt: skip

    add("dsd tma", True)
    add("dsd tma k-major w2 (down_proj^T)", True, k_major=True)
    add("dsd tma row_weights", True, row_weights=True)
    add("dsd tma k-tail (ffn % 128 != 0)", True, k_tail=True)
    add("dsd tma flatten", True, cfg=dict(D.default_config(BLOCK, 2), FLATTEN=True))
    add("dsd pointers", False)
    add("dsd pointers row_weights", False, row_weights=True)
    # The dual form (also=): the backward's dx_sorted = dg @ w1^T + du @ v1^T, both weights the K-major
    # views of [E, H, ffn] parameters; one N-major and one K-major weight; a K tail; pointers.
    add("dsd dual tma k-major (dx: dg@w1^T + du@v1^T)", True, k_major=True, dual=(True, True))
    add("dsd dual tma n-major + k-major", True, dual=(True, True))
    add("dsd dual tma row_weights", True, k_major=True, row_weights=True, dual=(True, True))
    add("dsd dual tma k-tail (ffn % 128 != 0)", True, k_major=True, k_tail=True, dual=(True, True))
    add("dsd dual tma flatten", True, k_major=True, cfg=dict(D.default_config(BLOCK, 2), FLATTEN=True),
        dual=(True, True))  # fmt: skip
    add("dsd dual pointers", False, dual=(False, False))
    if compile_all:
        for tma in (True, False):
            for cfg in D.dsd_persistent_configs(BLOCK, 2, use_tma=tma):
                add(f"dsd {'tma' if tma else 'pointers'} sweep", tma, cfg=cfg)
    return cases


def _dsd_source(case: dict):
    fn = _dsd_module()._dsd_persistent_kernel
    cfg = case["config"]
    dual = case.get("dual")
    tma2, k_major2 = dual or (False, False)
    unit = (
        {"stride_on"}
        | ({"stride_bk"} if case["k_major"] else {"stride_bn"})
        | ({"stride_w"} if case["row_weights"] else set())
        | (({"stride_ck"} if k_major2 else {"stride_cn"}) if dual else set())
    )
    constexprs = dict(
        BLOCK=BLOCK, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], COL_BITS=7, USE_TMA=case["use_tma"],
        B_K_MAJOR=case["k_major"], DUAL=dual is not None, TMA2=tma2, B2_K_MAJOR=k_major2, K_TAIL=case["k_tail"],
        ROW_WEIGHTS=case["row_weights"], UPCAST=False, PRECISION="tf32", FLATTEN=cfg.get("FLATTEN", False),
    )  # fmt: skip
    return _signature(fn, constexprs, unit, case["dtype"], {"w_ptr": "fp32" if case["row_weights"] else case["dtype"]})


def _dsd_t_module():
    import importlib

    return importlib.import_module("blocksparse_moe.kernels.dsd_t_persistent")


def _dsd_t_cases(compile_all: bool) -> list[dict]:
    D = _dsd_t_module()
    cases = []

    def add(name, tma, transposed=False, cfg=None):
        cfg = dict(cfg or D.default_config(BLOCK, 2))
        cases.append(dict(name=name, kernel="dsd_t", dtype="bf16", use_tma=tma, transposed=transposed, config=cfg))

    add("dsd_t tma", True)
    add("dsd_t tma transposed out (dw1^T)", True, transposed=True)
    add("dsd_t tma flatten", True, cfg=dict(D.default_config(BLOCK, 2), FLATTEN=True))
    add("dsd_t pointers", False)
    add("dsd_t pointers transposed out (dw1^T)", False, transposed=True)
    if compile_all:
        for tma in (True, False):
            for cfg in D.dsd_t_persistent_configs(BLOCK, 2, use_tma=tma):
                add(f"dsd_t {'tma' if tma else 'pointers'} sweep", tma, cfg=cfg)
    cases.append(dict(name="dsd_t schedule", kernel="schedule", family="dsd_t",
                      config={"num_warps": 4, "num_stages": 3}))  # fmt: skip
    return cases


def _dsd_t_source(case: dict):
    from triton.compiler import ASTSource

    D = _dsd_t_module()
    if case.get("kernel") == "schedule":
        sig = {"order_ptr": "*i32", "schedule_ptr": "*i32", "E": "i32", "F": "i32", "NT": "i32", "P": "i32",
               "COL_BITS": "constexpr", "GROUP": "constexpr", "TILE": "constexpr"}  # fmt: skip
        return ASTSource(D._dsd_t_schedule_kernel, sig, {"COL_BITS": 7, "GROUP": D.GROUP, "TILE": D._SCHEDULE_TILE})
    cfg = case["config"]
    # b [S, H] is row-contiguous (TMA needs it); the target is N-contiguous, or K-contiguous (dw1^T).
    unit = {"stride_bn"} | ({"stride_ok"} if case["transposed"] else {"stride_on"})
    constexprs = dict(
        BLOCK=BLOCK, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], COL_BITS=7, USE_TMA=case["use_tma"],
        UPCAST=False, PRECISION="tf32", FLATTEN=cfg.get("FLATTEN", False),
    )  # fmt: skip
    return _signature(D._dsd_t_persistent_kernel, constexprs, unit, case["dtype"], {})


def _glu_bwd_module():
    import importlib

    return importlib.import_module("blocksparse_moe.kernels.sdd_glu_backward")


def _glu_bwd_cases(compile_all: bool) -> list[dict]:
    G = _glu_bwd_module()
    cases = []

    def add(name, tma, k_major=True, store_h=False, cfg=None, row_weights=False, weighted_h=False):
        # A sweep config keeps its path's default epilogue chunks (EPI_SPLIT) unless it names them.
        cfg = dict(G.backward_default_config(BLOCK, 2, use_tma=tma, row_weights=row_weights), **(cfg or {}))
        cases.append(dict(name=name, kernel="glu_bwd", dtype="bf16", use_tma=tma, k_major=k_major, store_h=store_h,
                          row_weights=row_weights, weighted_h=weighted_h, config=cfg))  # fmt: skip

    # w2 [E, ffn, H] contiguous, as the layer stores it: w2^T is the K-major view (the default case).
    add("glu_bwd tma", True)
    add("glu_bwd tma store_h", True, store_h=True)
    add("glu_bwd tma n-major w2^T", True, k_major=False)
    add("glu_bwd tma flatten", True, cfg=dict(G.backward_default_config(BLOCK, 2), FLATTEN=True))
    add("glu_bwd tma row_weights", True, row_weights=True)
    add("glu_bwd tma store_h row_weights", True, store_h=True, row_weights=True)
    # h stored as row_weights[r] * h[r] (weighted_h: the down projection's dw2 without dy scaled in place).
    add("glu_bwd tma store_h row_weights weighted_h", True, store_h=True, row_weights=True, weighted_h=True)
    add("glu_bwd pointers", False)
    add("glu_bwd pointers store_h", False, store_h=True)
    add("glu_bwd pointers row_weights", False, row_weights=True)
    add("glu_bwd pointers store_h row_weights", False, store_h=True, row_weights=True)
    if compile_all:
        P = _module()
        for tma in (True, False):
            for cfg in P.persistent_configs(BLOCK, 2, True, use_tma=tma):
                add(f"glu_bwd {'tma' if tma else 'pointers'} sweep", tma, store_h=True, cfg=cfg, row_weights=True)
    return cases


def _glu_bwd_source(case: dict):
    cfg = case["config"]
    rw = case.get("row_weights", False)
    # row_weights contiguous fp32 as the router makes them (stride_w == 1, specialised as a launch is).
    unit = {"stride_ak"} | ({"stride_bk"} if case["k_major"] else {"stride_bn"}) | ({"stride_w"} if rw else set())
    constexprs = dict(
        BLOCK=BLOCK, BLOCK_K=cfg["BLOCK_K"], BLOCKS_N=cfg["BLOCKS_N"], COL_BITS=7, A_TMA=case["use_tma"],
        B_TMA=case["use_tma"], B_K_MAJOR=case["k_major"] and case["use_tma"], STORE_H=case["store_h"], UPCAST=False,
        EPI_TMA=case["use_tma"] and cfg["BLOCKS_N"] == 1,  # as the launcher decides (aligned block tensors)
        ROW_WEIGHTS=rw, EPI_SPLIT=cfg.get("EPI_SPLIT", 1), PRECISION="tf32", FLATTEN=cfg.get("FLATTEN", False),
        WEIGHTED_H=case.get("weighted_h", False),
    )  # fmt: skip
    ptrs = {"w_ptr": "fp32", "dw_ptr": "fp32"} if rw else {}
    return _signature(_glu_bwd_module()._sdd_glu_bwd_kernel, constexprs, unit, case["dtype"], ptrs)


def _cases(compile_all: bool, families=("sdd", "dsd", "dsd_t", "glu_bwd")) -> list[dict]:
    P = _module()

    cases = []
    if "glu_bwd" in families:
        cases += _glu_bwd_cases(compile_all)
    if "dsd" in families:
        cases += _dsd_cases(compile_all)
    if "dsd_t" in families:
        cases += _dsd_t_cases(compile_all)
    if "sdd" not in families:
        return cases

    def add(name, glu, tma, k_major=False, store_pre=False, cfg=None, gather=False, **extra):
        # use_tma: B by TMA (what the UTMALDG check reads); A too unless gathered (A goes by pointers then).
        cfg = dict(cfg or P.default_config(BLOCK, 2, glu), **extra)
        cases.append(dict(name=name, dtype="bf16", glu=glu, use_tma=tma, k_major=k_major, store_pre=store_pre,
                          gather=gather, config=cfg))  # fmt: skip

    add("sdd tma", False, True)
    add("sdd tma k-major b (w2^T)", False, True, k_major=True)
    add("sdd pointers", False, False)
    add("sdd tma flatten", False, True, FLATTEN=True)
    add("glu tma", True, True)
    add("glu tma store_pre k-major (gate_up_proj^T)", True, True, k_major=True, store_pre=True)
    add("glu pointers", True, False)
    # The fused gather (gather=): A's rows by masked pointer loads through the index, B by TMA or pointers.
    add("sdd gather tma-b", False, True, gather=True)
    add("glu gather tma-b", True, True, gather=True)
    add("glu gather tma-b store_pre k-major (gate_up_proj^T)", True, True, k_major=True, store_pre=True, gather=True)
    add("sdd gather pointers", False, False, gather=True)
    if compile_all:
        for glu in (False, True):
            for tma in (True, False):
                for cfg in P.persistent_configs(BLOCK, 2, glu, use_tma=tma):
                    add(f"{'glu' if glu else 'sdd'} {'tma' if tma else 'pointers'} sweep", glu, tma, cfg=cfg)
            # A by pointers under gather: the pointer path's configs (no BLOCK_K 128), B by TMA.
            for cfg in P.persistent_configs(BLOCK, 2, glu, use_tma=False):
                add(f"{'glu' if glu else 'sdd'} gather tma-b sweep", glu, True, cfg=cfg, gather=True)
    cases.append(dict(name="schedule", kernel="schedule", config={"num_warps": 4, "num_stages": 3}))
    return cases


def _source(case: dict):
    from triton.compiler import ASTSource

    P = _module()

    if case.get("kernel") == "dsd_t" or case.get("family") == "dsd_t":
        return _dsd_t_source(case)
    if case.get("kernel") == "schedule":
        fn = P._schedule_kernel
        sig = {"offsets_ptr": "*i32", "schedule_ptr": "*i32", "R": "i32", "F": "i32", "NT": "i32",
               "COL_BITS": "constexpr", "GROUP": "constexpr", "TILE": "constexpr"}  # fmt: skip
        return ASTSource(fn, sig, {"COL_BITS": 7, "GROUP": P.GROUP, "TILE": P._SCHEDULE_TILE})
    if case.get("kernel") == "dsd":
        return _dsd_source(case)
    if case.get("kernel") == "glu_bwd":
        return _glu_bwd_source(case)
    fn = P._sdd_persistent_kernel
    cfg = case["config"]
    gather = case.get("gather", False)
    # The gather index is contiguous as token_index(plan) makes it (stride_g == 1, specialised as a launch is).
    unit = {"stride_ak", "stride_g"} | ({"stride_bk", "stride_vk"} if case["k_major"] else {"stride_bn", "stride_vn"})
    constexprs = dict(
        BLOCK=BLOCK, BLOCK_K=cfg["BLOCK_K"], BLOCKS_N=cfg["BLOCKS_N"], COL_BITS=7, GATHER=gather,
        A_TMA=case["use_tma"] and not gather, B_TMA=case["use_tma"], B_K_MAJOR=case["k_major"], GLU=case["glu"],
        STORE_PRE=case["store_pre"],
        UPCAST=False, PRECISION="tf32", FLATTEN=cfg.get("FLATTEN", False),
    )  # fmt: skip
    return _signature(fn, constexprs, unit, case["dtype"], {})


def _signature(fn, constexprs: dict, unit: set, dtype: str, ptr_dtypes: dict):
    """The ASTSource of a launch: ``unit`` strides as constexpr 1, pointers and other strides 16-aligned."""
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in unit:
            sig[arg], constexprs[arg] = "constexpr", 1
        elif arg.endswith("_ptr"):
            sig[arg] = "*" + ptr_dtypes.get(arg, dtype) if arg in DATA_PTRS or arg in ptr_dtypes else "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "i32"
            if arg.startswith("stride_") or arg in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {p.name for p in fn.params if p.is_constexpr} - set(constexprs)
    if missing:  # the kernel grew a constexpr: this table must follow
        raise KeyError(f"no value for constexpr(s) {sorted(missing)}; update {__file__}")
    try:
        return ASTSource(fn, sig, constexprs, attrs)
    except TypeError:  # an older ASTSource without attrs (the device image's triton may be older)
        return ASTSource(fn, sig, constexprs)


def _compile(case: dict, tmpdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    out = dict(case)
    t0 = time.perf_counter()
    try:
        options = {k: case["config"][k] for k in ("num_warps", "num_stages")}
        kernel = triton.compile(_source(case), target=GPUTarget(*SM90), options=options)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still compile
        msg = f"{type(e).__name__}: {e}"
        out.update(ok=False, error=msg if len(msg) < 2000 else msg[:300] + " [...] " + msg[-1500:])
        return out
    path = os.path.join(tmpdir, f"{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    if not {"reg", "stack", "local"} <= set(res):
        out.update(ok=False, error=f"no REG/STACK/LOCAL in cuobjdump's resource usage:\n{usage}")
        return out
    # The instruction stream only (addresses and encodings vary with nothing that matters).
    body = "\n".join(m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+([^;]*;)", sass))
    out.update(
        ok=True, resources=res, shared=int(kernel.metadata.shared),
        sass={op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass)) for op in SASS_OPS},
        sass_sha=hashlib.sha1(body.encode()).hexdigest()[:12], seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    return out


def main(out_path: str, compile_all: bool, families=("sdd", "dsd", "dsd_t", "glu_bwd")) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # triton 3.9's fp-fusion notice, once per process
    records = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for case in _cases(compile_all, families):
            records.append(_compile(case, tmpdir))
            with open(out_path, "w") as f:  # partial results survive a timeout
                json.dump(records, f, indent=1)


if __name__ == "__main__":
    flags = sys.argv[2:]
    if len(sys.argv) < 2 or not set(flags) <= {"all", "sdd", "dsd", "dsd_t", "glu_bwd"}:
        sys.exit(f"usage: {sys.argv[0]} OUT.json [all] [sdd|dsd|dsd_t|glu_bwd] (run by tests/test_sdd_persistent.py, "
                 f"tests/test_dsd_persistent.py, tests/test_dsd_t_persistent.py, "
                 f"tests/test_sdd_glu_backward.py), got {flags}")  # fmt: skip
    main(sys.argv[1], "all" in flags, tuple(f for f in flags if f != "all") or ("sdd", "dsd", "dsd_t", "glu_bwd"))

"""Persistent SDD (and its GLU form): ``min(#SMs, tiles)`` programs walk a device-built tile schedule.

Same products and output contract as ``kernels/sdd.py``'s ``sdd`` (every block of
``[capacity, bs, bs]`` written, spare blocks and padding rows zero), organised the way
Triton's ``triton_kernels`` matmul_ogs is:

* **A tile schedule on the device.** One int32 per output tile, ``r << COL_BITS | c``
  (block row ``r``, column tile ``c`` of ``BLOCKS_N`` blocks), built by one small
  kernel from ``topo.offsets`` without a host read: the active tiles first, in
  grouped order (``GROUP`` block rows, then the next column tile, as ``tiling`` does,
  for L2 reuse of an expert's weight panel), then the spare tiles. Its length,
  ``R * cdiv(F, BLOCKS_N)``, comes from host-side shapes only.
* **A persistent grid.** ``min(num_programs, tiles)`` programs (``num_programs`` is
  the SM count on a GPU) loop ``for t in tl.range(pid, tiles, num_programs)``. Active
  tiles are spread round-robin over the programs; a spare tile runs no K step and
  stores zeros (the contract), so it costs one store.
* **TMA-fed dense operands** (``A_TMA``, ``B_TMA``): ``tl.make_tensor_descriptor`` over ``a``
  ``[S, K]`` and over ``b`` as one 3-D ``[E, K, N]`` (or K-major ``[E, N, K]``)
  descriptor, created once per program (outside the tile loop, so the tensormap
  writes are amortised over the program's tiles). The box zero-fills past ``S``, ``K``
  and ``N``, but not past an expert's last row: those rows of ``a`` belong to the next
  expert, so the epilogue zeroes the accumulator rows past ``block_row_end`` (exact:
  output row ``i`` depends only on row ``i`` of ``a``). With TMA off, the same
  kernel loads through masked pointers (any strides).
* **The fused gather** (``GATHER``, ``gather=``): ``a`` is the unsorted token rows
  ``[T, K]`` and ``gather [S]`` int32 maps sorted row -> token row (``token_index(plan)``),
  as ScatterMoE and SonicMoE do on Hopper: each tile loads its ``BLOCK`` indices once and
  then ``a``'s rows through them with masked pointer loads (sm_90's TMA cannot gather
  rows, so ``A_TMA`` is off), while ``b`` may still come by TMA (``B_TMA``). The
  separate gather kernel's ``[S, K]`` copy is then neither written nor read again.
* **GLU** (``GLU``): gate and up weights as two B operands into two accumulators
  (one ``BLOCK x 2*BLOCKS_N*BLOCK`` pass over ``a``), ``h = silu(x@w1) * (x@v1)`` in the
  epilogue; only ``h`` is written, and the pre-activations only when asked
  (``STORE_PRE``, what a backward that does not recompute needs).

Opt-in only (``blocksparse_moe.kernels.sdd_persistent`` / ``sdd_glu``): not timed yet,
so nothing uses them by default (docs/perf-notes.md, "Persistent TMA kernels").
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .checks import check_block_args, check_same, check_tensor
from .config import _fits, _registers_fit, dot_precision, interpreting, needs_upcast

# The helpers shared with the persistent DSD and DSD^T live in persistent_common; these
# names stay importable from here (tests/sm90_persistent_worker.py, benchmarks/persistent.py).
from .persistent_common import (  # noqa: F401
    _SCHEDULE_TILE,
    _TMA_ALIGN,
    DEFAULT_NUM_PROGRAMS_CPU,
    _default_programs,
    _ensure_allocator,
    _schedule_kernel,
    _sm_count,
    expert_weight_desc,
    load_expert_tile,
    check_config_keys,
    resolve_tma,
    schedule_tiles,
    tma_problem,
)
from .tiling import GROUP  # noqa: F401 - re-exported: the worker compiles _schedule_kernel with it


@triton.jit
def _sdd_persistent_kernel(
    a_ptr,  # [S, K] sorted rows, or [T, K] token rows under GATHER; strides (stride_am, stride_ak)
    gather_ptr,  # [S] int32 sorted row -> row of a (GATHER only; schedule_ptr otherwise, never read), stride stride_g
    b_ptr,  # [E, K, N] per-expert dense (gate weights under GLU), strides (stride_be, stride_bk, stride_bn)
    v_ptr,  # [E, K, N] up weights (GLU only; b_ptr otherwise), strides (stride_ve, stride_vk, stride_vn)
    out_ptr,  # [capacity, BLOCK, BLOCK] contiguous: the product, or h = silu(gate) * up under GLU
    gate_ptr,  # [capacity, BLOCK, BLOCK] contiguous: x @ w1 (STORE_PRE only)
    up_ptr,  # [capacity, BLOCK, BLOCK] contiguous: x @ v1 (STORE_PRE only)
    schedule_ptr,  # [num_tiles] int32: tile -> (r << COL_BITS) | c
    block_row_expert_ptr,  # [R] int32: block row -> expert (E if spare)
    block_row_start_ptr,  # [R] int32: block row -> first sorted position
    block_row_end_ptr,  # [R] int32: block row -> end of its expert's rows (exclusive)
    offsets_ptr,  # [R + 1] int32: offsets[R] = number of active blocks
    num_tiles,
    num_programs,
    S,
    R,
    K,
    N,
    F,
    E,
    stride_am,
    stride_ak,
    stride_g,
    stride_be,
    stride_bk,
    stride_bn,
    stride_ve,
    stride_vk,
    stride_vn,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_N: tl.constexpr,
    COL_BITS: tl.constexpr,
    GATHER: tl.constexpr,  # a's rows through gather_ptr (the fused gather); then A_TMA is off
    A_TMA: tl.constexpr,  # a through a [S, K] descriptor (TMA cannot gather rows on sm_90)
    B_TMA: tl.constexpr,  # b (and v) through a 3-D descriptor
    B_K_MAJOR: tl.constexpr,  # B_TMA only: b and v are K-contiguous views (stride_bk == 1), e.g. w2^T
    GLU: tl.constexpr,
    STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """Grid ``(min(num_programs, num_tiles),)``; each program computes tiles ``pid, pid + P, ...``.

    Tile ``(r, c)`` is blocks ``r*F + c*BLOCKS_N ..`` of block row ``r``: one
    ``BLOCK x BLOCKS_N*BLOCK`` product over the whole K. A spare tile (``r*F >=
    offsets[R]``) runs zero K steps (its accumulator stays zero), so the loop body has
    no branch; blocks past ``F`` in a row's last tile are not stored.
    """
    BN: tl.constexpr = BLOCKS_N * BLOCK
    offs = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BLOCK_K)
    n_active = tl.load(offsets_ptr + R)
    k_steps = tl.cdiv(K, BLOCK_K)
    # Once per program: the tensormaps are written to the global scratch that
    # triton.set_allocator provides (128 bytes each), then reused for every tile.
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[S, K], strides=[stride_am, 1], block_shape=[BLOCK, BLOCK_K])
    if B_TMA:
        b_desc = expert_weight_desc(b_ptr, E, K, N, stride_be, stride_bk, stride_bn, B_K_MAJOR, BLOCK_K, BN)
        v_desc = expert_weight_desc(v_ptr, E, K, N, stride_ve, stride_vk, stride_vn, B_K_MAJOR, BLOCK_K, BN)
    else:  # unused: load_expert_tile takes both forms
        b_desc, v_desc = b_ptr, v_ptr
    # No warp_specialize: triton 3.9 compiled this loop with it to the same sm_90 SASS as without
    # (tests/sm90_persistent_worker.py, docs/perf-notes.md), and older Tritons lack the argument.
    for t in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        packed = tl.load(schedule_ptr + t)
        r = packed >> COL_BITS
        f0 = (packed & ((1 << COL_BITS) - 1)) * BLOCKS_N
        first = r * F + f0  # the tile's first block
        steps = tl.where(first < n_active, k_steps, 0)  # a spare tile: no K step, zeros stored
        e = tl.load(block_row_expert_ptr + r)  # E on a spare row: never read with (steps == 0)
        row0 = tl.load(block_row_start_ptr + r)
        row_end = tl.load(block_row_end_ptr + r)
        rows = row0 + offs
        row_mask = rows < row_end
        col0 = f0 * BLOCK
        cols = col0 + offs_n
        col_mask = cols < N
        acc = tl.zeros((BLOCK, BN), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK, BN), dtype=tl.float32)  # GLU's up projection (dead code otherwise)
        if GATHER:
            # Sorted row -> row of a, once per tile (not per K step). Rows past the expert's end
            # (and a spare tile's empty range, start = end = S) read neither the index nor a.
            src = tl.load(gather_ptr + rows.to(tl.int64) * stride_g, mask=row_mask, other=0)
        else:
            src = rows
        # int64 before the multiply: a row index times stride_am can pass 2**31.
        a_ptrs = a_ptr + src.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_off = e.to(tl.int64) * stride_be + offs_k.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
        v_off = e.to(tl.int64) * stride_ve + offs_k.to(tl.int64)[:, None] * stride_vk + cols.to(tl.int64)[None, :] * stride_vn
        for ks in range(0, steps):
            k0 = ks * BLOCK_K
            k_mask = offs_k < K - k0  # the pointer loads' K edge (unused when both operands come by TMA)
            if A_TMA:
                a = a_desc.load([row0, k0])
            else:
                a = tl.load(a_ptrs + k0 * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = load_expert_tile(b_desc, b_ptr, b_off, e, k0, col0, k_mask, col_mask, stride_bk, B_TMA, B_K_MAJOR,
                                 BLOCK_K, BN)  # fmt: skip
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GLU:
                v = load_expert_tile(v_desc, v_ptr, v_off, e, k0, col0, k_mask, col_mask, stride_vk, B_TMA,
                                     B_K_MAJOR, BLOCK_K, BN)  # fmt: skip
                if UPCAST:
                    v = v.to(tl.float32)
                acc_v = tl.dot(a, v, acc_v, input_precision=PRECISION)
        # Rows past the expert's end: TMA read the next expert's rows there. Zero them
        # (the pointer and gather paths loaded zeros already; this keeps one epilogue).
        acc = tl.where(row_mask[:, None], acc, 0.0)
        # Column j of the tile is column j % BLOCK of block first + j // BLOCK.
        blk = first + offs_n // BLOCK
        block_off = blk.to(tl.int64)[None, :] * (BLOCK * BLOCK) + offs[:, None] * BLOCK + (offs_n % BLOCK)[None, :]
        store_mask = (f0 + offs_n // BLOCK < F)[None, :]
        if GLU:
            acc_v = tl.where(row_mask[:, None], acc_v, 0.0)
            h = acc * tl.sigmoid(acc) * acc_v  # silu(gate) * up, in fp32 (one rounding, at the store)
            tl.store(out_ptr + block_off, h.to(out_ptr.dtype.element_ty), mask=store_mask)
            if STORE_PRE:
                tl.store(gate_ptr + block_off, acc.to(gate_ptr.dtype.element_ty), mask=store_mask)
                tl.store(up_ptr + block_off, acc_v.to(up_ptr.dtype.element_ty), mask=store_mask)
        else:
            tl.store(out_ptr + block_off, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


# ---------------------------------------------------------------------------------------
# Host side: configs, the schedule, TMA eligibility, launchers.


def persistent_configs(block: int, elem_bytes: int = 2, glu: bool = False, use_tma: bool = True) -> list[dict]:
    """Launchable configs ``{BLOCK_K, BLOCKS_N, num_warps, num_stages}`` for a block size and element size.

    Tiles are ``block x BLOCKS_N*block`` (256 wide at most: a TMA box dimension's limit);
    under GLU the two accumulators count as one tile twice as wide for registers and
    shared memory. Filtered by the same register and shared-memory models as
    ``kernels.config`` (calibrated on sm_90 SASS). The pointer path (``use_tma=False``)
    does not get BLOCK_K 128: at 128 rows it held every thread's addresses and masks of
    a 128-wide K slice and spilled 64-192 bytes of stack in all four such bf16 configs
    (``tests/sm90_persistent_worker.py all``); the TMA path, with no per-thread
    addresses, stayed at 96-165 registers and no stack.
    """
    eb = 4 if elem_bytes >= 4 else 2
    out = []
    block_ks = (32, 64, 128) if use_tma else (32, 64)
    for blocks_n, block_k, warps, stages in itertools.product((1, 2, 4, 8, 16), block_ks, (4, 8), (2, 3, 4)):
        n = blocks_n * block
        width = 2 * n if glu else n
        if n > 256 or width > 512 or (blocks_n > 1 and n < 128):
            continue  # wider than a TMA box, or a narrow multi-block tile that only adds configs
        if _registers_fit(block, width, block_k, warps, eb) and _fits(block, width, block_k, stages, elem_bytes):
            out.append(dict(BLOCK_K=block_k, BLOCKS_N=blocks_n, num_warps=warps, num_stages=stages))
    return out


def default_config(block: int, elem_bytes: int = 2, glu: bool = False) -> dict:
    """The config a launch uses unless told otherwise: the widest tile (256 columns with GLU's
    two halves counted), BLOCK_K 64, the deepest pipeline that fits; one small pinned
    config under the interpreter."""
    if interpreting():
        return dict(BLOCK_K=32, BLOCKS_N=1 if glu else 2, num_warps=4, num_stages=1)
    configs = persistent_configs(block, elem_bytes, glu, use_tma=False)  # one default for both load paths
    if not configs:
        raise ValueError(f"sdd_persistent: no config fits block={block}, element size {elem_bytes}, glu={glu}")
    return preferred_config(configs)


def preferred_config(configs: list[dict]) -> dict:
    """Among ``persistent_configs``: the widest tile, BLOCK_K 64, 8 warps, the deepest pipeline."""
    return max(configs, key=lambda c: (c["BLOCKS_N"], c["BLOCK_K"] == 64, -abs(c["num_warps"] - 8), c["num_stages"]))


def tile_schedule(topo, blocks_n: int) -> torch.Tensor:
    """The device tile schedule ``[R * cdiv(F, blocks_n)]`` int32 (one launch, no host read).

    Depends only on ``topo`` and ``blocks_n``: a caller running several products over
    one topology (forward and backward) may build it once and pass it as ``schedule=``.
    """
    return schedule_tiles(topo, triton.cdiv(topo.ffn_blocks, blocks_n), "sdd_persistent")


def _b_layout(weights: dict[str, torch.Tensor]) -> tuple[bool, list[str]]:
    """(K-major?, problems): the one TMA orientation every weight operand qualifies for."""
    n_major = [p for n, w in weights.items() if (p := tma_problem(n, w, 2))]
    if not n_major:
        return False, []
    k_major = [p for n, w in weights.items() if (p := tma_problem(n, w, 1))]
    return (True, []) if not k_major else (False, n_major)


def token_index(plan) -> torch.Tensor:
    """The ``gather=`` index of a routing plan: ``[S]`` int32, sorted row -> token row (``sorted_to_slot // top_k``).

    One small launch per routing plan (on its device, no host read); the MLP's and GLU's
    SDD, and a backward's, can share it.
    """
    return torch.div(plan.sorted_to_slot, plan.top_k, rounding_mode="floor").to(torch.int32)


def _check_operands(op: str, a, experts, topo, gather, expert_name: str) -> None:
    """``a`` sorted rows ``[S, K]`` (``gather`` None), or token rows ``[T, K]`` read through ``gather [S]``."""
    if gather is None:
        check_block_args(op, a, experts, topo, rows_name="a", expert_name=expert_name)
        return
    check_tensor(op, "a", a, dim=2)
    check_tensor(op, expert_name, experts, dim=3)
    check_same(op, {"a": a, expert_name: experts}, device=topo.device)
    if experts.shape[0] != topo.num_experts:
        raise ValueError(f"{op}: {expert_name} must hold {topo.num_experts} experts in dim 0, got {experts.shape[0]}")
    if not isinstance(gather, torch.Tensor):
        raise TypeError(f"{op}: gather must be a torch.Tensor (int32 [S], token_index(plan)), got {type(gather).__name__}")
    S = topo.num_slots
    if gather.dtype != torch.int32 or gather.dim() != 1 or gather.shape[0] != S or gather.device != a.device:
        raise ValueError(f"{op}: gather must be an int32 [{S}] tensor on {a.device} (sorted row -> row of a, "
                         f"token_index(plan)), got {gather.dtype} {tuple(gather.shape)} on {gather.device}")  # fmt: skip
    if S and a.shape[0] == 0:
        raise ValueError(f"{op}: a has 0 rows but gather holds {S} sorted rows; expected the [T, K] token rows")


def _launch(op, a, b, v, topo, out, gate, up, use_tma, config, num_programs, schedule, store_pre, gather):
    S, K = a.shape
    E, Kb, N = b.shape
    if Kb != K:
        raise ValueError(f"{op}: b.shape[1] must equal a.shape[1]={K}, got {Kb}")
    if N != topo.ffn_size:
        raise ValueError(f"{op}: b.shape[2] must equal topo.ffn_size={topo.ffn_size}, got {N}")
    bs, glu = topo.block_size, v is not None
    shape = (topo.capacity, bs, bs)
    for name, t in (("out", out), ("gate_out", gate), ("up_out", up)):
        if t is not None and (tuple(t.shape) != shape or not t.is_contiguous() or t.dtype != a.dtype):
            raise ValueError(f"{op}: {name} must be a contiguous {a.dtype} tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)} contiguous={t.is_contiguous()}")  # fmt: skip
    new = lambda: torch.empty(shape, dtype=a.dtype, device=a.device)  # noqa: E731
    out = new() if out is None else out
    if store_pre:
        gate = new() if gate is None else gate
        up = new() if up is None else up
    if topo.capacity == 0:
        return out, gate, up
    cfg = dict(default_config(bs, a.element_size(), glu), **(config or {}))
    check_config_keys(op, cfg, ("BLOCK_K", "BLOCKS_N", "num_warps", "num_stages", "FLATTEN"))
    if cfg["BLOCKS_N"] * bs > 256:
        raise ValueError(f"{op}: config BLOCKS_N={cfg['BLOCKS_N']} x block {bs} > 256 columns (a TMA box's limit)")
    weights = {"b": b, "v": v} if glu else {"b": b}
    # Under gather, A comes through masked pointer loads whatever use_tma says (a descriptor
    # reads boxes of consecutive rows; sm_90's TMA has no row gather), so only B must qualify.
    problems = [p for p in [None if gather is not None else tma_problem("a", a, 1)] if p]
    k_major, b_problems = _b_layout(weights)
    problems += b_problems
    b_tma = resolve_tma(op, use_tma, a, problems)
    a_tma = b_tma and gather is None
    nt = triton.cdiv(topo.ffn_blocks, cfg["BLOCKS_N"])
    num_tiles = topo.max_block_rows * nt
    if schedule is None:
        schedule = tile_schedule(topo, cfg["BLOCKS_N"])
    elif schedule.dtype != torch.int32 or schedule.shape != (num_tiles,) or schedule.device != a.device:
        raise ValueError(f"{op}: schedule must be int32 [{num_tiles}] on {a.device} (tile_schedule(topo, "
                         f"{cfg['BLOCKS_N']})), got {schedule.dtype} {tuple(schedule.shape)} on {schedule.device}")  # fmt: skip
    programs = num_programs or _default_programs(a.device)
    if programs < 1:
        raise ValueError(f"{op}: num_programs must be >= 1, got {programs}")
    vv = v if glu else b
    g_, u_ = (gate, up) if store_pre else (out, out)
    _sdd_persistent_kernel[(min(programs, num_tiles),)](
        a, schedule if gather is None else gather, b, vv, out, g_, u_, schedule,
        topo.block_row_expert, topo.block_row_start, topo.block_row_end, topo.offsets,
        num_tiles, programs, S, topo.max_block_rows, K, N, topo.ffn_blocks, E,
        a.stride(0), a.stride(1), 1 if gather is None else gather.stride(0), b.stride(0), b.stride(1), b.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], BLOCKS_N=cfg["BLOCKS_N"], COL_BITS=max(1, (nt - 1).bit_length()),
        GATHER=gather is not None, A_TMA=a_tma, B_TMA=b_tma, B_K_MAJOR=bool(b_tma and k_major), GLU=glu, STORE_PRE=bool(store_pre),
        UPCAST=needs_upcast(a.dtype), PRECISION=dot_precision(a.dtype),
        FLATTEN=bool(cfg.get("FLATTEN", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, gate, up


def sdd_persistent(a: torch.Tensor, b: torch.Tensor, topo, out: torch.Tensor | None = None, *,
                   use_tma: bool | None = None, config: dict | None = None, num_programs: int | None = None,
                   schedule: torch.Tensor | None = None, gather: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Persistent SDD: ``a [S, K]`` sorted rows, ``b [E, K, N]`` (any strides) -> ``[capacity, bs, bs]``.

    The same contract as ``sdd``. ``use_tma``: None picks TMA on an sm_90+ GPU when ``a``
    is row-contiguous and ``b`` is N- or K-contiguous with 16-byte aligned base and
    strides; True requires it (ValueError naming the operand otherwise); False uses
    pointer loads. ``config`` overrides ``default_config`` keys; ``num_programs``
    the persistent grid (default: the SM count); ``schedule`` a prebuilt ``tile_schedule``.

    ``gather`` (the fused gather): ``a`` is then the unsorted token rows ``[T, K]`` (any
    strides) and ``gather [S]`` int32 maps each sorted row to its row of ``a``
    (``token_index(plan)``); the kernel loads ``a[gather[i]]`` where ``sdd_persistent(
    a[gather], b, topo)`` loads row ``i``, so no ``[S, K]`` copy is written or read, and
    the two give the same output (same loads, same K steps). ``a`` then always comes by
    masked pointer loads; ``use_tma`` decides ``b``'s only. ``gather``'s values must lie in
    ``[0, T)``: they are not checked (that would be a host read).
    """
    _check_operands("sdd_persistent", a, b, topo, gather, "b")
    out, _, _ = _launch("sdd_persistent", a, b, None, topo, out, None, None, use_tma, config, num_programs, schedule,
                        False, gather)  # fmt: skip
    return out


def sdd_glu(a: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, topo, out: torch.Tensor | None = None, *,
            store_pre: bool = False, gate_out: torch.Tensor | None = None, up_out: torch.Tensor | None = None,
            use_tma: bool | None = None, config: dict | None = None, num_programs: int | None = None,
            schedule: torch.Tensor | None = None, gather: torch.Tensor | None = None):  # fmt: skip
    """Fused SwiGLU SDD: ``h = silu(a @ w1) * (a @ v1)`` at the topology's blocks, one pass over ``a``.

    ``w1`` and ``v1`` are ``[E, K, N]`` (any strides: halves of a fused gate_up tensor,
    concatenated or interleaved, are views). Returns ``h`` ``[capacity, bs, bs]``, or
    ``(h, gate, up)`` with the pre-activations when ``store_pre`` (what a backward
    needs unless it recomputes them). Other arguments, ``gather`` (the fused gather of
    the token rows ``a [T, K]``) included, as ``sdd_persistent``.
    """
    _check_operands("sdd_glu", a, w1, topo, gather, "w1")
    check_tensor("sdd_glu", "v1", v1, dim=3)
    check_same("sdd_glu", {"w1": w1, "v1": v1})
    if v1.shape != w1.shape:
        raise ValueError(f"sdd_glu: v1 must have w1's shape {tuple(w1.shape)}, got {tuple(v1.shape)}")
    if not store_pre and (gate_out is not None or up_out is not None):
        raise ValueError("sdd_glu: gate_out/up_out are written only with store_pre=True")
    h, g, u = _launch("sdd_glu", a, w1, v1, topo, out, gate_out, up_out, use_tma, config, num_programs, schedule,
                      store_pre, gather)  # fmt: skip
    return (h, g, u) if store_pre else h

"""Persistent DSD: ``y_sorted = blocks(h) @ w2`` on ``min(#SMs, tiles)`` programs, routing weights in the epilogue.

The same product and output contract as ``kernels/dsd.py``'s ``dsd``: ``h_blocks
[capacity, bs, bs]`` (the block-sparse intermediate) times the per-expert dense ``w2
[E, ffn, N]`` gives ``[S, N]`` sorted rows, every row written (each sorted row belongs
to one active block row; padding exists only in index space), so ``out`` may come
from ``torch.empty``. Organised as ``sdd_persistent.py``:

* **The device tile schedule** of ``sdd_persistent.tile_schedule``, over output tiles
  (block row ``r``, column tile ``c`` of ``BLOCK_N`` columns of ``N``): active block
  rows first in grouped order (a weight panel ``w2[e][:, c]`` is then reused from L2 by
  the ``GROUP`` block rows walking it), then the spare rows. No host read.
* **A persistent grid**: ``min(num_programs, tiles)`` programs loop over the schedule.
  A spare tile runs no K step and its row range is empty, so it stores nothing.
* **The K loop** walks the block row's ``F`` blocks in order (block ``r*F + f`` holds
  columns ``f*bs ..`` of expert ``e``'s intermediate), ``BLOCK_K`` (a divisor of ``bs``)
  columns per step: step ``k0`` reads block ``r*F + k0 // bs`` at column ``k0 % bs``.
* **TMA** (``USE_TMA``): ``h_blocks`` through a 3-D ``[capacity, bs, bs]`` descriptor
  (box ``[1, bs, BLOCK_K]``; coordinates stay int32 however large ``capacity * bs``),
  ``w2`` through a 3-D ``[E, K, N]`` descriptor, or ``[E, N, K]`` for K-contiguous views
  (transformers' ``down_proj [E, H, ffn]`` transposed). The ``w2`` box zero-fills past
  ``K`` and ``N``; ``h_blocks``' columns past ``K`` in the last block are not zero-filled
  (they are inside the tensor, and may hold anything: ``dsd`` masks them), so when
  ``K % bs != 0`` (``K_TAIL``) the last K step, peeled off the loop, masks its tile in
  registers. At the two issue-15 shapes ``K`` is a multiple of 128 and there is no tail.
* **Two products, one launch** (``also=(h2_blocks, w2b)``, ``DUAL``): after the K loop
  over ``(h_blocks, w2)`` a second one over ``(h2_blocks, w2b)`` (same topology, same
  shape) into the same fp32 accumulator, then one store: the GLU backward's
  ``dx_sorted = dg @ w1^T + du @ v1^T`` without an ``[S, N]`` temporary or an add pass.
  Both K loops are one ``@triton.jit`` function (``_k_loop``, weights through
  ``persistent_common.load_expert_tile``), so each pair has its own TMA choice (a pair
  goes by descriptors when both its operands qualify) and each weight its own
  orientation (N- or K-major). The two loops are pipelined one after the other: the
  first's shared-memory buffers are dead when the second starts, so the dual kernel
  asks for the single one's shared memory (tests/sm90_persistent_worker.py's "dsd dual"
  records). ``FLATTEN`` does not fuse a tile loop holding two K loops (the dual
  "flatten" record compiles to the same SASS as without it).
* **Routing weights** (``row_weights [S]``, sorted order): each output row is scaled in
  fp32 before its one rounding, so the top-k combine afterwards is a plain gather-sum
  (``permute.combine`` with ``weights=None``).

Opt-in only (``blocksparse_moe.kernels.dsd_persistent``): not timed yet, so nothing
uses it by default (docs/perf-notes.md, "Persistent DSD").
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .checks import check_block_data, check_same, check_tensor
from .config import _fits, _registers_fit, dot_precision, interpreting, needs_upcast
from .persistent_common import (
    _default_programs,
    check_config_keys,
    expert_weight_desc,
    load_expert_tile,
    resolve_tma,
    schedule_tiles,
    tma_problem,
)


@triton.jit
def _k_loop(acc, a_desc, b_desc, data_ptr, b_ptr, first, e, col0, cols, col_mask, steps, K, stride_be, stride_bk,
            stride_bn, TMA: tl.constexpr, B_K_MAJOR: tl.constexpr, K_TAIL: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``acc += blocks(data)[row r] @ b[e][:, col0 ..]`` over ``steps`` K steps: one operand pair's K loop.

    ``first = r * F``, the block row's first block. ``TMA``: both operands by descriptor
    (``b`` through ``load_expert_tile``: N- or K-major), with a K tail peeled off the loop
    (``K_TAIL``) so the main loop's A tiles stay in shared memory for wgmma; else masked
    pointer loads. The persistent DSD calls it once per operand pair (``also=``).
    """
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    a_row = data_ptr + first.to(tl.int64) * (BLOCK * BLOCK) + offs[:, None] * BLOCK + offs_k[None, :]
    b_off = (
        e.to(tl.int64) * stride_be + offs_k.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    )
    # TMA with a K tail: the last step (the only one reaching past K) is peeled off, so
    # the main loop's A tiles stay in shared memory for wgmma (a masked tile goes
    # through registers: tests/sm90_persistent_worker.py's "k-tail" case).
    main_steps = steps
    if TMA:
        if K_TAIL:
            main_steps = tl.maximum(steps - 1, 0)
    for ks in range(0, main_steps):
        k0 = ks * BLOCK_K
        f = k0 // BLOCK  # BLOCK_K divides BLOCK: a step never straddles two blocks
        kk = k0 % BLOCK
        k_mask = offs_k < K - k0
        if TMA:
            a = a_desc.load([first + f, 0, kk]).reshape(BLOCK, BLOCK_K)
        else:
            a = tl.load(a_row + f * (BLOCK * BLOCK) + kk, mask=k_mask[None, :], other=0.0)
        b = load_expert_tile(b_desc, b_ptr, b_off, e, k0, col0, k_mask, col_mask, stride_bk, TMA, B_K_MAJOR, BLOCK_K,
                             BLOCK_N)  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if TMA:
        if K_TAIL:
            if steps > 0:
                k0 = (steps - 1) * BLOCK_K
                k_mask = offs_k < K - k0
                a = a_desc.load([first + k0 // BLOCK, 0, k0 % BLOCK]).reshape(BLOCK, BLOCK_K)
                # The data past K is inside the tensor, so TMA does not zero-fill it.
                a = tl.where(k_mask[None, :], a, 0.0)
                b = load_expert_tile(b_desc, b_ptr, b_off, e, k0, col0, k_mask, col_mask, stride_bk, TMA, B_K_MAJOR,
                                     BLOCK_K, BLOCK_N)  # fmt: skip
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _descriptors(data_ptr, b_ptr, capacity, E, K, N, stride_be, stride_bk, stride_bn, TMA: tl.constexpr,
                 B_K_MAJOR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One operand pair's TMA descriptors ``(blocks [capacity, bs, bs], b [E, K, N] or [E, N, K])``; the pointers without TMA.

    ``h_blocks``' box is ``[1, bs, BLOCK_K]`` (coordinates stay int32 however large
    ``capacity * bs``); ``b``'s zero-fills past ``K`` and ``N``.
    """
    if TMA:
        a_desc = tl.make_tensor_descriptor(data_ptr, shape=[capacity, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK, BLOCK_K])  # fmt: skip
        b_desc = expert_weight_desc(b_ptr, E, K, N, stride_be, stride_bk, stride_bn, B_K_MAJOR, BLOCK_K, BLOCK_N)
    else:  # unused: _k_loop takes both forms
        a_desc, b_desc = data_ptr, b_ptr
    return a_desc, b_desc


@triton.jit
def _dsd_persistent_kernel(
    data_ptr,  # [capacity, BLOCK, BLOCK] block data, contiguous
    b_ptr,  # [E, K, N] per-expert dense, strides (stride_be, stride_bk, stride_bn)
    data2_ptr,  # DUAL only: the second pair's block data (data_ptr otherwise, never read)
    b2_ptr,  # DUAL only: the second pair's [E, K, N], strides (stride_ce, stride_ck, stride_cn)
    out_ptr,  # [S, N] sorted rows, strides (stride_om, stride_on)
    w_ptr,  # [S] routing weights in sorted order (ROW_WEIGHTS only; out_ptr otherwise, never read)
    schedule_ptr,  # [num_tiles] int32: tile -> (r << COL_BITS) | c
    block_row_expert_ptr,  # [R] int32: block row -> expert (E if spare)
    block_row_start_ptr,  # [R] int32: block row -> first sorted position
    block_row_end_ptr,  # [R] int32: block row -> end of its expert's rows (exclusive)
    offsets_ptr,  # [R + 1] int32: block row -> first block (BCSR); spare rows are empty
    num_tiles,
    num_programs,
    K,
    N,
    F,
    E,
    capacity,
    stride_be,
    stride_bk,
    stride_bn,
    stride_ce,
    stride_ck,
    stride_cn,
    stride_om,
    stride_on,
    stride_w,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COL_BITS: tl.constexpr,
    USE_TMA: tl.constexpr,
    B_K_MAJOR: tl.constexpr,  # TMA only: b is a K-contiguous view (stride_bk == 1), e.g. down_proj^T
    DUAL: tl.constexpr,  # a second product blocks(data2) @ b2 into the same accumulator (also=)
    TMA2: tl.constexpr,  # DUAL only: the second pair by TMA
    B2_K_MAJOR: tl.constexpr,  # TMA2 only: b2 is a K-contiguous view (stride_ck == 1), e.g. v1^T
    K_TAIL: tl.constexpr,  # K % BLOCK != 0: the last block's columns past K must be masked
    ROW_WEIGHTS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,  # let the pipeliner prefetch the next tile's K steps during this tile's epilogue
):
    """Grid ``(min(num_programs, num_tiles),)``; program ``p`` computes tiles ``p, p + P, ...``.

    Tile ``(r, c)``: rows ``block_row_start[r] ..`` (at most ``BLOCK``, those below
    ``block_row_end[r]`` stored), columns ``c*BLOCK_N ..`` (those below ``N`` stored),
    summed over the expert's whole ``K`` in ``cdiv(K, BLOCK_K)`` steps (``DUAL``: then
    over the second pair's, into the same fp32 accumulator; one store).
    """
    offs = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    # Once per program (outside the tile loop): the tensormaps go to the global
    # scratch of triton.set_allocator, 128 bytes each, reused for every tile.
    a_desc, b_desc = _descriptors(data_ptr, b_ptr, capacity, E, K, N, stride_be, stride_bk, stride_bn, USE_TMA,
                                  B_K_MAJOR, BLOCK, BLOCK_K, BLOCK_N)  # fmt: skip
    a2_desc, b2_desc = _descriptors(data2_ptr, b2_ptr, capacity, E, K, N, stride_ce, stride_ck, stride_cn,
                                    TMA2, B2_K_MAJOR, BLOCK, BLOCK_K, BLOCK_N)  # fmt: skip
    for t in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        packed = tl.load(schedule_ptr + t)
        r = packed >> COL_BITS
        col0 = (packed & ((1 << COL_BITS) - 1)) * BLOCK_N
        n_blocks = tl.load(offsets_ptr + r + 1) - tl.load(offsets_ptr + r)  # F, or 0 for a spare row
        steps = tl.where(n_blocks > 0, k_steps, 0)
        e = tl.load(block_row_expert_ptr + r)  # E on a spare row: never read (steps == 0)
        rows = tl.load(block_row_start_ptr + r) + offs
        row_mask = rows < tl.load(block_row_end_ptr + r)
        cols = col0 + offs_n
        col_mask = cols < N
        first = r * F  # the block row's first block (int32: < capacity)
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        acc = _k_loop(acc, a_desc, b_desc, data_ptr, b_ptr, first, e, col0, cols, col_mask, steps, K, stride_be,
                      stride_bk, stride_bn, USE_TMA, B_K_MAJOR, K_TAIL, BLOCK, BLOCK_K, BLOCK_N, UPCAST, PRECISION)  # fmt: skip
        if DUAL:
            # The second K loop: its own pipeline (the first's buffers are dead by then), same accumulator.
            acc = _k_loop(acc, a2_desc, b2_desc, data2_ptr, b2_ptr, first, e, col0, cols, col_mask, steps, K,
                          stride_ce, stride_ck, stride_cn, TMA2, B2_K_MAJOR, K_TAIL, BLOCK, BLOCK_K, BLOCK_N, UPCAST,
                          PRECISION)  # fmt: skip
        if ROW_WEIGHTS:
            # In fp32, before the store's one rounding (the weighted combine rounds y_sorted, then scales it).
            w = tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------
# Host side: configs, the schedule, TMA eligibility, the launcher.


def dsd_persistent_configs(block: int, elem_bytes: int = 2, use_tma: bool = True) -> list[dict]:
    """Launchable configs ``{BLOCK_K, BLOCK_N, num_warps, num_stages}``: tiles ``block x BLOCK_N``.

    ``BLOCK_N`` is at most 256 (a TMA box dimension's limit) and ``BLOCK_K`` divides
    ``block`` (a K step reads one block). Filtered by ``kernels.config``'s register and
    shared-memory models. The pointer path does not get BLOCK_K 128, as for
    ``sdd_persistent`` (its pointer loads spilled there on sm_90).
    """
    eb = 4 if elem_bytes >= 4 else 2
    block_ks = [k for k in ((16, 32, 64, 128) if use_tma else (16, 32, 64)) if k <= block]
    out = []
    for block_n, block_k, warps, stages in itertools.product((32, 64, 128, 256), block_ks, (4, 8), (2, 3, 4)):
        if _registers_fit(block, block_n, block_k, warps, eb) and _fits(block, block_n, block_k, stages, elem_bytes):
            out.append(dict(BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps, num_stages=stages))
    return out


def preferred_config(configs: list[dict]) -> dict:
    """The widest tile, BLOCK_K 64 (else the largest), 8 warps, the deepest pipeline."""
    return max(configs, key=lambda c: (c["BLOCK_N"], c["BLOCK_K"] == 64, c["BLOCK_K"], -abs(c["num_warps"] - 8),
                                       c["num_stages"]))  # fmt: skip


def default_config(block: int, elem_bytes: int = 2) -> dict:
    """128x256x64, 8 warps, 4 stages at block 128 in bf16; one small pinned config under the interpreter."""
    return pick_default(dsd_persistent_configs, "dsd_persistent", block, elem_bytes)


def pick_default(configs_of, what: str, block: int, elem_bytes: int) -> dict:
    """``preferred_config`` of ``configs_of(block, elem_bytes, use_tma=False)`` (one default for both load paths).

    Under the interpreter one small pinned config; no config at all is a ``ValueError`` naming ``what``.
    Shared by the persistent DSD and DSD^T.
    """
    if interpreting():
        return dict(BLOCK_K=min(32, block), BLOCK_N=32, num_warps=4, num_stages=1)
    configs = configs_of(block, elem_bytes, use_tma=False)
    if not configs:
        raise ValueError(f"{what}: no config fits block={block}, element size {elem_bytes}")
    return preferred_config(configs)


def dsd_tile_schedule(topo, n: int, block_n: int) -> torch.Tensor:
    """The device tile schedule ``[R * cdiv(n, block_n)]`` int32 over the ``[S, n]`` output (no host read).

    Depends only on ``topo``, ``n`` and ``block_n``: several DSDs over one topology and
    width may share it (``schedule=``).
    """
    return schedule_tiles(topo, triton.cdiv(n, block_n), "dsd_persistent")


def _b_k_major(w2: torch.Tensor, name: str = "w2") -> tuple[bool, str | None]:
    """(K-major?, problem): the TMA orientation ``w2`` qualifies for, N-contiguous first."""
    n_problem = tma_problem(name, w2, 2)
    if n_problem is None:
        return False, None
    return (True, None) if tma_problem(name, w2, 1) is None else (False, n_problem)


def _pair_tma(op: str, use_tma, blocks: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> tuple[bool, bool]:
    """(TMA?, K-major?) for one operand pair: ``resolve_tma`` over the block data and the weight."""
    problems = [p for p in [tma_problem(names[0], blocks, 2)] if p]
    k_major, b_problem = _b_k_major(b, names[1])
    problems += [b_problem] if b_problem else []
    tma = resolve_tma(op, use_tma, blocks, problems)
    return tma, tma and k_major


def _check_also(op: str, also, h_blocks: torch.Tensor, w2: torch.Tensor, topo) -> tuple[torch.Tensor, torch.Tensor]:
    """``also = (h2_blocks, w2b)``: a second pair of ``h_blocks``' and ``w2``'s shapes, dtype and device."""
    if not isinstance(also, (tuple, list)) or len(also) != 2:
        got = f"{type(also).__name__} of length {len(also)}" if isinstance(also, (tuple, list)) else type(also).__name__
        raise TypeError(f"{op}: also must be a pair (h2_blocks, w2b) of tensors, got {got}")
    h2, w2b = also
    check_block_data(op, "also[0] (h2_blocks)", h2, topo)
    check_tensor(op, "also[1] (w2b)", w2b, dim=3)
    check_same(op, {"h_blocks": h_blocks, "also[0] (h2_blocks)": h2, "also[1] (w2b)": w2b}, device=topo.device)
    if w2b.shape != w2.shape:
        raise ValueError(f"{op}: also[1] (w2b) must have w2's shape {tuple(w2.shape)} (one [S, N] sum), "
                         f"got {tuple(w2b.shape)}")  # fmt: skip
    return h2, w2b


def dsd_persistent(h_blocks: torch.Tensor, w2: torch.Tensor, topo, out: torch.Tensor | None = None, *,
                   also: tuple[torch.Tensor, torch.Tensor] | None = None, row_weights: torch.Tensor | None = None,
                   use_tma: bool | None = None, config: dict | None = None, num_programs: int | None = None,
                   schedule: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Persistent DSD: ``h_blocks [capacity, bs, bs]``, ``w2 [E, ffn, N]`` (any strides) -> ``[S, N]``.

    ``dsd``'s contract: every row of the result is written. ``also = (h2_blocks, w2b)``
    (block data over the same ``topo``, ``w2b`` of ``w2``'s shape in any strides) adds a
    second product in the same launch: ``blocks(h) @ w2 + blocks(h2) @ w2b``, both K loops
    into one fp32 accumulator, one store (the GLU backward's ``dx_sorted = dg @ w1^T +
    du @ v1^T``). ``row_weights [S]`` (any
    float dtype, sorted order, e.g. the routing weights ``w.reshape(-1)[plan.sorted_to_slot]``)
    scales row ``i`` (of the sum) in fp32 before the store. ``use_tma``: None picks TMA on an sm_90+
    GPU when ``h_blocks`` and ``w2`` (N- or K-contiguous) have 16-byte aligned bases and
    strides; True requires it (ValueError naming the operand otherwise); False uses
    pointer loads. With ``also`` the choice is per pair: each pair goes by TMA where both
    of its operands qualify (True: all four must), and each weight has its own
    orientation (N- or K-major). ``config`` overrides ``default_config`` keys; ``num_programs`` the
    persistent grid (default: the SM count); ``schedule`` a prebuilt ``dsd_tile_schedule``.
    """
    op = "dsd_persistent"
    check_block_data(op, "h_blocks", h_blocks, topo)
    check_tensor(op, "w2", w2, dim=3)
    check_same(op, {"h_blocks": h_blocks, "w2": w2}, device=topo.device)
    E, K, N = w2.shape
    if E != topo.num_experts or K != topo.ffn_size:
        raise ValueError(f"{op}: w2 must have shape [{topo.num_experts}, {topo.ffn_size}, N], got {tuple(w2.shape)}")
    h2, w2b = _check_also(op, also, h_blocks, w2, topo) if also is not None else (h_blocks, w2)
    S, bs = topo.num_slots, topo.block_size
    if row_weights is not None:
        check_tensor(op, "row_weights", row_weights, dim=1)
        if row_weights.shape[0] != S or row_weights.device != h_blocks.device:
            raise ValueError(f"{op}: row_weights must be [{S}] (one weight per sorted row) on {h_blocks.device}, "
                             f"got {tuple(row_weights.shape)} on {row_weights.device}")  # fmt: skip
    if out is None:
        out = torch.empty(S, N, dtype=h_blocks.dtype, device=h_blocks.device)
    elif out.shape != (S, N) or out.dtype != h_blocks.dtype or out.device != h_blocks.device:
        raise ValueError(f"{op}: out must be a {h_blocks.dtype} tensor of shape {(S, N)} on {h_blocks.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")  # fmt: skip
    if topo.max_block_rows == 0 or N == 0:
        return out
    cfg = dict(default_config(bs, h_blocks.element_size()), **(config or {}))
    check_config_keys(op, cfg, ("BLOCK_K", "BLOCK_N", "num_warps", "num_stages", "FLATTEN"))
    if cfg["BLOCK_N"] > 256:
        raise ValueError(f"{op}: config BLOCK_N={cfg['BLOCK_N']} > 256 columns (a TMA box's limit)")
    if bs % cfg["BLOCK_K"]:
        raise ValueError(
            f"{op}: config BLOCK_K={cfg['BLOCK_K']} must divide the block size {bs} (a K step reads one block)"
        )
    tma, k_major = _pair_tma(op, use_tma, h_blocks, w2, ("h_blocks", "w2"))
    tma2, k_major2 = (_pair_tma(op, use_tma, h2, w2b, ("also[0] (h2_blocks)", "also[1] (w2b)")) if also is not None
                      else (False, False))  # fmt: skip
    nt = triton.cdiv(N, cfg["BLOCK_N"])
    num_tiles = topo.max_block_rows * nt
    if schedule is None:
        schedule = dsd_tile_schedule(topo, N, cfg["BLOCK_N"])
    elif schedule.dtype != torch.int32 or schedule.shape != (num_tiles,) or schedule.device != h_blocks.device:
        raise ValueError(f"{op}: schedule must be int32 [{num_tiles}] on {h_blocks.device} (dsd_tile_schedule(topo, "
                         f"{N}, {cfg['BLOCK_N']})), got {schedule.dtype} {tuple(schedule.shape)} on {schedule.device}")  # fmt: skip
    programs = num_programs or _default_programs(h_blocks.device)
    if programs < 1:
        raise ValueError(f"{op}: num_programs must be >= 1, got {programs}")
    w = row_weights if row_weights is not None else out
    _dsd_persistent_kernel[(min(programs, num_tiles),)](
        h_blocks, w2, h2, w2b, out, w, schedule,
        topo.block_row_expert, topo.block_row_start, topo.block_row_end, topo.offsets,
        num_tiles, programs, K, N, topo.ffn_blocks, E, topo.capacity,
        w2.stride(0), w2.stride(1), w2.stride(2), w2b.stride(0), w2b.stride(1), w2b.stride(2),
        out.stride(0), out.stride(1), row_weights.stride(0) if row_weights is not None else 0,
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], COL_BITS=max(1, (nt - 1).bit_length()),
        USE_TMA=tma, B_K_MAJOR=k_major, DUAL=also is not None, TMA2=tma2, B2_K_MAJOR=k_major2, K_TAIL=K % bs != 0,
        FLATTEN=bool(cfg.get("FLATTEN", False)), ROW_WEIGHTS=row_weights is not None, UPCAST=needs_upcast(h_blocks.dtype), PRECISION=dot_precision(h_blocks.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out

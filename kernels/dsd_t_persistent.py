"""Persistent DSD^T: the expert weight gradients ``blocks(a)^T @ b`` on ``min(#SMs, tiles)`` programs.

The same product and output contract as ``kernels/dsd_t.py``'s ``dsd_t``: block data
``data [capacity, bs, bs]`` (``h`` or ``dh``) and sorted rows ``b [S, N]`` (``dy_sorted``
or ``x_sorted``) give ``out [E, ffn, N]``, ``out[e] = rows(data of e)^T @ b[rows of e]``,
every element written (an expert with no rows gets exact zeros), into any strided
``[E, ffn, N]`` view (``dw1.transpose(1, 2)`` for a weight stored ``[E, N, ffn]``, as
transformers' ``gate_up_proj``/``down_proj`` layouts need: the store follows ``out``'s
strides). Organised as ``sdd_persistent.py`` / ``dsd_persistent.py``:

* **A device tile schedule** over the output tiles: expert ``e`` x (column block ``f``
  of ``ffn``, hidden tile ``n`` of ``BLOCK_N`` columns), one int32 ``(e*F + f) <<
  COL_BITS | n`` each, built by one small kernel without a host read. Sorted order:
  experts heaviest first (``argsort`` of the device row counts, so the empty experts'
  store-only tiles come last); within an expert the tiles are in grouped order
  (``tiling.grouped_tile``: ``GROUP`` column blocks, then the next hidden tile), so an
  expert's rows of ``b`` are re-read from L2. ``E * F * cdiv(N, BLOCK_N)`` tiles: a
  host-side count. The schedule is that order **snake-ordered** for the grid's ``P``
  programs: round ``i`` is positions ``i*P ..`` (program ``p`` runs position ``i*P + p``),
  and an odd round holds its sorted tiles reversed (position ``i*P + p`` holds sorted
  tile ``i*P + r-1-p``, ``r`` the round's length: ``P``, or the rest in the last round),
  so the program that got a round's heaviest tile gets the next round's lightest. A
  tile's K loop runs over all its expert's rows, so under skewed routing tiles differ
  a lot in cost, and plain round-robin keeps handing the same programs the heavier
  tile of every round: in the counting model of ``python -m benchmarks.tile_balance``
  (K rows plus a store per tile; a count, not a timing), at the fine-grained shape
  (E=128, H=2048, ffn=768, top-8, 16K tokens, skewed routing, 132 SMs) round-robin's
  makespan is 1.149x the ideal and the snake's 1.045x (elsewhere on that grid
  round-robin is within 3.1% and the snake no worse). No atomics, and still
  deterministic: each tile is one program's whole K loop, so the order changes which
  program computes a tile, never how (the same bits for any ``P``). The schedule thus
  depends on ``P`` (``dsd_t_tile_schedule(..., programs)``; a shared one must be built
  for the launches' ``num_programs``, which ``dsd_t_persistent`` checks when the tensor
  still carries its record).
* **A persistent grid**: ``P = min(num_programs, tiles)`` programs loop over the schedule.
* **The K loop runs over the expert's rows** (its consecutive block rows), ``BLOCK_K``
  (a divisor of ``bs``) rows per step: step ``k0`` reads rows ``k0 % bs ..`` of block
  ``(first block row + k0 // bs) * F + f`` (a ``BLOCK_K x bs`` tile, used transposed)
  and the same ``BLOCK_K`` sorted rows of ``b``. The output tile is ``bs x BLOCK_N``
  (one column block; 128 x 256 at block 128 in bf16 by default).
* **TMA** (``USE_TMA``): ``data`` through a 3-D ``[capacity, bs, bs]`` descriptor (box
  ``[1, BLOCK_K, bs]``), ``b`` through a 2-D ``[S, N]`` one (box ``[BLOCK_K, BLOCK_N]``),
  both created once per program. The ``b`` box zero-fills past ``S`` and ``N`` but not
  past the expert's last row (those rows are the next expert's), and ``data``'s rows past
  an expert's end are padding; so the last K step of a tile (the only one that can
  reach past the expert's end), peeled off the loop, zeroes both tiles' rows there in
  registers, and the main loop's tiles stay in shared memory for wgmma. The pointer
  path masks every step. Either way rows past an expert's end are never used, and
  ``data``'s columns past ``ffn`` only reach output rows past ``ffn``, which are not
  stored.

Opt-in only (``blocksparse_moe.kernels.dsd_t_persistent``): not timed yet, so nothing
uses it by default (docs/perf-notes.md, "Persistent DSD^T").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_block_data, check_same, check_tensor
from .config import dot_precision, needs_upcast
from .dsd_persistent import dsd_persistent_configs, pick_default
from .persistent_common import _SCHEDULE_TILE, _default_programs, check_config_keys, resolve_tma, tma_problem
from .tiling import GROUP, grouped_tile


@triton.jit
def _dsd_t_schedule_kernel(
    order_ptr,  # [E] experts, heaviest first
    schedule_ptr,  # [E * F * NT] int32 out: tile -> (e*F + f) << COL_BITS | n
    E,
    F,
    NT,  # hidden tiles: cdiv(N, BLOCK_N)
    P,  # the persistent grid: min(num_programs, E * F * NT)
    COL_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    TILE: tl.constexpr,
):
    """Grid ``(cdiv(E * F * NT, TILE),)``: position ``t`` holds sorted tile ``s``, snake-ordered for ``P`` programs.

    Sorted tile ``s``: expert ``order[s // (F*NT)]``, its tiles in grouped order. Position
    ``t = i*P + p`` (round ``i``, program ``p``) holds ``s = t`` in an even round and
    ``s = i*P + r-1-p`` in an odd one, ``r`` the round's length (``P``, or what is left in
    the last round).
    """
    t = tl.program_id(0) * TILE + tl.arange(0, TILE)
    num_tiles = E * F * NT
    valid = t < num_tiles
    i = t // P
    start = i * P
    r = tl.minimum(num_tiles - start, P)
    s = tl.where((i % 2) == 1, start + (r - 1) - (t - start), t)
    per_expert = F * NT
    e = tl.load(order_ptr + s // per_expert, mask=valid, other=0)
    f, n = grouped_tile(s % per_expert, F, NT, GROUP)
    tl.store(schedule_ptr + t, ((e * F + f) << COL_BITS) | n, mask=valid)


@triton.jit
def _dsd_t_persistent_kernel(
    data_ptr,  # [capacity, BLOCK, BLOCK] block data, contiguous
    b_ptr,  # [S, N] sorted rows (the dense operand), strides (stride_bm, stride_bn)
    out_ptr,  # [E, K, N] per-expert result, strides (stride_oe, stride_ok, stride_on)
    schedule_ptr,  # [num_tiles] int32: tile -> (e*F + f) << COL_BITS | n
    expert_offsets_ptr,  # [E + 1] int32: expert -> first sorted position
    expert_block_offsets_ptr,  # [E + 1] int32: expert -> first block row
    num_tiles,
    num_programs,
    S,
    K,
    N,
    F,
    capacity,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_ok,
    stride_on,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows of the expert per K step (divides BLOCK)
    BLOCK_N: tl.constexpr,
    COL_BITS: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """Grid ``(min(num_programs, num_tiles),)``; program ``p`` computes tiles ``p, p + P, ...``.

    Tile ``(e, f, n)``: ``out[e, f*BLOCK .., n*BLOCK_N ..]`` (rows below ``K``, columns
    below ``N`` stored), summed over expert ``e``'s rows in ``cdiv(rows, BLOCK_K)`` steps;
    an expert without rows runs none and stores zeros.
    """
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    if USE_TMA:
        # Once per program (outside the tile loop): tensormaps in triton.set_allocator's scratch.
        a_desc = tl.make_tensor_descriptor(data_ptr, shape=[capacity, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK_K, BLOCK])  # fmt: skip
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[S, N], strides=[stride_bm, 1], block_shape=[BLOCK_K, BLOCK_N])
    for t in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        packed = tl.load(schedule_ptr + t)
        c = packed >> COL_BITS
        col0 = (packed & ((1 << COL_BITS) - 1)) * BLOCK_N
        e = c // F
        f = c - e * F
        row0 = tl.load(expert_offsets_ptr + e)
        n_rows = tl.load(expert_offsets_ptr + e + 1) - row0
        r0 = tl.load(expert_block_offsets_ptr + e)
        steps = tl.cdiv(n_rows, BLOCK_K)
        cols = col0 + offs_n
        col_mask = cols < N
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        # The expert's first block of column block f; a step's block is F blocks per block row further.
        a_first = data_ptr + (r0.to(tl.int64) * F + f) * (BLOCK * BLOCK) + offs_k[:, None] * BLOCK + offs[None, :]
        b_first = b_ptr + (row0 + offs_k).to(tl.int64)[:, None] * stride_bm + cols.to(tl.int64)[None, :] * stride_bn
        main_steps = steps
        if USE_TMA:
            main_steps = tl.maximum(steps - 1, 0)  # the last step, peeled off below, is masked
        for ks in range(0, main_steps):
            k0 = ks * BLOCK_K
            if USE_TMA:
                a = a_desc.load([(r0 + k0 // BLOCK) * F + f, k0 % BLOCK, 0]).reshape(BLOCK_K, BLOCK)
                b = b_desc.load([row0 + k0, col0])
            else:
                row_mask = offs_k < n_rows - k0
                a_step = (k0 // BLOCK).to(tl.int64) * (F * BLOCK * BLOCK) + (k0 % BLOCK) * BLOCK
                a = tl.load(a_first + a_step, mask=row_mask[:, None], other=0.0)
                b = tl.load(b_first + k0.to(tl.int64) * stride_bm, mask=row_mask[:, None] & col_mask[None, :],
                            other=0.0)  # fmt: skip
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if USE_TMA:
            if steps > 0:
                k0 = (steps - 1) * BLOCK_K
                row_mask = offs_k < n_rows - k0  # rows past the expert's end: padding / the next expert's
                a = a_desc.load([(r0 + k0 // BLOCK) * F + f, k0 % BLOCK, 0]).reshape(BLOCK_K, BLOCK)
                b = b_desc.load([row0 + k0, col0])
                a = tl.where(row_mask[:, None], a, 0.0)
                b = tl.where(row_mask[:, None], b, 0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        kk = f * BLOCK + offs
        out_ptrs = (
            out_ptr
            + e.to(tl.int64) * stride_oe
            + kk.to(tl.int64)[:, None] * stride_ok
            + cols.to(tl.int64)[None, :] * stride_on
        )
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(kk < K)[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------
# Host side: configs, the schedule, the launcher.


def dsd_t_persistent_configs(block: int, elem_bytes: int = 2, use_tma: bool = True) -> list[dict]:
    """Launchable configs ``{BLOCK_K, BLOCK_N, num_warps, num_stages}``: output tiles ``block x BLOCK_N``.

    The tile shapes of ``dsd_persistent_configs`` (``BLOCK_K`` here counts rows of the
    expert per step, a divisor of ``block``; the same register and shared-memory models),
    without BLOCK_K 128 on either path: the TMA kernel's masked last step holds both
    tiles in registers, and at 128 rows 6 of its 14 bf16 sm_90 configs spilled (8 to 376
    bytes of stack; ``tests/sm90_persistent_worker.py all dsd_t``).
    """
    return [c for c in dsd_persistent_configs(block, elem_bytes, use_tma) if c["BLOCK_K"] <= 64]


def default_config(block: int, elem_bytes: int = 2) -> dict:
    """128x256x64, 8 warps, 4 stages at block 128 in bf16; one small pinned config under the interpreter."""
    return pick_default(dsd_t_persistent_configs, "dsd_t_persistent", block, elem_bytes)


def dsd_t_tile_schedule(topo, n: int, block_n: int, programs: int | None = None) -> torch.Tensor:
    """The device tile schedule ``[E * F * cdiv(n, block_n)]`` int32 over the ``[E, ffn, n]`` output (no host read).

    Snake-ordered for ``programs`` persistent programs (None: ``dsd_t_persistent``'s
    default, the SM count; see the module docstring). Depends only on ``topo``, ``n``,
    ``block_n`` and ``min(programs, tiles)``: the backward's two weight gradients (``dw2``
    and ``dw1^T``, both ``N = hidden``) may share it (``schedule=``) when launched with
    the same ``num_programs``. Built for another count it still covers every tile once (the
    same result, bit for bit), only less balanced; so only its dtype and shape are checked.
    """
    E, F = topo.num_experts, topo.ffn_blocks
    nt = triton.cdiv(n, block_n)
    col_bits = max(1, (nt - 1).bit_length())
    if E * F >= 1 << (31 - col_bits):
        raise ValueError(f"dsd_t_persistent: {E * F} column blocks x {nt} hidden tiles do not pack into an int32 "
                         f"schedule (E * F must be < 2**{31 - col_bits})")  # fmt: skip
    programs = _default_programs(topo.device) if programs is None else programs
    if programs < 1:
        raise ValueError(f"dsd_t_tile_schedule: programs must be >= 1, got {programs}")
    num_tiles = E * F * nt
    schedule = torch.empty(num_tiles, dtype=torch.int32, device=topo.device)
    grid = min(programs, num_tiles)  # the launch's grid: programs past the tiles get none
    if num_tiles:
        counts = topo.expert_offsets[1:] - topo.expert_offsets[:-1]
        order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)  # on the device: no host read
        _dsd_t_schedule_kernel[(triton.cdiv(num_tiles, _SCHEDULE_TILE),)](
            order, schedule, E, F, nt, grid, COL_BITS=col_bits, GROUP=GROUP, TILE=_SCHEDULE_TILE
        )
    return schedule


def dsd_t_persistent(data: torch.Tensor, b: torch.Tensor, topo, out: torch.Tensor | None = None, *,
                     use_tma: bool | None = None, config: dict | None = None, num_programs: int | None = None,
                     schedule: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Persistent DSD^T: ``data [capacity, bs, bs]``, ``b [S, N]`` -> ``[E, ffn, N]``, ``dsd_t``'s contract.

    ``out`` may be any strided ``[E, ffn, N]`` view (e.g. ``dw1.transpose(1, 2)``); every
    element of it is written. ``use_tma``: None picks TMA on an sm_90+ GPU when ``data``
    and ``b`` (row-contiguous) have 16-byte aligned bases and strides; True requires it
    (ValueError naming the operand otherwise); False uses pointer loads. ``config``
    overrides ``default_config`` keys; ``num_programs`` the persistent grid (default:
    the SM count); ``schedule`` a prebuilt ``dsd_t_tile_schedule`` for the same
    ``num_programs`` (a ValueError when it records another; a copy without the record
    is trusted: any permutation of the tiles gives the same result, only less balanced).
    """
    op = "dsd_t_persistent"
    check_block_data(op, "data", data, topo)
    check_tensor(op, "b", b, dim=2)
    check_same(op, {"data": data, "b": b}, device=topo.device)
    S, N = b.shape
    if S != topo.num_slots:
        raise ValueError(f"{op}: b must have {topo.num_slots} rows (tokens * top_k), got {S}")
    E, K, bs = topo.num_experts, topo.ffn_size, topo.block_size
    if out is None:
        out = torch.empty(E, K, N, dtype=data.dtype, device=data.device)
    elif out.shape != (E, K, N) or out.dtype != data.dtype or out.device != data.device:
        raise ValueError(f"{op}: out must be a {data.dtype} tensor of shape {(E, K, N)} on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")  # fmt: skip
    if N == 0 or out.numel() == 0:
        return out
    if topo.capacity == 0:  # no rows at all: the gradient is zero
        return out.zero_()
    cfg = dict(default_config(bs, data.element_size()), **(config or {}))
    check_config_keys(op, cfg, ("BLOCK_K", "BLOCK_N", "num_warps", "num_stages", "FLATTEN"))
    if cfg["BLOCK_N"] > 256:
        raise ValueError(f"{op}: config BLOCK_N={cfg['BLOCK_N']} > 256 columns (a TMA box's limit)")
    if bs % cfg["BLOCK_K"]:
        raise ValueError(f"{op}: config BLOCK_K={cfg['BLOCK_K']} must divide the block size {bs} "
                         "(a K step reads rows of one block)")  # fmt: skip
    problems = [p for p in (tma_problem("data", data, 2), tma_problem("b", b, 1)) if p]
    use_tma = resolve_tma(op, use_tma, data, problems)
    nt = triton.cdiv(N, cfg["BLOCK_N"])
    num_tiles = E * topo.ffn_blocks * nt
    programs = num_programs or _default_programs(data.device)
    if programs < 1:
        raise ValueError(f"{op}: num_programs must be >= 1, got {programs}")
    grid = min(programs, num_tiles)
    if schedule is None:
        schedule = dsd_t_tile_schedule(topo, N, cfg["BLOCK_N"], programs)
    elif schedule.dtype != torch.int32 or schedule.shape != (num_tiles,) or schedule.device != data.device:
        raise ValueError(f"{op}: schedule must be int32 [{num_tiles}] on {data.device} (dsd_t_tile_schedule(topo, "
                         f"{N}, {cfg['BLOCK_N']}, {programs})), got {schedule.dtype} {tuple(schedule.shape)} on "
                         f"{schedule.device}")  # fmt: skip
    _dsd_t_persistent_kernel[(grid,)](
        data, b, out, schedule, topo.expert_offsets, topo.expert_block_offsets,
        num_tiles, programs, S, K, N, topo.ffn_blocks, topo.capacity,
        b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], COL_BITS=max(1, (nt - 1).bit_length()),
        USE_TMA=bool(use_tma), UPCAST=needs_upcast(data.dtype), PRECISION=dot_precision(data.dtype),
        FLATTEN=bool(cfg.get("FLATTEN", False)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out

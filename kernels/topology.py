"""Topology: every index array of a block-sparse topology from the expert offsets, in two launches.

The torch construction in ``blocksparse_moe.topology`` (the reference, and the CPU
path) takes about 70 small ops; on a GPU those are 50-odd kernel launches, about a
millisecond at any size (measured on an H100: ``docs/benchmarks.md``). Here one
program scans the experts' block counts, then one grid writes every array, each
element found with a binary search over ``expert_block_offsets``. No host read.

Directions and meanings of the arrays: the glossary in ``blocksparse_moe.topology``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_offsets_kernel(
    expert_offsets_ptr,  # [E + 1] int32: expert -> first sorted position
    expert_block_offsets_ptr,  # [E + 1] int32 out: expert -> first block row
    E,
    BLOCK: tl.constexpr,  # block size (rows per block row)
    BLOCK_E: tl.constexpr,  # a power of two >= E
):
    """Grid ``(1,)``: one program sums ``ceil(rows_e / BLOCK)`` over the experts (inclusive scan)."""
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    lo = tl.load(expert_offsets_ptr + e, mask=valid, other=0)
    hi = tl.load(expert_offsets_ptr + e + 1, mask=valid, other=0)
    blocks = (hi - lo + (BLOCK - 1)) // BLOCK
    tl.store(expert_block_offsets_ptr + e + 1, tl.cumsum(blocks, 0), mask=valid)
    tl.store(expert_block_offsets_ptr + e, tl.zeros_like(e), mask=e == 0)


@triton.jit
def _expert_of(expert_block_offsets_ptr, row, E, SEARCH_STEPS: tl.constexpr):
    """The expert owning block row ``row`` (``E`` past the active rows): ``searchsorted(ebo[1:], row, right=True)``."""
    lo = tl.zeros_like(row)
    hi = tl.zeros_like(row) + E
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(expert_block_offsets_ptr + 1 + mid, mask=active, other=0)  # mid < hi <= E: in bounds
        lo = tl.where(active & (v <= row), mid + 1, lo)
        hi = tl.where(active & (v > row), mid, hi)
    return lo


@triton.jit
def _topology_kernel(
    expert_offsets_ptr,  # [E + 1] int32: expert -> first sorted position
    ebo_ptr,  # [E + 1] int32: expert -> first block row (from _block_offsets_kernel)
    block_row_expert_ptr,  # [R] int32 out: block row -> expert (E if spare)
    block_row_start_ptr,  # [R] int32 out: block row -> first sorted position (S if spare)
    block_row_end_ptr,  # [R] int32 out: block row -> end of its expert's rows (S if spare)
    offsets_ptr,  # [R + 1] int32 out: block row -> first block
    row_indices_ptr,  # [R * F] int32 out: block -> block row
    column_indices_ptr,  # [R * F] int32 out: block -> global column block (E * F if spare)
    offsets_t_ptr,  # [E * F + 1] int32 out: column block -> first transposed entry
    column_indices_t_ptr,  # [R * F] int32 out: transposed entry -> block row
    block_offsets_t_ptr,  # [R * F] int32 out: transposed entry -> block
    R,
    F,
    E,
    S,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """Grid ``(cdiv(max(R * F, E * F + 1, R + 1), TILE),)``: program ``p`` fills index ``j`` of every
    array for ``j`` in ``[p * TILE, (p + 1) * TILE)``, each array masked to its own length.

    Index ``j`` is a block row (``j < R``), a block and a transposed entry (``j < R * F``)
    and a column block (``j <= E * F``). Column-major entries of expert ``e`` fill
    ``[ebo[e] * F, ebo[e+1] * F)``, so entry ``j`` belongs to the expert of block row
    ``j // F``, the same search as block ``j``'s.
    """
    j = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    n_rows = tl.load(ebo_ptr + E)

    # Block rows: j < R.
    is_row = j < R
    e = _expert_of(ebo_ptr, j, E, SEARCH_STEPS)
    active = is_row & (e < E)
    ec = tl.minimum(e, E - 1)
    start = tl.load(expert_offsets_ptr + ec, mask=active, other=0) + (j - tl.load(ebo_ptr + ec, mask=active, other=0)) * BLOCK
    end = tl.load(expert_offsets_ptr + ec + 1, mask=active, other=0)
    tl.store(block_row_expert_ptr + j, e.to(tl.int32), mask=is_row)
    tl.store(block_row_start_ptr + j, tl.where(active, start, S).to(tl.int32), mask=is_row)
    tl.store(block_row_end_ptr + j, tl.where(active, end, S).to(tl.int32), mask=is_row)
    tl.store(offsets_ptr + j, (tl.minimum(j, n_rows) * F).to(tl.int32), mask=j < R + 1)

    # Blocks and transposed entries: j < R * F.
    is_blk = j < R * F
    row = j // F
    f = j % F
    be = _expert_of(ebo_ptr, row, E, SEARCH_STEPS)
    b_active = is_blk & (be < E)
    bec = tl.minimum(be, E - 1)
    first = tl.load(ebo_ptr + bec, mask=b_active, other=0)
    per_expert = tl.load(ebo_ptr + bec + 1, mask=b_active, other=1) - first  # >= 1 for an active entry
    local = j - first * F
    t_row = first + local % per_expert
    tl.store(row_indices_ptr + j, row.to(tl.int32), mask=is_blk)
    tl.store(column_indices_ptr + j, tl.where(b_active, be * F + f, E * F).to(tl.int32), mask=is_blk)
    tl.store(column_indices_t_ptr + j, tl.where(b_active, t_row, row).to(tl.int32), mask=is_blk)
    tl.store(block_offsets_t_ptr + j, tl.where(b_active, t_row * F + local // per_expert, j).to(tl.int32), mask=is_blk)

    # Column blocks: j <= E * F (the last entry is the active block count).
    is_col = j < E * F
    ce = tl.minimum(j // F, E - 1)
    c_first = tl.load(ebo_ptr + ce, mask=is_col, other=0)
    c_count = tl.load(ebo_ptr + ce + 1, mask=is_col, other=0) - c_first
    off_t = tl.where(is_col, c_first * F + (j % F) * c_count, n_rows * F)
    tl.store(offsets_t_ptr + j, off_t.to(tl.int32), mask=j < E * F + 1)


def topology_arrays(expert_offsets: torch.Tensor, num_slots: int, ffn_blocks: int, max_rows: int,
                    block_size: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Launch both kernels: ``expert_offsets [E+1]`` int32 -> the topology's arrays (glossary names).

    ``max_rows`` is ``R``, the host-side bound on block rows; ``ffn_blocks`` is ``F``.
    """
    if expert_offsets.dtype != torch.int32 or expert_offsets.dim() != 1 or expert_offsets.numel() < 2:
        raise ValueError(f"topology: expert_offsets must be a 1-D int32 tensor of E + 1 >= 2 entries, got "
                         f"{expert_offsets.dtype} {tuple(expert_offsets.shape)}")  # fmt: skip
    E, R, F = expert_offsets.numel() - 1, max_rows, ffn_blocks
    i32 = dict(device=expert_offsets.device, dtype=torch.int32)
    out = {
        "expert_block_offsets": torch.empty(E + 1, **i32),
        "block_row_expert": torch.empty(R, **i32),
        "block_row_start": torch.empty(R, **i32),
        "block_row_end": torch.empty(R, **i32),
        "offsets": torch.empty(R + 1, **i32),
        "row_indices": torch.empty(R * F, **i32),
        "column_indices": torch.empty(R * F, **i32),
        "offsets_t": torch.empty(E * F + 1, **i32),
        "column_indices_t": torch.empty(R * F, **i32),
        "block_offsets_t": torch.empty(R * F, **i32),
    }
    eo = expert_offsets.contiguous()
    _block_offsets_kernel[(1,)](eo, out["expert_block_offsets"], E, BLOCK=block_size,
                                BLOCK_E=triton.next_power_of_2(E))  # fmt: skip
    tile = 1024
    n = max(R * F, E * F + 1, R + 1)
    _topology_kernel[(triton.cdiv(n, tile),)](
        eo, out["expert_block_offsets"],
        out["block_row_expert"], out["block_row_start"], out["block_row_end"], out["offsets"],
        out["row_indices"], out["column_indices"], out["offsets_t"], out["column_indices_t"], out["block_offsets_t"],
        R, F, E, num_slots,
        BLOCK=block_size, TILE=tile, SEARCH_STEPS=max(1, E.bit_length()),
    )  # fmt: skip
    return out

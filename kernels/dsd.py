"""DSD: dense = sparse x dense, the block-sparse intermediate times per-expert weights.

``out[rows of block row r] = sum over blocks i of row r: data[i] @ b[e][rows of column block f(i)]``.
Forward uses it for ``y_sorted = h @ w2`` and backward for ``dx_sorted = dh @ w1^T``
(``b`` a transposed view, read through its strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_block_data, check_same, check_tensor
from .config import dot_precision, dsd_configs, needs_upcast, prune_by_block
from .tiling import GROUP, grouped_tile


@triton.autotune(
    configs=dsd_configs(),
    key=["K", "N", "BLOCK"],
    prune_configs_by={"early_config_prune": prune_by_block(dsd_configs)},
)
@triton.jit
def _dsd_kernel(
    data_ptr,  # [capacity, BLOCK, BLOCK] block data, contiguous
    b_ptr,  # [E, K, N] per-expert dense, strides (stride_be, stride_bk, stride_bn)
    out_ptr,  # [S, N] sorted rows, strides (stride_om, stride_on)
    block_row_expert_ptr,  # [R] int32: block row -> expert (E for spare rows)
    offsets_ptr,  # [R + 1] int32: block row -> first block (BCSR)
    block_row_start_ptr,  # [R] int32: block row -> first sorted position
    block_row_end_ptr,  # [R] int32: block row -> end of its expert's rows (exclusive)
    R,
    K,
    N,
    F,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Grid ``(R * cdiv(N, BLOCK_N),)``: program ``(r, n)`` writes rows of block row ``r``, column tile ``n``.

    Programs run in grouped order (``tiling.grouped_tile``) so that a block row's
    blocks and a weight column panel are each reused from L2 by several programs.

    An active block row holds all ``F`` column blocks of its expert, in order, at blocks
    ``r*F .. r*F+F-1`` (see ``topology``), so the loop walks both operands with affine
    pointers, one ``BLOCK``-wide step of the inner dimension each: no index is loaded
    inside it, and Triton's pipeliner can prefetch several steps ahead. Block columns
    past ``K`` are masked on both operands; rows past the block row's end are not
    stored. Spare block rows hold no blocks (``offsets[r] == offsets[r+1]``) and an
    empty row range: they run no step and store nothing.
    """
    r, pid_n = grouped_tile(tl.program_id(0), R, tl.cdiv(N, BLOCK_N), GROUP)
    offs = tl.arange(0, BLOCK)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rows = tl.load(block_row_start_ptr + r) + offs
    row_mask = rows < tl.load(block_row_end_ptr + r)
    n_blocks = tl.load(offsets_ptr + r + 1) - tl.load(offsets_ptr + r)  # F, or 0 for a spare row
    e = tl.load(block_row_expert_ptr + r)  # E on a spare row: its pointers below are never read
    acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    a_ptrs = data_ptr + (r.to(tl.int64) * F) * (BLOCK * BLOCK) + offs[:, None] * BLOCK + offs[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    for f in range(0, n_blocks):
        k_mask = f * BLOCK + offs < K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK * BLOCK
        b_ptrs += BLOCK * stride_bk
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def dsd(data: torch.Tensor, b: torch.Tensor, topo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch DSD: ``data [capacity, bs, bs]``, ``b [E, ffn, N]`` (any strides) -> ``[S, N]``.

    Every row of the result is written (each sorted row belongs to one active block
    row), so ``out`` may come from ``torch.empty``.
    """
    check_block_data("dsd", "data", data, topo)
    check_tensor("dsd", "b", b, dim=3)
    check_same("dsd", {"data": data, "b": b}, device=topo.device)
    E, K, N = b.shape
    if E != topo.num_experts or K != topo.ffn_size:
        raise ValueError(
            f"dsd: b must have shape [{topo.num_experts}, {topo.ffn_size}, N], got {tuple(b.shape)}"
        )
    S = topo.num_slots
    if out is None:
        out = torch.empty(S, N, dtype=data.dtype, device=data.device)
    elif out.shape != (S, N) or out.dtype != data.dtype:
        raise ValueError(f"dsd: out must be a {data.dtype} tensor of shape {(S, N)}, got {tuple(out.shape)}")
    if topo.max_block_rows == 0 or N == 0:
        return out
    grid = lambda meta: (topo.max_block_rows * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _dsd_kernel[grid](
        data, b, out,
        topo.block_row_expert, topo.offsets, topo.block_row_start, topo.block_row_end,
        topo.max_block_rows, K, N, topo.ffn_blocks,
        b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        BLOCK=topo.block_size, UPCAST=needs_upcast(data.dtype), PRECISION=dot_precision(data.dtype), GROUP=GROUP,
    )  # fmt: skip
    return out

"""SDD: sparse = dense x dense, sampled at the topology's blocks.

``data[i] = a[rows of block row r(i)] @ b[e(i)][:, columns of column block f(i)]``
for every active block ``i``; spare blocks are written as zeros. Forward uses it for
``h = x_sorted @ w1`` and backward for ``dh = dy_sorted @ w2^T`` (``b`` a transposed
view: the kernel reads every operand through its strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_block_args
from .config import dot_precision, needs_upcast, prune_by_block, sdd_configs
from .tiling import GROUP, grouped_tile


@triton.autotune(
    configs=sdd_configs(),
    key=["K", "N", "BLOCK"],
    prune_configs_by={"early_config_prune": prune_by_block(sdd_configs)},
)
@triton.jit
def _sdd_kernel(
    a_ptr,  # [S, K] sorted rows, strides (stride_am, stride_ak)
    b_ptr,  # [E, K, N] per-expert dense, strides (stride_be, stride_bk, stride_bn)
    out_ptr,  # [capacity, BLOCK, BLOCK] block data, contiguous
    column_indices_ptr,  # [capacity] int32: block -> global column block e * F + f
    block_row_start_ptr,  # [R] int32: block row -> first sorted position
    block_row_end_ptr,  # [R] int32: block row -> end of its expert's rows (exclusive)
    offsets_ptr,  # [R + 1] int32: offsets[R] = number of active blocks
    R,
    K,
    N,
    F,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Grid ``(R * cdiv(F, BLOCKS_N),)``: each program computes ``BLOCKS_N`` adjacent blocks of
    one block row over the whole K, as one ``BLOCK x BLOCKS_N*BLOCK`` tile.

    The blocks of block row ``r`` are ``r*F .. r*F+F-1``, all of one expert and in
    column order, so a tile of neighbours is one expert's weight panel (a wider tile
    reuses each row of ``a`` for more columns). Programs visit tiles in grouped order
    (``tiling.grouped_tile``): ``GROUP`` block rows, then the next tile, so an
    expert's weight panel is reused from L2.

    An active block's rows past its block row's end (index-space padding) and its
    columns past ``N`` are loaded as zeros, so they come out zero. A spare block row
    (``r*F >= offsets[R]``) skips the K loop and stores zeros. Blocks past ``F`` in the
    row's last tile are not stored.
    """
    r, tile = grouped_tile(tl.program_id(0), R, tl.cdiv(F, BLOCKS_N), GROUP)
    f0 = tile * BLOCKS_N
    first = r * F + f0  # the tile's first block
    offs = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCKS_N * BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCKS_N * BLOCK), dtype=tl.float32)
    if first < tl.load(offsets_ptr + R):  # an active block row: all of its blocks are active
        e = tl.load(column_indices_ptr + first) // F
        rows = tl.load(block_row_start_ptr + r) + offs
        row_mask = rows < tl.load(block_row_end_ptr + r)
        cols = f0 * BLOCK + offs_n
        col_mask = cols < N
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = (
            b_ptr
            + e.to(tl.int64) * stride_be
            + offs_k.to(tl.int64)[:, None] * stride_bk
            + cols.to(tl.int64)[None, :] * stride_bn
        )
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    # Column j of the tile is column j % BLOCK of block first + j // BLOCK.
    blk = first + offs_n // BLOCK
    out_ptrs = out_ptr + blk.to(tl.int64)[None, :] * (BLOCK * BLOCK) + offs[:, None] * BLOCK + (offs_n % BLOCK)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(f0 + offs_n // BLOCK < F)[None, :])


def sdd(a: torch.Tensor, b: torch.Tensor, topo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch SDD: ``a [S, K]`` sorted rows, ``b [E, K, N]`` (any strides) -> ``[capacity, bs, bs]``.

    ``N`` must equal ``topo.ffn_size``. ``out`` (optional, contiguous) receives the
    blocks; every element of it is written.
    """
    check_block_args("sdd", a, b, topo, rows_name="a", expert_name="b")
    S, K = a.shape
    E, Kb, N = b.shape
    if Kb != K:
        raise ValueError(f"sdd: b.shape[1] must equal a.shape[1]={K}, got {Kb}")
    if N != topo.ffn_size:
        raise ValueError(f"sdd: b.shape[2] must equal topo.ffn_size={topo.ffn_size}, got {N}")
    bs = topo.block_size
    if out is None:
        out = torch.empty(topo.capacity, bs, bs, dtype=a.dtype, device=a.device)
    elif out.shape != (topo.capacity, bs, bs) or not out.is_contiguous() or out.dtype != a.dtype:
        raise ValueError(f"sdd: out must be a contiguous {a.dtype} tensor of shape {(topo.capacity, bs, bs)}")
    if topo.capacity == 0:
        return out
    grid = lambda meta: (topo.max_block_rows * triton.cdiv(topo.ffn_blocks, meta["BLOCKS_N"]),)  # noqa: E731
    _sdd_kernel[grid](
        a, b, out,
        topo.column_indices, topo.block_row_start, topo.block_row_end, topo.offsets,
        topo.max_block_rows, K, N, topo.ffn_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        BLOCK=bs, UPCAST=needs_upcast(a.dtype), PRECISION=dot_precision(a.dtype), GROUP=GROUP,
    )  # fmt: skip
    return out

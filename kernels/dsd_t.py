"""DSD^T: per-expert dense = sparse^T x dense, the expert weight gradients.

``out[e][columns of column block f] = sum over block rows r of e: data[block(r, f)]^T @ d[rows of r]``.
Backward uses it for ``dw2 = h^T @ dy_sorted`` and ``dw1^T = dh^T @ x_sorted`` (the
output a transposed view of ``dw1``). An expert's blocks of one column block lie
``F`` blocks apart (one per block row, rows consecutive), so they are read in place
with an affine stride; the topology's transposed index is not needed here.
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
def _dsd_t_kernel(
    data_ptr,  # [capacity, BLOCK, BLOCK] block data, contiguous
    b_ptr,  # [S, N] sorted rows (the dense operand), strides (stride_bm, stride_bn)
    out_ptr,  # [E, K, N] per-expert result, strides (stride_oe, stride_ok, stride_on)
    expert_offsets_ptr,  # [E + 1] int32: expert -> first sorted position
    expert_block_offsets_ptr,  # [E + 1] int32: expert -> first block row
    C,
    K,
    N,
    F,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_ok,
    stride_on,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Grid ``(C * cdiv(N, BLOCK_N),)``, ``C = E * F``: program ``(c, n)`` writes ``out[e, f-th BLOCK rows, tile n]``.

    Programs run in grouped order (``tiling.grouped_tile``) over (column block, tile).

    It reduces over every block of column block ``c = e * F + f``: block ``r*F + f`` for
    each block row ``r`` of expert ``e``, whose dense rows are the expert's next ``BLOCK``
    sorted rows. Both pointers advance affinely (no index loads in the loop, so the
    pipeliner can prefetch), and the dense rows past the expert's end are masked. An
    expert with no rows runs no iteration and stores zeros, so every element is written.
    """
    c, pid_n = grouped_tile(tl.program_id(0), C, tl.cdiv(N, BLOCK_N), GROUP)
    e = c // F
    f = c % F
    offs = tl.arange(0, BLOCK)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    r0 = tl.load(expert_block_offsets_ptr + e)
    r1 = tl.load(expert_block_offsets_ptr + e + 1)
    rows = tl.load(expert_offsets_ptr + e) + offs
    row_end = tl.load(expert_offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    a_ptrs = data_ptr + (r0.to(tl.int64) * F + f) * (BLOCK * BLOCK) + offs[:, None] * BLOCK + offs[None, :]
    b_ptrs = b_ptr + rows.to(tl.int64)[:, None] * stride_bm + cols.to(tl.int64)[None, :] * stride_bn
    for _ in range(r0, r1):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs, mask=(rows < row_end)[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        a_ptrs += F * (BLOCK * BLOCK)
        b_ptrs += BLOCK * stride_bm
        rows += BLOCK
    kk = f * BLOCK + offs
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + kk.to(tl.int64)[:, None] * stride_ok + cols.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(kk < K)[:, None] & col_mask[None, :])


def dsd_t(data: torch.Tensor, b: torch.Tensor, topo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch DSD^T: ``data [capacity, bs, bs]``, ``b [S, N]`` -> ``[E, ffn, N]``.

    ``out`` may be any strided ``[E, ffn, N]`` view (e.g. ``dw1.transpose(1, 2)``);
    every element of it is written.
    """
    check_block_data("dsd_t", "data", data, topo)
    check_tensor("dsd_t", "b", b, dim=2)
    check_same("dsd_t", {"data": data, "b": b}, device=topo.device)
    S, N = b.shape
    if S != topo.num_slots:
        raise ValueError(f"dsd_t: b must have {topo.num_slots} rows (tokens * top_k), got {S}")
    E, K = topo.num_experts, topo.ffn_size
    if out is None:
        out = torch.empty(E, K, N, dtype=data.dtype, device=data.device)
    elif out.shape != (E, K, N) or out.dtype != data.dtype:
        raise ValueError(f"dsd_t: out must be a {data.dtype} tensor of shape {(E, K, N)}, got {tuple(out.shape)}")
    if N == 0:
        return out
    if topo.capacity == 0:  # no rows at all: the gradient is zero
        return out.zero_()
    grid = lambda meta: (E * topo.ffn_blocks * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _dsd_t_kernel[grid](
        data, b, out,
        topo.expert_offsets, topo.expert_block_offsets,
        E * topo.ffn_blocks, K, N, topo.ffn_blocks,
        b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK=topo.block_size, UPCAST=needs_upcast(data.dtype), PRECISION=dot_precision(data.dtype), GROUP=GROUP,
    )  # fmt: skip
    return out

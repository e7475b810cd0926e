"""Moving rows between token order and expert order.

``gather``: ``out[i] = src[sorted_to_slot[i] // k] (* scale[slot])``: tokens into the
expert-ordered buffer (forward), or the combine's gradient back into it (backward,
with the routing weights as scale).
``combine``: ``out[t] = sum_j (w[t, j] *) src[slot_to_sorted[t * k + j]]``: expert
outputs back to tokens, weighted (forward), or the gather's gradient (backward,
unweighted). A gather per token rather than a scatter: no atomics, deterministic.
``combine_weight_grad``: ``dw[t, j] = <dy[t], src[slot_to_sorted[t * k + j]]>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_tensor
from .config import interpreting

_BLOCK_ROWS = 32


def _block_h(h: int) -> int:
    cap = 64 if interpreting() else 256
    return max(16, min(cap, triton.next_power_of_2(max(h, 1))))


@triton.jit
def _gather_kernel(
    src_ptr,  # [T, H] token rows, strides (stride_sm, stride_sh)
    out_ptr,  # [S, H] sorted rows, strides (stride_om, stride_oh)
    sorted_to_slot_ptr,  # [S] int32: sorted position -> slot
    scale_ptr,  # [T, k] per-slot scale (routing weights), strides (stride_wt, stride_wk); unused if not HAS_SCALE
    S,
    H,
    top_k,
    stride_sm,
    stride_sh,
    stride_om,
    stride_oh,
    stride_wt,
    stride_wk,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_M), cdiv(H, BLOCK_H))``: each program copies a tile of sorted rows."""
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = i < S
    mask = m[:, None] & (h < H)[None, :]
    slot = tl.load(sorted_to_slot_ptr + i, mask=m, other=0)
    tok = slot // top_k
    v = tl.load(src_ptr + tok.to(tl.int64)[:, None] * stride_sm + h[None, :] * stride_sh, mask=mask, other=0.0)
    if HAS_SCALE:
        w = tl.load(scale_ptr + tok.to(tl.int64) * stride_wt + (slot - tok * top_k) * stride_wk, mask=m, other=0.0)
        v = v.to(tl.float32) * w.to(tl.float32)[:, None]
    tl.store(out_ptr + i.to(tl.int64)[:, None] * stride_om + h[None, :] * stride_oh, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    src_ptr,  # [S, H] sorted rows, strides (stride_sm, stride_sh)
    out_ptr,  # [T, H] token rows, strides (stride_om, stride_oh)
    slot_to_sorted_ptr,  # [S] int32: slot -> sorted position
    w_ptr,  # [T, k] routing weights, strides (stride_wt, stride_wk); unused if not HAS_WEIGHTS
    T,
    H,
    top_k,
    stride_sm,
    stride_sh,
    stride_om,
    stride_oh,
    stride_wt,
    stride_wk,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_M), cdiv(H, BLOCK_H))``: each program sums the k rows of a tile of tokens in fp32."""
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = t < T
    mask = m[:, None] & (h < H)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for j in range(top_k):
        pos = tl.load(slot_to_sorted_ptr + t.to(tl.int64) * top_k + j, mask=m, other=0)
        v = tl.load(src_ptr + pos.to(tl.int64)[:, None] * stride_sm + h[None, :] * stride_sh, mask=mask, other=0.0)
        v = v.to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + j * stride_wk, mask=m, other=0.0)
            v = v * w.to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_om + h[None, :] * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_weight_grad_kernel(
    dy_ptr,  # [T, H] gradient of the combined output, strides (stride_dm, stride_dh)
    src_ptr,  # [S, H] sorted expert outputs, strides (stride_sm, stride_sh)
    slot_to_sorted_ptr,  # [S] int32: slot -> sorted position
    out_ptr,  # [T, k] gradient of the routing weights, strides (stride_ot, stride_ok)
    S,
    H,
    top_k,
    stride_dm,
    stride_dh,
    stride_sm,
    stride_sh,
    stride_ot,
    stride_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_M),)``: each program reduces a tile of slots over the whole hidden size in fp32."""
    s = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = s < S
    tok = s // top_k
    pos = tl.load(slot_to_sorted_ptr + s, mask=m, other=0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = m[:, None] & (h < H)[None, :]
        g = tl.load(dy_ptr + tok.to(tl.int64)[:, None] * stride_dm + h[None, :] * stride_dh, mask=mask, other=0.0)
        v = tl.load(src_ptr + pos.to(tl.int64)[:, None] * stride_sm + h[None, :] * stride_sh, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * v.to(tl.float32), axis=1)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + (s - tok * top_k) * stride_ok, acc.to(out_ptr.dtype.element_ty), mask=m)


def _check_index(op: str, name: str, index: torch.Tensor, top_k: int, device: torch.device) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or index.dim() != 1:
        raise TypeError(f"{op}: {name} must be a 1-D int32 tensor from the routing plan")
    if index.device != device:
        raise ValueError(f"{op}: {name} is on {index.device} but the data is on {device}; expected one device")
    if not isinstance(top_k, int) or top_k < 1 or index.numel() % top_k:
        raise ValueError(f"{op}: top_k must be a positive divisor of {name}.numel()={index.numel()}, got {top_k!r}")


def _check_weights(op: str, name: str, weights: torch.Tensor, shape: tuple[int, int], device: torch.device) -> None:
    check_tensor(op, name, weights, dim=2)
    if tuple(weights.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape} (tokens, top_k), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"{op}: {name} is on {weights.device} but the data is on {device}; expected one device")


def gather(x: torch.Tensor, sorted_to_slot: torch.Tensor, top_k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x [T, H]`` into expert order: ``[S, H]``, optionally times ``scale [T, k]`` per slot."""
    check_tensor("gather", "x", x, dim=2)
    _check_index("gather", "sorted_to_slot", sorted_to_slot, top_k, x.device)
    S, H = sorted_to_slot.numel(), x.shape[1]
    T = S // top_k
    if x.shape[0] != T:
        raise ValueError(f"gather: x must have {T} rows (tokens), got {x.shape[0]}")
    if scale is not None:
        _check_weights("gather", "scale", scale, (T, top_k), x.device)
    out = torch.empty(S, H, dtype=x.dtype, device=x.device)
    if S == 0 or H == 0:
        return out
    bh = _block_h(H)
    w = scale if scale is not None else x
    _gather_kernel[(triton.cdiv(S, _BLOCK_ROWS), triton.cdiv(H, bh))](
        x, out, sorted_to_slot, w, S, H, top_k,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        w.stride(0), w.stride(1), HAS_SCALE=scale is not None, BLOCK_M=_BLOCK_ROWS, BLOCK_H=bh,
    )  # fmt: skip
    return out


def combine(src: torch.Tensor, slot_to_sorted: torch.Tensor, top_k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted rows ``src [S, H]`` back to tokens ``[T, H]``, summing each token's k rows (weighted if given)."""
    check_tensor("combine", "src", src, dim=2)
    _check_index("combine", "slot_to_sorted", slot_to_sorted, top_k, src.device)
    S, H = slot_to_sorted.numel(), src.shape[1]
    T = S // top_k
    if src.shape[0] != S:
        raise ValueError(f"combine: src must have {S} rows (tokens * top_k), got {src.shape[0]}")
    if weights is not None:
        _check_weights("combine", "weights", weights, (T, top_k), src.device)
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T == 0 or H == 0:
        return out
    bh = _block_h(H)
    w = weights if weights is not None else src
    _combine_kernel[(triton.cdiv(T, _BLOCK_ROWS), triton.cdiv(H, bh))](
        src, out, slot_to_sorted, w, T, H, top_k,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        w.stride(0), w.stride(1), HAS_WEIGHTS=weights is not None, BLOCK_M=_BLOCK_ROWS, BLOCK_H=bh,
    )  # fmt: skip
    return out


def combine_weight_grad(
    dy: torch.Tensor, src: torch.Tensor, slot_to_sorted: torch.Tensor, top_k: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``dw[t, j] = <dy[t], src[slot_to_sorted[t*k + j]]>``, the routing weights' gradient ``[T, k]``."""
    check_tensor("combine_weight_grad", "dy", dy, dim=2)
    check_tensor("combine_weight_grad", "src", src, dim=2)
    _check_index("combine_weight_grad", "slot_to_sorted", slot_to_sorted, top_k, src.device)
    S = slot_to_sorted.numel()
    T = S // top_k
    if dy.shape[0] != T or src.shape[0] != S or dy.shape[1] != src.shape[1] or dy.device != src.device:
        raise ValueError(
            f"combine_weight_grad: expected dy [{T}, H] and src [{S}, H] on one device, "
            f"got {tuple(dy.shape)} on {dy.device} and {tuple(src.shape)} on {src.device}"
        )
    out = torch.empty(T, top_k, dtype=dtype or src.dtype, device=src.device)
    if S == 0:
        return out
    H = src.shape[1]
    _combine_weight_grad_kernel[(triton.cdiv(S, _BLOCK_ROWS),)](
        dy, src, slot_to_sorted, out, S, H, top_k,
        dy.stride(0), dy.stride(1), src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=_BLOCK_ROWS, BLOCK_H=_block_h(H),
    )  # fmt: skip
    return out

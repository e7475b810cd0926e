"""Eager CPU inference of the grouped FFN in row chunks: every intermediate cache-sized, none of ``[S, *]``.

The whole-buffer path (``grouped._up_rows`` then ``grouped._down_rows``) allocates
``x_sorted [S, H]``, ``pre [S, 2F]``, ``h [S, F]`` and ``y_sorted [S, H]`` per call: 20 MB
per layer for a 256-token prefill of the Qwen3-shaped benchmark model. Whether that is
free depends on the C allocator's state, not on this code: after a ``generate`` call (the
KV cache and decode temporaries freed and the heap trimmed) glibc hands out fresh pages,
and a prefill took about 25,000 minor page faults (~100 MB) and 149 ms, against 0 faults
and 110 ms for the same prefill repeated back to back (2-core Xeon VM, both transformers'
``grouped_mm`` experts and ours). Training needs the whole ``pre`` for backward anyway;
inference does not, so here the sorted rows go through the FFN ``rows`` at a time:

    for each chunk of sorted rows [r0, r1):
        xs = x[token[r0:r1]]                      # gather, into the chunk's buffer
        pre = xs @ w1[e] per expert in the chunk  # GroupedProducts: mm / row dots / F.grouped_mm
        h = act(g) [* u] [* w]                    # grouped._hidden
        ys = h @ w2[e] per expert in the chunk
        out[token[r0:r1]] += ys                   # in fp32 for half inputs, in row order

An expert whose rows cross a chunk edge is two products (at most one extra product per
chunk). The chunk buffers are allocated once per call, at most 4 MB each, and reused by
every chunk. Row order and every per-row operation are those of the whole-buffer
path, so the result is the same up to the products' blocking (the sums over a row's
``H`` or ``F`` are each one GEMM dot, as there).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .grouped_mm import GroupedProducts

__all__ = ["STREAM_BYTES", "chunk_rows", "streamed_rows"]

#: Widest chunk intermediate (bytes). Measured on the 2-core Xeon VM (2026-12-03), a 256-token
#: prefill of the Qwen3-shaped model right after a ``generate``, medians of 8: 1 MB chunks
#: 132.6 ms (224 page faults), 4 MB 121.4 ms (2 faults), 16 MB (one chunk here) 151.1 ms
#: (28,700 faults), the whole-buffer path 151.6 ms (28,500). Smaller chunks split more
#: experts across chunk edges (their weights read twice) and lose ``F.grouped_mm``'s C++ loop.
STREAM_BYTES = 4 << 20
_MIN_ROWS = 64


def chunk_rows(width: int, elem_bytes: int) -> int:
    """Rows per chunk: the widest intermediate ``[rows, width]`` within :data:`STREAM_BYTES`."""
    return max(_MIN_ROWS, STREAM_BYTES // max(width * elem_bytes, 1))


def _chunk_products(bounds: list[int], r0: int, r1: int, device: torch.device) -> GroupedProducts:
    """The grouped products of sorted rows ``[r0, r1)``: every expert's offsets clipped to the chunk."""
    ends = [min(max(b, r0), r1) - r0 for b in bounds]
    # host offsets on a CPU tensor (GroupedProducts reads them with .tolist(): no sync)
    return GroupedProducts(torch.tensor(ends, dtype=torch.int32, device=device), r1 - r0, True)


def streamed_rows(x: Tensor, w1: Tensor, v1: Optional[Tensor], w2: Tensor, token: Tensor, bounds: list[int],
                  w_sorted: Optional[Tensor], num_tokens: int, activation: str, layout: str,
                  rows: int) -> Tensor:  # fmt: skip
    """``y [num_tokens, H]``: the grouped FFN of sorted rows ``bounds[0] .. bounds[-1]``, ``rows`` at a time.

    ``token [S]`` sorted row -> token; ``bounds`` the host expert offsets (``E + 1``);
    ``w_sorted [S, 1]`` the routing weights in sorted order (compute dtype) or None.
    Rows outside ``bounds`` (a padded plan's tail) contribute nothing, as in the
    whole-buffer path where they are zeroed.
    """
    from .grouped import _compute_dtype, _hidden, _split_gate_up  # lazy: grouped imports this module

    H = w2.shape[2]
    cd = _compute_dtype(x.dtype)
    acc = torch.zeros(num_tokens, H, dtype=cd, device=x.device)
    lo, hi = bounds[0], bounds[-1]
    width1 = w1.shape[2]
    xs_buf = x.new_empty(min(rows, hi - lo), x.shape[1])
    pre_buf = x.new_empty(xs_buf.shape[0], width1)
    pre3_buf = x.new_empty(xs_buf.shape[0], v1.shape[2]) if layout == "separate" else None
    ys_buf = x.new_empty(xs_buf.shape[0], H)
    for r0 in range(lo, hi, rows):
        r1 = min(r0 + rows, hi)
        n = r1 - r0
        pro = _chunk_products(bounds, r0, r1, x.device)
        tok = token[r0:r1]
        xs = torch.index_select(x, 0, tok, out=xs_buf[:n])
        pre1 = pro.mm(xs, w1, out=pre_buf[:n])
        pre3 = pro.mm(xs, v1, out=pre3_buf[:n]) if pre3_buf is not None else None
        g, u = _split_gate_up(pre1, pre3, layout)
        h = _hidden(g, u, None if w_sorted is None else w_sorted[r0:r1], activation, pro)
        ys = pro.mm(h, w2, out=ys_buf[:n])
        acc.index_add_(0, tok, ys if ys.dtype == cd else ys.to(cd))
    return acc if acc.dtype == x.dtype else acc.to(x.dtype)

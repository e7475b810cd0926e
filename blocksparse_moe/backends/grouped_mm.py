"""Grouped products over expert offsets, and when ``torch.nn.functional.grouped_mm`` takes them.

Two products cover the grouped backend, forward and backward (``offs [E] int32`` the
cumulative row ends of the experts, ``offs[-1] <= S``):

* :func:`gmm`: ``out[rows of e] = a[rows of e] @ b[e]`` for ``a [S, K]``, ``b [E, K, N]``;
* :func:`gmm_wgrad`: ``out[e] = a[rows of e]^T @ g[rows of e]`` for ``a [S, K]``, ``g [S, N]``.

Both run one ``F.grouped_mm`` when its layout rules hold. Checked on torch 2.13
(CPU; the CUDA kernels state the same rules) for fp32, fp16 and bf16:

* every operand has a unit stride in one of its last two dims, and its other strides
  (the batch stride of ``b`` too) are multiples of 16 bytes;
* every data pointer is 16-byte aligned;
* so interleaved halves of a fused weight (stride 2) and hidden sizes that are not a
  multiple of 16 bytes (4 fp32 / 8 half elements) are refused.

Where the rules fail, the product is a loop of ``torch.mm`` over the experts, which
reads the offsets back to the host (``.tolist()``): free on a CPU, a sync on an
accelerator. That fallback is explicit and documented (``docs/design.md``), and
``backend="auto"`` never picks ``grouped`` on CUDA where it would be taken.

Rows past ``offs[-1]`` of a grouped product's output are left uninitialised by
torch (pytorch #193633); callers never read them (the grouped FFN masks them when
its plan has such rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm_layout_ok", "gmm", "gmm_wgrad"]


def _operand_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    if t.data_ptr() % 16:
        return False
    (rows, cols), (s_row, s_col) = t.shape[-2:], t.stride()[-2:]
    if s_col == 1 or cols == 1:
        other = s_row
    elif s_row == 1 or rows == 1:
        other = s_col
    else:
        return False
    if (other * es) % 16:
        return False
    return t.dim() == 2 or (t.stride(0) * es) % 16 == 0


def grouped_mm_layout_ok(*operands: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` accepts these operands' strides and pointers (rules above)."""
    return all(_operand_ok(t) for t in operands)


def _ends(offs: torch.Tensor) -> list[int]:
    return offs.tolist()  # host read: only the fallback loop, see the module docstring


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]``: ``a [S, K]``, ``b [E, K, N]`` -> ``[S, N]``."""
    if grouped_mm_layout_ok(a, b):
        return F.grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(_ends(offs)):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def gmm_wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e]^T @ g[rows of e]``: ``a [S, K]``, ``g [S, N]`` -> ``[E, K, N]`` (0 for empty experts)."""
    at = a.t()
    if grouped_mm_layout_ok(at, g):
        return F.grouped_mm(at, g, offs=offs)
    out = a.new_zeros(offs.shape[0], a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(_ends(offs)):
        if end > start:
            torch.mm(at[:, start:end], g[start:end], out=out[e])
        start = end
    return out

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
  multiple of 16 bytes (4 fp32 / 8 half elements) are refused;
* and float64 is refused ("Expected mat_a to be Float32, BFloat16 or Float16").

Where the rules fail, the product is a loop of ``torch.mm`` over the experts, which
reads the offsets back to the host (``.tolist()``): free on a CPU, a sync on an
accelerator. That fallback is explicit and documented (``docs/design.md``), and
``backend="auto"`` never picks ``grouped`` on CUDA where it would be taken.

Rows past ``offs[-1]`` of a grouped product's output are left uninitialised by
torch (pytorch #193633); callers never read them (the grouped FFN masks them when
its plan has such rows).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["GroupedProducts", "grad_like", "grouped_mm_layout_ok", "gmm", "gmm_wgrad", "row_dots_pay", "valid_rows"]

Tensor = torch.Tensor
#: Rows per chunk of the elementwise work on a CPU: ~1 MB fp32 temporaries at this width.
_CPU_CHUNK_ELEMENTS = 1 << 18
#: Most rows of an expert for which a CPU product against a weight stored ``[N, K]`` (as
#: transformers stores its experts: ``x @ W^T``) runs as row dots (``linalg.vecdot``) instead
#: of ``torch.mm``, where :func:`row_dots_pay`. A decode step has 1 row per expert.
_DOT_MAX_ROWS = 2
#: From this many experts with rows, a CPU product is one ``F.grouped_mm`` (its loop over the
#: groups runs in C++) rather than a Python loop of ``torch.mm``, if its output is small enough
#: (below). Measured (2-core Xeon, fp32, E=64, [*, 512] @ [512, 1024], 2026-12-03): loops/grouped_mm
#: 0.75-0.98 at 4-16 active experts, 1.03-1.10 at 32-64 (1, 4 and 32 rows each).
_GMM_MIN_ACTIVE = 32
#: Largest output (bytes) that ``F.grouped_mm`` may allocate fresh on a CPU. glibc serves up to
#: about this size from memory it already holds; past it a fresh buffer is new pages, and page
#: faults cost more than the product saves (measured: filling a fresh 16 MB tensor 1.1x the time
#: of an existing one, 24 MB and up 1.9-2.7x).
_GMM_MAX_OUT_BYTES = 16 << 20


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    """The CPU's vendor string (``/proc/cpuinfo``'s ``vendor_id``), ``""`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def row_dots_pay() -> bool:
    """Whether one- and two-row products against an ``[N, K]`` weight are faster as row dots than by MKL.

    Only on AMD CPUs, with two or more intra-op threads: there MKL's matrix-vector product
    runs on one thread (8 GB/s), the row dot on all of them. Measured on 2-core VMs, 8
    products of one row against [1024, 512] weights, interleaved:

    * AMD EPYC (2026-12-02/03): dots 1.4x and 2.2x faster on 1 and 2 threads the first day,
      0.72x / 1.11x the next; the model's decode 1.13 of transformers' with them, 0.98 without;
    * Intel Xeon (2026-12-03): ``torch.mm`` reads the weights at 25 GB/s on 2 threads (the
      machine's bandwidth) and the dots are 0.63x of it; a one-token forward of the model
      0.81 of transformers' with them, 0.98 to 1.00 without.
    """
    return _cpu_vendor() == "AuthenticAMD" and torch.get_num_threads() >= 2


_GMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _operand_ok(t: torch.Tensor) -> bool:
    if t.dtype not in _GMM_DTYPES:
        return False
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
    """Whether ``F.grouped_mm`` accepts these operands' dtypes, strides and pointers (rules above)."""
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


def valid_rows(offs: Tensor, rows: int) -> Tensor:
    """``[rows, 1]`` mask of the rows some expert owns (no host read)."""
    return (torch.arange(rows, device=offs.device) < offs[-1:].to(torch.int64))[:, None]




class GroupedProducts:
    """The grouped products of one op call, done the way this device does them fastest.

    On a CPU the offsets are host memory already, so reading them is no sync: each
    product is a loop of ``torch.mm`` writing **into a buffer the call already has**
    (``out=``; ``addmm`` to accumulate). A fresh 100 MB tensor costs more in page
    faults than the matmul work that fills it on a small machine (measured: a new
    ``[32768, 1024]`` fp32 buffer filled 123 ms, an existing one 36 ms), and
    ``F.grouped_mm`` always allocates its output. Elementwise work runs in row chunks
    whose temporaries stay cache-sized and are reused by the allocator.
    Elsewhere every product is one ``F.grouped_mm`` (offsets stay on the device), the
    ``out``/``acc`` buffers are only hints, and elementwise work is whole-tensor.
    """

    def __init__(self, expert_offsets: Tensor, rows: int, loops: bool):
        self.offs = expert_offsets[1:]
        self.rows = rows
        self.host = loops
        # loops run only on CPU tensors (grouped_ffn checks): .tolist() copies host memory, no sync
        self.bounds = expert_offsets.tolist() if loops else None
        # (expert, first row, end) of the experts with rows, found once per op: a decode step's
        # 8 rows touch 8 of 64 experts, and the loops below then do 8 iterations, not 64.
        b = self.bounds
        self.active = [(e, b[e], b[e + 1]) for e in range(len(b) - 1) if b[e + 1] > b[e]] if loops else None
        # Their rows are consecutive: one split() gives every expert's rows as views, cheaper than
        # a Python slice per expert (rows before offsets[0] and a padded plan's tail: the end pieces).
        self.sizes = [b[0]] + [hi - lo for _, lo, hi in self.active] + [rows - b[-1]] if loops else None

    def chunks(self, width: int):
        step = max(1, _CPU_CHUNK_ELEMENTS // max(width, 1)) if self.host else max(self.rows, 1)
        return [slice(i, min(i + step, self.rows)) for i in range(0, self.rows, step)]

    def mm(self, a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``out[rows of e] = a[rows of e] @ b[e]``; rows past the last expert: unspecified.

        ``out`` is a buffer the result may be written into; use the returned tensor.
        """
        if not self.host:
            return gmm(a, b, self.offs)
        if (len(self.active) >= _GMM_MIN_ACTIVE and a.shape[0] * b.shape[2] * a.element_size() <= _GMM_MAX_OUT_BYTES
                and grouped_mm_layout_ok(a, b)):  # fmt: skip
            return F.grouped_mm(a, b, offs=self.offs)  # many experts, small output: the C++ loop
        out = a.new_empty(a.shape[0], b.shape[2]) if out is None else out
        # b[e] stored [N, K] with unit stride along K: its rows are the dots of a matrix-vector product
        dots = b.stride(1) == 1 and b.dtype in (torch.float32, torch.float64) and row_dots_pay()
        bt = b.transpose(1, 2) if dots else None
        for (e, lo, hi), a_e, out_e in zip(self.active, a.split(self.sizes)[1:], out.split(self.sizes)[1:]):
            if bt is not None and hi - lo <= _DOT_MAX_ROWS:
                for r in range(hi - lo):  # fp32/64 only: half products would round before the sum
                    torch.linalg.vecdot(bt[e], a_e[r], out=out_e[r])
            else:
                torch.mm(a_e, b[e], out=out_e)
        return out

    def mm_acc(self, acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``acc[rows of e] += a[rows of e] @ b[e]``."""
        if not self.host:
            return acc.add_(gmm(a, b, self.offs))
        for e, lo, hi in self.active:
            part = acc[lo:hi]
            torch.addmm(part, a[lo:hi], b[e], out=part)
        return acc

    def wgrad(self, a: Tensor, g: Tensor, like: Tensor) -> Tensor:
        """``out[e] = a[rows of e]^T @ g[rows of e]`` (zero for empty experts), laid out like ``like``.

        A weight stored transposed (``[E, N, K]`` memory, as transformers keeps
        ``down_proj``) gets its gradient in that layout, so accumulating it into
        ``.grad`` copies nothing.
        """
        transposed = _is_transposed(like)
        if not self.host:
            return gmm_wgrad(g, a, self.offs).transpose(1, 2) if transposed else gmm_wgrad(a, g, self.offs)
        E, K, N = like.shape
        out = a.new_empty(E, N, K) if transposed else a.new_empty(E, K, N)
        b = self.bounds
        for e in range(E):  # empty experts get zeros
            if b[e + 1] == b[e]:
                out[e].zero_()
        for e, lo, hi in self.active:
            if transposed:
                torch.mm(g[lo:hi].t(), a[lo:hi], out=out[e])
            else:
                torch.mm(a[lo:hi].t(), g[lo:hi], out=out[e])
        return out.transpose(1, 2) if transposed else out

    def zero_tail(self, t: Tensor) -> Tensor:
        """Zero the rows no expert owns (a padded plan's tail), in place."""
        if self.host:
            t[self.bounds[-1] :].zero_()
            return t
        return t.masked_fill_(~valid_rows(self.offs, self.rows), 0)


def _is_transposed(w: Tensor) -> bool:
    return w.dim() == 3 and w.stride(1) == 1 and w.stride(2) != 1 and w.shape[1] > 1


def grad_like(w: Tensor) -> Tensor:
    """An uninitialised tensor shaped and laid out as :meth:`GroupedProducts.wgrad` returns for ``w``."""
    if _is_transposed(w):
        return w.new_empty(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2)
    return w.new_empty(w.shape)

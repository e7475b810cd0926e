"""The ``grouped`` backend: the expert FFN as grouped GEMMs over the sorted rows, no block layout.

Forward, ``S = T * k`` sorted rows, ``offs`` the experts' row ends (from the plan)::

    xs  = x[token of each sorted row]                       one index_select  [S, H]
    g   = xs @ w1[e]     u = xs @ v1[e]                     grouped GEMMs     [S, F]
    h   = act(g) * u * w[slot]                              routing weight folded in here
    ys  = h @ w2[e]                                         grouped GEMM      [S, H]
    y   = index_add over each token's k rows                no weighting pass over [S, H]

Why the routing weight goes into ``h``: ``[S, F]`` is touched by the activation anyway,
so weighting there costs no pass of its own, and the combine becomes a plain
``index_add_`` (one pass, deterministic on the CPU: rows are added in index order).

Backward keeps only the pre-activations ``g`` and ``u`` and recomputes ``act`` (and
``xs``, one gather) from them, as ``recompute_activation`` does for the block
backends; nothing of size ``[S, H]`` is saved::

    dys = dy[token]                dh = dys @ w2[e]^T        dw2[e] = h_e^T dys_e
    dw[slot] = <dh, act(g) * u>    d(act(g) * u) = dh * w    -> dg, du (closed-form act')
    dw1[e] = xs_e^T dg_e           dxs = dg @ w1[e]^T + du @ v1[e]^T      dx = index_add(dxs)

The whole forward and the whole backward are two ``torch.library`` custom ops, so
``torch.compile`` sees one opaque node each: one graph, no data-dependent shapes,
in every dtype (torch's own ``grouped_mm`` traces only in bf16). A model's fused
gate/up tensor is taken whole (one GEMM of width ``2F``, concatenated or interleaved
halves), the way ``transformers`` stores it.

Extras that model code carries (biases, a class's own gate, a post-expert op, a
callable activation) go through :func:`grouped_ffn_composed`: the same products as
differentiable ops, the extras in plain torch between them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..routing import RoutingPlan
from .grouped_mm import gmm, gmm_wgrad

__all__ = ["GATE_UP_LAYOUTS", "ACTIVATION_NAMES", "grouped_ffn", "grouped_ffn_composed", "grouped_product"]

Tensor = torch.Tensor

#: How ``w1`` (and ``v1``) hold the first layer: ``mlp`` (no gate), ``separate`` (``w1`` gate,
#: ``v1`` up), or one fused ``[E, H, 2F]`` tensor with ``concat`` ([:F] gate, [F:] up) or
#: ``interleave`` ([0::2] gate, [1::2] up) columns.
GATE_UP_LAYOUTS = ("mlp", "separate", "concat", "interleave")
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "silu", "relu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act_fwd(name: str, g: Tensor) -> Tensor:
    if name == "silu":
        return torch.nn.functional.silu(g)
    if name == "relu":
        return torch.relu(g)
    if name == "gelu":
        return torch.nn.functional.gelu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def _act_fwd_grad(name: str, g: Tensor) -> tuple[Tensor, Tensor]:
    """``act(g)`` and ``act'(g)`` in closed form (the backward op runs below autograd)."""
    if name == "silu":
        s = torch.sigmoid(g)
        a = g * s
        return a, s * (1.0 + g * (1.0 - s))
    if name == "relu":
        return torch.relu(g), (g > 0).to(g.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
        return g * cdf, cdf + g * pdf
    inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    t = torch.tanh(inner)
    a = 0.5 * g * (1.0 + t)
    return a, 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * g * g)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Elementwise work in fp32 for half inputs: the GEMMs accumulate in fp32 too.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _split_gate_up(pre1: Tensor, pre3: Tensor, layout: str) -> tuple[Tensor, Optional[Tensor]]:
    if layout == "mlp":
        return pre1, None
    if layout == "separate":
        return pre1, pre3
    if layout == "concat":
        half = pre1.shape[1] // 2
        return pre1[:, :half], pre1[:, half:]
    return pre1[:, 0::2], pre1[:, 1::2]


def _valid_rows(offs: Tensor, rows: int) -> Tensor:
    """``[rows, 1]`` mask of the rows some expert owns (no host read)."""
    return (torch.arange(rows, device=offs.device) < offs[-1:].to(torch.int64))[:, None]


#: Rows per chunk of the elementwise work on a CPU: ~1 MB fp32 temporaries at this width.
_CPU_CHUNK_ELEMENTS = 1 << 18


class _Products:
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

    def chunks(self, width: int):
        step = max(1, _CPU_CHUNK_ELEMENTS // max(width, 1)) if self.host else max(self.rows, 1)
        return [slice(i, min(i + step, self.rows)) for i in range(0, self.rows, step)]

    def mm(self, a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``out[rows of e] = a[rows of e] @ b[e]``; rows past the last expert: unspecified."""
        if not self.host:
            return gmm(a, b, self.offs)
        out = a.new_empty(a.shape[0], b.shape[2]) if out is None else out
        lo = self.bounds
        for e in range(b.shape[0]):
            if lo[e + 1] > lo[e]:
                torch.mm(a[lo[e] : lo[e + 1]], b[e], out=out[lo[e] : lo[e + 1]])
        return out

    def mm_acc(self, acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``acc[rows of e] += a[rows of e] @ b[e]``."""
        if not self.host:
            return acc.add_(gmm(a, b, self.offs))
        lo = self.bounds
        for e in range(b.shape[0]):
            if lo[e + 1] > lo[e]:
                part = acc[lo[e] : lo[e + 1]]
                torch.addmm(part, a[lo[e] : lo[e + 1]], b[e], out=part)
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
        lo = self.bounds
        for e in range(E):
            if lo[e + 1] == lo[e]:
                out[e].zero_()
            elif transposed:
                torch.mm(g[lo[e] : lo[e + 1]].t(), a[lo[e] : lo[e + 1]], out=out[e])
            else:
                torch.mm(a[lo[e] : lo[e + 1]].t(), g[lo[e] : lo[e + 1]], out=out[e])
        return out.transpose(1, 2) if transposed else out

    def zero_tail(self, t: Tensor) -> Tensor:
        """Zero the rows no expert owns (a padded plan's tail), in place."""
        if self.host:
            t[self.bounds[-1] :].zero_()
            return t
        return t.masked_fill_(~_valid_rows(self.offs, self.rows), 0)


def _is_transposed(w: Tensor) -> bool:
    return w.dim() == 3 and w.stride(1) == 1 and w.stride(2) != 1 and w.shape[1] > 1


def _grad_like(w: Tensor) -> Tensor:
    """An uninitialised tensor shaped and laid out as :meth:`_Products.wgrad` returns for ``w``."""
    if _is_transposed(w):
        return w.new_empty(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2)
    return w.new_empty(w.shape)


def _index_add_rows(rows: Tensor, index: Tensor, num_out: int) -> Tensor:
    """``out[index[i]] += rows[i]`` in fp32 for half inputs; deterministic on the CPU."""
    acc = torch.zeros(num_out, rows.shape[1], dtype=_compute_dtype(rows.dtype), device=rows.device)
    acc.index_add_(0, index, rows if rows.dtype == acc.dtype else rows.to(acc.dtype))
    return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)


def _hidden_into(h: Tensor, g: Tensor, u: Optional[Tensor], w_sorted: Optional[Tensor], activation: str, pro: _Products) -> None:
    """``h = act(g) [* u] [* w]``, chunk by chunk, computed in fp32 for half inputs."""
    cd = _compute_dtype(h.dtype)
    for sl in pro.chunks(h.shape[1]):
        a = _act_fwd(activation, g[sl].to(cd))
        if u is not None:
            a.mul_(u[sl])
        if w_sorted is not None:
            a.mul_(w_sorted[sl])
        h[sl] = a


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("blocksparse_moe::grouped_ffn", mutates_args=())
def _ffn_op(
    x: Tensor, weights: Optional[Tensor], w1: Tensor, v1: Optional[Tensor], w2: Tensor,
    sorted_to_slot: Tensor, slot_to_sorted: Tensor, expert_offsets: Tensor,
    top_k: int, activation: str, layout: str, padded: bool, loops: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    S, T = sorted_to_slot.shape[0], x.shape[0]
    pro = _Products(expert_offsets, S, loops)
    token = torch.div(sorted_to_slot, top_k, rounding_mode="floor").long()
    xs = x.index_select(0, token)
    pre1 = pro.mm(xs, w1)
    pre3 = pro.mm(xs, v1) if layout == "separate" else x.new_empty(0)
    if padded:  # rows no expert owns: zeros, so every later pass over them stays finite
        pro.zero_tail(pre1)
        if layout == "separate":
            pro.zero_tail(pre3)
    g, u = _split_gate_up(pre1, pre3, layout)
    w_sorted = None if weights is None else weights.reshape(-1)[sorted_to_slot.long()].to(_compute_dtype(x.dtype))[:, None]
    h = x.new_empty(S, w2.shape[1])
    _hidden_into(h, g, u, w_sorted, activation, pro)
    ys = pro.mm(h, w2, out=xs)  # xs is dead: its buffer takes the output
    del h
    if padded:
        pro.zero_tail(ys)
    return _index_add_rows(ys, token, T), pre1, pre3


@_ffn_op.register_fake
def _(x, weights, w1, v1, w2, sorted_to_slot, slot_to_sorted, expert_offsets, top_k, activation, layout, padded, loops):
    S = sorted_to_slot.shape[0]
    pre3 = x.new_empty(S, v1.shape[2]) if layout == "separate" else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(S, w1.shape[2]), pre3


# --------------------------------------------------------------------------- backward op
def _backward_elementwise(dh, g, u, w_sorted, activation, pro, hw, du, dw_sorted) -> None:
    """From ``dh = d(down input)``: ``hw = act(g) [* u] * w`` (for dw2), ``dw``, ``du``, and ``dg`` into ``dh``.

    Chunk by chunk, in fp32 for half inputs; ``hw``/``du``/``dw_sorted`` may be None
    when not needed (``dw_sorted`` needs ``w_sorted``).
    """
    cd = _compute_dtype(dh.dtype)
    for sl in pro.chunks(dh.shape[1]):
        a, da_dg = _act_fwd_grad(activation, g[sl].to(cd))
        d = dh[sl].to(cd)
        r = a if u is None else a * u[sl]
        if dw_sorted is not None:
            dw_sorted[sl] = torch.einsum("sf,sf->s", d, r)
        if hw is not None:
            hw[sl] = r if w_sorted is None else r * w_sorted[sl]
        if w_sorted is not None:
            d.mul_(w_sorted[sl])  # now d(act(g) [* u])
        if du is not None:
            du[sl] = d * a
        if u is not None:
            d.mul_(u[sl])
        dh[sl] = d.mul_(da_dg)


@torch.library.custom_op("blocksparse_moe::grouped_ffn_backward", mutates_args=())
def _ffn_backward_op(
    dy: Tensor, x: Tensor, weights: Optional[Tensor], w1: Tensor, v1: Optional[Tensor], w2: Tensor,
    pre1: Tensor, pre3: Tensor, sorted_to_slot: Tensor, slot_to_sorted: Tensor, expert_offsets: Tensor,
    top_k: int, activation: str, layout: str, padded: bool, loops: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    need_x, need_w, need_w1, need_v1, need_w2 = needs
    S, T = sorted_to_slot.shape[0], x.shape[0]
    pro = _Products(expert_offsets, S, loops)
    slot = sorted_to_slot.long()
    token = torch.div(sorted_to_slot, top_k, rounding_mode="floor").long()
    cd = _compute_dtype(x.dtype)
    fused = layout in ("concat", "interleave")
    g, u = _split_gate_up(pre1, pre3, layout)
    w_sorted = None if weights is None else weights.reshape(-1)[slot].to(cd)[:, None]

    buf = dy.index_select(0, token)  # [S, H]: dys now, xs later, dxs last (one buffer)
    dh = pro.mm(buf, w2.transpose(1, 2))  # d(down input) [S, F]
    if padded:
        pro.zero_tail(dh)
    F = dh.shape[1]
    hw = x.new_empty(S, F) if need_w2 else None
    dw_sorted = x.new_empty(S, dtype=cd) if need_w and w_sorted is not None else None
    d_gate_up = x.new_empty(S, 2 * F) if fused else None
    dg_out, du_out = _split_gate_up(d_gate_up, d_gate_up, layout) if fused else (dh, None)
    if u is not None and not fused:
        du_out = x.new_empty(S, F)
    _backward_elementwise(dh, g, u, w_sorted, activation, pro, hw, du_out, dw_sorted)
    if fused:
        dg_out.copy_(dh)
    del dh
    d_w2 = pro.wgrad(hw, buf, w2) if need_w2 else x.new_empty(0)
    del hw
    d_weights = x.new_empty(0)
    if dw_sorted is not None:
        d_weights = torch.empty_like(dw_sorted).index_copy_(0, slot, dw_sorted).view(T, top_k).to(weights.dtype)

    dg, du = (d_gate_up, None) if fused else (dg_out, du_out)
    d_w1, d_v1 = x.new_empty(0), x.new_empty(0)
    if need_w1 or need_v1:
        xs = torch.index_select(x, 0, token, out=buf)
        if need_w1:
            d_w1 = pro.wgrad(xs, dg, w1)
        if need_v1 and du is not None:
            d_v1 = pro.wgrad(xs, du, v1)
    d_x = x.new_empty(0)
    if need_x:
        dxs = pro.mm(dg, w1.transpose(1, 2), out=buf)
        if du is not None:
            dxs = pro.mm_acc(dxs, du, v1.transpose(1, 2))
        if padded:
            pro.zero_tail(dxs)
        d_x = _index_add_rows(dxs, token, T)
    return d_x, d_weights, d_w1, d_v1, d_w2


@_ffn_backward_op.register_fake
def _(dy, x, weights, w1, v1, w2, pre1, pre3, sorted_to_slot, slot_to_sorted, expert_offsets,
      top_k, activation, layout, padded, loops, needs):  # fmt: skip
    need_x, need_w, need_w1, need_v1, need_w2 = needs
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        x.new_empty(weights.shape, dtype=weights.dtype) if need_w and weights is not None else x.new_empty(0),
        _grad_like(w1) if need_w1 else x.new_empty(0),
        _grad_like(v1) if need_v1 and layout == "separate" else x.new_empty(0),
        _grad_like(w2) if need_w2 else x.new_empty(0),
    )


def _setup(ctx, inputs, output):
    x, weights, w1, v1, w2, s2s, slot2s, offsets, top_k, activation, layout, padded, loops = inputs
    _, pre1, pre3 = output
    ctx.save_for_backward(x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets)
    ctx.static = (top_k, activation, layout, padded, loops)


def _backward(ctx, dy, _dpre1, _dpre3):
    x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets = ctx.saved_tensors
    top_k, activation, layout, padded, loops = ctx.static
    n = ctx.needs_input_grad
    needs = [n[0], weights is not None and n[1], n[2], v1 is not None and n[3], n[4]]
    d_x, d_w, d_w1, d_v1, d_w2 = _ffn_backward_op(
        dy.contiguous(), x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets, top_k, activation, layout,
        padded, loops, needs,
    )  # fmt: skip
    return (
        d_x if n[0] else None,
        d_w if needs[1] else None,
        d_w1 if n[2] else None,
        d_v1 if needs[3] else None,
        d_w2 if n[4] else None,
        None, None, None, None, None, None, None, None,
    )  # fmt: skip


_ffn_op.register_autograd(_backward, setup_context=_setup)


def grouped_ffn(
    x: Tensor,
    plan: RoutingPlan,
    weights: Optional[Tensor],
    w1: Tensor,
    w2: Tensor,
    v1: Optional[Tensor] = None,
    *,
    activation: str = "gelu",
    layout: str | None = None,
    padded: bool = False,
    products: str | None = None,
) -> Tensor:
    """``y[t] = sum_j weights[t, j] * FFN_{e}(x[t])`` over ``plan``'s sorted rows (``weights=None``: unweighted).

    ``w1 [E, H, F]`` (or the fused ``[E, H, 2F]`` for ``layout`` ``concat``/``interleave``),
    ``v1 [E, H, F]`` for ``separate``, ``w2 [E, F, H]``; any strides. ``padded``: the plan
    has rows past ``expert_offsets[-1]`` that no expert owns; they contribute zero.
    ``products``: ``"loops"`` (``torch.mm`` into reused buffers; CPU tensors only) or
    ``"grouped_mm"``; ``None`` picks loops on a CPU, grouped_mm elsewhere.
    """
    if products is None:
        products = "loops" if x.device.type == "cpu" else "grouped_mm"
    if products not in ("loops", "grouped_mm") or (products == "loops" and x.device.type != "cpu"):
        raise ValueError(f"products must be 'grouped_mm', or 'loops' for CPU tensors; got {products!r} on {x.device}")
    if layout is None:
        layout = "mlp" if v1 is None else "separate"
    if layout not in GATE_UP_LAYOUTS:
        raise ValueError(f"layout must be one of {GATE_UP_LAYOUTS}, got {layout!r}")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES} for the fused grouped FFN, got {activation!r}")
    if (layout == "separate") != (v1 is not None):
        raise ValueError(
            f"v1 is given exactly when layout='separate'; got layout={layout!r}, v1 {'set' if v1 is not None else 'None'}"
        )
    y, _, _ = _ffn_op(
        x, weights, w1, v1, w2, plan.sorted_to_slot, plan.slot_to_sorted, plan.expert_offsets,
        plan.top_k, activation, layout, padded, products == "loops",
    )  # fmt: skip
    return y


# --------------------------------------------------------------------------- composed path
@torch.library.custom_op("blocksparse_moe::grouped_product", mutates_args=())
def _product_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return gmm(a, b, offs)


@_product_op.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[2])


def _product_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _product_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    da = _product_op(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    db = _wgrad_op(a, grad, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


_product_op.register_autograd(_product_backward, setup_context=_product_setup)


@torch.library.custom_op("blocksparse_moe::grouped_wgrad", mutates_args=())
def _wgrad_op(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    return gmm_wgrad(a, g, offs)


@_wgrad_op.register_fake
def _(a, g, offs):
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def grouped_product(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Differentiable ``out[rows of e] = a[rows of e] @ b[e]``; rows past ``offs[-1]`` are unspecified."""
    return _product_op(a, b, offs)


def grouped_ffn_composed(
    x: Tensor,
    plan: RoutingPlan,
    weights: Optional[Tensor],
    w1: Tensor,
    w2: Tensor,
    v1: Optional[Tensor] = None,
    *,
    activation: Callable[[Tensor], Tensor],
    b1: Optional[Tensor] = None,
    bv: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    gate: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    post: Optional[Callable[[Tensor], Tensor]] = None,
    padded: bool = False,
) -> Tensor:
    """The grouped FFN with model extras, each in plain torch between differentiable grouped products.

    ``FFN_e(x) = post(g(x @ w1[e] + b1[e], x @ v1[e] + bv[e]) @ w2[e] + b2[e])`` with
    ``g = gate`` or ``act(h1) [* h3]``; shapes as :func:`grouped_ffn` (``separate``/``mlp``).
    """
    S, T = plan.num_slots, plan.num_tokens
    offs = plan.expert_offsets[1:]
    token = torch.div(plan.sorted_to_slot, plan.top_k, rounding_mode="floor").long()
    expert = plan.sorted_expert.long().clamp(max=w1.shape[0] - 1)  # padded rows: any real expert, masked below
    xs = x.index_select(0, token)
    h1 = grouped_product(xs, w1, offs)
    if b1 is not None:
        h1 = h1 + b1.index_select(0, expert)
    if v1 is None:
        h = activation(h1)
    else:
        h3 = grouped_product(xs, v1, offs)
        if bv is not None:
            h3 = h3 + bv.index_select(0, expert)
        h = gate(h1, h3) if gate is not None else activation(h1) * h3
    valid = _valid_rows(offs, S) if padded else None
    if valid is not None:
        h = torch.where(valid, h, h.new_zeros(()))
    ys = grouped_product(h.to(w2.dtype), w2, offs)
    if b2 is not None:
        ys = ys + b2.index_select(0, expert)
    if post is not None:
        ys = post(ys).to(x.dtype)
    if weights is not None:
        ys = ys * weights.reshape(-1)[plan.sorted_to_slot.long()].to(ys.dtype)[:, None]
    if valid is not None:
        ys = torch.where(valid, ys, ys.new_zeros(()))
    acc_dtype = _compute_dtype(ys.dtype)
    y = torch.zeros(T, ys.shape[1], dtype=acc_dtype, device=ys.device).index_add(0, token, ys.to(acc_dtype))
    return y.to(x.dtype)

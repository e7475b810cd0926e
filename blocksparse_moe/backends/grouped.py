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


def _index_add_rows(rows: Tensor, index: Tensor, num_out: int) -> Tensor:
    """``out[index[i]] += rows[i]`` in fp32 for half inputs; deterministic on the CPU."""
    acc = torch.zeros(num_out, rows.shape[1], dtype=_compute_dtype(rows.dtype), device=rows.device)
    acc.index_add_(0, index, rows.to(acc.dtype))
    return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)


def _first_layer(xs: Tensor, w1: Tensor, v1: Optional[Tensor], offs: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    pre1 = gmm(xs, w1, offs)
    pre3 = gmm(xs, v1, offs) if layout == "separate" else xs.new_empty(0)
    return pre1, pre3


def _hidden(pre1: Tensor, pre3: Tensor, w_sorted: Optional[Tensor], activation: str, layout: str) -> Tensor:
    """``act(g) [* u] [* w]`` in the compute dtype: the down projection's input (unmasked)."""
    g, u = _split_gate_up(pre1, pre3, layout)
    cd = _compute_dtype(pre1.dtype)
    h = _act_fwd(activation, g.to(cd))
    if u is not None:
        h.mul_(u)
    if w_sorted is not None:
        h.mul_(w_sorted.to(cd)[:, None])
    return h


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("blocksparse_moe::grouped_ffn", mutates_args=())
def _ffn_op(
    x: Tensor, weights: Optional[Tensor], w1: Tensor, v1: Optional[Tensor], w2: Tensor,
    sorted_to_slot: Tensor, slot_to_sorted: Tensor, expert_offsets: Tensor,
    top_k: int, activation: str, layout: str, padded: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    S, T = sorted_to_slot.shape[0], x.shape[0]
    offs = expert_offsets[1:]
    token = torch.div(sorted_to_slot, top_k, rounding_mode="floor").long()
    pre1, pre3 = _first_layer(x.index_select(0, token), w1, v1, offs, layout)
    w_sorted = None if weights is None else weights.reshape(-1)[sorted_to_slot.long()]
    h = _hidden(pre1, pre3, w_sorted, activation, layout).to(x.dtype)
    valid = _valid_rows(offs, S) if padded else None
    if valid is not None:  # rows no expert owns hold garbage from the first GEMM
        h = torch.where(valid, h, h.new_zeros(()))
    ys = gmm(h, w2, offs)
    del h
    if valid is not None:
        ys = torch.where(valid, ys, ys.new_zeros(()))
    return _index_add_rows(ys, token, T), pre1, pre3


@_ffn_op.register_fake
def _(x, weights, w1, v1, w2, sorted_to_slot, slot_to_sorted, expert_offsets, top_k, activation, layout, padded):
    S = sorted_to_slot.shape[0]
    pre3 = x.new_empty(S, v1.shape[2]) if layout == "separate" else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(S, w1.shape[2]), pre3


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("blocksparse_moe::grouped_ffn_backward", mutates_args=())
def _ffn_backward_op(
    dy: Tensor, x: Tensor, weights: Optional[Tensor], w1: Tensor, v1: Optional[Tensor], w2: Tensor,
    pre1: Tensor, pre3: Tensor, sorted_to_slot: Tensor, slot_to_sorted: Tensor, expert_offsets: Tensor,
    top_k: int, activation: str, layout: str, padded: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    need_x, need_w, need_w1, need_v1, need_w2 = needs
    S, T = sorted_to_slot.shape[0], x.shape[0]
    offs = expert_offsets[1:]
    slot = sorted_to_slot.long()
    token = torch.div(sorted_to_slot, top_k, rounding_mode="floor").long()
    cd = _compute_dtype(x.dtype)
    empty = x.new_empty(0)

    dys = dy.index_select(0, token)
    dh = gmm(dys, w2.transpose(1, 2), offs).to(cd)  # d(down input) [S, F], rows past the end: garbage
    g, u = _split_gate_up(pre1, pre3, layout)
    a, da_dg = _act_fwd_grad(activation, g.to(cd))
    r = a if u is None else a * u  # act(g) [* u], unweighted
    w_sorted = None if weights is None else weights.reshape(-1)[slot].to(cd)[:, None]

    d_w2 = empty
    if need_w2:
        h = r if w_sorted is None else r * w_sorted
        d_w2 = gmm_wgrad(h.to(x.dtype), dys, offs)
        del h
    del dys
    d_weights = empty
    if need_w and w_sorted is not None:
        dw_sorted = (dh * r).sum(1)
        if padded:
            dw_sorted = torch.where(_valid_rows(offs, S)[:, 0], dw_sorted, dw_sorted.new_zeros(()))
        d_weights = torch.empty_like(dw_sorted).index_copy_(0, slot, dw_sorted).view(T, top_k).to(weights.dtype)
    del r
    if w_sorted is not None:
        dh.mul_(w_sorted)  # now d(act(g) [* u])
    d_gate_up = None
    if layout in ("concat", "interleave"):  # both halves in one buffer: one GEMM each way
        d_gate_up = torch.empty(S, pre1.shape[1], dtype=x.dtype, device=x.device)
        dg, du = _split_gate_up(d_gate_up, empty, layout)
        torch.mul(dh, a, out=du)
        torch.mul(dh.mul_(u), da_dg, out=dg)
    else:
        du = None if u is None else (dh * a).to(x.dtype)
        dg = (dh.mul_(da_dg) if u is None else dh.mul_(u).mul_(da_dg)).to(x.dtype)
    del dh, a, da_dg
    if padded:  # rows no expert owns carry garbage into the input GEMMs' unread rows only,
        valid = _valid_rows(offs, S)  # but the weight GEMMs read every row up to offs[-1]: exact.
        if d_gate_up is not None:
            d_gate_up = torch.where(valid, d_gate_up, d_gate_up.new_zeros(()))
        else:
            dg = torch.where(valid, dg, dg.new_zeros(()))
            du = None if du is None else torch.where(valid, du, du.new_zeros(()))

    d_w1 = d_v1 = empty
    if need_w1 or need_v1:
        xs = x.index_select(0, token)
        if d_gate_up is not None:
            d_w1 = gmm_wgrad(xs, d_gate_up, offs)
        else:
            d_w1 = gmm_wgrad(xs, dg, offs) if need_w1 else empty
            d_v1 = gmm_wgrad(xs, du, offs) if need_v1 and du is not None else empty
        del xs
    d_x = empty
    if need_x:
        if d_gate_up is not None:
            dxs = gmm(d_gate_up, w1.transpose(1, 2), offs)
        else:
            dxs = gmm(dg, w1.transpose(1, 2), offs)
            if du is not None:
                dxs.add_(gmm(du, v1.transpose(1, 2), offs))
        if padded:
            dxs = torch.where(_valid_rows(offs, S), dxs, dxs.new_zeros(()))
        d_x = _index_add_rows(dxs, token, T)
    return d_x, d_weights, d_w1, d_v1, d_w2


@_ffn_backward_op.register_fake
def _(dy, x, weights, w1, v1, w2, pre1, pre3, sorted_to_slot, slot_to_sorted, expert_offsets,
      top_k, activation, layout, padded, needs):  # fmt: skip
    need_x, need_w, need_w1, need_v1, need_w2 = needs
    e = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else e,
        weights.new_empty(weights.shape) if need_w and weights is not None else e,
        w1.new_empty(w1.shape) if need_w1 or (need_v1 and layout in ("concat", "interleave")) else e,
        v1.new_empty(v1.shape) if need_v1 and layout == "separate" else e,
        w2.new_empty(w2.shape) if need_w2 else e,
    )


def _setup(ctx, inputs, output):
    x, weights, w1, v1, w2, s2s, slot2s, offsets, top_k, activation, layout, padded = inputs
    _, pre1, pre3 = output
    ctx.save_for_backward(x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets)
    ctx.static = (top_k, activation, layout, padded)


def _backward(ctx, dy, _dpre1, _dpre3):
    x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets = ctx.saved_tensors
    top_k, activation, layout, padded = ctx.static
    n = ctx.needs_input_grad
    needs = [n[0], weights is not None and n[1], n[2], v1 is not None and n[3], n[4]]
    d_x, d_w, d_w1, d_v1, d_w2 = _ffn_backward_op(
        dy.contiguous(), x, weights, w1, v1, w2, pre1, pre3, s2s, slot2s, offsets, top_k, activation, layout,
        padded, needs,
    )  # fmt: skip
    return (
        d_x if n[0] else None,
        d_w if needs[1] else None,
        d_w1 if n[2] else None,
        d_v1 if needs[3] else None,
        d_w2 if n[4] else None,
        None, None, None, None, None, None, None,
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
) -> Tensor:
    """``y[t] = sum_j weights[t, j] * FFN_{e}(x[t])`` over ``plan``'s sorted rows (``weights=None``: unweighted).

    ``w1 [E, H, F]`` (or the fused ``[E, H, 2F]`` for ``layout`` ``concat``/``interleave``),
    ``v1 [E, H, F]`` for ``separate``, ``w2 [E, F, H]``; any strides. ``padded``: the plan
    has rows past ``expert_offsets[-1]`` that no expert owns; they contribute zero.
    """
    if layout is None:
        layout = "mlp" if v1 is None else "separate"
    if layout not in GATE_UP_LAYOUTS:
        raise ValueError(f"layout must be one of {GATE_UP_LAYOUTS}, got {layout!r}")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES} for the fused grouped FFN, got {activation!r}")
    if (layout == "separate") != (v1 is not None):
        raise ValueError(f"v1 is given exactly when layout='separate'; got layout={layout!r}, v1 {'set' if v1 is not None else 'None'}")
    y, _, _ = _ffn_op(
        x, weights, w1, v1, w2, plan.sorted_to_slot, plan.slot_to_sorted, plan.expert_offsets,
        plan.top_k, activation, layout, padded,
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

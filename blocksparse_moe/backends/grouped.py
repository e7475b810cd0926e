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
backends; nothing of size ``[S, H]`` is saved (the routing weight's gradient is a
dot over ``F``, ``<dh, act(g) * u>``, so ``ys`` is not needed either)::

    dys = dy[token]                dh = dys @ w2[e]^T        dw2[e] = h_e^T dys_e
    dw[slot] = <dh, act(g) * u>    d(act(g) * u) = dh * w    -> dg, du (closed-form act')
    dw1[e] = xs_e^T dg_e           dxs = dg @ w1[e]^T + du @ v1[e]^T      dx = index_add(dxs)

The FFN is two autograd nodes (``up`` and ``down``), each a ``torch.library`` custom
op with a custom-op backward, so ``torch.compile`` sees opaque nodes: one graph, no
data-dependent shapes, in every dtype (torch's own ``grouped_mm`` traces only in
bf16). How the products run per device (loops into reused buffers on a CPU, one
``F.grouped_mm`` elsewhere) is :class:`~.grouped_mm.GroupedProducts`. A model's fused
gate/up tensor is taken whole (one GEMM of width ``2F``, concatenated or interleaved
halves), the way ``transformers`` stores it, and every weight gradient comes in its
weight's layout.

Extras that model code carries (biases, a class's own gate, a post-expert op, a
callable activation) go through :mod:`.grouped_composed`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..routing import RoutingPlan
from .grouped_mm import GroupedProducts, grad_like
from .grouped_streamed import chunk_rows, streamed_rows

__all__ = ["GATE_UP_LAYOUTS", "ACTIVATION_NAMES", "grouped_ffn"]

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


_aten = torch.ops.aten


def _act_into(name: str, g: Tensor, out: Tensor) -> Tensor:
    """``out = act(g)``, written in place: no temporary of the chunk's size."""
    if name == "silu":
        return _aten.silu.out(g, out=out)
    if name == "relu":
        return torch.clamp_min(g, 0, out=out)  # NaN stays NaN, as torch.relu
    return _aten.gelu.out(g, approximate="none" if name == "gelu" else "tanh", out=out)


def _act_backward_into(name: str, grad: Tensor, g: Tensor, out: Tensor) -> Tensor:
    """``out = grad * act'(g)`` with torch's own fused backward kernel (one pass, ``out`` may be ``grad``).

    The closed form spelled out in torch ops (sigmoid, products, sums) is five to six
    passes with a temporary each: measured 20x slower on a 1 MB chunk on a CPU.
    """
    if name == "silu":
        return _aten.silu_backward.grad_input(grad, g, grad_input=out)
    if name == "relu":  # as relu's own backward: 0 where g <= 0, so a NaN input passes the gradient
        return _aten.threshold_backward.grad_input(grad, g, 0, grad_input=out)
    return _aten.gelu_backward.grad_input(grad, g, approximate="none" if name == "gelu" else "tanh", grad_input=out)


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


def _index_add_rows(rows: Tensor, index: Tensor, num_out: int) -> Tensor:
    """``out[index[i]] += rows[i]`` in fp32 for half inputs; deterministic on the CPU."""
    cd = _compute_dtype(rows.dtype)
    if num_out == 1:  # one token (a decode step): every row is its own, a sum in row order
        acc = rows.sum(0, keepdim=True, dtype=cd)
        return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)
    acc = torch.zeros(num_out, rows.shape[1], dtype=cd, device=rows.device)
    acc.index_add_(0, index, rows if rows.dtype == acc.dtype else rows.to(acc.dtype))
    return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)


def _hidden(g: Tensor, u: Optional[Tensor], w_sorted: Optional[Tensor], activation: str,
            pro: GroupedProducts) -> Tensor:  # fmt: skip
    """``h = act(g) [* u] [* w]``, chunk by chunk, computed in fp32 for half inputs."""
    cd = _compute_dtype(g.dtype)
    h = g.new_empty(g.shape)
    for sl in pro.chunks(g.shape[1]):
        # full precision: the activation lands in h itself; half: in an fp32 chunk, cast once at the end
        a = _act_into(activation, g[sl], h[sl]) if cd == g.dtype else _act_fwd(activation, g[sl].to(cd))
        if u is not None:
            a.mul_(u[sl])
        if w_sorted is not None:
            a.mul_(w_sorted[sl])
        if cd != g.dtype:
            h[sl] = a
    return h


def _tokens(sorted_to_slot: Tensor, top_k: int) -> Tensor:
    return torch.div(sorted_to_slot, top_k, rounding_mode="floor").long()


def _sorted_weights(weights: Optional[Tensor], sorted_to_slot: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    if weights is None:
        return None
    return weights.reshape(-1).index_select(0, sorted_to_slot).to(_compute_dtype(dtype))[:, None]


# The FFN is two autograd nodes, each a forward op and a backward op:
#   up:   x -> (g, u)            backward: (dg, du) -> dx, dw1, dv1
#   down: (g, u), w -> y         backward: dy -> (dg, du), dw, dw2
# Two nodes rather than one so that autograd frees the down node's saved g, u before
# the up node's backward allocates its weight gradients: one [S, 2F] less at the
# backward's peak (measured at E=64: 1.24x -> below transformers' grouped_mm).


# --------------------------------------------------------------------------- up: x -> pre-activations
def _up_impl(x: Tensor, w1: Tensor, v1: Optional[Tensor], sorted_to_slot: Tensor, expert_offsets: Tensor,
           top_k: int, layout: str, padded: bool, loops: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    pro = GroupedProducts(expert_offsets, sorted_to_slot.shape[0], loops)
    return _up_rows(x, w1, v1, _tokens(sorted_to_slot, top_k), pro, layout, padded)


def _up_rows(x: Tensor, w1: Tensor, v1: Optional[Tensor], token: Tensor, pro: GroupedProducts, layout: str,
             padded: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    xs = x.index_select(0, token)
    pre1 = pro.mm(xs, w1)
    pre3 = pro.mm(xs, v1) if layout == "separate" else x.new_empty(0)
    if padded:  # rows no expert owns: zeros, so every later pass over them stays finite
        pro.zero_tail(pre1)
        if layout == "separate":
            pro.zero_tail(pre3)
    return pre1, pre3


_up_op = torch.library.custom_op("blocksparse_moe::grouped_up", mutates_args=())(_up_impl)


@_up_op.register_fake
def _(x, w1, v1, sorted_to_slot, expert_offsets, top_k, layout, padded, loops):
    S = sorted_to_slot.shape[0]
    return x.new_empty(S, w1.shape[2]), x.new_empty(S, v1.shape[2]) if layout == "separate" else x.new_empty(0)


@torch.library.custom_op("blocksparse_moe::grouped_up_backward", mutates_args=())
def _up_backward_op(d_pre1: Tensor, d_pre3: Tensor, x: Tensor, w1: Tensor, v1: Optional[Tensor],
                    sorted_to_slot: Tensor, expert_offsets: Tensor, top_k: int, layout: str, padded: bool,
                    loops: bool, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    need_x, need_w1, need_v1 = needs
    S, T = sorted_to_slot.shape[0], x.shape[0]
    pro = GroupedProducts(expert_offsets, S, loops)
    token = _tokens(sorted_to_slot, top_k)
    separate = layout == "separate"
    buf = x.index_select(0, token)  # xs for the weight gradients, then dxs (one buffer)
    d_w1 = pro.wgrad(buf, d_pre1, w1) if need_w1 else x.new_empty(0)
    d_v1 = pro.wgrad(buf, d_pre3, v1) if need_v1 and separate else x.new_empty(0)
    d_x = x.new_empty(0)
    if need_x:
        dxs = pro.mm(d_pre1, w1.transpose(1, 2), out=buf)
        if separate:
            dxs = pro.mm_acc(dxs, d_pre3, v1.transpose(1, 2))
        if padded:
            pro.zero_tail(dxs)
        d_x = _index_add_rows(dxs, token, T)
    return d_x, d_w1, d_v1


@_up_backward_op.register_fake
def _(d_pre1, d_pre3, x, w1, v1, sorted_to_slot, expert_offsets, top_k, layout, padded, loops, needs):
    need_x, need_w1, need_v1 = needs
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        grad_like(w1) if need_w1 else x.new_empty(0),
        grad_like(v1) if need_v1 and layout == "separate" else x.new_empty(0),
    )


def _up_setup(ctx, inputs, output):
    x, w1, v1, s2s, offsets, top_k, layout, padded, loops = inputs
    ctx.save_for_backward(x, w1, v1, s2s, offsets)
    ctx.static = (top_k, layout, padded, loops)


def _up_backward(ctx, d_pre1, d_pre3):
    x, w1, v1, s2s, offsets = ctx.saved_tensors
    top_k, layout, padded, loops = ctx.static
    n = ctx.needs_input_grad
    needs = [n[0], n[1], v1 is not None and n[2]]
    d_pre3 = d_pre3 if d_pre3 is not None else x.new_empty(0)
    d_x, d_w1, d_v1 = _up_backward_op(d_pre1.contiguous(), d_pre3.contiguous(), x, w1, v1, s2s, offsets, top_k,
                                      layout, padded, loops, needs)  # fmt: skip
    return d_x if n[0] else None, d_w1 if n[1] else None, d_v1 if needs[2] else None, None, None, None, None, None, None


_up_op.register_autograd(_up_backward, setup_context=_up_setup)


# --------------------------------------------------------------------------- down: pre-activations -> y
def _down_impl(pre1: Tensor, pre3: Tensor, weights: Optional[Tensor], w2: Tensor, sorted_to_slot: Tensor,
             expert_offsets: Tensor, num_tokens: int, top_k: int, activation: str, layout: str, padded: bool,
             loops: bool) -> Tensor:  # fmt: skip
    pro = GroupedProducts(expert_offsets, sorted_to_slot.shape[0], loops)
    w_sorted = _sorted_weights(weights, sorted_to_slot, pre1.dtype)
    return _down_rows(pre1, pre3, w_sorted, w2, _tokens(sorted_to_slot, top_k), num_tokens, pro, activation,
                      layout, padded)  # fmt: skip


def _down_rows(pre1: Tensor, pre3: Tensor, w_sorted: Optional[Tensor], w2: Tensor, token: Tensor, num_tokens: int,
               pro: GroupedProducts, activation: str, layout: str, padded: bool) -> Tensor:  # fmt: skip
    g, u = _split_gate_up(pre1, pre3, layout)
    h = _hidden(g, u, w_sorted, activation, pro)
    ys = pro.mm(h, w2)
    del h
    if padded:
        pro.zero_tail(ys)
    return _index_add_rows(ys, token, num_tokens)


_down_op = torch.library.custom_op("blocksparse_moe::grouped_down", mutates_args=())(_down_impl)


@_down_op.register_fake
def _(pre1, pre3, weights, w2, sorted_to_slot, expert_offsets, num_tokens, top_k, activation, layout, padded, loops):
    return pre1.new_empty(num_tokens, w2.shape[2])


def _down_operand_pass(dh, g, u, w_sorted, activation, pro, hw, dw_sorted) -> None:
    """Pass 1 of backward: ``hw = act(g) [* u] * w`` (dw2's operand) and ``dw[row] = <dh, act(g) [* u]>``."""
    cd = _compute_dtype(dh.dtype)
    in_place = hw is not None and hw.dtype == cd  # full precision: build the operand in hw itself
    for sl in pro.chunks(dh.shape[1]):
        r = _act_into(activation, g[sl], hw[sl]) if in_place else _act_fwd(activation, g[sl].to(cd))
        if u is not None:
            r.mul_(u[sl])
        if dw_sorted is not None:
            torch.linalg.vecdot(dh[sl].to(cd), r, out=dw_sorted[sl])  # a row dot; einsum takes a bmm, 3x slower
        if hw is not None and w_sorted is not None:
            r.mul_(w_sorted[sl])
        if hw is not None and not in_place:
            hw[sl] = r


def _gate_up_grad_pass(dh, g, u, w_sorted, activation, pro, dg, du) -> None:
    """Pass 2 of backward: ``du = dh * w * act(g)`` and ``dg = dh * w [* u] * act'(g)`` (``dg`` may be ``dh``).

    Two passes rather than one, so that dw2's operand is consumed (and its buffer
    free for ``du``) before ``du`` is written: one ``[S, F]`` buffer less at the peak,
    and one fresh allocation less; the activation is recomputed per cache-sized chunk.
    """
    cd = _compute_dtype(dh.dtype)
    for sl in pro.chunks(dh.shape[1]):
        d = dh[sl].to(cd)  # for fp32 a view: dh is dead after this pass (or becomes dg), so in place is fine
        gc = g[sl].to(cd)
        if w_sorted is not None:
            d.mul_(w_sorted[sl])
        if du is not None:
            if du.dtype == cd:
                _act_into(activation, gc, du[sl]).mul_(d)
            else:
                du[sl] = _act_fwd(activation, gc).mul_(d)
        if u is not None:
            d.mul_(u[sl])
        _act_backward_into(activation, d, gc, dg[sl])


@torch.library.custom_op("blocksparse_moe::grouped_down_backward", mutates_args=())
def _down_backward_op(dy: Tensor, pre1: Tensor, pre3: Tensor, weights: Optional[Tensor], w2: Tensor,
                      sorted_to_slot: Tensor, expert_offsets: Tensor, top_k: int, activation: str, layout: str,
                      padded: bool, loops: bool, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    need_pre, need_w, need_w2 = needs
    S, T = sorted_to_slot.shape[0], dy.shape[0]
    pro = GroupedProducts(expert_offsets, S, loops)
    g, u = _split_gate_up(pre1, pre3, layout)
    w_sorted = _sorted_weights(weights, sorted_to_slot, pre1.dtype)
    dys = dy.index_select(0, _tokens(sorted_to_slot, top_k))
    dh = pro.mm(dys, w2.transpose(1, 2))  # d(down input) [S, F]
    if padded:
        pro.zero_tail(dh)
    F = dh.shape[1]
    hw = pre1.new_empty(S, F) if need_w2 else None
    dw_sorted = pre1.new_empty(S, dtype=_compute_dtype(pre1.dtype)) if need_w and w_sorted is not None else None
    if hw is not None or dw_sorted is not None:
        _down_operand_pass(dh, g, u, w_sorted, activation, pro, hw, dw_sorted)
    d_w2 = pro.wgrad(hw, dys, w2) if need_w2 else pre1.new_empty(0)
    del dys
    d_weights = pre1.new_empty(0)
    if dw_sorted is not None:
        slot = sorted_to_slot.long()
        d_weights = torch.empty_like(dw_sorted).index_copy_(0, slot, dw_sorted).view(T, top_k).to(weights.dtype)
    d_pre1, d_pre3 = pre1.new_empty(0), pre1.new_empty(0)
    if need_pre:
        if layout in ("concat", "interleave"):  # both halves in one buffer, as the up GEMM wrote them
            d_pre1 = pre1.new_empty(S, 2 * F)
            dg, du = _split_gate_up(d_pre1, d_pre1, layout)
        else:
            dg = d_pre1 = dh  # dg overwrites dh in place; du takes hw's buffer once hw is consumed
            du = None if u is None else (hw if hw is not None else pre1.new_empty(S, F))
            d_pre3 = du if du is not None else d_pre3
        _gate_up_grad_pass(dh, g, u, w_sorted, activation, pro, dg, du)
    return d_pre1, d_pre3, d_weights, d_w2


@_down_backward_op.register_fake
def _(dy, pre1, pre3, weights, w2, sorted_to_slot, expert_offsets, top_k, activation, layout, padded, loops, needs):
    need_pre, need_w, need_w2 = needs
    e = lambda: pre1.new_empty(0)  # noqa: E731
    return (
        pre1.new_empty(pre1.shape) if need_pre else e(),
        pre1.new_empty(pre3.shape) if need_pre and layout == "separate" else e(),
        pre1.new_empty(weights.shape, dtype=weights.dtype) if need_w and weights is not None else e(),
        grad_like(w2) if need_w2 else e(),
    )


def _down_setup(ctx, inputs, output):
    pre1, pre3, weights, w2, s2s, offsets, num_tokens, top_k, activation, layout, padded, loops = inputs
    ctx.save_for_backward(pre1, pre3, weights, w2, s2s, offsets)
    ctx.static = (top_k, activation, layout, padded, loops)


def _down_backward(ctx, dy):
    pre1, pre3, weights, w2, s2s, offsets = ctx.saved_tensors
    top_k, activation, layout, padded, loops = ctx.static
    n = ctx.needs_input_grad
    needs = [n[0] or n[1], weights is not None and n[2], n[3]]
    d_pre1, d_pre3, d_w, d_w2 = _down_backward_op(dy.contiguous(), pre1, pre3, weights, w2, s2s, offsets, top_k,
                                                  activation, layout, padded, loops, needs)  # fmt: skip
    return (d_pre1 if needs[0] else None, d_pre3 if needs[0] and layout == "separate" else None,
            d_w if needs[1] else None, d_w2 if n[3] else None) + (None,) * 8  # fmt: skip


_down_op.register_autograd(_down_backward, setup_context=_down_setup)


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
    loops = products == "loops"
    s2s, offsets = plan.sorted_to_slot, plan.expert_offsets
    if _eager_inference(x, weights, w1, w2, v1):  # the two op bodies in one go, sharing their set-up
        pro, token = GroupedProducts(offsets, s2s.shape[0], loops), _tokens(s2s, plan.top_k)
        rows = chunk_rows(max(w1.shape[2], w2.shape[2]), x.element_size())
        if loops and pro.bounds[-1] - pro.bounds[0] > rows:  # no [S, *] intermediates (.grouped_streamed)
            w_sorted = _sorted_weights(weights, s2s, x.dtype)
            return streamed_rows(x, w1, v1, w2, token, pro.bounds, w_sorted, plan.num_tokens, activation, layout,
                                 rows)  # fmt: skip
        pre1, pre3 = _up_rows(x, w1, v1, token, pro, layout, padded)
        w_sorted = _sorted_weights(weights, s2s, pre1.dtype)
        return _down_rows(pre1, pre3, w_sorted, w2, token, plan.num_tokens, pro, activation, layout, padded)
    pre1, pre3 = _up_op(x, w1, v1, s2s, offsets, plan.top_k, layout, padded, loops)
    return _down_op(pre1, pre3, weights, w2, s2s, offsets, plan.num_tokens, plan.top_k, activation, layout, padded,
                    loops)  # fmt: skip


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a layer's own weights are Parameters; subclasses (fake, DTensor) are not


def _eager_inference(*tensors: Optional[Tensor]) -> bool:
    """Whether the op bodies can run as plain functions: eager, plain tensors, nothing to differentiate.

    The custom ops exist for autograd and for ``torch.compile`` (opaque nodes). In eager
    inference neither applies, and the dispatcher's wrapping costs ~20 us per op, a tenth
    of a one-token decode step's expert call; fake, meta or wrapped tensors keep the ops
    (their fake implementations give the shapes without the data the bodies read).
    """
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta or (grad and t.requires_grad)):
            return False
    return True

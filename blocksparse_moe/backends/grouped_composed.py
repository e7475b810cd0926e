"""The grouped FFN with the extras model code carries, in plain torch between differentiable grouped products.

Biases, a class's own gate, a post-expert op or a callable activation cannot enter
the fused ops of :mod:`.grouped` (their derivative is not known in closed form there),
so this path composes :func:`grouped_product` (a custom op with its own backward, so
``torch.compile`` traces it in every dtype) with ordinary autograd for the rest.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..routing import RoutingPlan
from .grouped_mm import gmm, gmm_wgrad, valid_rows

__all__ = ["grouped_ffn_composed", "grouped_product"]

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    valid = valid_rows(offs, S) if padded else None
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

"""The block-sparse FFN (backends ``triton`` and ``torch``): gather, SDD, activation, DSD, combine.

The intermediate lives in the topology's block layout (``docs/design.md``); the
products are the differentiable ops of :mod:`blocksparse_moe.ops`, which launch the
Triton kernels or run their pure-torch references.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from ..routing import RoutingPlan
from ..topology import Topology, build_topology

__all__ = ["block_ffn"]


def block_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    weights: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None,
    act: Callable[[torch.Tensor], torch.Tensor],
    *,
    backend: str,
    block_size: int = 64,
    topo: Topology | None = None,
    recompute: bool = False,
    padded: bool = False,
) -> torch.Tensor:
    """Every expert's FFN over ``plan`` in the block layout, combined with ``weights`` (``None``: unweighted).

    ``topo`` is built from the plan unless given. ``recompute``: keep only the
    pre-activations for backward (:class:`_ActThenDown`). ``padded``: rows past
    ``plan.expert_offsets[-1]`` belong to no expert and contribute zero.
    """
    if topo is None:
        topo = build_topology(plan, w1.shape[2], block_size)
    xs = ops.gather(x, plan, backend)
    h1 = ops.sdd(xs, w1, topo, backend)
    h3 = None if v1 is None else ops.sdd(xs, v1, topo, backend)
    if recompute:
        ys = _ActThenDown.apply(h1, h3, w2, act, topo, backend)
    else:
        h = act(h1) if h3 is None else act(h1) * h3
        ys = ops.dsd(h, w2, topo, backend)
    if padded:
        # Padding rows (sorted last) belong to no expert: the torch backend returns
        # only the real rows, the Triton dsd leaves the rest unwritten.
        S = plan.num_slots
        if ys.shape[0] < S:
            ys = torch.cat([ys, ys.new_zeros(S - ys.shape[0], ys.shape[1])])
        real = torch.arange(S, device=ys.device) < plan.expert_offsets[-1]
        ys = torch.where(real[:, None], ys, ys.new_zeros(()))
    return ops.combine(ys, plan, weights, backend)


class _ActThenDown(torch.autograd.Function):
    """``y = dsd(act(h1) [* h3], w2)`` that keeps ``h1`` (and ``h3``) but not the activation.

    Without it, backward keeps the pre-activation ``h1`` (for ``act``'s gradient)
    *and* the activated ``h`` (for ``dsd``'s weight gradient), plus ``act(h1)`` and
    ``h3`` for the GLU product: 2 (MLP) or 4 (GLU) intermediates of the sparse size.
    This node keeps 1 or 2 and recomputes the elementwise part in backward; the
    matmuls are not redone (a checkpoint of the whole segment would redo ``dsd``).
    MegaBlocks' memory-optimized MLP does the same, but this one skips the gradients
    nobody asked for, so frozen ``w1``/``w2``/``v1`` work.
    """

    @staticmethod
    def forward(ctx, h1, h3, w2, act, topo: Topology, backend: str):
        h = act(h1) if h3 is None else act(h1) * h3
        y = ops.dsd(h, w2, topo, backend)
        ctx.save_for_backward(h1, h3, w2, *topo.tensors())
        ctx.act, ctx.sizes, ctx.backend = act, topo.sizes(), backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h1, h3, w2, *topo_tensors = ctx.saved_tensors
        topo = Topology.from_parts(ctx.sizes, topo_tensors)
        need_h1, need_h3, need_w2 = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        with torch.enable_grad():
            a = h1.detach().requires_grad_(need_h1)
            r = ctx.act(a)
        # The GLU product is formed outside the graph and only for dw2, then freed
        # before dh is allocated: keeps backward's peak near that of the plain layer.
        d_w2 = None
        if need_w2:
            h = r.detach() if h3 is None else r.detach() * h3
            d_w2 = _down_weight_grad(h, grad, topo, ctx.backend)
            del h
        d_h1 = d_h3 = None
        if need_h1 or need_h3:
            d_h = _down_input_grad(grad, w2, topo, ctx.backend)
            if h3 is not None:
                d_h3 = d_h * r.detach() if need_h3 else None
                d_h = d_h.mul_(h3)  # now d(act(h1)); d_h is ours, fresh from sdd
            if need_h1:
                # an activation that ignores its input (a constant) leaves no graph
                d_h1 = torch.autograd.grad(r, a, d_h)[0] if r.requires_grad else torch.zeros_like(h1)
        return d_h1, d_h3, d_w2, None, None, None


def _down_input_grad(grad: torch.Tensor, w2: torch.Tensor, topo: Topology, backend: str) -> torch.Tensor:
    """``dh = sdd(grad, w2^T)``: dsd's input gradient, as ``ops``' own backward computes it."""
    return ops.sdd(grad, w2.transpose(1, 2), topo, backend)


def _down_weight_grad(h: torch.Tensor, grad: torch.Tensor, topo: Topology, backend: str) -> torch.Tensor:
    """``dw2[e] = rows(h of e)^T @ grad[rows of e]``, as ``ops``' own dsd backward computes it."""
    return ops.dsd_t(h, grad, topo, backend)

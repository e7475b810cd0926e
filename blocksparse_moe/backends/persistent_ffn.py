"""The SwiGLU expert FFN built only from the persistent Hopper kernels (issue 15), opt-in.

``persistent_glu_ffn(x, w1, v1, w2, plan, topo, weights)`` computes what
``block_ffn(..., act=silu, backend="triton")`` computes for a GLU, ``y[t] = sum_j
weights[t, j] * (silu(x[t] @ w1[e]) * (x[t] @ v1[e])) @ w2[e]`` over the token's k
experts, with fewer launches and bytes:

forward (3 launches after the plan's index):
    ``sdd_glu(x, w1, v1, gather=token_index(plan), store_pre=True)``: the gather fused
    into the SDD's A loads, SwiGLU in its epilogue; ``g``/``u`` kept for backward, ``h``
    freed (backward recomputes it from ``g``/``u``), no ``[S, H]`` copy of ``x``.
    ``dsd_persistent(h, w2, row_weights=weights in sorted order)``: the routing weights
    in the epilogue (fp32, before the one rounding), then the top-k combine is a plain
    deterministic gather-sum (``permute.combine``, ``weights=None``: no atomics).

backward (7 launches with every gradient, after the gathers):
    ``dy_sorted = gather(dy)``; ``sdd_glu_backward(dy_sorted, w2, g, u, row_weights=,
    store_h=True, weighted_h=True, out=(g, u, h))`` gives ``dg``, ``du`` (already scaled by
    the row weight) written over ``g`` and ``u`` (the kernel reads each chunk before it
    stores there), ``w * h`` and the routing-weight gradient ``dy[r] . (h[r] @ w2[e])``
    from the same pass; ``dw2 = dsd_t_persistent(w * h, dy_sorted)``; ``x_sorted =
    gather(x)`` once (the persistent DSD^T has no fused gather, and keeping it from
    forward would cost ``[S, H]`` of activation memory for the whole step);
    ``dw1``/``dv1 = dsd_t_persistent(dg/du, x_sorted)``; ``dx_sorted = dsd_persistent(dg,
    w1^T, also=(du, v1^T))`` (both products in one accumulator; transposed views: the
    kernels read any strides), summed over each token's k rows by ``combine`` (a gather
    per token, no atomics: deterministic).

Memory: writing ``dg``/``du`` over the saved ``g``/``u`` means the backward's peak holds
three block tensors (``dg``, ``du``, ``h``), not five. The price: the saved tensors are
spent, so a second backward over the same graph (``retain_graph=True``) is refused with
a RuntimeError rather than computed from overwritten values.

Nothing reads a value back to the host: the plan and topology are device tensors and
every size used here comes from host-side shapes (tests check it). Plans with padding
rows (``padded=`` of ``block_ffn``) are not supported: every sorted row must belong to
an expert.

As a backend (``routed_ffn(..., backend="persistent")``, :func:`persistent_ffn`): a SwiGLU
FFN without padding; ``backend="auto"`` picks it where ``measured_layers.json`` has it
fastest (``backends/select.py``), which no GPU run has shown yet:
``benchmarks/persistent_layer.py`` times it against ``triton`` and ``grouped``.
"""

from __future__ import annotations

import importlib

import torch

from .. import kernels as K
from ..kernels.checks import check_tensor
from ..routing import RoutingPlan
from ..topology import Topology, build_topology
from .select import persistent_unsupported

__all__ = ["persistent_ffn", "persistent_glu_ffn"]

# The launchers' modules, for their default configs (the tile schedules depend on them).
_SDD = importlib.import_module("blocksparse_moe.kernels.sdd_persistent")
_DSD = importlib.import_module("blocksparse_moe.kernels.dsd_persistent")
_DSD_T = importlib.import_module("blocksparse_moe.kernels.dsd_t_persistent")


def _check(x, w1, v1, w2, plan, topo, weights) -> None:
    """Shapes, dtypes and devices, named after this function's arguments (the kernels' names differ)."""
    op = "persistent_glu_ffn"
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{op}: plan must be a RoutingPlan (plan_routing), got {type(plan).__name__}")
    if not isinstance(topo, Topology):
        raise TypeError(f"{op}: topo must be a Topology (build_topology(plan, ffn, block)), got {type(topo).__name__}")
    named = {"x": x, "w1": w1, "v1": v1, "w2": w2}
    for name, t in named.items():
        check_tensor(op, name, t)  # a tensor of float32, float16 or bfloat16 (what the kernels take)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    T, H = x.shape
    E, F = plan.num_experts, topo.ffn_size
    if T != plan.num_tokens:
        raise ValueError(f"{op}: x has {T} rows but plan.num_tokens={plan.num_tokens}; expected one row per token")
    if topo.num_experts != E or topo.num_slots != plan.num_slots:
        raise ValueError(f"{op}: topo was built for {topo.num_experts} experts and {topo.num_slots} slots, the plan "
                         f"has {E} and {plan.num_slots}; expected build_topology(plan, ...)")  # fmt: skip
    for name, want, dims in (("w1", (E, H, F), "hidden, ffn"), ("v1", (E, H, F), "hidden, ffn"),
                             ("w2", (E, F, H), "ffn, hidden")):  # fmt: skip
        if tuple(named[name].shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want} (experts, {dims}), got {tuple(named[name].shape)}")
    for name, t in named.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device}; expected x's {x.dtype} on {x.device}")
    if plan.device != x.device:
        raise ValueError(f"{op}: the plan is on {plan.device}, x on {x.device}; expected one device")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
            raise TypeError(f"{op}: weights must be a float tensor [tokens, top_k] or None, got {weights!r:.60}")
        if tuple(weights.shape) != (T, plan.top_k) or weights.device != x.device:
            raise ValueError(f"{op}: weights must be [{T}, {plan.top_k}] on {x.device}, "
                             f"got {tuple(weights.shape)} on {weights.device}")  # fmt: skip


def persistent_glu_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    plan: RoutingPlan,
    topo: Topology,
    weights: torch.Tensor | None,
    *,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """The SwiGLU dMoE expert FFN on the persistent kernels: ``x [T, H]`` -> ``y [T, H]`` (differentiable).

    ``w1``/``v1`` ``[E, H, ffn]`` and ``w2`` ``[E, ffn, H]`` in any strides (a model's
    ``[E, ffn, H]`` gate storage transposed, halves of a fused gate/up tensor, transformers'
    ``down_proj [E, H, ffn]`` transposed); their gradients come back in the same strides
    where the tensor is dense. ``plan``/``topo`` as ``block_ffn`` takes them
    (``plan_routing(ids, E)``, ``build_topology(plan, ffn, block_size)``). ``weights [T, k]``
    (any float dtype) or ``None`` (unweighted). ``use_tma`` goes to every kernel (None:
    each decides; True: each requires it).
    """
    _check(x, w1, v1, w2, plan, topo, weights)
    return _PersistentGLU.apply(x, w1, v1, w2, weights, plan, topo, use_tma)


def persistent_ffn(x, plan: RoutingPlan, weights, w1, w2, v1, activation: str | None, *, block_size: int = 64,
                   padded: bool = False) -> torch.Tensor:  # fmt: skip
    """``routed_ffn``'s ``persistent`` sibling: the plan's topology at ``block_size``, then :func:`persistent_glu_ffn`.

    ``activation`` is the activation's name (``reference.activation_name``; None for a
    callable). A call this backend cannot compute is refused with the reason
    (:func:`~blocksparse_moe.backends.select.persistent_unsupported`).
    """
    why = persistent_unsupported(v1 is not None, activation, padded)
    if why is not None:
        raise ValueError(f"backend='persistent' cannot compute this FFN: {why}")
    topo = build_topology(plan, w1.shape[2], block_size)
    return persistent_glu_ffn(x, w1, v1, w2, plan, topo, weights)


def _row_weights(weights: torch.Tensor | None, sorted_to_slot: torch.Tensor) -> torch.Tensor | None:
    """``weights`` in sorted order, fp32 ``[S]``: the DSD and the GLU backward scale in fp32 anyway."""
    if weights is None:
        return None
    return weights.detach().reshape(-1).float()[sorted_to_slot.long()]


class _PersistentGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, v1, w2, weights, plan: RoutingPlan, topo: Topology, use_tma):
        s2s, slot2s, k = plan.sorted_to_slot, plan.slot_to_sorted, plan.top_k
        idx = K.token_index(plan)  # the fused gather's index; backward's gather of x takes sorted_to_slot itself
        rw = _row_weights(weights, s2s)
        # The tile schedules once per step: the GLU SDD's serves the GLU backward (same tile), the DSD's
        # the two DSDs of dx (same output width H). They depend only on the topology and the tile width.
        bs, es = topo.block_size, x.element_size()
        sdd_sched = K.tile_schedule(topo, _SDD.default_config(bs, es, glu=True)["BLOCKS_N"])
        dsd_sched = K.dsd_tile_schedule(topo, x.shape[1], _DSD.default_config(bs, es)["BLOCK_N"])
        h, g, u = K.sdd_glu(x, w1, v1, topo, store_pre=True, gather=idx, use_tma=use_tma, schedule=sdd_sched)
        ys = K.dsd_persistent(h, w2, topo, row_weights=rw, use_tma=use_tma, schedule=dsd_sched)
        del h  # backward recomputes it from g and u (sdd_glu_backward's store_h): C less activation memory
        y = K.combine(ys, slot2s, k)
        ctx.save_for_backward(x, w1, v1, w2, g, u, s2s, slot2s, rw if rw is not None else g, sdd_sched,
                              dsd_sched, *topo.tensors())  # fmt: skip
        ctx.sizes, ctx.k, ctx.has_w, ctx.use_tma = topo.sizes(), k, weights is not None, use_tma
        ctx.spent = False
        ctx.w_dtype = weights.dtype if weights is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        if ctx.spent:  # checked before saved_tensors: their g and u now hold dg and du (see the module docstring)
            raise RuntimeError(
                "persistent_glu_ffn: backward ran twice over one graph (retain_graph=True); the first one wrote dg, du "
                "over the saved g, u to save their memory. Run the forward again, or use backend='triton' or 'grouped'"
            )
        x, w1, v1, w2, g, u, s2s, slot2s, rw, sdd_sched, dsd_sched, *topo_tensors = ctx.saved_tensors
        topo = Topology.from_parts(ctx.sizes, topo_tensors)
        rw = rw if ctx.has_w else None
        k, tma = ctx.k, ctx.use_tma
        need_x, need_w1, need_v1, need_w2, need_w = ctx.needs_input_grad[:5]
        dy_sorted = K.gather(dy, s2s, k)  # any strides (a loss's expanded ones too): no contiguous copy first
        ctx.spent = True
        dg, du, h, d_rw = _glu_backward(dy_sorted, w2, g, u, topo, rw, need_w and ctx.has_w, tma, sdd_sched)
        del g, u  # now dg, du: the same buffers
        # One DSD^T schedule (an argsort of the expert counts and a launch) for dw2, dw1 and dv1: all N = H.
        t_sched = None
        if need_w1 or need_v1 or need_w2:
            block_n = _DSD_T.default_config(topo.block_size, x.element_size())["BLOCK_N"]
            t_sched = K.dsd_t_tile_schedule(topo, x.shape[1], block_n)
        d_weights = None
        if need_w and ctx.has_w:
            # sorted order -> [T, k]: slot s's gradient sits at sorted row slot_to_sorted[s] (a gather, deterministic)
            d_weights = d_rw[slot2s.long()].reshape(-1, k).to(ctx.w_dtype)
        dw1 = dv1 = dw2 = dx = None
        if need_w2:
            # y_sorted = w * (h @ w2): dw2[e] = (w * h)^T dy_sorted, and h is already w * h (weighted_h).
            dw2 = K.dsd_t_persistent(h, dy_sorted, topo, out=_grad_like(w2), use_tma=tma, schedule=t_sched)
        del dy_sorted, h
        if need_w1 or need_v1:
            x_sorted = K.gather(x, s2s, k)
            # dsd_t gives [E, ffn, H] = dw1^T: written through the transposed view of a w1-shaped gradient.
            if need_w1:
                dw1 = _grad_like(w1)
                K.dsd_t_persistent(dg, x_sorted, topo, out=dw1.transpose(1, 2), use_tma=tma, schedule=t_sched)
            if need_v1:
                dv1 = _grad_like(v1)
                K.dsd_t_persistent(du, x_sorted, topo, out=dv1.transpose(1, 2), use_tma=tma, schedule=t_sched)
            del x_sorted
        if need_x:
            # dx_sorted = dg @ w1^T + du @ v1^T in one launch: both products into one fp32 accumulator, one store
            dxs = K.dsd_persistent(dg, w1.transpose(1, 2), topo, also=(du, v1.transpose(1, 2)), use_tma=tma,
                                   schedule=dsd_sched)  # fmt: skip
            dx = K.combine(dxs, slot2s, k)  # the sum over each token's k sorted rows: a gather, no atomics
        return dx, dw1, dv1, dw2, d_weights, None, None, None


def _grad_like(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient in ``w``'s strides where ``w`` is dense (a transposed view stays one), else contiguous.

    ``dsd_t_persistent`` writes every element of any strided ``[E, ffn, N]`` target.
    """
    return torch.empty_like(w, memory_format=torch.preserve_format)


def _glu_backward(dy_sorted, w2, g, u, topo, rw, need_rw: bool, tma, schedule):
    """``(dg, du, h, d_row_weights)`` from one ``sdd_glu_backward`` pass, ``dg``/``du`` written over ``g``/``u``.

    ``dg``/``du`` are scaled by ``rw`` (when given) in fp32 before their rounding; ``h`` is
    ``silu(g) * u``, times ``rw`` when given (``weighted_h``: what ``dw2`` needs, so
    ``dy_sorted`` is not scaled); ``d_row_weights`` fp32 ``[S]`` (``dy[r] . (h[r] @ w2[e])``,
    None when not asked for). The kernel reads each g/u chunk before it stores dg/du there.
    """
    out = (g, u, torch.empty_like(g))
    if rw is None:
        dg, du, h = K.sdd_glu_backward(dy_sorted, w2, g, u, topo, store_h=True, out=out, use_tma=tma,
                                       schedule=schedule)  # fmt: skip
        return dg, du, h, None
    dg, du, h, d_rw = K.sdd_glu_backward(dy_sorted, w2, g, u, topo, store_h=True, weighted_h=True, row_weights=rw,
                                         out=out, use_tma=tma, schedule=schedule)  # fmt: skip
    return dg, du, h, (d_rw if need_rw else None)

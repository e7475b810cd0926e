"""Differentiable block-sparse ops, with a backend switch.

``backend="triton"`` goes through ``torch.library`` custom ops whose forward and
backward launch the Triton kernels (``torch.compile`` sees them as single nodes and
does not break the graph); ``backend="torch"`` uses the pure-torch references of
:mod:`blocksparse_moe.reference` and ordinary autograd; for these block ops ``"auto"``
picks Triton for CUDA tensors and torch otherwise. (The ``grouped`` backend has no
block-sparse intermediate: it is a whole FFN, :mod:`blocksparse_moe.backends.grouped`.)

Backward of each op, in the kernels' terms (``g`` the incoming gradient):

=========  ==========================  ===============================================
op         forward                     backward
=========  ==========================  ===============================================
sdd        ``h = sdd(a, b)``           ``da = dsd(g, b^T)``, ``db^T = dsd_t(g, a)``
dsd        ``y = dsd(h, b)``           ``dh = sdd(g, b^T)``, ``db = dsd_t(h, g)``
gather     ``xs = gather(x)``          ``dx = combine(g)``
combine    ``y = combine(ys, w)``      ``dys = gather(g, scale=w)``, ``dw = <g, ys>``
=========  ==========================  ===============================================
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels as K
from . import reference
from .backends.select import BACKENDS, resolve_backend, resolve_block_backend
from .routing import RoutingPlan
from .topology import Topology

__all__ = ["BACKENDS", "resolve_backend", "resolve_block_backend", "sdd", "dsd", "dsd_t", "gather", "combine"]

Tensor = torch.Tensor


# Each kernel is one custom op. Backward formulas call these ops (never the raw
# launchers), so that AOT autograd traces them as opaque nodes with fake tensors.


# --------------------------------------------------------------------------- sdd
@torch.library.custom_op("blocksparse_moe::sdd", mutates_args=())
def _sdd_op(a: Tensor, b: Tensor, sizes: list[int], topo_tensors: list[Tensor]) -> Tensor:
    return K.sdd(a, b, Topology.from_parts(sizes, topo_tensors))


@_sdd_op.register_fake
def _(a, b, sizes, topo_tensors):
    bs = sizes[0]
    return a.new_empty(topo_tensors[5].numel(), bs, bs)  # row_indices: one entry per block


def _sdd_setup(ctx, inputs, output):
    a, b, sizes, topo_tensors = inputs
    ctx.save_for_backward(a, b, *topo_tensors)
    ctx.sizes = sizes


def _sdd_backward(ctx, grad):
    a, b, *topo_tensors = ctx.saved_tensors
    grad = grad.contiguous()
    da = db = None
    if ctx.needs_input_grad[0]:
        da = _dsd_op(grad, b.transpose(1, 2), ctx.sizes, topo_tensors)
    if ctx.needs_input_grad[1]:
        db = _dsd_t_op(grad, a, ctx.sizes, topo_tensors).transpose(1, 2)  # [E, K, ffn] view
    return da, db, None, [None] * len(topo_tensors)


_sdd_op.register_autograd(_sdd_backward, setup_context=_sdd_setup)


# --------------------------------------------------------------------------- dsd
@torch.library.custom_op("blocksparse_moe::dsd", mutates_args=())
def _dsd_op(data: Tensor, b: Tensor, sizes: list[int], topo_tensors: list[Tensor]) -> Tensor:
    return K.dsd(data, b, Topology.from_parts(sizes, topo_tensors))


@_dsd_op.register_fake
def _(data, b, sizes, topo_tensors):
    return data.new_empty(sizes[3], b.shape[2])  # [num_slots, N]


def _dsd_setup(ctx, inputs, output):
    data, b, sizes, topo_tensors = inputs
    ctx.save_for_backward(data, b, *topo_tensors)
    ctx.sizes = sizes


def _dsd_backward(ctx, grad):
    data, b, *topo_tensors = ctx.saved_tensors
    ddata = db = None
    if ctx.needs_input_grad[0]:
        ddata = _sdd_op(grad, b.transpose(1, 2), ctx.sizes, topo_tensors)
    if ctx.needs_input_grad[1]:
        db = _dsd_t_op(data, grad, ctx.sizes, topo_tensors)
    return ddata, db, None, [None] * len(topo_tensors)


_dsd_op.register_autograd(_dsd_backward, setup_context=_dsd_setup)


# --------------------------------------------------------------------------- dsd_t (backward only)
@torch.library.custom_op("blocksparse_moe::dsd_t", mutates_args=())
def _dsd_t_op(data: Tensor, b: Tensor, sizes: list[int], topo_tensors: list[Tensor]) -> Tensor:
    return K.dsd_t(data.contiguous(), b, Topology.from_parts(sizes, topo_tensors))


@_dsd_t_op.register_fake
def _(data, b, sizes, topo_tensors):
    return data.new_empty(sizes[1], sizes[2], b.shape[1])  # [E, ffn, N]


# --------------------------------------------------------------------------- gather
@torch.library.custom_op("blocksparse_moe::gather", mutates_args=())
def _gather_op(
    x: Tensor, scale: Optional[Tensor], sorted_to_slot: Tensor, slot_to_sorted: Tensor, top_k: int
) -> Tensor:
    return K.gather(x, sorted_to_slot, top_k, scale)


@_gather_op.register_fake
def _(x, scale, sorted_to_slot, slot_to_sorted, top_k):
    return x.new_empty(sorted_to_slot.numel(), x.shape[1])


def _gather_setup(ctx, inputs, output):
    _, scale, sorted_to_slot, slot_to_sorted, top_k = inputs
    if scale is not None:
        raise NotImplementedError("gather with a scale is a backward-only op; it has no gradient")
    ctx.save_for_backward(sorted_to_slot, slot_to_sorted)
    ctx.top_k = top_k


def _gather_backward(ctx, grad):
    sorted_to_slot, slot_to_sorted = ctx.saved_tensors
    return _combine_op(grad, None, sorted_to_slot, slot_to_sorted, ctx.top_k), None, None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# --------------------------------------------------------------------------- combine
@torch.library.custom_op("blocksparse_moe::combine", mutates_args=())
def _combine_op(
    src: Tensor, weights: Optional[Tensor], sorted_to_slot: Tensor, slot_to_sorted: Tensor, top_k: int
) -> Tensor:
    return K.combine(src, slot_to_sorted, top_k, weights)


@_combine_op.register_fake
def _(src, weights, sorted_to_slot, slot_to_sorted, top_k):
    return src.new_empty(slot_to_sorted.numel() // top_k, src.shape[1])


def _combine_setup(ctx, inputs, output):
    src, weights, sorted_to_slot, slot_to_sorted, top_k = inputs
    ctx.save_for_backward(src, weights, sorted_to_slot, slot_to_sorted)
    ctx.top_k = top_k


def _combine_backward(ctx, grad):
    src, weights, sorted_to_slot, slot_to_sorted = ctx.saved_tensors
    dsrc = dw = None
    if ctx.needs_input_grad[0]:
        dsrc = _gather_op(grad, weights, sorted_to_slot, slot_to_sorted, ctx.top_k)
    if weights is not None and ctx.needs_input_grad[1]:
        dw = _combine_weight_grad_op(grad, src, slot_to_sorted, ctx.top_k, weights.dtype)
    return dsrc, dw, None, None, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("blocksparse_moe::combine_weight_grad", mutates_args=())
def _combine_weight_grad_op(dy: Tensor, src: Tensor, slot_to_sorted: Tensor, top_k: int, dtype: torch.dtype) -> Tensor:
    return K.combine_weight_grad(dy, src, slot_to_sorted, top_k, dtype)


@_combine_weight_grad_op.register_fake
def _(dy, src, slot_to_sorted, top_k, dtype):
    return src.new_empty(slot_to_sorted.numel() // top_k, top_k, dtype=dtype)


# --------------------------------------------------------------------------- public functions
def _permute_backend(backend: str, device: torch.device) -> str:
    """gather/combine are plain permutes: under ``grouped`` they are the torch ones (no block layout needed)."""
    return "torch" if backend == "grouped" else resolve_block_backend(backend, device)


def sdd(a: Tensor, b: Tensor, topo: Topology, backend: str = "auto") -> Tensor:
    """``a [S, K] @ b [E, K, ffn]`` sampled at ``topo``'s blocks -> ``[capacity, bs, bs]`` (differentiable)."""
    if resolve_block_backend(backend, a.device) == "torch":
        return reference.sdd_torch(a, b, topo)
    return _sdd_op(a, b, topo.sizes(), topo.tensors())


def dsd(data: Tensor, b: Tensor, topo: Topology, backend: str = "auto") -> Tensor:
    """Block data ``[capacity, bs, bs] @ b [E, ffn, N]`` -> sorted rows ``[S, N]`` (differentiable)."""
    if resolve_block_backend(backend, data.device) == "torch":
        return reference.dsd_torch(data, b, topo)
    return _dsd_op(data, b, topo.sizes(), topo.tensors())


def dsd_t(data: Tensor, b: Tensor, topo: Topology, backend: str = "auto") -> Tensor:
    """``out[e] = rows(data of e)^T @ b[rows of e]`` -> ``[E, ffn, N]``: the weight-gradient product.

    A backward building block (``dw2 = dsd_t(h, dy_sorted)``); not itself differentiable.
    """
    if resolve_block_backend(backend, data.device) == "torch":
        return reference.dsd_t_torch(data, b, topo)
    return _dsd_t_op(data, b, topo.sizes(), topo.tensors())


def gather(x: Tensor, plan: RoutingPlan, backend: str = "auto") -> Tensor:
    """Token rows ``x [T, H]`` into expert order ``[S, H]`` (differentiable)."""
    if _permute_backend(backend, x.device) == "torch":
        return reference.gather_torch(x, plan)
    return _gather_op(x, None, plan.sorted_to_slot, plan.slot_to_sorted, plan.top_k)


def combine(y_sorted: Tensor, plan: RoutingPlan, weights: Tensor, backend: str = "auto") -> Tensor:
    """``y[t] = sum_j weights[t, j] * y_sorted[slot_to_sorted[t*k + j]]`` (differentiable in both)."""
    if _permute_backend(backend, y_sorted.device) == "torch":
        return reference.combine_torch(y_sorted, plan, weights)
    return _combine_op(y_sorted, weights, plan.sorted_to_slot, plan.slot_to_sorted, plan.top_k)

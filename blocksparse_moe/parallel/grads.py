"""Gradients in a data-parallel x expert-parallel job: what is reduced where, and the global norm.

After backward on rank ``(d, p)`` of a ``dp x ep`` mesh (``D * P = N`` ranks):

* an expert tensor's gradient already holds every ``ep`` peer's tokens (they came
  through the all-to-alls), but only the tokens of data-parallel replica ``d``. The
  ``D`` replicas of the same shard hold the rest: the gradient is **summed over
  ``dp`` only** (summing over ``ep`` would add up different experts);
* a replicated parameter's gradient (the router, embeddings, attention, ...) holds
  only this rank's tokens: it is **summed over ``dp x ep``**;
* a replicated *expert* (a placement holding it on several ``ep`` ranks) holds on
  each holder only the rows routed to that replica: it is first **summed over its
  ``ep`` holders** (:func:`~.replicas.sync_replica_grads`, one all-reduce over ``ep``
  per layer), then over ``dp`` like any expert.

``op="mean"`` (default) then divides both by ``N``: each rank's loss is the mean
over its own tokens, and the result is exactly what DDP over all ``N`` ranks of a
model without expert parallelism gives (``1/N * sum of the ranks' gradients``).
``op="sum"`` leaves the sums (the gradient of the sum of the ranks' losses).

Beside DDP or FSDP2: those reduce the non-expert parameters themselves (with the
mean over their group, which must be all ``N`` ranks); exclude the expert tensors
from them (:func:`expert_parameter_names` for DDP's ignore list,
:func:`expert_parameters` for ``fully_shard(ignored_params=...)``) and call
``reduce_gradients(model, replicated=False)`` for the experts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .collectives import Communicator
from .replicas import primary_rows, sync_replica_grads
from .units import expert_shards, unwrap

__all__ = ["clip_grad_norm_", "expert_parameter_names", "expert_parameters", "grad_norm", "reduce_gradients"]

OPS = ("mean", "sum")


def expert_parameters(model: nn.Module) -> list:
    """The expert-sharded parameters of ``model`` (each layer's ``w1``/``w2``/``v1``, or HF ``*_proj``)."""
    return [p for s in expert_shards(model) for _, p in s.params()]


def expert_parameter_names(model: nn.Module) -> list:
    """Their names as ``model.named_parameters()`` gives them (DDP's ``_set_params_and_buffers_to_ignore_for_model``)."""
    ids = {id(p) for p in expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    # A parameter unused on this rank still joins the reduction: the collectives must match.
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _all_reduce_flat(comm: Communicator, grads: list, what: str, scale: float) -> None:
    """One all-reduce per dtype over a flat copy of ``grads`` (fewer collectives than one per tensor)."""
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        if comm is not None:
            comm.all_reduce_(flat, what)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


@torch.no_grad()
def reduce_gradients(model: nn.Module, op: str = "mean", *, replicated: bool = True) -> None:
    """Reduce every gradient of ``model`` after backward: experts over ``dp``, the rest over ``dp x ep``.

    A collective on every rank of the job (in the same order everywhere). ``op``:
    ``"mean"`` (DDP's convention over all ``dp x ep`` ranks) or ``"sum"``.
    ``replicated=False`` leaves the non-expert parameters alone, for DDP or FSDP2 to
    reduce. Parameters without a gradient on this rank take part with zeros.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    shards = [s for s in expert_shards(model) if s.sharded]
    if not shards:
        raise ValueError(
            "reduce_gradients: model holds no expert-parallel layer; use DDP (or torch.distributed.all_reduce) "
            "for a model without sharded experts"
        )
    groups = shards[0].groups
    n = groups.replicated_size
    for s in shards:
        if s.groups.replicated_size != n or s.groups.dp_size != groups.dp_size:
            raise ValueError(
                f"reduce_gradients: layer {s.name!r} lives on a dp x ep layout of {s.groups.dp_size} x "
                f"{s.groups.ep_size} ranks, layer {shards[0].name!r} on {groups.dp_size} x {groups.ep_size}; "
                "expected one layout for the whole model"
            )
    scale = 1.0 / n if op == "mean" else 1.0
    expert_ids = set()
    for s in shards:
        grads = [_grad_or_zeros(p) for _, p in s.params() if p.requires_grad]
        expert_ids.update(id(p) for _, p in s.params())
        # Replicas first: the sum over the ep holders within this dp replica, then over dp.
        sync_replica_grads(s)
        dp = None if s.groups.dp is None else Communicator(s.groups.dp, s.name)
        _all_reduce_flat(dp, grads, "expert gradient all-reduce over dp", scale)
    if not replicated:
        return
    rest = [p for p in unwrap(model).parameters() if p.requires_grad and id(p) not in expert_ids]
    for p in rest:
        if _is_dtensor(p):
            raise ValueError(
                "reduce_gradients: a parameter is a DTensor (FSDP2 manages it and reduces its gradient); "
                "call reduce_gradients(model, replicated=False) to reduce only the experts"
            )
    comm = Communicator(groups.replicated, "replicated parameters")
    _all_reduce_flat(comm, [_grad_or_zeros(p) for p in rest], "gradient all-reduce over dp x ep", scale)


def _local_norm_power(grads: list, norm_type: float, device) -> torch.Tensor:
    """``sum |g|^p`` over plain tensors (``max |g|`` for inf), in float64, on ``device`` (no per-tensor sync)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    if math.isinf(norm_type):
        parts = [g.detach().abs().max() if g.numel() else g.new_zeros(()) for g in grads]
        return torch.stack([t.to(device, torch.float64) for t in parts]).max()
    parts = [torch.linalg.vector_norm(g.detach(), norm_type).to(device, torch.float64) ** norm_type for g in grads]
    return torch.stack(parts).sum()


@torch.no_grad()
def grad_norm(model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the whole model's gradient, each element counted once: the same value on every rank.

    Call after the gradients are reduced (:func:`reduce_gradients`, or DDP / FSDP2
    for the non-expert parameters). Expert shards are summed over ``ep`` (the ``dp``
    replicas hold the same values and are not counted again); replicated tensors
    are counted once; FSDP2's sharded (DTensor) gradients are reduced over their
    own mesh. A collective; returns a float64 CPU scalar.
    """
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
    shards = [s for s in expert_shards(model) if s.sharded]
    expert_ids = {id(p) for s in shards for _, p in s.params()}
    inf = math.isinf(norm_type)
    total = torch.zeros((), dtype=torch.float64)
    for s in shards:  # one reduction per layer, over its ep group
        dev = next((p.device for _, p in s.params()), torch.device("cpu"))
        grads = [p.grad for _, p in s.params() if p.grad is not None]
        if s.placement.replicated:  # a replicated expert counts once: on its lowest holder
            keep = primary_rows(s.placement, s.rank)
            grads = [g[torch.tensor(keep, dtype=torch.long, device=g.device)] for g in grads]
        part = _local_norm_power(grads, norm_type, dev)
        s.comm.all_reduce_(part, "gradient norm over ep", op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        # host read, after backward (clipping), not in forward/backward: one per layer, summed in float64 on the host
        total = torch.maximum(total, part.cpu()) if inf else total + part.cpu()
    plain, sharded = [], []
    for p in unwrap(model).parameters():
        if p.grad is None or id(p) in expert_ids:
            continue
        (sharded if _is_dtensor(p.grad) else plain).append(p.grad)
    # host reads as above (after backward, for clipping): the replicated part, then each DTensor's
    rest = _local_norm_power(plain, norm_type, plain[0].device if plain else torch.device("cpu")).cpu()
    total = torch.maximum(total, rest) if inf else total + rest
    for g in sharded:  # DTensor: the norm of the whole tensor, reduced over its mesh
        n = torch.linalg.vector_norm(g, norm_type).full_tensor().double().cpu()
        total = torch.maximum(total, n) if inf else total + n**norm_type
    return total if inf else total ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale every gradient so that :func:`grad_norm` is at most ``max_norm``; returns the norm before clipping."""
    total = grad_norm(model, norm_type)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        for p in unwrap(model).parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return total

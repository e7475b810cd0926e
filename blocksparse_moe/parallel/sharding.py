"""Moving between a full (single-process) state dict and the expert-parallel shards.

Keys do not change: :class:`~blocksparse_moe.parallel.ExpertParallelDMoE` names its
parameters like :class:`~blocksparse_moe.dMoE` (``router.weight``, ``w1``, ``w2``,
``v1``), and a Hugging Face experts module sharded by ``expert_parallel`` keeps its
own names. Only the expert tensors change shape: rank ``r`` holds the rows
``placement.experts_of(r)`` of dimension 0, in that (ascending) order; everything
else (the router, any non-MoE parameter) is replicated and copied as is.

``shard_state_dict(full, model)`` -> this rank's dict, for ``model.load_state_dict``.
``gather_state_dict(model)``     -> the full dict again (collective; on every rank
or on one ``dst``), loadable into a single-process model.

For checkpoints that outlive the layout (any placement, any degree, optimizer state
included) use :func:`~blocksparse_moe.parallel.save_sharded` / ``load_sharded``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .placement import ExpertPlacement
from .units import expert_shards

__all__ = ["EXPERT_PARAMS", "expert_range", "shard_state_dict", "gather_state_dict"]

EXPERT_PARAMS = ("w1", "w2", "v1")


def expert_range(rank: int, world_size: int, num_experts: int) -> range:
    """The global expert ids that rank ``rank`` of ``world_size`` holds under the default contiguous placement."""
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    pl = ExpertPlacement.contiguous(num_experts, world_size)
    return range(pl.rank_offsets[rank], pl.rank_offsets[rank + 1])


def _rows(value: torch.Tensor, experts: tuple, placement: ExpertPlacement, key: str) -> torch.Tensor:
    E = placement.num_experts
    if value.dim() == 0 or value.shape[0] != E:
        raise ValueError(f"{key}: expected the full tensor of {E} experts in dimension 0, got shape {tuple(value.shape)}")
    if placement.is_contiguous:  # a view: load_state_dict copies
        start = experts[0] if experts else 0
        return value[start : start + len(experts)]
    return value[torch.tensor(experts, dtype=torch.long, device=value.device)]


def _shard_keys(model: nn.Module) -> dict:
    """State-dict key of every expert tensor -> its :class:`ExpertShard`."""
    return {s.fqn(attr): s for s in expert_shards(model) for attr, _ in s.params()}


def shard_state_dict(
    full_state_dict: dict,
    model: Optional[nn.Module] = None,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    expert_keys: Optional[Iterable[str]] = None,
    placement: Optional[ExpertPlacement] = None,
) -> dict:
    """This rank's state dict from a full one: expert tensors cut to the experts the rank holds.

    Args:
        full_state_dict: a single-process state dict (e.g. of a model whose MoE
            layers are :class:`~blocksparse_moe.dMoE`), expert tensors ``[E, ...]``.
        model: the expert-parallel model that will load the result; its expert-parallel
            layers say which keys are expert tensors and which experts this rank holds.
        rank, world_size, expert_keys, placement: without ``model`` (offline, e.g. to
            write one file per rank): the rank to shard for, the group size, the expert
            keys (default: every key whose last component is ``w1``, ``w2`` or ``v1``)
            and the placement (default contiguous).

    Contiguous placements give views of ``full_state_dict``'s tensors (``load_state_dict`` copies).
    """
    out = {}
    if model is not None:
        shards = _shard_keys(model)
        if not shards:
            raise ValueError("model holds no expert-parallel layer; nothing to shard")
        for key, value in full_state_dict.items():
            s = shards.get(key)
            out[key] = value if s is None else _rows(value, s.local_experts, s.placement, key)
        return out
    if rank is None or world_size is None:
        raise ValueError("without a model, pass rank and world_size")
    if expert_keys is not None:
        keys = set(expert_keys)
    else:
        keys = {k for k in full_state_dict if k.rsplit(".", 1)[-1] in EXPERT_PARAMS}
    for key, value in full_state_dict.items():
        if key in keys:
            pl = placement if placement is not None else ExpertPlacement.contiguous(value.shape[0], world_size)
            if pl.world_size != world_size:
                raise ValueError(f"placement is for world_size={pl.world_size}, got world_size={world_size}")
            value = _rows(value, pl.experts_of(rank), pl, key)
        out[key] = value
    return out


def gather_state_dict(model: nn.Module, dst: Optional[int] = None) -> Optional[dict]:
    """The full single-process state dict of an expert-parallel model (a collective: call on every rank).

    Expert tensors are gathered over each layer's expert-parallel group and put back
    at their global expert ids, so ``w1[e]`` is global expert ``e`` again; the rest is
    this rank's copy. ``dst=None``: every rank gets the dict (``all_gather``).
    ``dst=g``: only group rank ``g`` of each layer's group gets it (``gather``, less
    memory elsewhere); the others get ``None``. Tensors are detached copies.
    """
    shards = _shard_keys(model)
    local = model.state_dict()
    full: dict = {}
    keep = True
    for key, value in local.items():
        s = shards.get(key)
        if s is None:
            full[key] = value.detach().clone()
            continue
        comm, pl = s.comm, s.placement
        # Ranks hold different numbers of experts: pad to the largest, gather, unpad.
        most = max(pl.counts)
        padded = value.detach().new_zeros((most,) + tuple(value.shape[1:]))
        padded[: value.shape[0]] = value.detach()
        what = f"gather_state_dict({key})"
        try:
            if dst is None:
                parts = [torch.empty_like(padded) for _ in range(comm.world_size)]
                work = dist.all_gather(parts, padded, group=comm.group, async_op=True)
            else:
                parts = [torch.empty_like(padded) for _ in range(comm.world_size)] if comm.rank == dst else None
                work = dist.gather(padded, parts, dst=dist.get_global_rank(comm.group, dst), group=comm.group,
                                   async_op=True)  # fmt: skip
                keep = keep and comm.rank == dst
        except Exception as err:  # noqa: BLE001
            raise comm.error(what, err) from err
        comm.wait(work, what)
        if parts is None:
            full[key] = None
            continue
        out = value.new_empty((pl.num_experts,) + tuple(value.shape[1:]))
        for r, part in enumerate(parts):
            ids = pl.experts_of(r)
            if ids:
                out[torch.tensor(ids, dtype=torch.long, device=out.device)] = part[: len(ids)]
        full[key] = out
    return full if keep else None

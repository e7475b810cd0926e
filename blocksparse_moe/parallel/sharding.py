"""Moving between a full (single-process) state dict and the expert-parallel shards.

Keys do not change: :class:`~blocksparse_moe.parallel.ExpertParallelDMoE` names its
parameters like :class:`~blocksparse_moe.dMoE` (``router.weight``, ``w1``, ``w2``,
``v1``). Only the expert tensors change shape: rank ``r`` of ``W`` holds rows
``r * E/W .. (r+1) * E/W - 1`` of dimension 0 of ``w1``, ``w2`` and ``v1``, that is
the global experts :func:`expert_range` ``(r, W, E)``; everything else (the
router, and any non-MoE parameter) is replicated and copied as is.

``shard_state_dict(full, model)`` -> this rank's dict, for ``model.load_state_dict``.
``gather_state_dict(model)``     -> the full dict again (collective; on every rank
or on one ``dst``), loadable into a single-process model.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .layer import ExpertParallelDMoE

__all__ = ["EXPERT_PARAMS", "expert_range", "shard_state_dict", "gather_state_dict"]

EXPERT_PARAMS = ("w1", "w2", "v1")


def expert_range(rank: int, world_size: int, num_experts: int) -> range:
    """The global expert ids that rank ``rank`` of ``world_size`` owns."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel world size {world_size}")
    n = num_experts // world_size
    return range(rank * n, (rank + 1) * n)


def _ep_layers(model: nn.Module) -> dict[str, ExpertParallelDMoE]:
    """State-dict prefix (``""`` or ``"a.b."``) -> expert-parallel layer."""
    return {(name + "." if name else ""): m for name, m in model.named_modules() if isinstance(m, ExpertParallelDMoE)}


def _owner(key: str, layers: dict[str, ExpertParallelDMoE]) -> Optional[ExpertParallelDMoE]:
    for prefix, layer in layers.items():
        if key.startswith(prefix) and key[len(prefix) :] in EXPERT_PARAMS:
            return layer
    return None


def shard_state_dict(
    full_state_dict: dict,
    model: Optional[nn.Module] = None,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    expert_keys: Optional[Iterable[str]] = None,
) -> dict:
    """This rank's state dict from a full one: expert tensors sliced to the rank's experts.

    Args:
        full_state_dict: a single-process state dict (e.g. of a model whose MoE
            layers are :class:`~blocksparse_moe.dMoE`), expert tensors ``[E, ...]``.
        model: the expert-parallel model that will load the result; its
            :class:`ExpertParallelDMoE` layers say which keys are expert tensors and
            which experts this rank owns.
        rank, world_size, expert_keys: without ``model`` (offline, e.g. to write one
            checkpoint file per rank): the rank to shard for, the group size, and the
            expert keys (default: every key whose last component is ``w1``, ``w2``
            or ``v1``).

    The slices are views of ``full_state_dict``'s tensors (``load_state_dict`` copies).
    """
    out = {}
    if model is not None:
        layers = _ep_layers(model)
        if not layers:
            raise ValueError("model holds no ExpertParallelDMoE layer; nothing to shard")
        for key, value in full_state_dict.items():
            layer = _owner(key, layers)
            if layer is not None:
                E = layer.config.num_experts
                if value.shape[0] != E:
                    raise ValueError(
                        f"{key}: expected the full tensor of {E} experts in dimension 0, got shape {tuple(value.shape)}"
                    )
                value = value[layer.expert_slice]
            out[key] = value
        return out
    if rank is None or world_size is None:
        raise ValueError("without a model, pass rank and world_size")
    if expert_keys is not None:
        keys = set(expert_keys)
    else:
        keys = {k for k in full_state_dict if k.rsplit(".", 1)[-1] in EXPERT_PARAMS}
    for key, value in full_state_dict.items():
        if key in keys:
            owned = expert_range(rank, world_size, value.shape[0])
            value = value[owned.start : owned.stop]
        out[key] = value
    return out


def gather_state_dict(model: nn.Module, dst: Optional[int] = None) -> Optional[dict]:
    """The full single-process state dict of an expert-parallel model (a collective: call on every rank).

    Expert tensors are gathered over each layer's group and concatenated in rank
    order, so ``w1[e]`` is global expert ``e`` again; the rest is this rank's copy.
    ``dst=None``: every rank gets the dict (``all_gather``). ``dst=g``: only group
    rank ``g`` of each layer's group gets it (``gather``, less memory elsewhere);
    the others get ``None``. Tensors are detached copies on the parameters' device.
    """
    layers = _ep_layers(model)
    local = model.state_dict()
    full: dict = {}
    keep = True
    for key, value in local.items():
        layer = _owner(key, layers)
        if layer is None:
            full[key] = value.detach().clone()
            continue
        comm = layer.comm
        value = value.detach().contiguous()
        what = f"gather_state_dict({key})"
        try:
            if dst is None:
                parts = [torch.empty_like(value) for _ in range(comm.world_size)]
                dist.all_gather(parts, value, group=comm.group)
            else:
                parts = [torch.empty_like(value) for _ in range(comm.world_size)] if comm.rank == dst else None
                dist.gather(value, parts, dst=dist.get_global_rank(comm.group, dst), group=comm.group)
                keep = keep and comm.rank == dst
        except Exception as err:  # noqa: BLE001
            raise comm.error(what, err) from err
        full[key] = torch.cat(parts) if parts is not None else None
    return full if keep else None

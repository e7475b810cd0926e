"""The process groups of a data-parallel x expert-parallel job: ``ep``, ``dp`` and their product.

A job of ``D * P`` ranks laid out as a ``DeviceMesh`` with dims ``("dp", "ep")``:

* ``ep`` (a row of the mesh): the ``P`` ranks that share the experts of a layer.
  The token all-to-alls run here; rank ``p`` holds the experts its placement names.
* ``dp`` (a column): the ``D`` ranks holding the *same* expert shard (replicas).
  Expert gradients are reduced here, and only here.
* ``replicated`` (the whole mesh, ``dp x ep``): every rank holds the router and
  every non-expert parameter, so their gradients are reduced over all ``D * P``.

:class:`ExpertParallelGroups` carries the three; every helper (the layer, gradient
reduction, the gradient norm, checkpoints) takes one, or anything
:func:`resolve_groups` turns into one: ``None`` (the default group is ``ep``),
a ``ProcessGroup`` (``ep``, no data parallelism), a ``DeviceMesh`` with an ``"ep"``
dim (and optionally ``"dp"``), or ``(ep_group, dp_group)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

__all__ = ["ExpertParallelGroups", "resolve_groups"]

MESH_DIMS = ("dp", "ep")


def _require_dist(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs torch.distributed to be initialized: call torch.distributed.init_process_group("
            "'gloo' or 'nccl', ...) first (torchrun sets the environment for the default env:// rendezvous)"
        )


def _size(group) -> int:
    return dist.get_world_size(group)


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The expert-parallel group, its data-parallel replicas, and the group of both.

    Attributes:
        ep: ranks that split the experts among themselves (the all-to-alls run here).
        dp: ranks holding the same expert shard; ``None`` without data parallelism.
        replicated: every rank of ``dp x ep`` (router and other replicated parameters
            are reduced here); ``ep`` itself when ``dp`` is ``None``.
    """

    ep: dist.ProcessGroup
    dp: Optional[dist.ProcessGroup]
    replicated: dist.ProcessGroup

    def __post_init__(self) -> None:
        _require_dist("ExpertParallelGroups")
        for name in ("ep", "replicated"):
            if dist.get_rank(getattr(self, name)) < 0:
                raise ValueError(f"ExpertParallelGroups.{name}: this process (rank {dist.get_rank()}) is not a member")
        if self.dp is not None and dist.get_rank(self.dp) < 0:
            raise ValueError(f"ExpertParallelGroups.dp: this process (rank {dist.get_rank()}) is not a member")
        if self.ep_size * self.dp_size != _size(self.replicated):
            raise ValueError(
                f"ExpertParallelGroups: ep size {self.ep_size} x dp size {self.dp_size} != replicated group size "
                f"{_size(self.replicated)}; expected replicated to be exactly the dp x ep ranks"
            )

    def __deepcopy__(self, memo):
        return self  # process groups are handles, shared by copies of a model

    @property
    def ep_size(self) -> int:
        return _size(self.ep)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep)

    @property
    def dp_size(self) -> int:
        return 1 if self.dp is None else _size(self.dp)

    @property
    def dp_rank(self) -> int:
        return 0 if self.dp is None else dist.get_rank(self.dp)

    @property
    def replicated_size(self) -> int:
        return _size(self.replicated)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mesh(cls, mesh) -> "ExpertParallelGroups":
        """From a ``DeviceMesh`` with dims ``("dp", "ep")`` (either order) or ``("ep",)``."""
        names = getattr(mesh, "mesh_dim_names", None)
        if not names or "ep" not in names or any(n not in MESH_DIMS for n in names) or len(set(names)) != len(names):
            raise ValueError(
                f"mesh must be a DeviceMesh with dims ('dp', 'ep') or ('ep',), got mesh_dim_names={names!r} "
                f"(shape {tuple(mesh.shape) if hasattr(mesh, 'shape') else '?'}); name the expert-parallel dim "
                "'ep' and the data-parallel one 'dp', e.g. init_device_mesh(device, (D, P), "
                "mesh_dim_names=('dp', 'ep'))"
            )
        ep = mesh.get_group("ep")
        if "dp" not in names:
            return cls(ep=ep, dp=None, replicated=ep)
        dp = mesh.get_group("dp")
        if mesh.size() == dist.get_world_size():
            replicated = dist.group.WORLD
        else:  # a sub-mesh of a larger job: its own group over the dp x ep ranks
            replicated = mesh._flatten().get_group()
        return cls(ep=ep, dp=dp, replicated=replicated)

    @classmethod
    def from_groups(cls, ep, dp=None, replicated=None) -> "ExpertParallelGroups":
        """From the two groups; ``replicated`` defaults to the world when ``dp x ep`` covers it."""
        _require_dist("ExpertParallelGroups")
        if replicated is None:
            if dp is None:
                replicated = ep
            elif _size(ep) * _size(dp) == dist.get_world_size():
                replicated = dist.group.WORLD
            else:
                raise ValueError(
                    f"ExpertParallelGroups.from_groups: ep ({_size(ep)} ranks) x dp ({_size(dp)} ranks) does not "
                    f"cover the world ({dist.get_world_size()} ranks); pass replicated=, the group of all dp x ep ranks"
                )
        return cls(ep=ep, dp=dp, replicated=replicated)


def resolve_groups(group_or_mesh=None, what: str = "group") -> ExpertParallelGroups:
    """``None``, a ``ProcessGroup``, a ``DeviceMesh``, ``(ep, dp)`` or :class:`ExpertParallelGroups` -> groups.

    Runs no collective (a mesh's groups already exist), so a bad mesh raises the same
    error on every rank before anything else happens.
    """
    if isinstance(group_or_mesh, ExpertParallelGroups):
        return group_or_mesh
    _require_dist(f"expert parallelism ({what})")
    if group_or_mesh is None:
        return ExpertParallelGroups(ep=dist.group.WORLD, dp=None, replicated=dist.group.WORLD)
    if isinstance(group_or_mesh, dist.ProcessGroup):
        return ExpertParallelGroups(ep=group_or_mesh, dp=None, replicated=group_or_mesh)
    if isinstance(group_or_mesh, tuple) and len(group_or_mesh) == 2:
        return ExpertParallelGroups.from_groups(*group_or_mesh)
    if hasattr(group_or_mesh, "mesh_dim_names") and hasattr(group_or_mesh, "get_group"):
        return ExpertParallelGroups.from_mesh(group_or_mesh)
    raise TypeError(
        f"{what} must be None, a ProcessGroup, a DeviceMesh with dims ('dp', 'ep'), a pair (ep_group, dp_group) "
        f"or an ExpertParallelGroups, got {type(group_or_mesh).__name__}"
    )

"""Which node each rank of the expert-parallel group lives on: the layout the hierarchical all-to-all needs.

A node is a set of ranks joined by a fast link (NVLink, or shared memory); nodes are
joined by a slower network. The hierarchical exchange (:mod:`.hierarchical`) sends a
row across that network once per (source node, destination node) and spreads it
inside the node, so it needs, for every group rank, its node and its index inside
the node ("local index"). Rank ``(n, l)`` talks across nodes only to the ranks with
the same local index ``l`` (its *rail*: one rank per node), and inside its node to
the ranks of node ``n``.

Where the layout comes from, in order:

* ``ranks_per_node=G`` given to the layer: group rank ``r`` is on node
  ``global_rank(r) // G`` (torchrun numbers the ranks of a node consecutively);
* a ``DeviceMesh`` with dims ``("node", "local")``: the mesh's own coordinates;
* the ``LOCAL_WORLD_SIZE`` environment variable that torchrun sets, used as ``G``.

Every node must hold the same number of the group's ranks (one rail per local index).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch.distributed as dist

__all__ = ["NodeLayout", "HIERARCHIES", "resolve_node_layout", "mesh_groups"]

HIERARCHIES = ("flat", "node")
MESH_NODE_DIMS = ("node", "local")


@dataclass(frozen=True)
class NodeLayout:
    """``node_of[r]``: the node (0..N-1) of group rank ``r``; nodes are numbered by their lowest rank."""

    node_of: tuple

    def __post_init__(self) -> None:
        sizes = [len(m) for m in self.members]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"node layout {self.describe()}: every node must hold the same number of the group's ranks, "
                f"got {sizes} ranks per node; expected {len(self.node_of) // max(1, len(sizes))} on each"
            )

    @cached_property
    def members(self) -> tuple:
        """``members[n]``: the group ranks on node ``n``, ascending (their local index is the position)."""
        out: dict = {}
        for r, n in enumerate(self.node_of):
            out.setdefault(n, []).append(r)
        return tuple(tuple(out[n]) for n in sorted(out))

    @property
    def num_nodes(self) -> int:
        return len(self.members)

    @property
    def ranks_per_node(self) -> int:
        return len(self.members[0])

    @cached_property
    def local_of(self) -> tuple:
        """``local_of[r]``: rank ``r``'s index inside its node (its rail)."""
        out = [0] * len(self.node_of)
        for m in self.members:
            for i, r in enumerate(m):
                out[r] = i
        return tuple(out)

    def rail(self, local: int) -> tuple:
        """The group ranks with local index ``local``, one per node, in node order."""
        return tuple(m[local] for m in self.members)

    def describe(self) -> str:
        return "; ".join(f"node {n}: ranks {list(m)}" for n, m in enumerate(self.members))


def _renumber(raw: list) -> tuple:
    first: dict = {}
    for v in raw:
        first.setdefault(v, len(first))
    return tuple(first[v] for v in raw)


def _positive_int(value, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or isinstance(value, bool) or v < 1 or (not isinstance(value, str) and v != value):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return v


def resolve_node_layout(
    hierarchy: str, ranks_per_node, group, *, mesh_layout: Optional[NodeLayout] = None, what: str = "layer"
) -> Optional[NodeLayout]:
    """The group's :class:`NodeLayout`, or ``None`` when nothing says where the nodes are (flat only).

    ``hierarchy="node"`` without any source of node membership is a ``ValueError``
    naming the three ways to give one. Runs no collective: every rank given the same
    arguments and environment raises the same error; a layout that differs between
    ranks is caught by the layer's configuration check.
    """
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"{what}: hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
    if ranks_per_node is not None:
        G = _positive_int(ranks_per_node, f"{what}: ranks_per_node")
    elif mesh_layout is not None:
        return mesh_layout
    elif os.environ.get("LOCAL_WORLD_SIZE"):
        G = _positive_int(os.environ["LOCAL_WORLD_SIZE"], f"{what}: the LOCAL_WORLD_SIZE environment variable")
    elif hierarchy == "node":
        raise ValueError(
            f"{what}: hierarchy='node' needs to know which ranks share a node: pass ranks_per_node=G, a "
            "DeviceMesh with dims ('node', 'local'), or run under torchrun (which sets LOCAL_WORLD_SIZE); "
            "none was given"
        )
    else:
        return None
    W = dist.get_world_size(group)
    globals_ = [dist.get_global_rank(group, r) for r in range(W)]
    try:
        return NodeLayout(_renumber([g // G for g in globals_]))
    except ValueError as err:
        if hierarchy == "flat" and ranks_per_node is None:
            return None  # the flat exchange only loses its cross-node figures on an uneven job
        raise ValueError(f"{what}: ranks_per_node={G} (global ranks {globals_}): {err}") from None


def mesh_groups(mesh):
    """A ``DeviceMesh`` with dims ``("node", "local")`` -> (its flattened group, its layout); else ``None``."""
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None or tuple(names) != MESH_NODE_DIMS:
        return None
    N, G = mesh.shape
    layout = NodeLayout(tuple(r // G for r in range(N * G)))  # the flattened mesh is node-major
    return mesh._flatten().get_group(), layout

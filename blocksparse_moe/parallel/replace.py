"""Dynamic placement: move a layer's experts, their gradients and optimizer state, to a new placement.

``replace_experts(layer, new_placement, optimizer)`` (also ``layer.replace_experts``)
runs between steps on every rank of the layer's expert-parallel group:

1. the new placement is validated locally (the same rules as the constructor's) and
   then compared across the ranks: a rank given another placement raises
   :class:`~.checks.ConfigMismatchError` on every rank before anything moves;
2. every expert tensor moves in one all-to-all per tensor, rows = experts:
   ``w1``, ``w2``, ``v1``, their ``.grad`` when set, and each optimizer state tensor
   shaped like its parameter (AdamW's ``exp_avg``/``exp_avg_sq``; scalar state such
   as ``step`` is the same on every rank and stays). A rank sends the experts it held
   that another rank holds now, in ascending global id per destination, and receives
   the experts it holds now from their old owners. With replicated experts, each new
   holder that did not hold the expert receives a copy from its lowest old holder;
3. each expert parameter is replaced by a new ``nn.Parameter`` of its new shape (autograd
   caches a leaf's shape, so resizing ``p.data`` in place would break the next backward);
   ``optimizer``'s parameter groups and state are re-keyed to it. References to the old
   parameters held elsewhere (hooks, another optimizer) are not updated. The layer's
   exchange, local expert list and load tracker are rebuilt for the new placement
   (statistics not yet collected are dropped: collect them first).

Nothing is lost, so the step after a move computes what it would have computed without
the move (tested: ``tests/test_parallel_replace.py``). What moved is returned as an
:class:`ExpertMove`. Not supported: parameters sharded further by FSDP2 or wrapped by
DDP (their flat buffers have the old shapes); move before wrapping, or reshard
through a checkpoint (``save_sharded`` / ``load_sharded`` read any placement's files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .checks import check_same_fingerprint
from .placement import ExpertPlacement, as_placement
from .sharding import EXPERT_PARAMS

__all__ = ["ExpertMove", "replace_experts"]


@dataclass(frozen=True)
class ExpertMove:
    """What one :func:`replace_experts` moved, seen from this rank.

    Attributes:
        experts_moved: experts (of the whole layer) whose rank (set of holding ranks) changed.
        experts_sent / experts_received: expert copies this rank sent to / received from other ranks.
        bytes_sent / bytes_received: bytes to / from other ranks: parameters, gradients and
            optimizer state together.
        seconds: wall time of the move on this rank (the collectives included).
    """

    experts_moved: int
    experts_sent: int
    experts_received: int
    bytes_sent: int
    bytes_received: int
    seconds: float


def _source(old: ExpertPlacement, e: int, dest: int) -> int:
    """Who gives expert ``e`` to its new holder ``dest``: ``dest`` itself if it held ``e``, else its lowest old holder.

    With one replica per expert this is the old owner; with replicas every new holder gets a
    copy (identical replicas, so any holder would do; the lowest makes it deterministic).
    """
    holders = old.ranks[e]
    return dest if dest in holders else holders[0]


def _routes(old: ExpertPlacement, new: ExpertPlacement, rank: int) -> tuple:
    """``(send[p], recv[s])``: the experts this rank sends to each rank, and receives from each, ascending ids."""
    W = old.world_size
    held, holds = old.experts_of(rank), new.experts_of(rank)
    send = [[e for e in held if p in new.ranks[e] and _source(old, e, p) == rank] for p in range(W)]
    recv = [[e for e in holds if _source(old, e, rank) == s] for s in range(W)]
    return send, recv


def _move_rows(comm, local: torch.Tensor, old: ExpertPlacement, new: ExpertPlacement, what: str) -> torch.Tensor:
    """``local [E_old_local, ...]`` (rows = this rank's experts under ``old``) -> rows of ``new``'s, in global id order."""
    rank = comm.rank
    held, holds = old.experts_of(rank), new.experts_of(rank)
    row = {e: i for i, e in enumerate(held)}
    send, recv = _routes(old, new, rank)
    order = [row[e] for part in send for e in part]
    inp = local.index_select(0, torch.tensor(order, dtype=torch.long, device=local.device))
    got = comm.all_to_all(inp.reshape(len(order), -1), what, [len(r) for r in recv], [len(s) for s in send])
    arrived = [e for part in recv for e in part]  # received rows, by source rank
    where = {e: i for i, e in enumerate(arrived)}
    back = torch.tensor([where[e] for e in holds], dtype=torch.long, device=local.device)
    return got.index_select(0, back).reshape((len(holds),) + tuple(local.shape[1:]))


def replace_experts(layer, new_placement, optimizer: torch.optim.Optimizer | None = None) -> ExpertMove:
    """Move ``layer``'s experts (an ``ExpertParallelDMoE``) to ``new_placement``; a collective, between steps."""
    t0 = time.perf_counter()
    what = f"replace_experts of layer {layer.name!r}"
    comm, old = layer.comm, layer.placement
    new = as_placement(new_placement, old.num_experts, comm.world_size, what=f"new placement of layer {layer.name!r}")
    check_same_fingerprint(comm, {"new placement": str(new.fingerprint)},
                           "Every rank must pass the same new placement to replace_experts.")  # fmt: skip
    rank = comm.rank
    send, recv = _routes(old, new, rank)
    sent = sum(len(x) for p, x in enumerate(send) if p != rank)  # expert copies, with replicas
    received = sum(len(x) for s, x in enumerate(recv) if s != rank)
    bytes_sent = bytes_received = 0
    state = optimizer.state if optimizer is not None else {}
    for name in EXPERT_PARAMS:
        p = getattr(layer, name, None)
        if p is None:
            continue
        tensors = {"": p.data}
        if p.grad is not None:
            tensors[".grad"] = p.grad
        for key, value in state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                tensors[f" state {key}"] = value
        moved = {}
        for suffix, t in tensors.items():
            moved[suffix] = _move_rows(comm, t, old, new, f"{what}: {name}{suffix}")
            per_expert = t[0].numel() * t.element_size() if t.shape[0] else 0
            bytes_sent += sent * per_expert
            bytes_received += received * per_expert
        # A new Parameter, not ``p.data = ...``: autograd caches a leaf's shape in its gradient
        # accumulator, so a parameter whose shape changed under it fails in the next backward.
        q = torch.nn.Parameter(moved.pop(""), requires_grad=p.requires_grad)
        q.grad = moved.pop(".grad", None)
        setattr(layer, name, q)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [q if x is p else x for x in group["params"]]
            if p in state:
                state[q] = state.pop(p)
                for suffix, t in moved.items():
                    state[q][suffix[len(" state ") :]] = t
    layer._set_placement(new)
    return ExpertMove(
        experts_moved=sum(1 for e in range(old.num_experts) if old.ranks[e] != new.ranks[e]),
        experts_sent=sent, experts_received=received, bytes_sent=bytes_sent, bytes_received=bytes_received,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip

"""Replicated (hot) experts: which replica a row goes to, and keeping the replicas identical.

A placement that holds expert ``e`` on several ranks (``ExpertPlacement.ranks[e]``)
runs the token exchange on its *slots* (one per (expert, holding rank), see
:attr:`~.placement.ExpertPlacement.slot_placement`); before the exchange, each
``(token, expert)`` row is mapped to one slot of its expert by :func:`choose_slots`.

**The replica rule** (deterministic, device ops only, no host read). For a token held
by rank ``r`` with global index ``g`` choosing expert ``e`` as its ``j``-th expert:

1. a replica on rank ``r`` itself, if there is one (the row never leaves the rank);
2. else the replicas on ``r``'s node, when the node layout is known (the row stays
   off the network);
3. else all of ``e``'s replicas;

and among those ``n`` candidates (in rank order) the one at index ``(g + j) mod n``.
Consecutive tokens thus alternate between the candidates, so each receives ``1 / n``
of the expert's rows from that rank in expectation. The layer uses
``g = rank * T + t`` for its ``t``-th of ``T`` local tokens (the global index when
every rank holds ``T`` tokens); :func:`~.planning.placement_traffic` applies the same
rule to a recorded trace, so what it predicts is what the layer sends.

**Gradients.** The replicas of an expert receive different rows, so after backward
their gradients are partial sums. :func:`sync_replica_grads` adds them up: one
all-reduce over the ``ep`` group (per dtype) of a buffer holding the replicated
experts' gradients, zeros where a rank does not hold one; it costs
``(replicated experts) x (parameters per expert) x (element size)`` bytes of
all-reduce per rank and step. :func:`~.grads.reduce_gradients` calls it before the
``dp`` reduction (so the ``ep`` holders are summed once within each ``dp`` replica,
then the ``dp`` replicas as for any expert); without ``reduce_gradients`` call
``layer.sync_replica_grads()`` after backward. Identical gradients and identical
optimizer states keep the replicas bitwise identical through the step.
"""

from __future__ import annotations

from typing import Optional

import torch

from .placement import ExpertPlacement

__all__ = ["ReplicaRule", "choose_slots", "primary_rows", "replica_candidates", "sync_replica_grads"]


def replica_candidates(placement: ExpertPlacement, rank: int, node_of: Optional[tuple] = None) -> list:
    """``[E]`` lists: the slots a token of rank ``rank`` may use for each expert (the rule's steps 1-3)."""
    out = []
    for e, holders in enumerate(placement.ranks):
        slots = placement.slots_of_expert[e]  # in rank order, one per holder
        if rank in holders:
            out.append([slots[holders.index(rank)]])
            continue
        if node_of is not None:
            near = [s for s, h in zip(slots, holders) if node_of[h] == node_of[rank]]
            if near:
                out.append(near)
                continue
        out.append(list(slots))
    return out


class ReplicaRule:
    """The replica rule's device tables for one placement: ``[W, E, max candidates]`` slots and ``[W, E]`` counts."""

    def __init__(self, placement: ExpertPlacement, node_of: Optional[tuple] = None, ranks=None):
        if node_of is not None and len(node_of) != placement.world_size:
            raise ValueError(
                f"node_of has {len(node_of)} entries; expected one node per rank (world_size={placement.world_size})"
            )
        self.placement, self.node_of = placement, node_of
        self.ranks = tuple(range(placement.world_size)) if ranks is None else tuple(ranks)
        rows = [replica_candidates(placement, r, node_of) for r in self.ranks]
        width = max(len(c) for row in rows for c in row)
        self._cand = [[c + [c[0]] * (width - len(c)) for c in row] for row in rows]
        self._count = [[len(c) for c in row] for row in rows]
        self._by_device: dict = {}

    def tables(self, device) -> tuple:
        t = self._by_device.get(device)
        if t is None:
            t = (torch.tensor(self._cand, dtype=torch.int64, device=device),
                 torch.tensor(self._count, dtype=torch.int64, device=device))  # fmt: skip
            self._by_device[device] = t
        return t

    def slots(self, expert_ids: torch.Tensor, token_index: torch.Tensor, home: Optional[torch.Tensor] = None):
        """``[T, k]`` slot ids; ``home [T]`` indexes ``ranks`` (``None``: the only rank this rule was built for)."""
        cand, count = self.tables(expert_ids.device)
        if home is None:
            if len(self.ranks) != 1:
                raise ValueError(f"home is needed for a rule over {len(self.ranks)} ranks")
            home = torch.zeros(expert_ids.shape[0], dtype=torch.int64, device=expert_ids.device)
        return choose_slots(expert_ids, cand, count, token_index, home)


def choose_slots(expert_ids, cand: torch.Tensor, count: torch.Tensor, token_index, home) -> torch.Tensor:
    """The replica rule on the device: ``cand[home, e, (g + j) mod count[home, e]]`` for every row."""
    ids = expert_ids.long()
    T, k = ids.shape
    h = home.long().view(T, 1).expand(T, k)
    j = torch.arange(k, dtype=torch.int64, device=ids.device).view(1, k)
    idx = (token_index.long().view(T, 1) + j) % count[h, ids]
    return cand[h, ids, idx]


def primary_rows(placement: ExpertPlacement, rank: int) -> list:
    """The local rows of ``rank`` whose expert it is the lowest holder of (each expert counted once)."""
    return [i for i, e in enumerate(placement.experts_of(rank)) if placement.primary[e] == rank]


@torch.no_grad()
def sync_replica_grads(shard) -> int:
    """Sum every replicated expert's gradient over the ranks holding it (a collective over ``ep``; see above).

    ``shard``: an :class:`~.units.ExpertShard`. Every rank of the group must call it
    (a rank holding no replica joins with zeros). Returns the bytes all-reduced per rank
    (0 without replicas, and then no collective runs).
    """
    pl, rank = shard.placement, shard.rank
    if not pl.replicated or shard.comm is None:
        return 0
    hot = [e for e, h in enumerate(pl.ranks) if len(h) > 1]
    local = {e: i for i, e in enumerate(pl.experts_of(rank))}
    mine = [(j, local[e]) for j, e in enumerate(hot) if e in local]
    by_dtype: dict = {}
    for _, p in shard.params():
        if not p.requires_grad:
            continue
        if p.grad is None:  # no row reached this rank's replicas: it still joins the sum
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    sent = 0
    for (dtype, device), grads in by_dtype.items():
        js = torch.tensor([j for j, _ in mine], dtype=torch.long, device=device)
        rows = torch.tensor([i for _, i in mine], dtype=torch.long, device=device)
        bufs = []
        for g in grads:
            b = g.new_zeros((len(hot),) + tuple(g.shape[1:]))
            if mine:
                b[js] = g[rows]
            bufs.append(b.reshape(len(hot), -1))
        flat = torch.cat(bufs, 1)
        shard.comm.all_reduce_(flat, f"replica gradient all-reduce of {shard.name or 'layer'} over ep")
        sent += flat.numel() * flat.element_size()
        offset = 0
        for g, b in zip(grads, bufs):
            n = b.shape[1]
            if mine:
                g[rows] = flat[js, offset : offset + n].view((len(mine),) + tuple(g.shape[1:]))
            offset += n
    return sent

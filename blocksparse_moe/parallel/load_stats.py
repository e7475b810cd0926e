"""Per-layer load and traffic statistics of the expert-parallel layers, collected after a step.

Every expert-parallel layer (``ExpertParallelDMoE``, and the Hugging Face experts
modules sharded by ``expert_parallel``) owns an :class:`ExpertLoadTracker`: running
sums, over its forwards since the last collection, kept as device tensors. A forward
adds to them with a few tiny in-place ops and never reads them back, so the
statistics cost no host sync (the one host read of the variable all-to-all is the
layer's own, see docs/parallel.md). :func:`collect_load_stats` reads them after a
step, optionally reduces them over each layer's expert-parallel group, and resets.

Counted per forward (the backward moves the same rows back, and is not counted again;
a forward recomputed under activation checkpointing is counted twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .placement import ExpertPlacement

__all__ = ["ExpertLoadStats", "ExpertLoadTracker", "collect_load_stats"]


class ExpertLoadTracker:
    """Running sums of one layer's routing and traffic (device tensors; host ints for the byte counts)."""

    def __init__(self, placement: ExpertPlacement, rank: int):
        self.placement = placement
        self.rank = rank
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.tokens_per_expert: Optional[torch.Tensor] = None  # [E] rows this rank routed to each expert
        self.tokens_per_local_expert: Optional[torch.Tensor] = None  # [E_l] rows its experts computed
        self.rows_sent: Optional[torch.Tensor] = None  # [W] rows dispatched to each rank
        self.rows_received: Optional[torch.Tensor] = None  # [W] rows received from each rank
        self.dropped: Optional[torch.Tensor] = None  # [] assignments dropped (fixed capacity, "drop")
        self.bytes_sent = 0  # to other ranks, both data all-to-alls, padding included
        self.bytes_received = 0
        self.count_bytes = 0
        self.cross_node_bytes_sent: Optional[int] = None  # None until a forward knew the node layout
        self.meta_bytes = 0
        self.host_reads = 0
        self.rounds = 0  # dispatch-experts-return rounds, summed over the forwards
        self.peak_recv_rows: Optional[int] = None  # the most rows received at once in any forward (None: unknown)

    @torch.no_grad()
    def record(self, tokens_per_expert, tokens_per_local_expert, rows_sent, rows_received, dropped, stats) -> None:
        """Add one forward: device tensors are summed in place (no host read), byte counts on the host."""
        parts = (tokens_per_expert, tokens_per_local_expert, rows_sent, rows_received, dropped)
        if self.tokens_per_expert is None:
            (self.tokens_per_expert, self.tokens_per_local_expert, self.rows_sent, self.rows_received,
             self.dropped) = (t.detach().to(torch.int64).clone() for t in parts)  # fmt: skip
        else:
            for acc, t in zip(
                (self.tokens_per_expert, self.tokens_per_local_expert, self.rows_sent, self.rows_received,
                 self.dropped), parts,
            ):  # fmt: skip
                acc.add_(t.detach().to(acc.dtype))
        self.forwards += 1
        self.bytes_sent += stats.bytes_sent
        self.bytes_received += stats.bytes_received
        self.count_bytes += stats.count_bytes
        if stats.cross_node_bytes_sent is not None:
            self.cross_node_bytes_sent = (self.cross_node_bytes_sent or 0) + stats.cross_node_bytes_sent
        self.meta_bytes += stats.meta_bytes
        self.host_reads += stats.host_reads
        self.rounds += stats.rounds
        if stats.peak_recv_rows is not None:
            self.peak_recv_rows = max(self.peak_recv_rows or 0, stats.peak_recv_rows)


@dataclass(frozen=True)
class ExpertLoadStats:
    """One layer's load and traffic over the forwards since the last collection.

    Attributes:
        name: the layer's module path.
        forwards: forwards counted.
        tokens_per_expert: ``[E]`` (token, expert) assignments routed to each global
            expert: from the whole expert-parallel group when collected with
            ``reduce=True``, from this rank's tokens otherwise.
        rows_per_rank: ``[W]`` rows each rank's experts computed (the sum of
            ``tokens_per_expert`` over the experts it holds): its compute load. With
            ``reduce=False`` only this rank's share of every rank's load.
        balancedness: ``mean(rows_per_rank) / max(rows_per_rank)``: 1.0 when every rank
            computes the same number of rows, ``1 / W`` when one rank computes all of
            them; a rank holding no expert counts as a rank with no load; 1.0 when no
            row was routed at all. With replicated experts, the rows each rank's
            replicas received (the column sums of ``traffic``; ``rows_sent`` with
            ``reduce=False``).
        rows_sent: ``[W]`` rows this rank dispatched to each rank (its own entry stays local).
        rows_received: ``[W]`` rows this rank's experts received from each rank.
        bytes_sent / bytes_received: bytes this rank sent to / received from *other*
            ranks in both data all-to-alls of its forwards (padding included in the
            fixed-capacity mode), excluding the count exchange (``count_bytes``).
        dropped: assignments dropped by the fixed-capacity ``"drop"`` policy (else 0).
        traffic: with ``reduce=True``, ``traffic[s][p]`` = rows rank ``s`` dispatched
            to rank ``p``; ``None`` otherwise.
        bytes_sent_per_rank / bytes_received_per_rank: with ``reduce=True``, every
            rank's byte counts; ``None`` otherwise.
        cross_node_bytes_sent: the part of ``bytes_sent`` to other nodes (``None``
            when the layer does not know the node layout).
        meta_bytes: routing metadata sent beside the rows (hierarchical exchange).
        host_reads: device-to-host reads of the forwards counted.
        rounds: dispatch-experts-return rounds over the forwards counted (one per forward
            unless ``max_recv_rows`` cut them into more).
        peak_recv_rows: the most rows this rank received at once, in any forward counted
            (``None`` for the hierarchical exchange); at most ``max_recv_rows`` when set.
        peak_recv_rows_per_rank: with ``reduce=True``, every rank's ``peak_recv_rows``
            (``-1`` where unknown); ``None`` otherwise.
    """

    name: str
    forwards: int
    rank: int
    world_size: int
    tokens_per_expert: list
    rows_per_rank: list
    balancedness: float
    rows_sent: list
    rows_received: list
    bytes_sent: int
    bytes_received: int
    count_bytes: int
    dropped: int
    traffic: Optional[list] = None
    bytes_sent_per_rank: Optional[list] = None
    bytes_received_per_rank: Optional[list] = None
    cross_node_bytes_sent: Optional[int] = None
    meta_bytes: int = 0
    host_reads: int = 0
    rounds: int = 0
    peak_recv_rows: Optional[int] = None
    peak_recv_rows_per_rank: Optional[list] = None


def _balancedness(loads: list) -> float:
    top = max(loads) if loads else 0
    return 1.0 if top == 0 else (sum(loads) / len(loads)) / top


def _layer_stats(shard, reduce: bool) -> ExpertLoadStats:
    tr, placement = shard.tracker, shard.placement
    E, W = placement.num_experts, placement.world_size
    if tr.tokens_per_expert is None:  # no forward yet: zeros, and still join the collectives below
        dev = next((p.device for _, p in shard.params()), torch.device("cpu"))
        z = dict(dtype=torch.int64, device=dev)
        tpe, sent, recv, dropped = torch.zeros(E, **z), torch.zeros(W, **z), torch.zeros(W, **z), torch.zeros((), **z)
    else:
        tpe, sent, recv, dropped = tr.tokens_per_expert, tr.rows_sent, tr.rows_received, tr.dropped
    traffic = bytes_s = bytes_r = peaks = None
    peak = -1 if tr.peak_recv_rows is None else tr.peak_recv_rows
    if reduce and shard.groups is not None and W > 1:
        comm = shard.comm
        tpe = tpe.clone()
        comm.all_reduce_(tpe, "load statistics (all_reduce)")
        extra = torch.tensor([tr.bytes_sent, tr.bytes_received, peak], dtype=torch.int64, device=sent.device)
        # host read on purpose: collect_load_stats runs after a step, to report; the forward never reads
        rows = torch.stack(comm.all_gather(torch.cat([sent, extra]), "load statistics (all_gather)")).tolist()
        traffic = [r[:W] for r in rows]
        bytes_s, bytes_r, peaks = [r[W] for r in rows], [r[W + 1] for r in rows], [r[W + 2] for r in rows]
    tpe_l = tpe.tolist()  # host read, as above: a report after the step, never in forward or backward
    if placement.replicated:  # an expert's rows are split among its replicas: count what each rank received
        loads = [sum(row[p] for row in traffic) for p in range(W)] if traffic is not None else sent.tolist()
    else:
        loads = [sum(tpe_l[e] for e in placement.experts_of(r)) for r in range(W)]
    return ExpertLoadStats(
        name=shard.name, forwards=tr.forwards, rank=shard.rank, world_size=W, tokens_per_expert=tpe_l,
        rows_per_rank=loads, balancedness=_balancedness(loads), rows_sent=sent.tolist(),
        rows_received=recv.tolist(), bytes_sent=tr.bytes_sent, bytes_received=tr.bytes_received,
        count_bytes=tr.count_bytes, dropped=int(dropped), traffic=traffic, bytes_sent_per_rank=bytes_s,
        bytes_received_per_rank=bytes_r, cross_node_bytes_sent=tr.cross_node_bytes_sent,
        meta_bytes=tr.meta_bytes, host_reads=tr.host_reads, rounds=tr.rounds, peak_recv_rows=tr.peak_recv_rows,
        peak_recv_rows_per_rank=peaks,
    )  # fmt: skip


def collect_load_stats(model: torch.nn.Module, *, reset: bool = True, reduce: bool = True) -> dict:
    """``{layer name: ExpertLoadStats}`` for every expert-parallel layer of ``model``, in module order.

    Call after a step (it reads the device sums on the host). ``reduce=True`` (default)
    is a collective over each layer's expert-parallel group (call it on every rank):
    ``tokens_per_expert``, ``rows_per_rank`` and ``balancedness`` then describe the
    whole group, and ``traffic`` holds every rank's dispatch. ``reset=True`` starts the
    next counting window.
    """
    from .units import expert_shards

    out = {}
    for shard in expert_shards(model):
        out[shard.name] = _layer_stats(shard, reduce)
        if reset:
            shard.tracker.reset()
    return out

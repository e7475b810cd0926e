"""What the expert-parallel layer returns beside its output, and the fixed-capacity error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layers import MoEAux

__all__ = ["AllToAllStats", "CapacityOverflowError", "ExpertParallelAux"]


class CapacityOverflowError(RuntimeError):
    """A rank had more rows for one peer than ``capacity_per_peer`` (fixed-capacity mode, ``"error"`` policy)."""


@dataclass
class AllToAllStats:
    """What one forward moved, seen from this rank (the backward moves the same volume back).

    Attributes:
        send_rows: rows this rank dispatched to each rank of the group (its own
            entry is a local copy); ``None`` in fixed-capacity mode, where the
            counts stay on the device.
        recv_rows: rows this rank received from each rank (and computed); ``None``
            in fixed-capacity mode.
        bytes_sent: bytes this rank sent to *other* ranks in the two data
            all-to-alls (dispatch + return); padding included in fixed-capacity mode.
        bytes_received: bytes it received from other ranks in the two.
        count_bytes: bytes of the count exchange (sent to other ranks).
        cross_node_bytes_sent / cross_node_bytes_received: the part of ``bytes_sent`` /
            ``bytes_received`` to / from ranks on other nodes; ``None`` when the layer
            does not know the node layout (flat, no ``ranks_per_node``, mesh or
            ``LOCAL_WORLD_SIZE``).
        meta_bytes: routing metadata sent to other ranks beside the rows (the
            hierarchical path's weights and int32 expert ids, across nodes); 0 when flat.
        phase_bytes: ``bytes_sent`` by phase: ``dispatch``, ``return`` (flat), or
            ``inter_dispatch``, ``intra_dispatch``, ``intra_return``, ``inter_return``
            (hierarchical); ``None`` in fixed-capacity mode.
        host_reads: device-to-host reads of this forward (1 variable, 0 fixed capacity on
            an accelerator; see docs/parallel.md, "Host reads per step").
        hierarchy / chunks: the exchange that ran (``"flat"`` or ``"node"``) and its chunk count.
        rounds: the dispatch-experts-return rounds of this forward (more than 1 only when
            ``max_recv_rows`` cut the exchange; see :mod:`.bounded`).
        peak_recv_rows: the most rows this rank received at once (in one round), its own
            included: at most ``max_recv_rows`` when set; ``W * B`` in fixed-capacity mode;
            ``None`` for the hierarchical exchange.

    Every figure is reproduced exactly from the routing alone by ``benchmarks/ep_traffic.py``.
    """

    send_rows: Optional[list]
    recv_rows: Optional[list]
    bytes_sent: int
    bytes_received: int
    count_bytes: int
    cross_node_bytes_sent: Optional[int] = None
    cross_node_bytes_received: Optional[int] = None
    meta_bytes: int = 0
    phase_bytes: Optional[dict] = None
    host_reads: int = 1
    hierarchy: str = "flat"
    chunks: int = 1
    rounds: int = 1
    peak_recv_rows: Optional[int] = None


@dataclass
class ExpertParallelAux(MoEAux):
    """:class:`~blocksparse_moe.layers.MoEAux` of this rank's tokens, plus the expert-parallel traffic.

    The losses and ``tokens_per_expert [E]`` are those of this rank's tokens, exactly
    what a single-process dMoE returns for them (a data-parallel convention: average
    them across ranks, or all-reduce ``tokens_per_expert`` for a global load).

    Attributes:
        tokens_per_local_expert: ``[E_l]`` rows that this rank's experts computed,
            from all ranks.
        all_to_all: the :class:`AllToAllStats` of this forward.
    """

    tokens_per_local_expert: torch.Tensor = None
    all_to_all: AllToAllStats = None

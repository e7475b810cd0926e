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
    """

    send_rows: Optional[list]
    recv_rows: Optional[list]
    bytes_sent: int
    bytes_received: int
    count_bytes: int


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

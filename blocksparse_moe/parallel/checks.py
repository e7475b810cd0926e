"""Up-front agreement of the expert-parallel ranks on the layer's configuration.

A layer whose configuration differs across ranks would not fail cleanly: a rank
with another ``num_experts`` or ``top_k`` sends counts of another length, a rank
with another ``hidden_size`` or dtype sends rows of another width, and the
all-to-all then hangs, crashes, or silently mixes bytes. So the layer's
constructor gathers a fingerprint of the configuration from every rank (one
``all_gather_object``, on every rank of the group, before any parameter is
allocated) and compares it with rank 0's. Every rank sees the same gathered list,
so every rank raises the same :class:`ConfigMismatchError`: none is left waiting.
"""

from __future__ import annotations

import dataclasses

from ..config import MoEConfig
from .collectives import Communicator

__all__ = ["ConfigMismatchError", "config_fingerprint", "check_same_config", "check_same_fingerprint"]

# Fields that may legitimately differ per rank: each rank's own device (cuda:0, cuda:1, ...).
_PER_RANK_FIELDS = ("device",)


class ConfigMismatchError(ValueError):
    """The expert-parallel ranks built the layer with different configurations."""


def _describe(value) -> str:
    if callable(value) and not isinstance(value, type):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}>"
    return repr(value)


def config_fingerprint(config: MoEConfig, extra: dict | None = None) -> dict[str, str]:
    """Every field that must agree across ranks, as printable strings (picklable, comparable)."""
    fields = [f.name for f in dataclasses.fields(config) if f.name not in _PER_RANK_FIELDS]
    fp = {name: _describe(getattr(config, name)) for name in fields}
    for key, value in (extra or {}).items():
        fp[key] = _describe(value)
    return fp


def check_same_config(comm: Communicator, config: MoEConfig, extra: dict | None = None) -> None:
    """Raise :class:`ConfigMismatchError` on every rank if any rank's fingerprint differs from rank 0's.

    The message names each differing rank and field with both values, e.g.
    ``rank 1: num_experts=4 (rank 0 has 8)``.
    """
    check_same_fingerprint(
        comm, config_fingerprint(config, extra),
        "Every rank must build the layer with the same MoEConfig (except device) and the same expert-parallel "
        "options.",
    )  # fmt: skip


def check_same_fingerprint(comm: Communicator, fingerprint: dict, advice: str) -> None:
    """One ``all_gather_object`` of ``fingerprint`` (printable values); any difference from rank 0 raises everywhere."""
    everyone = comm.all_gather_object(fingerprint, "configuration check (all_gather_object)")
    ref = everyone[0]
    problems = []
    for rank, fp in enumerate(everyone):
        if rank == 0:
            continue
        for key in sorted(set(ref) | set(fp)):
            if fp.get(key) != ref.get(key):
                mine, first = fp.get(key, "<missing>"), ref.get(key, "<missing>")
                problems.append(f"rank {rank}: {key}={mine} (rank 0 has {first})")
    if problems:
        raise ConfigMismatchError(
            f"expert-parallel layer {comm.name!r}: the configuration differs across the {comm.world_size} ranks "
            f"of its group: " + "; ".join(problems) + ". " + advice
        )

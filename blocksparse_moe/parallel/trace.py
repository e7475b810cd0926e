"""Timestamps per stage of an expert-parallel forward and backward, to see what overlaps with what.

Off by default (``layer.trace is None``: nothing is recorded, no clock is read). Set
``layer.trace = StageTrace()`` and every stage of the exchange appends an event
``(stage, chunk, start, end)`` in seconds of ``time.perf_counter()``: the count
exchange, the host read, each chunk's transfer (from the moment it is issued to the
moment the backend reports it complete, read from the work's future on the
backend's thread, so a transfer that ran during the experts shows as such), each
chunk's expert compute, and their backward counterparts (``(backward)`` suffix).

On CUDA the host clock sees kernel launches, not kernel execution: use the profiler
there; this trace is for CPU/gloo, where compute runs on the calling thread and the
transfers on the process group's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["StageTrace", "Span"]


@dataclass
class Span:
    stage: str
    chunk: int
    start: float
    end: float


@dataclass
class StageTrace:
    """A list of :class:`Span` (appended to from the caller's and the backend's threads)."""

    spans: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, chunk: int, start: float, end: float) -> None:
        with self._lock:
            self.spans.append(Span(stage, chunk, start, end))

    def clock(self) -> float:
        return time.perf_counter()

    def watch(self, work, stage: str, chunk: int) -> None:
        """Record ``work``'s transfer from now until the backend completes it (its future's callback)."""
        start = time.perf_counter()
        try:
            fut = work.get_future()
        except Exception:  # noqa: BLE001 - a backend without futures: the wait records the end instead
            return
        fut.then(lambda _f: self.add(stage, chunk, start, time.perf_counter()))

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def table(self, origin: float | None = None) -> list:
        """``[(stage, chunk, start_ms, end_ms)]`` sorted by start, relative to ``origin`` (default: the first start)."""
        spans = sorted(self.spans, key=lambda s: s.start)
        t0 = origin if origin is not None else (spans[0].start if spans else 0.0)
        return [(s.stage, s.chunk, round((s.start - t0) * 1e3, 3), round((s.end - t0) * 1e3, 3)) for s in spans]


class _Timed:
    """``with _Timed(trace, stage, chunk):`` records the block's span; a no-op when ``trace`` is None."""

    __slots__ = ("trace", "stage", "chunk", "t")

    def __init__(self, trace, stage: str, chunk: int = 0):
        self.trace, self.stage, self.chunk = trace, stage, chunk

    def __enter__(self):
        if self.trace is not None:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.trace is not None:
            self.trace.add(self.stage, self.chunk, self.t, time.perf_counter())
        return False


def timed(trace, stage: str, chunk: int = 0) -> _Timed:
    return _Timed(trace, stage, chunk)

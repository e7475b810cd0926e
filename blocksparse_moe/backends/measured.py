"""The measured layer times ``backend="auto"`` follows on CUDA: which backend was fastest at which shape.

``measured_layers.json`` (beside this file) is written by ``python -m benchmarks.auto_table``
from committed results files (``benchmarks/results/``): one :class:`LayerTiming` per
GPU architecture, dtype and layer shape, holding each backend's forward + backward
median. It is data, not code: a device run that measures a new shape or backend
regenerates it, and ``auto`` changes with it (``select.py`` says how it is read).

Why the nearest measured shape: a results file covers a handful of shapes, and a call
rarely matches one exactly. Distance is the sum of ``|log2|`` ratios of experts, ffn,
hidden and top-k (a factor of two in any one counts the same), so a call takes the
choice measured at the shape it most resembles; a GLU call prefers GLU timings at equal
distance. An architecture with no timing at all gets ``select``'s rule, not a guess.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from dataclasses import dataclass

__all__ = ["MEASURED_PATH", "LayerTiming", "load_timings", "nearest_timing", "shape_distance"]

MEASURED_PATH = pathlib.Path(__file__).with_name("measured_layers.json")
SCHEMA = "blocksparse-moe-auto/1"


@dataclass(frozen=True)
class LayerTiming:
    """One layer shape on one GPU architecture and dtype, and what each backend took there.

    ``arch``: compute capability as ``10 * major + minor`` (90 for H100 and H200).
    ``ms``: ``(backend, fwd+bwd median in ms)`` pairs, the mean over the routings that
    every listed backend was timed on. ``source``: the results file(s) it came from.
    """

    arch: int
    dtype: str
    experts: int
    hidden: int
    ffn: int
    top_k: int
    glu: bool
    ms: tuple[tuple[str, float], ...]
    source: str

    def fastest(self, allowed) -> str | None:
        """The fastest of the backends in ``allowed`` that this timing has, or None."""
        timed = [(t, b) for b, t in self.ms if b in allowed]
        return min(timed)[1] if timed else None

    def to_json(self) -> dict:
        return dict(arch=self.arch, dtype=self.dtype, experts=self.experts, hidden=self.hidden, ffn=self.ffn,
                    top_k=self.top_k, glu=self.glu, ms=dict(self.ms), source=self.source)  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> "LayerTiming":
        return cls(int(d["arch"]), str(d["dtype"]), int(d["experts"]), int(d["hidden"]), int(d["ffn"]),
                   int(d["top_k"]), bool(d["glu"]), tuple(sorted((str(b), float(t)) for b, t in d["ms"].items())),
                   str(d.get("source", "")))  # fmt: skip


@functools.cache
def load_timings(path: pathlib.Path = MEASURED_PATH) -> tuple[LayerTiming, ...]:
    """Every timing in ``path`` (read once per process: the file ships with the package)."""
    doc = json.loads(pathlib.Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema must be {SCHEMA!r}, got {doc.get('schema')!r}; regenerate it with "
                         "python -m benchmarks.auto_table")  # fmt: skip
    return tuple(LayerTiming.from_json(d) for d in doc["timings"])


def shape_distance(t: LayerTiming, experts: int, hidden: int | None, ffn: int, top_k: int | None) -> float:
    """Sum of ``|log2|`` ratios over the sizes the call knows (an unknown hidden or top-k adds nothing)."""
    pairs = [(t.experts, experts), (t.ffn, ffn), (t.hidden, hidden), (t.top_k, top_k)]
    return sum(abs(math.log2(a / b)) for a, b in pairs if b is not None and b > 0)


def nearest_timing(timings, arch: int, dtype: str, experts: int, ffn: int, hidden: int | None = None,
                   top_k: int | None = None, glu: bool = False) -> LayerTiming | None:  # fmt: skip
    """The timing of this architecture and dtype nearest the call's shape (None when there is none)."""
    same = [t for t in timings if t.arch == arch and t.dtype == dtype]
    if not same:
        return None
    return min(same, key=lambda t: (shape_distance(t, experts, hidden, ffn, top_k), t.glu != glu))

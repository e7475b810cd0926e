"""Regenerate ``blocksparse_moe/backends/measured_layers.json``, the timings ``backend="auto"`` follows on CUDA.

    python -m benchmarks.auto_table                         # every GPU results file in benchmarks/results/
    python -m benchmarks.auto_table FILE ... [--out PATH]   # these files (later ones win at the same shape)

Reads two kinds of results file, GPU runs only (``env.device == "cuda"``, timed, not smoke):

* the layer suite (``python -m benchmarks --full``, ``"layers"`` records): the dMoE row is
  the backend it ran on (``record["backend"]``, e.g. ``triton``), ``dmoe_<backend>`` rows
  are that backend, and ``grouped_mm`` (the same grouped GEMMs over the sorted rows as the
  ``grouped`` backend) is ``grouped``;
* ``python -m benchmarks.persistent_layer`` (``persistent-layer.json``): every record is
  one backend by name (``persistent``, ``triton``, ``grouped``), a SwiGLU layer.

Per (architecture, dtype, shape), each backend's time is its forward + backward median
averaged over the routings (uniform, skewed) that all of that shape's backends were timed
on, so no backend is compared on an easier routing. Where two files time one backend at
one shape, the later file on the command line (or the later name, by default) wins. No
timing is made up: a backend absent from the files is absent from the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blocksparse_moe.backends.measured import MEASURED_PATH, SCHEMA, LayerTiming

from .common import RESULTS_DIR

__all__ = ["timings_from", "build_table", "main"]

Key = tuple  # (arch, dtype, experts, hidden, ffn, top_k, glu)


def _arch(env: dict) -> int | None:
    cc = env.get("compute_capability")
    if env.get("device") != "cuda" or not cc or env.get("smoke") or env.get("triton_interpret"):
        return None
    major, minor = (int(p) for p in str(cc).split("."))
    return 10 * major + minor


def _layer_suite(doc: dict, arch: int, src: str):
    """``(key, routing, backend, ms, source)`` from a layer-suite file's ``layers`` records."""
    dtype = doc["env"]["dtype"]
    for rec in doc.get("layers", []):
        s = rec["shape"]
        key = (arch, dtype, s["experts"], s["hidden"], s["ffn"], s["top_k"], bool(s["glu"]))
        for impl, r in rec["impls"].items():
            if r.get("status") != "ok" or r.get("median_ms") is None:
                continue
            if impl == "dmoe":
                backend = rec.get("backend")
            elif impl.startswith("dmoe_"):
                backend = impl[len("dmoe_"):]
            elif impl == "grouped_mm":
                backend = "grouped"
            else:
                continue  # capacity layers and the expert loop are not backends auto can pick
            if backend:
                yield key, rec["routing"], backend, float(r["median_ms"]), src


def _persistent_layer(doc: dict, arch: int, src: str):
    """The same from ``persistent-layer.json`` (records named by backend; the layer is SwiGLU)."""
    for rec in doc.get("results", []):
        t = rec.get("fwd_bwd", {}).get("median_ms")
        if t is None or "error" in rec or rec.get("mismatch"):
            continue  # a failed or wrong backend is not a candidate
        key = (arch, rec["dtype"], rec["experts"], rec["hidden"], rec["ffn"], rec["top_k"], True)
        yield key, rec["routing"], rec["impl"], float(t), src


def timings_from(path: Path):
    """Every ``(key, routing, backend, ms, source)`` a results file holds (none for CPU or smoke runs)."""
    doc = json.loads(Path(path).read_text())
    env = doc.get("env", {})
    arch = _arch(env)
    if arch is None:
        return []
    if "layers" in doc:
        return list(_layer_suite(doc, arch, Path(path).name))
    if "results" in doc and any("fwd_bwd" in r for r in doc["results"]):
        return list(_persistent_layer(doc, arch, Path(path).name))
    return []


def build_table(rows) -> list[LayerTiming]:
    """Rows in file order -> one :class:`LayerTiming` per key (later rows replace earlier ones)."""
    cell: dict[Key, dict[str, dict[str, tuple[float, str]]]] = {}
    for key, routing, backend, ms, src in rows:
        cell.setdefault(key, {}).setdefault(backend, {})[routing] = (ms, src)
    out = []
    for key, by_backend in sorted(cell.items()):
        common = set.intersection(*(set(r) for r in by_backend.values()))
        if not common:
            continue  # no routing timed for every backend: nothing comparable
        ms = tuple(sorted((b, round(sum(r[x][0] for x in common) / len(common), 4)) for b, r in by_backend.items()))
        srcs = sorted({r[x][1] for r in by_backend.values() for x in common})
        out.append(LayerTiming(*key, ms=ms, source=", ".join(srcs)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="results files (default: benchmarks/results/*.json)")
    ap.add_argument("--out", type=Path, default=MEASURED_PATH)
    args = ap.parse_args(argv)
    files = args.files or sorted(Path(RESULTS_DIR).glob("*.json"))
    for f in [f for f in files if not f.is_file()]:
        print(f"auto_table: no file {f} (a device step that did not run?); the others are used", file=sys.stderr)
    files = [f for f in files if f.is_file()]
    rows = [r for f in files for r in timings_from(f)]
    table = build_table(rows)
    doc = dict(schema=SCHEMA, generated_by="python -m benchmarks.auto_table",
               timings=[t.to_json() for t in table])  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for t in table:
        print(f"sm_{t.arch} {t.dtype} E={t.experts} H={t.hidden} F={t.ffn} k={t.top_k} glu={t.glu}: "
              f"{dict(t.ms)} -> {t.fastest({b for b, _ in t.ms})}")  # fmt: skip
    print(f"{len(table)} timings from {len(files)} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks.ep_sim``: a cost model of the expert-parallel exchange, up to thousands of ranks.

For E experts (top-k), hidden size H, T tokens per rank, G ranks per node and N nodes,
link bandwidths and a routing distribution (uniform, Zipf-skewed, or a recorded
``tokens_per_expert`` trace), it computes per rank the rows and bytes of every
all-to-all phase of the flat and the hierarchical exchange, the expert compute time
from a measured kernel throughput, and the step time (forward + backward) with and
without chunked overlap. It prints a table and can write a JSON file and a plot.

Two levels, by the same definitions as the layer's ``AllToAllStats``:

* exact, for a concrete routing (every rank's ``expert_ids``): :func:`exact_traffic`
  (from :mod:`benchmarks.ep_traffic`). ``tests/test_parallel_comm.py`` holds the
  layer's reported figures to it byte for byte at 4 ranks (2 simulated nodes).
* expected, for a distribution (:func:`expected_traffic`): per-expert inclusion
  probabilities and per-node hit probabilities estimated from ``--samples`` sampled
  tokens (k distinct experts per token, Gumbel top-k), then scaled to ``T`` tokens per
  rank. Routing is taken independent of the source rank, so every rank sends the same
  expected volume; the receive side differs per rank under skew, and a phase lasts as
  long as its busiest rank (``max(sent, received) / bandwidth``, full-duplex links).

Time model (assumptions, all flags): one all-to-all message costs ``alpha`` (its
link's latency) plus bytes / bandwidth; a rank's messages to other nodes share its
network bandwidth, those inside the node its NVLink bandwidth, and the flat exchange
drives both at once; the hierarchical one runs stage A (network) then stage B
(NVLink). Expert compute = ``2 * rows * H * ffn * (3 if GLU else 2)`` FLOPs at
``--tflops`` (forward), twice that in backward. Overlap cuts the expert-feeding
transfer (flat: the whole exchange; hierarchical: stage B) and the compute into ``c``
chunks: ``(D + C + R) / c + (c - 1) / c * max(D, C, R)`` plus ``c`` times the
per-message latency, with the best ``c`` in {1, 2, 4, 8}.

    python -m benchmarks.ep_sim                                  # the docs table (DeepSeek-V3-, Mixtral-like)
    python -m benchmarks.ep_sim --experts 64 --top-k 6 --hidden 2048 --ffn 1408 --gpus 64,512 --routing zipf:1.2
    python -m benchmarks.ep_sim --routing trace:tokens_per_expert.json --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from .ep_traffic import ID_BYTES, exact_traffic

__all__ = ["Shape", "Links", "SHAPES", "exact_traffic", "expected_traffic", "step_times", "routing_probs", "main"]


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    top_k: int
    hidden: int
    ffn: int
    tokens: int  # per rank
    glu: bool = True
    elem_bytes: int = 2  # bf16


@dataclass(frozen=True)
class Links:
    """Per-GPU, per-direction bandwidths (GB/s) and per-message latencies (µs); defaults: H100 NVLink4, 400G NDR IB."""

    intra_gbps: float = 450.0
    inter_gbps: float = 50.0
    alpha_intra_us: float = 2.0
    alpha_inter_us: float = 5.0
    tflops: float = 720.0 * 0.72  # measured: dense bf16 matmul 720 TFLOP/s x the kernels' median 0.72 of dense


SHAPES = {
    "deepseek-v3": Shape("DeepSeek-V3-like", experts=256, top_k=8, hidden=7168, ffn=2048, tokens=4096),
    "mixtral": Shape("Mixtral-like", experts=8, top_k=2, hidden=4096, ffn=14336, tokens=4096),
}


def routing_probs(spec: str, E: int) -> np.ndarray:
    """``uniform``, ``zipf:S`` (expert i's weight ``(i + 1) ** -S``, experts shuffled over ranks by a fixed seed),
    or ``trace:FILE`` (a JSON list of tokens per expert, or an object with ``tokens_per_expert``)."""
    if spec == "uniform":
        return np.full(E, 1.0 / E)
    if spec.startswith("zipf:"):
        w = np.arange(1, E + 1, dtype=float) ** -float(spec.split(":", 1)[1])
        np.random.default_rng(0).shuffle(w)  # hot experts spread over ranks, not all on rank 0
        return w / w.sum()
    if spec.startswith("trace:"):
        with open(spec.split(":", 1)[1]) as f:
            data = json.load(f)
        counts = np.asarray(data["tokens_per_expert"] if isinstance(data, dict) else data, dtype=float)
        if counts.shape != (E,):
            raise ValueError(f"--routing {spec}: {counts.shape[0]} experts in the trace, expected {E}")
        return counts / counts.sum()
    raise ValueError(f"--routing must be uniform, zipf:S or trace:FILE, got {spec!r}")


def sample_routing(probs: np.ndarray, k: int, samples: int, seed: int = 0) -> np.ndarray:
    """``[samples, k]`` distinct experts per token, drawn with probabilities ``probs`` (Gumbel top-k)."""
    g = np.random.default_rng(seed).gumbel(size=(samples, probs.size))
    return np.argsort(-(np.log(probs) + g), axis=1)[:, :k]


def expected_traffic(shape: Shape, W: int, G: int, probs: np.ndarray, samples: int = 4096) -> dict:
    """Expected rows per rank and phase (contiguous placement, E/W experts per rank), flat and hierarchical."""
    E, k, T = shape.experts, shape.top_k, shape.tokens
    if E % W or W % G:
        raise ValueError(f"expected experts ({E}) divisible by ranks ({W}) and ranks by ranks per node ({G})")
    N, per_rank = W // G, E // W
    ids = sample_routing(probs, k, samples)
    q = np.bincount(ids.ravel(), minlength=E) / samples  # expected rows per token for each expert
    rank_q = q.reshape(W, per_rank).sum(1)  # [W] rows per token to each rank
    node_q = rank_q.reshape(N, G).sum(1)  # [N]
    hits = np.zeros(N)
    node_of_e = np.arange(E) // (per_rank * G)
    for n in range(N):  # fraction of tokens with at least one expert on node n
        hits[n] = (node_of_e[ids] == n).any(1).mean()
    node_of_r = np.arange(W) // G
    flat = {
        "send_remote": T * (k - rank_q), "recv_remote": (W - 1) * T * rank_q,
        "send_cross": T * (k - node_q[node_of_r]), "recv_cross": (W - G) * T * rank_q,
    }  # fmt: skip
    hier = {
        "a_send": T * (hits.sum() - hits[node_of_r]), "a_recv": (N - 1) * T * hits[node_of_r],
        "b_send": N * T * (node_q[node_of_r] - rank_q), "b_recv": (G - 1) * N * T * rank_q,
    }  # fmt: skip
    return {"flat": flat, "hier": hier, "rows_computed": W * T * rank_q, "N": N, "G": G, "W": W}


def _pipeline(d: float, c: float, r: float, chunks: int, extra_latency: float) -> float:
    if chunks == 1:
        return d + c + r
    return (d + c + r) / chunks + (chunks - 1) / chunks * max(d, c, r) + (chunks - 1) * extra_latency


def step_times(shape: Shape, tr: dict, links: Links) -> dict:
    """Forward + backward seconds of the busiest rank: flat / hierarchical, without / with overlap."""
    W, G, N, H, b = tr["W"], tr["G"], tr["N"], shape.hidden, shape.elem_bytes
    row = H * b
    inter, intra = links.inter_gbps * 1e9, links.intra_gbps * 1e9
    a_inter, a_intra = links.alpha_inter_us * 1e-6, links.alpha_intra_us * 1e-6
    flops_row = 2 * H * shape.ffn * (3 if shape.glu else 2)
    compute = float(tr["rows_computed"].max()) * flops_row / (links.tflops * 1e12)
    f = tr["flat"]
    cross = np.maximum(f["send_cross"], f["recv_cross"]) * row
    intra_rows = np.maximum(f["send_remote"] - f["send_cross"], f["recv_remote"] - f["recv_cross"])
    # one direction of the flat exchange (dispatch; the return is its mirror): both links at once
    flat_one = max(
        float(cross.max()) / inter + (W - G) * a_inter, float(intra_rows.max()) * row / intra + (G - 1) * a_intra
    )
    h = tr["hier"]
    meta = shape.top_k * (b + ID_BYTES)
    a_one = float(np.maximum(h["a_send"], h["a_recv"]).max()) * (row + meta) / inter + (N - 1) * a_inter
    b_one = float(np.maximum(h["b_send"], h["b_recv"]).max()) * row / intra + (G - 1) * a_intra
    out = {"compute_fwd_ms": compute * 1e3}
    for name, pre, d, lat in (("flat", 0.0, flat_one, (W - 1) * a_inter), ("hier", a_one, b_one, (G - 1) * a_intra)):
        best = None
        for c in (1, 2, 4, 8):
            fwd = 2 * pre + _pipeline(d, compute, d, c, lat)
            bwd = 2 * pre + _pipeline(d, 2 * compute, d, c, lat)
            if c == 1:
                out[f"{name}_ms"] = (fwd + bwd) * 1e3
                out[f"{name}_comm_ms"] = 2 * (2 * pre + 2 * d) * 1e3
            if best is None or fwd + bwd < best[0]:
                best = (fwd + bwd, c)
        out[f"{name}_overlap_ms"], out[f"{name}_chunks"] = best[0] * 1e3, best[1]
    out["cross_node_bytes_flat"] = float(f["send_cross"].mean()) * row * 2
    out["cross_node_bytes_hier"] = float(h["a_send"].mean()) * row * 2
    out["cross_node_meta_hier"] = float(h["a_send"].mean()) * meta
    return out


def scaled_shape(shape: Shape, W: int) -> Shape:
    """The shape at W ranks: E = max(E, W) rounded up to a multiple of W (one expert per GPU at least)."""
    E = max(shape.experts, W)
    E = int(math.ceil(E / W) * W)
    return Shape(**{**asdict(shape), "experts": E})


def table(shapes, gpus, G, routing, links, samples) -> list:
    rows = []
    for key in shapes:
        for W in gpus:
            sh = scaled_shape(SHAPES[key] if isinstance(key, str) else key, W)
            tr = expected_traffic(sh, W, G, routing_probs(routing, sh.experts), samples)
            rows.append({"shape": sh.name, "gpus": W, "experts": sh.experts, "routing": routing,
                         **step_times(sh, tr, links)})  # fmt: skip
    return rows


def _print(rows) -> None:
    head = ("| shape | GPUs | E | cross-node MB/rank flat | hier (+meta) | flat ms | flat+overlap (c) | hier ms | "
            "hier+overlap (c) | compute fwd ms |")  # fmt: skip
    print(head)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['shape']} ({r['routing']}) | {r['gpus']} | {r['experts']} | "
              f"{r['cross_node_bytes_flat'] / 1e6:.1f} | "
              f"{r['cross_node_bytes_hier'] / 1e6:.1f} (+{r['cross_node_meta_hier'] / 1e6:.2f}) | {r['flat_ms']:.2f} | "
              f"{r['flat_overlap_ms']:.2f} ({r['flat_chunks']}) | {r['hier_ms']:.2f} | {r['hier_overlap_ms']:.2f} "
              f"({r['hier_chunks']}) | {r['compute_fwd_ms']:.2f} |")  # fmt: skip


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys((r["shape"], r["routing"]) for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, (shape, routing) in zip(axes[0], names):
        sel = [r for r in rows if r["shape"] == shape and r["routing"] == routing]
        x = [r["gpus"] for r in sel]
        for key, label in (("flat_ms", "flat"), ("flat_overlap_ms", "flat + overlap"), ("hier_ms", "hierarchical"),
                           ("hier_overlap_ms", "hierarchical + overlap")):  # fmt: skip
            ax.plot(x, [r[key] for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel("modelled fwd+bwd ms per MoE layer")
        ax.set_title(f"{shape}, {routing}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shapes", default="deepseek-v3,mixtral", help=f"named shapes: {', '.join(SHAPES)}")
    p.add_argument("--experts", type=int), p.add_argument("--top-k", type=int)
    p.add_argument("--hidden", type=int), p.add_argument("--ffn", type=int)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (custom shape)")
    p.add_argument("--gpus", default="64,128,256,512,1024,2048")
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--routing", default="uniform,zipf:1.0", help="comma-separated: uniform, zipf:S, trace:FILE")
    p.add_argument("--samples", type=int, default=4096, help="sampled tokens for the expected volumes")
    for f, v in asdict(Links()).items():
        p.add_argument("--" + f.replace("_", "-"), type=float, default=v)
    p.add_argument("--json", default=None), p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    links = Links(**{f: getattr(a, f) for f in asdict(Links())})
    if a.experts:
        shapes = [Shape("custom", a.experts, a.top_k or 2, a.hidden or 4096, a.ffn or 14336, a.tokens)]
    else:
        shapes = a.shapes.split(",")
    gpus = [int(g) for g in a.gpus.split(",")]
    rows = [r for routing in a.routing.split(",") for r in table(shapes, gpus, a.per_node, routing, links, a.samples)]
    _print(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"links": asdict(links), "rows": rows}, f, indent=1)
    if a.plot:
        _plot(rows, a.plot)
    return rows


if __name__ == "__main__":
    main()

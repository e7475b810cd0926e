"""``python -m benchmarks.placement``: expert placement and node-limited routing on a skewed synthetic trace.

The trace (CPU, no process group; ranks and nodes are simulated): ``E=64`` experts
with Zipf(1.2) popularity (expert ``e`` has weight ``rank_e ** -1.2``, ranks a seeded
permutation, so hot experts are scattered over the contiguous placement) and 32
correlated pairs (a random matching; each pair shares a Gumbel term, so its two
experts tend to be picked together). Per token, ``z_e = log p_e + g_e + g_pair(e)``
(``g`` independent standard Gumbels) and the router's scores are ``softmax(z)``; top-8
of them is the routing decision. Two traces of the same distribution are drawn:
placement is planned on the first ("recorded") and measured on the second, so the
figures are out of sample.

Tokens live on ``W=8`` ranks, ``2`` per node (4 nodes), each rank holding a
consecutive ``T / W`` of them. For each row of the table:

* balancedness: mean / max of the rows each rank's experts compute;
* cross-rank rows: rows whose expert is on another rank (the all-to-all's rows today);
* cross-rank copies, cross-node copies: distinct (token, rank) or (token, node)
  destinations other than the token's own (a dispatch sending a token once per
  destination, as DeepSeek's node-limited dispatch does); percentages against the
  uniform placement.

The replicated rows plan ``--replicas`` (default 8) extra copies of the hottest
experts, and 8 times that, with ``plan_placement(..., replicas=N)``, and the
``--node-replicas`` (default 8) hottest experts on every node
(``plan_placement(..., node_replicas=M)``), and send each row to the replica the
layer's rule picks (own rank, own node, then an even spread: ``parallel/replicas.py``),
through the same ``placement_traffic``.

The expert-choice row routes the same scores the other way, as ``ExpertParallelDMoE``
does: on each rank every expert takes its ``C = ceil(T_r k / E)`` best tokens of that
rank (capacity factor 1), so every expert computes exactly ``C`` rows per rank.

Run: ``python -m benchmarks.placement`` (about 10 s on a CPU); ``--markdown`` prints
the table for docs/parallel.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from blocksparse_moe.expert_choice import expert_choice_route
from blocksparse_moe.parallel import ExpertPlacement, plan_placement
from blocksparse_moe.parallel.planning import placement_traffic, routing_stats
from blocksparse_moe.router import group_limited_topk

__all__ = ["skewed_trace", "main"]


def skewed_trace(num_tokens: int, num_experts: int = 64, zipf: float = 1.2, seed: int = 0, trace_seed: int = 1):
    """``(scores [T, E], partner [E])`` of the synthetic model above: ``seed`` fixes the experts and
    their pairs (``partner[e]``), ``trace_seed`` the tokens."""
    g = torch.Generator().manual_seed(seed)
    E = num_experts
    rank = torch.randperm(E, generator=g).double() + 1
    logp = -zipf * rank.log()
    partner = torch.empty(E, dtype=torch.long)
    perm = torch.randperm(E, generator=g)
    pair_of = torch.empty(E, dtype=torch.long)
    for i in range(0, E - 1, 2):
        a, b = perm[i], perm[i + 1]
        partner[a], partner[b] = b, a
        pair_of[a] = pair_of[b] = i // 2
    t = torch.Generator().manual_seed(trace_seed)

    def gumbel(*shape):
        return -torch.empty(*shape, dtype=torch.float64).exponential_(generator=t).log()

    z = logp + gumbel(num_tokens, E) + gumbel(num_tokens, (E + 1) // 2)[:, pair_of]
    return z.softmax(-1).float(), partner


def _row(name, ids, placement, R, base=None):
    m = placement_traffic(ids, placement, R)
    m["name"] = name
    if base is not None:
        for key in ("cross_node_rows", "cross_rank_copies", "cross_node_copies"):
            m[key + "_pct"] = 100.0 * (m[key] - base[key]) / base[key]
    return m


def expert_choice_traffic(scores: torch.Tensor, placement: ExpertPlacement, R: int, k: int, base=None) -> dict:
    """``placement_traffic``'s figures for expert choice per rank (one placement replica per expert)."""
    T, E = scores.shape
    W = placement.world_size
    tok, exp = [], []
    for r in range(W):  # the ranks' consecutive token blocks, as placement_traffic homes them
        lo, hi = r * T // W, (r + 1) * T // W
        C = min(hi - lo, -(-(hi - lo) * k // E))
        picks, _ = expert_choice_route(scores[lo:hi], C)  # [E, C] token indices within the block
        tok.append((picks + lo).reshape(-1))
        exp.append(torch.arange(E).repeat_interleave(C))
    tok, exp = torch.cat(tok), torch.cat(exp)
    home = tok * W // T
    dest = torch.tensor(placement.owners)[exp]
    rows_per_rank = torch.bincount(dest, minlength=W)
    distinct = lambda a, n: int(torch.unique(tok * n + a).numel())  # noqa: E731 - (token, destination) pairs
    m = dict(
        rows=int(tok.numel()),
        rows_per_rank=rows_per_rank.tolist(),
        balancedness=float(rows_per_rank.double().mean() / rows_per_rank.max()),
        cross_rank_rows=int((dest != home).sum()),
        cross_node_rows=int((dest // R != home // R).sum()),
        # distinct destinations other than home: all distinct minus the tokens that have a row at home
        cross_rank_copies=distinct(dest, W) - int(torch.unique(tok[dest == home]).numel()),
        cross_node_copies=distinct(dest // R, W // R) - int(torch.unique(tok[dest // R == home // R]).numel()),
        unrouted_tokens=T - int(torch.unique(tok).numel()),
    )
    if base is not None:
        for key in ("cross_node_rows", "cross_rank_copies", "cross_node_copies"):
            m[key + "_pct"] = 100.0 * (m[key] - base[key]) / base[key]
    return m


def run(tokens: int = 16384, W: int = 8, R: int = 2, E: int = 64, k: int = 8, M: int = 2, seed: int = 0,
        replicas: int = 8, node_replicas: int = 8):  # fmt: skip
    recorded, partner = skewed_trace(tokens, E, seed=seed, trace_seed=1)
    measured, _ = skewed_trace(tokens, E, seed=seed, trace_seed=2)
    ids_rec = recorded.topk(k, -1).indices
    ids = measured.topk(k, -1).indices
    uniform = ExpertPlacement.contiguous(E, W)
    t0 = time.perf_counter()
    planned = plan_placement(routing_stats(ids_rec, E), W, R)
    plan_ms = 1e3 * (time.perf_counter() - t0)
    N = W // R
    rows = [_row("uniform placement, top-8", ids, uniform, R)]
    base = rows[0]
    rows.append(_row("data-driven placement, top-8", ids, planned, R, base))
    # replicated hot experts: the planner's copies, each row to the replica the layer's rule picks
    replicated = {}
    for extra in (replicas, 8 * replicas):
        pl = plan_placement(routing_stats(ids_rec, E), W, R, replicas=extra)
        replicated[extra] = pl
        rows.append(_row(f"data-driven placement + {extra} extra copies of the hottest experts "
                         f"({max(pl.counts)} slots per rank), top-8", ids, pl, R, base))  # fmt: skip
    # the hottest experts on every node: their rows never leave the token's node
    pl = plan_placement(routing_stats(ids_rec, E), W, R, node_replicas=node_replicas)
    replicated[f"node_replicas={node_replicas}"] = pl
    rows.append(_row(f"data-driven placement, the {node_replicas} hottest experts on every node ({max(pl.counts)} "
                     "slots per rank), top-8", ids, pl, R, base))  # fmt: skip
    # node-limited routing: the groups are the nodes of the placement in use
    nodes_uniform = torch.arange(E).view(N, E // N)
    nl = group_limited_topk(measured, k, nodes_uniform, M, 2)
    rows.append(_row(f"uniform placement, node-limited top-8 (M={M} of {N} nodes)", nl, uniform, R, base))
    nodes_planned = torch.tensor(
        [[e for r in range(n * R, (n + 1) * R) for e in planned.experts_of(r)] for n in range(N)]
    )
    nl2 = group_limited_topk(measured, k, nodes_planned, M, 2)
    rows.append(_row(f"data-driven placement, node-limited top-8 (M={M})", nl2, planned, R, base))
    ec = expert_choice_traffic(measured, uniform, R, k, base)
    ec["name"] = (
        f"uniform placement, expert choice (capacity factor 1, per rank; {ec['unrouted_tokens']:,} tokens unrouted)"
    )
    rows.append(ec)
    own = torch.tensor(planned.owners)
    pairs = dict(same_rank=float((own == own[partner]).double().mean()),
                 same_node=float((own // R == own[partner] // R).double().mean()))  # fmt: skip
    pairs["replicated"] = {n: [len(h) for h in pl.ranks] for n, pl in replicated.items()}
    return rows, plan_ms, planned, pairs


def _plan_time(E=256, W=1024, R=8, tokens=8192, k=8):
    ids = skewed_trace(tokens, E, seed=1)[0].topk(k, -1).indices
    stats = routing_stats(ids, E)
    t0 = time.perf_counter()
    plan_placement(stats, W, R)
    return 1e3 * (time.perf_counter() - t0)


def format_table(rows, markdown: bool) -> str:
    head = ["routing and placement", "balancedness", "cross-rank rows", "cross-node rows", "cross-rank copies",
            "cross-node copies"]  # fmt: skip
    body = []
    for m in rows:
        pct = lambda key: "" if key + "_pct" not in m else f" ({m[key + '_pct']:+.0f}%)"  # noqa: E731
        body.append([m["name"], f"{m['balancedness']:.3f}", f"{m['cross_rank_rows']:,} of {m['rows']:,}",
                     f"{m['cross_node_rows']:,}{pct('cross_node_rows')}", f"{m['cross_rank_copies']:,}{pct('cross_rank_copies')}",
                     f"{m['cross_node_copies']:,}{pct('cross_node_copies')}"])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + body)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--topk-nodes", type=int, default=2, help="M of node-limited routing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=8, help="extra copies of the hottest experts (and 8x that)")
    p.add_argument("--node-replicas", type=int, default=8, help="hottest experts held on every node")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    rows, plan_ms, planned, pairs = run(a.tokens, a.world_size, a.ranks_per_node, M=a.topk_nodes, seed=a.seed,
                                        replicas=a.replicas, node_replicas=a.node_replicas)  # fmt: skip
    print(f"skewed trace: {a.tokens} tokens, E=64, top-8, Zipf 1.2 with 32 correlated pairs; W={a.world_size} "
          f"simulated, {a.ranks_per_node} ranks per node; planned on one trace, measured on another")  # fmt: skip
    print(format_table(rows, a.markdown))
    print(f"plan_placement: {plan_ms:.1f} ms here; E=256, W=1024, 8 ranks per node: {_plan_time():.0f} ms")
    for n, copies in pairs["replicated"].items():
        hot = sorted(((c, e) for e, c in enumerate(copies) if c > 1), reverse=True)
        label = n if isinstance(n, str) else f"replicas={n}"
        print(f"{label}: copies per replicated expert {', '.join(f'{e}: {c}' for c, e in hot)}")
    print(f"data-driven placement: {100 * pairs['same_node']:.0f}% of the experts share a node with their correlated "
          f"partner, {100 * pairs['same_rank']:.0f}% a rank; {planned.describe()}")  # fmt: skip


if __name__ == "__main__":
    main()

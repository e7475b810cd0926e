"""Data-driven placement: routing_stats (counts, no host read), plan_placement (valid, deterministic, balanced,
co-locating), placement_traffic (counted by hand), and their errors."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe.parallel import ExpertPlacement, RoutingStats, placement_traffic, plan_placement, routing_stats

from benchmarks.placement import skewed_trace


class _NoHostRead(TorchDispatchMode):
    """Fails on any op that reads a tensor value back to the host (item, tolist, nonzero, bool())."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_routing_stats_counts_without_host_read():
    ids = torch.tensor([[0, 2], [2, 3], [0, 2], [1, 0]])
    with _NoHostRead():
        s = routing_stats(ids, 4)
        s2 = s + s
    assert s.tokens_per_expert.tolist() == [3, 1, 3, 1]
    want = torch.zeros(4, 4, dtype=torch.int64)
    for row in ids.tolist():
        for a in row:
            for b in row:
                want[a, b] += 1
    assert torch.equal(s.coselection, want) and int(s.num_tokens) == 4
    assert torch.equal(s2.coselection, 2 * want)


def _skewed_stats(T=8192, E=64, k=8, trace_seed=1):
    scores, partner = skewed_trace(T, E, seed=0, trace_seed=trace_seed)
    return scores.topk(k, -1).indices, partner


def test_plan_balances_and_colocates_the_skewed_trace():
    ids, partner = _skewed_stats()
    held_out, _ = _skewed_stats(trace_seed=2)
    W, R = 8, 2
    plan = plan_placement(routing_stats(ids, 64), W, R)
    again = plan_placement(routing_stats(ids, 64), W, R)
    assert plan == again  # deterministic
    assert plan.counts == (8,) * 8  # E / W per rank: equal memory
    uniform = placement_traffic(held_out, ExpertPlacement.contiguous(64, W), R)
    planned = placement_traffic(held_out, plan, R)
    assert uniform["balancedness"] < 0.85 and planned["balancedness"] > 0.88
    own = torch.tensor(plan.owners)
    assert (own // R == own[partner] // R).double().mean() >= 0.9  # correlated pairs share a node (random: 1/4)
    assert (own == own[partner]).double().mean() >= 0.7  # and mostly a rank (random: 1/8)
    assert planned["cross_node_copies"] <= uniform["cross_node_copies"]


def test_loads_only_balance():
    load = torch.tensor([100, 1, 1, 1, 50, 50, 1, 1, 30, 30, 30, 1])
    plan = plan_placement(load, 4)
    rank_load = [sum(int(load[e]) for e in plan.experts_of(r)) for r in range(4)]
    assert max(rank_load) == 102 and plan.counts == (3, 3, 3, 3)  # the 100 with the two lightest


def test_large_plan_is_fast_and_leaves_ranks_empty_when_w_exceeds_e():
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(4096, 256, generator=g).pow(3).topk(8, -1).indices
    t0 = time.perf_counter()
    plan = plan_placement(routing_stats(ids, 256), 1024, 8)
    took = time.perf_counter() - t0
    assert took < 5.0, f"plan_placement E=256 W=1024 took {took:.2f}s"
    assert max(plan.counts) == 1 and sum(plan.counts) == 256
    per_node = [sum(plan.counts[n * 8 : (n + 1) * 8]) for n in range(128)]
    assert max(per_node) <= 4  # node loads balanced: 2 experts per node on average


@settings(max_examples=examples(25), deadline=None)
@given(E=st.integers(1, 40), W=st.sampled_from([1, 2, 3, 4, 8]), R=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999),
       k=st.integers(1, 4))  # fmt: skip
def test_any_plan_is_a_valid_placement(E, W, R, seed, k):
    R = R if W % R == 0 else 1
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(64, E, generator=g).pow(4).topk(k, -1).indices
    plan = plan_placement(routing_stats(ids, E), W, R)
    cap = -(-E // W)
    assert plan.num_experts == E and plan.world_size == W and max(plan.counts) <= cap
    m = placement_traffic(ids, plan, R)
    assert sum(m["rows_per_rank"]) == 64 * k
    # never worse than the heaviest expert or the mean by more than the heaviest expert (LPT-like bound)
    load = routing_stats(ids, E).tokens_per_expert.double()
    assert max(m["rows_per_rank"]) <= load.sum() / W + cap * load.max() + 1e-9


def test_placement_traffic_counted_by_hand():
    # 4 tokens on 2 ranks (2 each), 4 experts: rank 0 holds 0, 1; rank 1 holds 2, 3; one rank per node
    ids = torch.tensor([[0, 1], [0, 2], [2, 3], [1, 3]])
    m = placement_traffic(ids, ExpertPlacement.contiguous(4, 2), 1)
    assert m["rows_per_rank"] == [4, 4] and m["balancedness"] == 1.0
    # tokens 0, 1 live on rank 0: token 1's expert 2 leaves; tokens 2, 3 on rank 1: token 3's expert 1 leaves
    assert m["cross_rank_rows"] == 2 and m["cross_rank_copies"] == 2 and m["cross_node_copies"] == 2
    m = placement_traffic(ids, ExpertPlacement.from_owners([1, 1, 0, 0], 2), 1)
    assert m["cross_rank_rows"] == 6 and m["cross_rank_copies"] == 4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: plan_placement(s, 0), r"world_size must be a positive int, got 0"),
        (lambda s: plan_placement(s, 4, 3), r"ranks_per_node must be a positive int dividing world_size=4, got 3"),
        (lambda s: plan_placement(s, 2, experts_per_rank=1), r"experts_per_rank \* world_size >= num_experts=4, got 1"),
        (lambda s: plan_placement(s, 2, slack=-1), r"slack must be a finite number >= 0, got -1"),
        (lambda s: plan_placement([1, 2], 2), r"stats must be a RoutingStats .* got list"),
        (lambda s: routing_stats(torch.zeros(3), 4), r"expert_ids must be an integer tensor \[tokens, top_k\], got \(3,\)"),
        (lambda s: s + routing_stats(torch.zeros(1, 1, dtype=torch.long), 5), r"RoutingStats of 4 experts, got 5"),
    ],
)
def test_errors_name_the_argument(call, match):
    s = routing_stats(torch.tensor([[0, 1], [2, 3]]), 4)
    assert isinstance(s, RoutingStats)
    with pytest.raises((ValueError, TypeError), match=match):
        call(s)


def test_benchmark_runs_small(capsys):
    from benchmarks import placement as bench

    rows, _, plan, pairs = bench.run(tokens=1024)
    names = [r["name"].split(",")[0] for r in rows]
    assert names[:2] == names[-3:-1] == ["uniform placement", "data-driven placement"]
    choice = rows[-1]  # expert choice per rank: every expert takes C rows on every rank
    assert "expert choice" in choice["name"] and choice["balancedness"] == 1.0 and choice["rows"] == 1024 * 8
    replicated = [r for r in rows if "extra copies" in r["name"] or "on every node" in r["name"]]
    assert len(replicated) == 3 and all(r["balancedness"] > rows[0]["balancedness"] for r in replicated)
    (every_node,) = [r for r in rows if "on every node" in r["name"]]
    assert every_node["cross_node_rows"] < rows[0]["cross_node_rows"]
    assert rows[-3]["cross_node_copies"] < rows[0]["cross_node_copies"]  # node-limited: at most 2 of 4 nodes
    assert "| routing and placement |" in bench.format_table(rows, markdown=True)
    assert 0 <= pairs["same_rank"] <= pairs["same_node"] <= 1

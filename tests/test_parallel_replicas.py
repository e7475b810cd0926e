"""Replicated (hot) experts: the slot tables, the replica rule, planning, and the layer on gloo (2 and 4 ranks).

Single-process: :class:`ExpertPlacement`'s slots and validation, the replica rule of
``parallel/replicas.py`` (own rank, then own node, then an even spread), and
``plan_placement(replicas=...)`` / ``placement_traffic`` on replicated placements.
Multi-process (``tests/parallel_replica_scenarios.py``, one launch per world size,
with deadlines): the layer against one process holding every expert, training steps,
checkpoints, ``replace_experts`` and bad placements.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import parallel_harness as harness
from blocksparse_moe.parallel import ExpertPlacement, placement_traffic, plan_placement, routing_stats
from blocksparse_moe.parallel.replicas import ReplicaRule, primary_rows, replica_candidates
from parallel_replica_scenarios import holders

gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# --------------------------------------------------------------------------- slot tables
def test_slot_tables_of_a_replicated_placement():
    pl = ExpertPlacement.from_rank_experts([[0, 1], [0, 2], [3], [0, 4]], replicas=True)
    assert pl.ranks == ((0, 1, 3), (0,), (1,), (2,), (3,)) and pl.replicated
    assert pl.experts_of(1) == (0, 2) and pl.counts == (2, 2, 1, 2)
    assert pl.num_slots == 7
    assert pl.slot_expert == (0, 1, 0, 2, 3, 0, 4) and pl.slot_rank == (0, 0, 1, 1, 2, 3, 3)
    assert pl.slots_of_expert[0] == (0, 2, 5) and list(pl.slots_of(3)) == [5, 6]
    sp = pl.slot_placement
    assert not sp.replicated and sp.is_contiguous and sp.counts == pl.counts
    assert pl.primary == (0, 0, 1, 2, 3) and primary_rows(pl, 1) == [1] and primary_rows(pl, 0) == [0, 1]
    # the same placement, listed per expert in another order: equal values
    assert ExpertPlacement.from_ranks([[3, 0, 1], [0], [1], [2], [3]], 4) == pl
    assert pl.fingerprint == pl.ranks
    single = ExpertPlacement.from_owners([1, 0, 1], 2)
    assert not single.replicated and single.fingerprint == single.owners == (1, 0, 1)
    assert single.slot_expert == single.order and single.slot_placement.counts == single.counts


def test_one_rank_per_expert_views_refuse_a_replicated_placement():
    pl = ExpertPlacement.from_ranks([[0, 1], [1]], 2)
    for attr in ("owners", "position"):
        with pytest.raises(ValueError, match=rf"ExpertPlacement.{attr} needs one rank per expert; .*expert\(s\) \[0\]"):
            getattr(pl, attr)
    assert not pl.is_contiguous


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ExpertPlacement.from_ranks([[0, 0], [1]], 2), r"ranks\[0\] = \(0, 0\): a rank is listed twice"),
        (lambda: ExpertPlacement.from_ranks([[0, 2], [1]], 2), r"ranks\[0\] = \(0, 2\): ranks must be ints in \[0, world_size=2\)"),
        (lambda: ExpertPlacement.from_ranks([[0, 1, 0], [1]], 2), r"3 replicas of expert 0, more than world_size=2"),
        (lambda: ExpertPlacement.from_ranks([[0], []], 2), r"ranks\[1\] must be a non-empty tuple"),
        (lambda: ExpertPlacement.from_rank_experts([[0, 1], [1]]), r"expert 1 is listed for rank 0 and rank 1: each expert must be placed exactly once \(pass replicas=True"),
        (lambda: ExpertPlacement.from_rank_experts([[0, 0], [1]], replicas=True), r"experts_per_rank\[0\] = \[0, 0\] lists expert 0 twice"),
        (lambda: ExpertPlacement.from_rank_experts([[0], [0]], 2, replicas=True), r"places no rank for expert\(s\) \[1\]: .* at least once"),
    ],
)  # fmt: skip
def test_bad_replicated_placements_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_from_ranks_needs_sequences():
    with pytest.raises(TypeError, match="ranks_per_expert must be a sequence of rank sequences"):
        ExpertPlacement.from_ranks([0, 1], 2)


# --------------------------------------------------------------------------- the replica rule
def test_the_rule_prefers_the_own_rank_then_the_node_then_spreads():
    # expert 0 on ranks 0 and 2 (nodes 0 and 1 of two ranks each), expert 1 on rank 3 alone
    pl = ExpertPlacement.from_ranks([[0, 2], [3]], 4)
    node_of = (0, 0, 1, 1)
    s0 = pl.slots_of_expert[0]
    assert replica_candidates(pl, 0, node_of)[0] == [s0[0]]  # own rank
    assert replica_candidates(pl, 3, node_of)[0] == [s0[1]]  # own node (rank 2)
    assert replica_candidates(pl, 3, None)[0] == list(s0)  # no layout: every replica
    two = ExpertPlacement.from_ranks([[0, 2], [3]], 4)
    rule = ReplicaRule(two, None, ranks=(1,))
    ids = torch.zeros(1000, 1, dtype=torch.long)
    slots = rule.slots(ids, torch.arange(1000))
    assert torch.bincount(slots.view(-1), minlength=3)[:2].tolist() == [500, 500]  # an even split
    again = rule.slots(ids, torch.arange(1000))
    assert torch.equal(slots, again)  # deterministic


def test_the_rule_spreads_over_three_replicas_and_the_topk_position():
    pl = ExpertPlacement.from_ranks([[0, 1, 2], [0], [1]], 4)
    rule = ReplicaRule(pl, None, ranks=(3,))
    ids = torch.tensor([[0, 1]] * 6)
    slots = rule.slots(ids, torch.arange(6))
    counts = torch.bincount(slots[:, 0], minlength=pl.num_slots)
    assert counts[list(pl.slots_of_expert[0])].tolist() == [2, 2, 2]
    assert (slots[:, 1] == pl.slots_of_expert[1][0]).all()


# --------------------------------------------------------------------------- planning
def _trace(T=4096, E=16, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, E + 1, dtype=torch.float64) ** -1.5
    return torch.multinomial(p.expand(T, E), k, generator=g)


def test_plan_placement_with_replicas_balances_and_counts_slots():
    ids = _trace()
    stats = routing_stats(ids, 16)
    plain = plan_placement(stats, 4, 2)
    rep = plan_placement(stats, 4, 2, replicas=4, experts_per_rank=5)
    assert not plain.replicated and rep.replicated
    assert max(rep.counts) <= 5 and rep.num_slots == 16 + 4
    load = stats.tokens_per_expert
    by_load = load.argsort(descending=True, stable=True).tolist()
    copies = [len(rep.ranks[e]) for e in by_load]
    assert copies == sorted(copies, reverse=True) and sum(copies) == 20 and copies[0] > 1  # the hottest get them
    # each extra copy went to the largest load per copy
    per_copy = [float(load[e]) / len(rep.ranks[e]) for e in range(16)]
    assert max(per_copy) <= min(float(load[e]) / (len(rep.ranks[e]) - 1) for e in range(16) if len(rep.ranks[e]) > 1)
    assert rep == plan_placement(stats, 4, 2, replicas=4, experts_per_rank=5)  # deterministic
    a, b = placement_traffic(ids, plain, 2), placement_traffic(ids, rep, 2)
    assert b["balancedness"] > a["balancedness"] and b["balancedness"] > 0.9
    assert sum(b["rows_per_rank"]) == ids.numel()


def test_plan_placement_node_replicas_puts_the_hottest_on_every_node():
    ids = _trace()
    stats = routing_stats(ids, 16)
    W, R = 8, 2  # 4 nodes
    pl = plan_placement(stats, W, R, node_replicas=3)
    hot = stats.tokens_per_expert.argsort(descending=True, stable=True)[:3].tolist()
    for e in range(16):
        nodes = sorted(r // R for r in pl.ranks[e])
        assert nodes == ([0, 1, 2, 3] if e in hot else nodes[:1]), (e, pl.ranks[e])  # one copy on each node
    assert pl.num_slots == 16 + 3 * 3 and max(pl.counts) <= -(-(16 + 9) // W)
    assert pl == plan_placement(stats, W, R, node_replicas=3)  # deterministic
    # rows of those experts never cross a node: the rule finds the copy on the token's node
    only_hot = torch.tensor(hot)[torch.randint(0, 3, (64, 1), generator=torch.Generator().manual_seed(0))]
    assert placement_traffic(only_hot, pl, R)["cross_node_rows"] == 0
    assert placement_traffic(only_hot, plan_placement(stats, W, R), R)["cross_node_rows"] > 0
    with pytest.raises(ValueError, match=r"node_replicas must be an int in \[0, num_experts=16\] .*, got 17"):
        plan_placement(stats, W, R, node_replicas=17)
    assert not plan_placement(stats, W, node_replicas=3).replicated  # one node: nothing to copy


def test_plan_placement_replica_arguments():
    stats = routing_stats(_trace(), 16)
    with pytest.raises(ValueError, match=r"replicas must be an int >= 0 \(extra expert copies\), got -1"):
        plan_placement(stats, 4, replicas=-1)
    with pytest.raises(
        ValueError,
        match=r"experts_per_rank \* world_size >= num_experts \+ replicas=20 \(it counts every copy\), got 4",
    ):
        plan_placement(stats, 4, replicas=4, experts_per_rank=4)
    assert not plan_placement(stats, 4, replicas=0).replicated


def test_placement_traffic_uses_the_layers_rule():
    pl = ExpertPlacement.from_ranks([[0, 1], [1]], 2)
    ids = torch.tensor([[0], [0], [0], [0]])  # tokens 0, 1 on rank 0; 2, 3 on rank 1
    m = placement_traffic(ids, pl)
    assert m["rows_per_rank"] == [2, 2] and m["cross_rank_rows"] == 0  # each token uses its own rank's replica


# --------------------------------------------------------------------------- the layer, on gloo
NAMES = ["replicas_vs_single", "replicas_training", "replicas_checkpoint", "replicas_replace", "replicas_traffic",
         "replicas_bad_placements"]  # fmt: skip


@pytest.fixture(scope="module", params=[2, 4], ids=["two_ranks", "four_ranks"])
def launch(request):
    with tempfile.TemporaryDirectory(prefix="bsmoe-replicas-") as directory:
        run = harness.launch(request.param, NAMES, timeout=240, pg_timeout=60, env={"BSMOE_CKPT_DIR": directory})
        from parallel_replica_scenarios import single_process_load

        loaded = None
        if run.get("replicas_checkpoint")[0] and run.get("replicas_checkpoint")[0].get("status") == "ok":
            loaded = single_process_load(directory, request.param)
            meta = dcp.FileSystemReader(os.path.join(directory, f"rep{request.param}")).read_metadata()
            full = torch.load(os.path.join(directory, f"rep{request.param}.full.pt"))
            loaded = (loaded, meta, full)
        yield run, loaded


@gloo
def test_replicated_layer_equals_one_process(launch):
    run, _ = launch
    per_rank = run.check("replicas_vs_single")
    W = run.world_size
    modes = [m for m in per_rank[0] if m not in ("status", "seconds")]
    assert {"flat", "capacity", "chunks", "bounded", "flat_nodes"} <= set(modes)
    assert ("hierarchical" in modes) == (W == 4)
    for mode in modes:
        assert per_rank[0][mode]["replica_bytes"] > 0, mode  # the replica gradient sum ran
        # a token prefers its own rank's replica: expert 0 is on every rank, so rank 1
        # (no tokens) computes no row of it, whoever chose it
        local = [e for e, h in enumerate(holders(W)) if 1 in h]
        assert per_rank[1][mode]["local_rows"][local.index(0)] == 0, mode
        assert sum(sum(r[mode]["local_rows"]) for r in per_rank) == (9 if W == 2 else 15) * 3  # every row once


@gloo
def test_training_keeps_replicas_identical(launch):
    run, _ = launch
    per_rank = run.check("replicas_training")
    labels = [k for k, v in per_rank[0].items() if isinstance(v, dict)]
    assert labels == (["ep"] if run.world_size == 2 else ["ep", "dp2_ep2"])
    for label in labels:
        assert per_rank[0][label]["identical"], label
        assert len({tuple(x[label]["norms"]) for x in per_rank}) == 1  # one norm, the same everywhere


@gloo
def test_checkpoint_stores_one_copy_and_loads_anywhere(launch):
    run, loaded = launch
    run.check("replicas_checkpoint")
    state, meta, full = loaded
    keys = [k for k in meta.state_dict_metadata if ".expert." in k and k.startswith("model.")]
    E = 6 if run.world_size == 2 else 8
    assert len(keys) == 3 * E  # w1, w2, v1 once per global expert
    for k in keys:
        assert len(meta.state_dict_metadata[k].chunks) == 1
    writers = {}
    for idx, info in meta.storage_data.items():
        writers.setdefault(idx.fqn, []).append(info.relative_path)
    assert all(len(v) == 1 for k, v in writers.items() if k in keys), "an expert was written twice"
    assert state["moe.w1"].shape[0] == E
    for key, value in full.items():  # a plain dMoE process reads every expert back, bit for bit
        assert torch.equal(state[key], value), key


@gloo
def test_layer_traffic_is_what_placement_traffic_predicts(launch):
    run, _ = launch
    per_rank = run.check("replicas_traffic")
    assert sum(per_rank[0]["rows_per_rank"]) == 12 * 3 * run.world_size


@gloo
def test_replace_experts_into_and_out_of_replicas(launch):
    run, _ = launch
    per_rank = run.check("replicas_replace")
    moves = per_rank[0]["moves"]
    assert len(moves) == 2 and all(m[0] > 0 for m in moves)


@gloo
def test_bad_placements_raise_on_every_rank(launch):
    run, _ = launch
    per_rank = run.check("replicas_bad_placements")
    for name in ("no_replica", "rank_out_of_range", "twice_on_a_rank", "more_replicas_than_ranks",
                 "wrong_expert_count"):  # fmt: skip
        assert len({r[name] for r in per_rank}) == 1, name
    assert "places no rank for expert(s) [3]" in per_rank[0]["no_replica"]
    assert "ranks must be ints in [0, world_size=" in per_rank[0]["rank_out_of_range"]
    assert "a rank is listed twice" in per_rank[0]["twice_on_a_rank"]
    assert "more than world_size=" in per_rank[0]["more_replicas_than_ranks"]
    assert "places 3 experts" in per_rank[0]["wrong_expert_count"]


@gloo
def test_hugging_face_experts_with_replicas():
    pytest.importorskip("transformers", minversion="5.23", reason="needs the [hf] extra (transformers>=5.23)")
    with tempfile.TemporaryDirectory(prefix="bsmoe-replicas-hf-") as directory:
        run = harness.launch(2, ["replicas_hf_mixtral"], timeout=150, pg_timeout=40, env={"BSMOE_CKPT_DIR": directory})
        per_rank = run.check("replicas_hf_mixtral")
    holders = per_rank[0]["holders"]
    for key in per_rank[0]["experts"]:  # each rank holds exactly the experts the placement gives it
        for rank, r in enumerate(per_rank):
            assert r["experts"][key] == [e for e, h in enumerate(holders) if rank in h]

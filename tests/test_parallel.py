"""Expert parallelism on CPU (gloo): the sharded layer equals one process holding every expert.

Each world size is one launch of worker processes (tests/parallel_harness.py) that
runs every scenario (tests/parallel_scenarios.py) in turn; each test below checks
one scenario's per-rank report. In a scenario every rank builds the same full dMoE,
computes the single-process reference on the concatenation of all ranks' tokens,
and compares, in fp32:

* its output rows and input gradient with the reference's rows for its tokens;
* the router gradient, summed over ranks (``sync_router_grad``), with the reference's;
* the gradients of its expert shards with the reference's slices.

The loss is the sum over ranks of ``<out_r, g_r>``. Every join has a deadline (the
harness kills stragglers), every process group a short timeout, and a worker that
aborts at teardown after reporting everything is a warning, not a failure.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

COMMON = [
    "uneven",
    "zero_tokens",
    "hot_rank",
    "topk_gt_local",
    "glu_recompute",
    "x_without_grad",
    "two_layers",
    "aux_and_stats",
    "capacity_exact",
    "capacity_drop",
    "capacity_overflow_error",
    "replicated_router",
    "sharding",
]
TWO = COMMON + ["world_size_one", "triton_interpreter"]  # the interpreter case is ~3 s on 2 ranks
FOUR = COMMON


@pytest.fixture(scope="module")
def two_ranks():
    return harness.launch(2, TWO, timeout=120, pg_timeout=30)


@pytest.fixture(scope="module")
def four_ranks():
    return harness.launch(4, FOUR, timeout=150, pg_timeout=30)


def _consistent_traffic(per_rank):
    """What rank s sent to rank r is what rank r received from s."""
    W = len(per_rank)
    for r in range(W):
        for s in range(W):
            assert per_rank[r]["recv_rows"][s] == per_rank[s]["send_rows"][r], (r, s, per_rank)


@pytest.mark.parametrize("name", TWO)
def test_two_ranks(two_ranks, name):
    per_rank = two_ranks.check(name)
    if per_rank[0].get("recv_rows") is not None and name != "world_size_one":
        _consistent_traffic(per_rank)


@pytest.mark.parametrize("name", FOUR)
def test_four_ranks(four_ranks, name):
    per_rank = four_ranks.check(name)
    if per_rank[0].get("recv_rows") is not None:
        _consistent_traffic(per_rank)


@pytest.mark.parametrize("fixture", ["two_ranks", "four_ranks"])
def test_premises(request, fixture):
    """The cases exercise what they claim: a rank without tokens, one hot rank, drops."""
    launch = request.getfixturevalue(fixture)
    W = launch.world_size
    zero = launch.check("zero_tokens")
    assert zero[0]["tokens"] == 0 and zero[0]["send_rows"] == [0] * W
    hot = launch.check("hot_rank")
    assert all(r["recv_rows"] == [0] * W for r in hot[:-1]) and sum(hot[-1]["recv_rows"]) > 0
    assert sum(r["dropped"] for r in launch.check("capacity_drop")) > 0


def test_harness_counts_a_teardown_abort_as_a_pass():
    """A rank that reported everything then died in teardown (SIGABRT) passes with a warning."""
    done = {"finished": True, "scenarios": {"s": {"status": "ok"}}}
    launch = harness.Launch(2, [done, done], exitcodes=[0, -6], killed=[False, False], seconds=0.0)
    with pytest.warns(RuntimeWarning, match="teardown abort"):
        launch.check("s")
    hung = harness.Launch(2, [done, {"scenarios": {}}], exitcodes=[0, -9], killed=[False, True], seconds=0.0)
    with pytest.raises(AssertionError, match="did not report"):
        hung.check("s")


# --------------------------------------------------------------------------- in-process (no group)
def test_needs_an_initialized_process_group():
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, block_size=16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelDMoE(cfg, name="m")
    with pytest.raises(ValueError, match="capacity_per_peer"):
        ExpertParallelDMoE(cfg, capacity_per_peer=0)
    with pytest.raises(ValueError, match="capacity_overflow"):
        ExpertParallelDMoE(cfg, capacity_overflow="pad")


def test_offline_sharding():
    from blocksparse_moe.parallel import ExpertPlacement, expert_range, shard_state_dict

    full = {
        "a.router.weight": torch.randn(6, 4),
        "a.w1": torch.randn(6, 4, 5),
        "a.w2": torch.randn(6, 5, 4),
        "b": torch.ones(2),
    }
    assert list(expert_range(1, 3, 6)) == [2, 3]
    shard = shard_state_dict(full, rank=2, world_size=3)
    assert torch.equal(shard["a.w1"], full["a.w1"][4:6]) and torch.equal(shard["a.w2"], full["a.w2"][4:6])
    assert shard["a.router.weight"] is full["a.router.weight"] and shard["b"] is full["b"]
    # E need not divide the group: the first E % W ranks hold one more expert.
    assert [list(expert_range(r, 4, 6)) for r in range(4)] == [[0, 1], [2, 3], [4], [5]]
    placed = shard_state_dict(full, rank=0, world_size=2, placement=ExpertPlacement.from_owners([1, 0, 0, 1, 0, 1], 2))
    assert torch.equal(placed["a.w1"], full["a.w1"][[1, 2, 4]])
    with pytest.raises(ValueError, match="rank and world_size"):
        shard_state_dict(full)


def test_launch_time_is_reported(two_ranks):
    """Keep an eye on the CI budget (the whole multi-process suite must stay under two minutes)."""
    if two_ranks.seconds > 60:
        warnings.warn(f"the two-rank launch took {two_ranks.seconds:.0f} s", RuntimeWarning)

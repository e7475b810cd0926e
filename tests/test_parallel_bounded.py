"""``ExpertParallelDMoE(max_recv_rows=R)``: dropless within a receive bound, equal to one process (gloo, CPU).

Every token routed to one rank and ``R`` a quarter of its rows forces at least four
rounds; outputs and every gradient are compared with one process holding every expert
(``tests/parallel_bounded_scenarios.py``), and the peak rows any rank received at once,
from the layer's statistics, never exceed ``R``. Each world size is one launch with
a deadline (the harness kills what is left), so nothing hangs.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

SCENARIOS = ["bounded_hot_rank", "bounded_glu_zero_tokens", "bounded_fits", "bounded_two_layers", "bounded_mismatch"]


@pytest.fixture(scope="module", params=[2, 4], ids=["two_ranks", "four_ranks"])
def launch(request):
    return harness.launch(request.param, SCENARIOS, timeout=120, pg_timeout=30)


@pytest.mark.parametrize("name", SCENARIOS)
def test_bounded(launch, name):
    per_rank = launch.check(name)
    W = launch.world_size
    if name == "bounded_mismatch":
        assert len({r["message"] for r in per_rank}) == 1  # the same error on every rank
        return
    if name == "bounded_two_layers":
        for layer in per_rank[0]["layers"].values():
            assert max(layer["peak_recv_rows_per_rank"]) <= per_rank[0]["max_recv_rows"]
        return
    for r in range(W):  # what rank s sent to rank r is what r received from s
        for s in range(W):
            assert per_rank[r]["recv_rows"][s] == per_rank[s]["send_rows"][r]
    assert len({r["rounds"] for r in per_rank}) == 1  # every rank ran the same rounds
    R = per_rank[0]["max_recv_rows"]
    assert all(r["peak_recv_rows"] <= R for r in per_rank)
    assert sum(per_rank[-1]["recv_rows"]) == per_rank[0]["hot_rows"] and per_rank[0]["dropped"] == 0


def test_bad_options_raise_before_any_collective():
    """Local checks, in the constructor before the process group is touched: no group needed."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, block_size=16)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"max_recv_rows must be None or a positive int, got"):
            ExpertParallelDMoE(cfg, max_recv_rows=bad, name="m")
    for kw, shown in ((dict(capacity_per_peer=8), "capacity_per_peer=8"), (dict(hierarchy="node"), "hierarchy='node'"),
                      (dict(chunks=2), "chunks=2")):  # fmt: skip
        with pytest.raises(ValueError, match=r"max_recv_rows=4 bounds the flat variable-size exchange only") as e:
            ExpertParallelDMoE(cfg, max_recv_rows=4, name="m", **kw)
        assert shown in str(e.value) and "'m'" in str(e.value)


def test_round_schedule():
    from blocksparse_moe.parallel.bounded import round_schedule

    m = [[0, 5, 3], [0, 0, 4], [0, 9, 0]]  # rank 1 receives 14, rank 2 receives 7
    sch = round_schedule(m, 4)
    assert sch.rounds == 4 and sch.peak == [0, 4, 4]
    for s in range(3):  # every row travels exactly once, in order
        for p in range(3):
            spans = [sch.parts[j][s][p] for j in range(sch.rounds)]
            assert spans[0][0] == 0 and spans[-1][1] == m[s][p]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert round_schedule([[0, 0], [0, 0]], 3).rounds == 1

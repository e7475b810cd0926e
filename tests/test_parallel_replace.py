"""``ExpertParallelDMoE.replace_experts``: move experts and their optimizer state between steps (gloo, CPU).

``replace_experts_equal`` trains two identical layers for 5 AdamW steps, one of them
moved to a scrambled placement (the last rank holding no expert, E not a multiple of W)
before step 2: every loss and the final weights, gathered by global expert id, equal
the unmoved run's. ``replace_experts_mismatch``: a rank passing another placement
raises on every rank and nothing moves. Scenarios in ``tests/parallel_longrun_scenarios.py``;
each world size is one launch with a deadline.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module", params=[2, 4], ids=["two_ranks", "four_ranks"])
def launch(request):
    return harness.launch(request.param, ["replace_experts_equal", "replace_experts_mismatch"], timeout=120,
                          pg_timeout=30)  # fmt: skip


def test_move_changes_nothing(launch):
    per_rank = launch.check("replace_experts_equal")
    for mode in ("mlp", "glu"):
        assert len({tuple(r[mode]["losses"]) for r in per_rank}) == 1  # the all-reduced losses agree
        assert per_rank[0][mode]["moved"] > 0
        assert sum(r[mode]["sent"] for r in per_rank) == sum(r[mode]["received"] for r in per_rank)
        assert sum(r[mode]["bytes_sent"] for r in per_rank) == sum(r[mode]["bytes_received"] for r in per_rank) > 0


def test_mismatched_placement_raises_everywhere(launch):
    per_rank = launch.check("replace_experts_mismatch")
    assert len({r["message"] for r in per_rank}) == 1 and "new placement" in per_rank[0]["message"]

"""Data parallel x expert parallel on 4 gloo ranks: one training step equals one process holding everything.

One launch (tests/parallel_harness.py) runs every scenario of tests/parallel_mesh_scenarios.py:

* dp x ep = 2 x 2 and 1 x 4 (a DeviceMesh with dims ("dp", "ep")), MLP and GLU experts:
  forward, backward, ``reduce_gradients`` (experts over dp, the rest over dp x ep, DDP's
  mean), an SGD step; loss, every gradient, the global gradient norm and every
  parameter after the step against one process on the whole global batch; the
  inf norm and ``clip_grad_norm_``;
* the same beside DDP (2 x 2, and 1 x 4 where DDP shares the default group with the
  all-to-alls) and beside FSDP2 (``fully_shard``) on the non-expert parameters;
* placements: E=6 over 4 ranks, a permuted placement, a rank holding no expert, and
  the fixed-capacity mode under that placement (plus ``gather_state_dict``);
* ``collect_load_stats``: the group's load per expert and per rank, balancedness,
  the traffic matrix and byte counts, and the reset.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

STEPS = [
    "mesh_2x2", "mesh_2x2_glu", "mesh_1x4", "mesh_1x4_glu", "mesh_2x2_ddp", "mesh_1x4_ddp", "mesh_2x2_fsdp2",
    "mesh_2x2_clip",
]  # fmt: skip
PLACEMENTS = ["placement_e6", "placement_permuted", "placement_empty_rank", "placement_capacity"]
STATS = ["load_stats"]


@pytest.fixture(scope="module")
def four_ranks():
    return harness.launch(4, STEPS + PLACEMENTS + STATS, timeout=150, pg_timeout=30)


@pytest.mark.parametrize("name", STEPS + PLACEMENTS + STATS)
def test_four_ranks(four_ranks, name):
    four_ranks.check(name)


def test_empty_rank_really_is_empty(four_ranks):
    per_rank = four_ranks.check("placement_empty_rank")
    assert [r["experts"] for r in per_rank] == [[1, 2], [], [3, 4], [0, 5]]
    stats = four_ranks.check("load_stats")
    assert stats[1]["rows_per_rank"][1] == 0 and 0 < stats[0]["balancedness"] < 1

"""Expert parallelism, faults and bad input (gloo on CPU): errors that name the rank, field or layer, never a hang.

* Configurations that differ across ranks (E, hidden size, top_k, dtype) fail in
  the constructor on every rank with a ConfigMismatchError naming the rank and field.
* A placement missing an expert, or a mesh without an "ep" dim, fails on every rank
  before any collective with a ValueError naming it; valid placements that differ
  across ranks fail the configuration check.
* Bad input on one rank: it raises its own error, and still joins the count exchange
  with a sentinel, so the others raise PeerFailedError naming it at once (no timeout).
* A collective that times out (the group's timeout, or the layer's own, shorter
  one) raises CollectiveError naming the layer and the collective.
* A rank that dies makes the others' next collective fail (gloo sees the closed
  connection at once; a silent peer would hit the timeout), naming the layer.

The scenarios are in tests/parallel_fault_scenarios.py, launched by tests/parallel_harness.py.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

CONFIG = [
    "mismatch_num_experts", "mismatch_hidden_size", "mismatch_top_k", "mismatch_dtype", "mismatch_placement",
    "placement_missing_expert", "mesh_without_ep",
]  # fmt: skip
BAD_INPUT = ["bad_input_one_rank"]
TIMEOUTS = ["group_timeout", "layer_timeout"]  # last: they leave their groups unusable


@pytest.fixture(scope="module")
def faults():
    return harness.launch(2, CONFIG + BAD_INPUT + TIMEOUTS, timeout=90, pg_timeout=20)


@pytest.fixture(scope="module")
def death():
    return harness.launch(3, ["dead_rank"], timeout=60, pg_timeout=10)


@pytest.mark.parametrize("name", CONFIG)
def test_config_checked_up_front(faults, name):
    per_rank = faults.check(name)
    # Every rank raised the same message: nobody was left waiting.
    assert len({r["message"] for r in per_rank}) == 1, per_rank


def test_bad_input_on_one_rank_fails_every_rank_at_once(faults):
    per_rank = faults.check("bad_input_one_rank")
    for mode in range(2):  # variable splits, fixed capacity
        assert "hidden_size=16" in per_rank[1]["messages"][mode]  # the culprit reports its own error
        assert "rank(s) [1]" in per_rank[0]["messages"][mode]  # its peer names it


@pytest.mark.parametrize("name", TIMEOUTS)
def test_timeout_names_the_layer(faults, name):
    per_rank = faults.check(name)
    assert "elapsed" in per_rank[0] and "count exchange" in per_rank[0]["message"]


def test_dead_rank_fails_the_others(death):
    per_rank = death.check("dead_rank")
    assert death.exitcodes[2] == 17, death.summary()  # it died on purpose, without teardown
    for rank in (0, 1):
        assert per_rank[rank]["elapsed"] < 10, per_rank[rank]  # within the group's timeout
        assert not death.killed[rank], death.summary()  # a teardown abort is only warned about (check)

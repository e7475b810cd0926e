"""Expert-choice routing and shared experts under expert parallelism, on gloo at 2 and 4 ranks.

The scenarios (tests/parallel_routing_scenarios.py) compare outputs and every
gradient with one process; here each world size is one launch, and the per-rank
reports are checked for what the scenarios cannot see alone (the ranks' agreement).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

CASES = ["shared_token_choice", "shared_gated_mlp", "choice_basic", "choice_glu_shared", "choice_all_tokens",
         "choice_node", "choice_fixed_capacity", "shared_beside_counts", "limited_softmax",
         "limited_sigmoid_bias"]  # fmt: skip


@pytest.fixture(scope="module")
def two():
    return harness.launch(2, CASES, timeout=90, pg_timeout=20)


@pytest.fixture(scope="module")
def four():
    return harness.launch(4, CASES, timeout=120, pg_timeout=30)


@pytest.mark.parametrize("launch", ["two", "four"])
@pytest.mark.parametrize("name", CASES)
def test_equals_one_process(request, launch, name):
    per_rank = request.getfixturevalue(launch).check(name)
    if name == "shared_beside_counts":  # checked in the scenario (trace orders on every rank)
        return
    if name == "choice_all_tokens":  # k = E, capacity factor 1: every expert takes every token
        assert all(r["unrouted"] == 0 and r["capacity"] == r["tokens"] for r in per_rank), per_rank
    for r in per_rank:  # a rank with no tokens: its experts pick none of them, and it still joins the exchange
        if name.startswith("choice") and r["tokens"] == 0:
            assert r["capacity"] == 0 and sum(r["send_rows"]) == 0, per_rank

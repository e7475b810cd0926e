"""Two micro-batches interleaved through expert-parallel blocks, on gloo at 2 and 4 ranks (issue 13, item 3).

The scenarios (tests/parallel_microbatch_scenarios.py) compare ``interleaved_forward``
with one process and with the micro-batches run one after another, outputs and every
gradient; check by timestamps that one micro-batch's dense part runs while the other's
counts travel; and that a dense part failing on one rank raises on every rank. Each
world size is one launch (with a deadline: nothing hangs).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

CASES = ["mb_flat", "mb_node", "mb_chunks", "mb_capacity", "mb_overlap", "mb_beside_raises_fails",
         "mb_beside_width_fails", "mb_first_dense_fails", "mb_layer_beside"]  # fmt: skip


def _launch(world_size, timeout, pg_timeout):
    return harness.launch(world_size, CASES, timeout=timeout, pg_timeout=pg_timeout)


@pytest.fixture(scope="module")
def two():
    return _launch(2, timeout=90, pg_timeout=20)


@pytest.fixture(scope="module")
def four():
    return _launch(4, timeout=120, pg_timeout=30)


@pytest.mark.parametrize("launch", ["two", "four"])
@pytest.mark.parametrize("name", CASES)
def test_interleaved(request, launch, name):
    per_rank = request.getfixturevalue(launch).check(name)
    if name.endswith("_fails"):
        assert [r["raised"] for r in per_rank].count("PeerFailedError") == len(per_rank) - 1, per_rank
    if name.startswith("mb_") and "collectives" in per_rank[0]:
        # the same collectives on every rank (checked in the scenario); backward: the last block first
        backward = per_rank[0]["backward_layers"]
        assert backward == sorted(backward, reverse=True) and len(set(backward)) == 2, backward
        if name != "mb_capacity":  # variable mode: one host read per layer call, interleaved or not
            assert all(h == 1 for r in per_rank for h in r["host_reads"]), per_rank


def test_bad_arguments():
    """Refused before any layer runs (no process group needed): the argument, the value, what was expected."""
    import re

    import torch

    from blocksparse_moe.parallel import interleaved_forward

    x = [torch.zeros(2, 4)]
    cases = [
        (([], x), "blocks must be a non-empty sequence of (dense, moe) pairs, got an empty list"),
        ((torch.nn.Linear(4, 4), x), "blocks must be a non-empty sequence of (dense, moe) pairs, got Linear"),
        (([(abs,)], x), "blocks[0] must be a (dense, moe) pair, got a tuple of length 1"),
        (([(1, 2)], x), "blocks[0][0] (the dense part) must be callable, got int"),
        (
            ([(abs, torch.nn.Linear(4, 4))], x),
            "blocks[0][1] (the MoE part) must be an ExpertParallelDMoE, got Linear",
        ),
    ]
    for args, msg in cases:
        with pytest.raises(TypeError, match=re.escape(msg)):
            interleaved_forward(*args)
    with pytest.raises(TypeError, match="return_aux must be a bool, got 1"):
        interleaved_forward([(abs, None)], x, return_aux=1)
    with pytest.raises(
        TypeError, match=re.escape("microbatches must be a non-empty list of tensors (one per micro-batch), got Tensor")
    ):
        interleaved_forward(None, torch.zeros(2, 4))

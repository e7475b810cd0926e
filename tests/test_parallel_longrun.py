"""The expert-parallel layer over a long run (issue 18): flat memory while routing shifts, the same bits run to run.

``ep_long_run`` (``tests/parallel_longrun_scenarios.py``) trains the layer with AdamW on 4
gloo ranks for 120 steps, token counts changing every step (a rank sometimes has none)
and the hot expert moving across the ranks. Asserted on every rank:

* after warm-up nothing accumulates: live tensors (count and bytes) never above the
  warm-up census, tracked Python objects and container items within a slack of 20
  (a statistic kept per step, or per new token count, would exceed it), and the
  peak resident memory of the second half within 5% of the first (the heap trimmed
  before each peak reset: ``test_memory_flat._trim_heap``);
* two launches at the same world size give bitwise identical losses, parameters and
  optimizer state (the digest), on every rank.

One launch per run (two in all, ~40 s here), each with a deadline: nothing hangs.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

SLACK = 20
W = 4


@pytest.fixture(scope="module")
def runs():
    return [harness.launch(W, ["ep_long_run"], timeout=240, pg_timeout=60).check("ep_long_run") for _ in range(2)]


def test_memory_flat_on_every_rank(runs):
    for rank, r in enumerate(runs[0]):
        base = r["base"]
        assert r["empty_steps"] > 0, r  # the premise: a rank with no tokens on some steps
        for c in r["later"]:
            for key in ("tensors", "tensor bytes"):
                assert c[key] <= base[key], f"rank {rank}: live {key} grew: {base[key]} after warm-up, {c[key]} later"
            for key in ("objects", "items"):
                assert c[key] <= base[key] + SLACK, f"rank {rank}: Python {key} grew: {base[key]} -> {c[key]}"
        if r["reset"]:
            first, second = r["peaks"]
            bound = 1.05 * first
            assert second <= bound, f"rank {rank}: peak resident memory {first} KiB, then {second} KiB (bound {bound:.0f})"


def test_same_bits_across_launches(runs):
    first, second = ([r["digest"] for r in run] for run in runs)
    assert first == second, f"per-rank digests differ between two launches: {first} vs {second}"
    assert len(set(first)) == W  # each rank holds its own experts (and its own optimizer state)

"""Resharding checkpoints on gloo: EP=4 -> EP=2 -> EP=1 (this process, no process group) -> EP=4.

Two launches of 4 ranks (tests/parallel_harness.py, scenarios in
tests/parallel_ckpt_scenarios.py) around one single-process step here: after five
Adam steps taken at three expert-parallel degrees and two placements (the last one
permuted, with a rank holding no expert), the loss and every parameter equal those
of one process that ran the five steps without interruption. A checkpoint of
another expert count or expert shape raises on every rank, naming the parameter.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_harness as harness
from parallel_ckpt_scenarios import single_process_step

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

BAD = ["ckpt_wrong_experts", "ckpt_wrong_shape"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bsmoe-ckpt"))
    env = {"BSMOE_CKPT_DIR": directory}
    first = harness.launch(4, ["ckpt_ep4_then_ep2"], timeout=90, pg_timeout=30, env=env)
    first.check("ckpt_ep4_then_ep2")
    assert not dist.is_initialized()  # EP=1 really is one plain process
    single_process_step(directory)
    second = harness.launch(4, ["ckpt_resume_ep4"] + BAD, timeout=90, pg_timeout=30, env=env)
    return {"first": first, "second": second, "directory": directory}


def test_round_trip_equals_an_uninterrupted_run(run):
    per_rank = run["second"].check("ckpt_resume_ep4")
    assert [r["experts"] for r in per_rank] == [[1, 2, 6], [], [3, 4], [0, 5, 7]]


def test_checkpoint_is_keyed_by_global_expert(run):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(f"{run['directory']}/ep4").read_metadata().state_dict_metadata
    assert {f"model.moe.w1.expert.{e}" for e in range(8)} <= set(meta)
    assert "model.moe.w1" not in meta and tuple(meta["model.moe.w1.expert.3"].size) == (16, 24)
    assert "optim.state.moe.v1.expert.7.exp_avg_sq" in meta and "optim.state.moe.v1.step" in meta


@pytest.mark.parametrize("name", BAD)
def test_mismatched_checkpoint_raises_on_every_rank(run, name):
    per_rank = run["second"].check(name)
    assert len({r["message"] for r in per_rank}) == 1, per_rank

"""examples/train_dp_ep.py as a user runs it: torchrun on gloo, re-placing experts (with replicas) mid-training.

The run that moves its experts every 3 steps, into placements with an extra copy of the
hottest expert, must print the same losses as the run that never moves them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _losses(*extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_dp_ep.py"), "--ep", "2", "--steps", "8", "--print-every", "3", *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    # its own session, so that a hang kills torchrun and its workers together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train_dp_ep.py did not finish in 120 s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return re.findall(r"^step\s+\d+\s+loss (\S+)", out, flags=re.M), out


def test_replacing_experts_with_replicas_changes_no_loss():
    still, _ = _losses()
    moved, out = _losses("--replace-every", "3", "--replicas", "1")
    assert "re-placed" in out, out  # the premise: experts did move
    assert len(still) == 4 and moved == still, (still, moved, out)

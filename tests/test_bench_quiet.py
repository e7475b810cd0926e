"""``benchmarks.common.QuietGate``: timings taken only while no other process uses the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.common import QuietGate

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


@linux_only
def test_a_call_is_timed_and_the_neighbours_load_reported():
    gate = QuietGate(max_other=64.0, settle_s=0.01)  # any load passes: only the bookkeeping is checked
    ms, load = gate.timed(lambda: sum(range(100_000)))
    assert ms > 0 and load is not None and load >= 0 and gate.discarded == 0


@linux_only
def test_a_busy_neighbour_is_refused_with_the_reason():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        gate = QuietGate(max_other=0.0, settle_s=0.2, tries=3)
        with pytest.raises(RuntimeError, match=r"never quiet .*above 0\.0 cores.* in 3 tries"):
            gate.timed(lambda: None)
    finally:
        spin.kill()
        spin.wait(10)

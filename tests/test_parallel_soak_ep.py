"""A derandomized slice of the expert-parallel soak (``benchmarks/soak_ep.py``): a few cases at 2 gloo ranks.

The full soak (hundreds of cases at 2 and 4 ranks, every mode) runs outside CI and
writes ``benchmarks/results/soak-ep-*.json``; this slice keeps its machinery and a
case of each mode in the suite. One launch, joined with a deadline (the soak's
launcher kills what is left), so it fails rather than hangs.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

import parallel_harness as harness

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def test_soak_slice_two_ranks():
    from benchmarks import soak_ep

    drawn = soak_ep.draw_cases(seed=7, n=40, worlds=[2])[2]
    # the first case of each mode; the bounded one with every token on one rank, so that it runs rounds
    picked = [next(c for c in drawn if c["mode"] == mode) for mode in soak_ep.MODES if mode != "bounded"]
    hot = dict(next(c for c in drawn if c["mode"] == "bounded"), index=99, hot=True, tokens=[9, 7], k=2, E=4,
               owners=None, hot_rank=1, max_recv_rows=8)  # fmt: skip
    picked.append(hot)
    # a replicated expert, shared experts and expert choice in one case (their reference: each rank's batch)
    newer = dict(picked[0], index=98, E=3, k=2, tokens=[7, 5], owners=None, ranks=[[0, 1], [0], [1]], shared=True,
                 routing="expert_choice", hot=False, mode="flat", chunks=2)  # fmt: skip
    picked.insert(0, newer)
    t0 = time.monotonic()
    run = soak_ep.run_world(2, picked, minutes=1.0, pg_timeout=20, mp_context=harness._context())
    assert not any(run["killed"]) and run["worker_errors"] == [None, None], run
    assert len(run["results"]) == len(picked)
    bad = [m for m in run["results"] if soak_ep.is_mismatch(m)]
    assert not bad, bad
    last = run["results"][-1]
    assert last["rounds"] >= 4 and max(last["peak_recv_rows"]) <= 8, last
    summary = soak_ep.summarize([run])
    assert summary["cases"] == len(picked) and summary["mismatches"] == 0
    assert set(summary["per_mode"]) == {f"W=2/{m}" for m in soak_ep.MODES}
    assert time.monotonic() - t0 < 60  # a CI budget guard (measured ~10 s on a loaded 2-core machine)


def test_cases_are_reproducible_and_cover_the_edges():
    from benchmarks import soak_ep

    a, b = soak_ep.draw_cases(3, 200, [2, 4]), soak_ep.draw_cases(3, 200, [2, 4])
    assert a == b and len(a[2]) == len(a[4]) == 100
    cases = a[2] + a[4]
    assert {c["mode"] for c in cases} == set(soak_ep.MODES)
    assert any(c["k"] == c["E"] for c in cases) and any(c["E"] in (7, 11, 13) for c in cases)
    assert any(0 in c["tokens"] for c in cases) and any(c["glu"] for c in cases)
    assert any(c["owners"] is not None and len(set(c["owners"])) < c["world_size"] for c in cases)
    assert any(c["chunks"] > 1 for c in cases)
    assert any(c["shared"] for c in cases) and any(c["routing"] == "expert_choice" for c in cases)
    assert any(c["ranks"] is not None and any(len(h) > 1 for h in c["ranks"]) for c in cases)

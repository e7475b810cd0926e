"""A small derandomized slice of the layer soak (``benchmarks/soak.py``), so CI runs the soak's own code.

The full soak (``python -m benchmarks.soak --cases 10000 --fuzz``) runs outside CI and
commits its results file; here 60 cases from a fixed seed (the same cases every run)
hold every backend, dtype and edge it draws to the same oracle and term-size bounds.
"""

from __future__ import annotations

import torch

from benchmarks import soak


def test_soak_slice_has_no_mismatch():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny cases, as the soak runs them
    try:
        res = soak.run_layer_soak(60, minutes=5.0, seed_value=18)
    finally:
        torch.set_num_threads(n)
    assert res["failure"] is None, res["failure"]
    assert res["cases"] == 60
    assert {k.split("/")[0] for k in res["per_backend_dtype"]} >= {"grouped", "torch"}


def test_a_case_reproduces_from_its_own_seed():
    """A dMoE case initialises its layer from the case's seed, whatever ran before it."""
    c = dict(backend="grouped", dtype="float32", E=3, k=2, T=5, H=16, F=12, bs=16, mode="skewed", glu=True,
             activation="silu", weights="plain", layer="dmoe", seed=7)  # fmt: skip
    first = soak.run_case(c)
    torch.manual_seed(12345)  # another global state
    assert soak.run_case(c) == first

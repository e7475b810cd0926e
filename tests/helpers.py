"""Shared test helpers: tolerances with their reasons, one assert helper, routing generators."""

from __future__ import annotations

import os

import torch

# Tolerances against a float64 reference, with their reasons: one copy, in the package
# (the soak uses the same numbers).
from blocksparse_moe.testing import TOLERANCES  # noqa: E402,F401


def examples(n: int) -> int:
    """Hypothesis example count: ``n`` in CI, ten times that under HYPOTHESIS_PROFILE=long."""
    return n * (10 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor", scale: float | None = None
):
    """``|a - e| <= atol * max|e| + rtol * |e|`` everywhere, NaN never passes.

    ``scale`` replaces ``max|e|`` where the expected values come from sums that cancel:
    a rounded dot product errs by about ``u * sum|terms|``, not ``u * |sum|``, so such a
    tensor is held to the size of its terms (e.g. the routing-weight gradient
    ``<dy[t], y_e(x[t])>``, which can be a thousand times smaller than its terms).

    On failure, reports the max and RMS error and where the worst element is.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return
    nan = torch.isnan(a) & ~torch.isnan(e)
    if nan.any():
        where = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{name}: {int(nan.sum())} NaN elements (unwritten or poisoned), first at {where}")
    scale = float(e.abs().max()) if scale is None else max(float(scale), float(e.abs().max()))
    err = (a - e).abs()
    bound = atol * max(scale, 1e-30) + rtol * e.abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements out of tolerance (atol={atol} x max|e|={scale:.3g}, "
            f"rtol={rtol}); max err {float(err.max()):.3g}, RMS err {float(err.pow(2).mean().sqrt()):.3g}; "
            f"worst at {idx}: got {float(a[idx]):.6g}, expected {float(e[idx]):.6g}"
        )


def make_expert_ids(num_tokens: int, num_experts: int, top_k: int, mode: str, seed: int = 0) -> torch.Tensor:
    """Router-like ids ``[T, k]``, distinct per token.

    mode: ``uniform`` (random), ``one`` (every token's first choice is expert 0),
    ``skewed`` (half the experts get nothing; the rest unevenly).
    """
    g = torch.Generator().manual_seed(seed)
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.long)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if mode == "one":
        scores[:, 0] += 2.0
    elif mode == "skewed":
        # Experts in the upper half can be picked only when top_k forces it.
        scores[:, num_experts // 2 :] -= 2.0
        scores[:, 0] += 0.5
    elif mode != "uniform":
        raise ValueError(mode)
    return scores.topk(top_k, dim=1).indices

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
):  # fmt: skip
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


def padding_poisoned(data: torch.Tensor, topo) -> torch.Tensor:
    """Block data ``data`` with NaN wherever it holds no element of ``h``: the rows past an expert's end
    in its last block row, the columns past ``ffn`` in the last column block, and the spare blocks.

    A kernel reading the block data must mask every one of them (a ``<`` moved to ``<=`` in a
    mask reads one); the reference drops them, so it never sees the NaN.
    """
    from blocksparse_moe import reference as ref

    S, E, n = topo.num_slots, topo.num_experts, topo.ffn_size
    valid = ref.sdd_torch(torch.ones(S, 1, device=data.device), torch.ones(E, 1, n, device=data.device), topo) != 0
    return torch.where(valid, data, torch.full((), float("nan"), dtype=data.dtype, device=data.device))


# The persistent kernels' cases: name -> (T, E, k, width, ffn, block, routing). The width (H or
# N) and ffn=72 / 104 are off the tile and block grids; "skewed" leaves experts empty; "one" with
# k=1 puts every token on expert 0.
PERSISTENT_CASES = {
    "skewed-empty-experts": (37, 5, 2, 40, 72, 16, "skewed"),
    "one-token": (1, 4, 2, 24, 40, 16, "uniform"),
    "prime-experts": (29, 7, 3, 40, 104, 32, "uniform"),
    "all-on-one-expert": (45, 6, 1, 56, 48, 16, "one"),
}


def persistent_case(device, name: str, dtype, seed: int = 0, cases: dict | None = None):
    """``(plan, topo, rnd, (E, width, ffn))`` of ``(cases or PERSISTENT_CASES)[name]``; ``rnd(*shape)`` draws seeded normals.

    ``cases``: a test file's own table of the same ``(T, E, k, width, ffn, block, routing)`` form.
    """
    from blocksparse_moe import build_topology, plan_routing

    T, E, k, width, ffn, bs, mode = (cases or PERSISTENT_CASES)[name]
    plan = plan_routing(make_expert_ids(T, E, k, mode, seed=seed).to(device), E)
    topo = build_topology(plan, ffn, bs)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return plan, topo, rnd, (E, width, ffn)

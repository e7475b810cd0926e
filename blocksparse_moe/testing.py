"""Tolerances against a float64 reference, with their reasons: one copy for the tests, the soak and users.

The rule: ``|actual - expected| <= atol * scale + rtol * |expected|`` everywhere, with
``scale = max|expected|`` (matmul errors grow with the largest magnitude), or the size
of the terms where the expected values come from sums that cancel (a rounded dot
product errs by about ``u * sum|terms|``, not ``u * |sum|``). NaN never passes.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "error_ratio"]

TOLERANCES = {
    # fp32 inputs, fp32 accumulation, full-precision dots: only summation order differs.
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    # fp16 inputs carry 11 significant bits (unit roundoff 4.9e-4); intermediates such
    # as h are rounded to fp16 again between the two matmuls.
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    # bf16 carries 8 significant bits (unit roundoff 3.9e-3), rounded at each stage.
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                scale: float | None = None) -> float:  # fmt: skip
    """``max(|a - e| / bound)`` over the elements (<= 1 passes); ``inf`` for a NaN or a shape mismatch."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    if (torch.isnan(a) & ~torch.isnan(e)).any():
        return float("inf")
    s = float(e.abs().max()) if scale is None else max(float(scale), float(e.abs().max()))
    bound = atol * max(s, 1e-30) + rtol * e.abs()
    return float(((a - e).abs() / bound).nan_to_num(0.0).max())

"""Shared pieces of the fuzzed bad-input tests (``test_fuzz_inputs.py`` for ``moe_ffn``,
``test_fuzz_layers.py`` for ``dMoE`` and ``MoE``): the backends this machine runs, the
layouts a valid input may come in, and the comparison with the float64 reference that
accepts a NaN/Inf exactly where the reference has one.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import TOLERANCES
from hypothesis import event as _event

from blocksparse_moe import ops

TOL = TOLERANCES[torch.float32]
ROUTER_TOL = dict(atol=2e-4, rtol=2e-4)  # softmax-gradient cancellation, as in test_layers.py
CPU_BACKENDS = []
for _b in ops.BACKENDS:
    if _b in ("auto", "persistent"):  # persistent is SwiGLU only: test_persistent_ffn.py covers it
        continue
    try:
        ops.resolve_backend(_b, torch.device("cpu"))
        CPU_BACKENDS.append(_b)
    except ValueError:
        pass
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]  # triton (interpreted) gets its own, smaller test


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than waking a pool (as in test_capacity_replace.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded")


def event(what: str) -> None:
    """hypothesis.event inside a hypothesis test (the statistics), nothing elsewhere."""
    try:
        _event(what)
    except Exception:  # noqa: BLE001 - InvalidArgument outside a test
        pass


# --------------------------------------------------------------------------- layouts
def lay_out(values: torch.Tensor, layout: str):
    """``(storage, view)``: a leaf tensor and a function of it that returns a tensor equal to ``values``
    in ``layout`` (``expanded``: ``values[:1]`` repeated along dim 0, so the values change)."""
    if layout == "contiguous" or values.dim() == 0:
        return values.clone(), lambda s: s
    if layout == "transposed":
        if values.dim() < 2:
            return values.clone(), lambda s: s
        return values.transpose(-1, -2).contiguous(), lambda s: s.transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide, lambda s: s[..., ::2]
    if layout == "offset":
        n, shape = values.numel(), values.shape
        buf = torch.zeros(n + 5, dtype=values.dtype)
        buf[3 : 3 + n] = values.reshape(-1)
        return buf, lambda s: s[3 : 3 + n].view(shape)
    if layout == "expanded":
        if values.shape[0] == 0:
            return values.clone(), lambda s: s
        shape = values.shape
        return values[:1].clone(), lambda s: s.expand(shape)
    raise ValueError(layout)


def check_message(err: BaseException, names: tuple[str, ...]) -> None:
    msg = str(err)
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg) for n in names), (
        f"{type(err).__name__} does not name {' or '.join(names)}: {msg!r}"
    )
    assert "got" in msg or "found" in msg or " is on " in msg or " but " in msg, f"no value in the message: {msg!r}"


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, name: str, tol=TOL, extra_nan_ok=False) -> None:
    """Equal non-finite pattern (a NaN/Inf exactly where the reference has one), close elsewhere.

    ``extra_nan_ok``: ``actual`` may also be non-finite where the reference is finite (but never
    finite where the reference is not).
    """
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if extra_nan_ok:
        assert not bool((fa & ~fe).any()), f"{name}: finite where the reference is not"
        fe = fe & fa
    if not torch.equal(fa, fe):
        where = tuple(int(i) for i in (fa != fe).nonzero()[0])
        raise AssertionError(
            f"{name}: {int((fa != fe).sum())} elements finite in one and not the other, first at {where}: "
            f"got {float(a[where])}, expected {float(e[where])}"
        )
    if fa.any():
        a, e = a[fa], e[fa]
        err = (a - e).abs()
        bound = tol["atol"] * max(float(e.abs().max()), 1e-30) + tol["rtol"] * e.abs()
        assert bool((err <= bound).all()), f"{name}: max err {float(err.max()):.3g} (max |e| {float(e.abs().max()):.3g})"


BAD_DTYPES = (torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8)


def assert_token_grads(actual, expected, bad_tokens, name, tol=TOL):
    """Per token: strict for tokens whose reference output is finite; for a token whose output is
    NaN/Inf only that its own gradient is close where both are finite (how a NaN meets a zero
    derivative, NaN * 0 or a select, differs between equally valid backward formulas)."""
    assert actual is not None, f"{name}: missing"
    good = ~bad_tokens
    assert_same_values(actual[good], expected[good], name, tol)
    if bad_tokens.any():
        a, e = actual[bad_tokens].detach().double(), expected[bad_tokens].detach().double()
        both = torch.isfinite(a) & torch.isfinite(e)
        assert_same_values(a[both], e[both], f"{name} (NaN/Inf tokens, where both are finite)", tol)

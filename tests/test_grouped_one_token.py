"""The grouped backend's one-token path (``backends/grouped_one_token.py``) against the float64 oracle.

A decode step (one token, CPU, inference) skips the routing plan. These tests check it is
taken exactly there, gives the oracle's result in every weight layout, activation, dtype
and product rule (``torch.mm`` or row dots), refuses bad ids as the general path does, and
agrees with the general path it replaces.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close

from blocksparse_moe import moe_ffn, routing
from blocksparse_moe.backends import grouped_mm, grouped_one_token
from blocksparse_moe.backends.grouped import grouped_ffn
from blocksparse_moe.integrations._ffn import dropless_ffn
from blocksparse_moe.reference import moe_ffn_dense

E, H, F = 7, 24, 20  # a prime expert count; sizes off any block grid


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * F, H, generator=g) / 4  # transformers' fused [E, 2F, H]
    w2t = torch.randn(E, H, F, generator=g) / 4  # transformers' down [E, H, F]
    return w13.to(dtype), w2t.to(dtype)


@pytest.fixture(params=["mm", "row-dots"])
def product_rule(request, monkeypatch):
    """Both ways a one-row product runs on a CPU (row dots hold on AMD CPUs only)."""
    monkeypatch.setattr(grouped_mm, "row_dots_pay", lambda: request.param == "row-dots")
    monkeypatch.setattr(grouped_one_token, "row_dots_pay", lambda: request.param == "row-dots")
    return request.param


@pytest.fixture
def no_plan(monkeypatch):
    """Fail if the general path's routing plan is built: the one-token path must not need it."""

    def refuse(*args, **kwargs):
        raise AssertionError("plan_routing called: the one-token path was not taken")

    monkeypatch.setattr(routing, "plan_routing", refuse)
    import blocksparse_moe.functional as functional
    import blocksparse_moe.integrations._ffn as ffn

    monkeypatch.setattr(functional, "plan_routing", refuse)
    monkeypatch.setattr(ffn, "plan_routing", refuse)


def _case(dtype, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, H, generator=g).to(dtype)
    ids = torch.randperm(E, generator=g)[:k].view(1, k)
    w = torch.rand(1, k, generator=g).to(dtype)
    return x, ids, w


# fp32: the oracle's fp64 products against fp32 rounding; half: the products round their inputs
# to 8 or 11 mantissa bits, the suite's per-dtype tolerances say how far that goes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["concat", "interleave", "separate", "mlp"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("k", [1, 3, E], ids=["k1", "k3", "k=E"])
def test_one_token_matches_the_oracle(dtype, layout, activation, k, product_rule, no_plan):
    x, ids, w = _case(dtype, k)
    w13, w2t = _weights(dtype)
    up = w13.transpose(1, 2)  # [E, H, 2F] strided view, read in place
    if layout == "concat":
        w1, v1, fused = up[..., :F], up[..., F:], (up, "concat")
    elif layout == "interleave":
        w1, v1, fused = up[..., 0::2], up[..., 1::2], (up, "interleave")
    elif layout == "separate":
        w1, v1, fused = up[..., :F], up[..., F:], None
    else:
        w1, v1, fused = up[..., :F], None, None
    w2 = w2t.transpose(1, 2)
    with torch.no_grad():
        y = dropless_ffn(x, ids, w, w1, w2, v1, activation=activation, fused_gate_up=fused)
    ref = moe_ffn_dense(x.double(), ids, w.double(), w1.double(), w2.double(),
                        None if v1 is None else v1.double(), activation=activation)  # fmt: skip
    assert y.shape == (1, H) and y.dtype == dtype
    assert_close(y, ref, **TOLERANCES[dtype], name=f"{layout} {activation} k={k}")


def test_moe_ffn_takes_it_and_matches_the_general_path(product_rule, no_plan):
    x, ids, w = _case(torch.float32, 4)
    g = torch.Generator().manual_seed(3)
    w1, v1 = torch.randn(E, H, F, generator=g), torch.randn(E, H, F, generator=g)
    w2 = torch.randn(E, F, H, generator=g)
    with torch.no_grad():
        y = moe_ffn(x, ids, w, w1, w2, v1, activation="silu")
    plan = routing._plan_impl(ids, E, 0)  # the general path, by hand (plan_routing is refused here)
    general = grouped_ffn(x, routing.RoutingPlan(num_tokens=1, top_k=4, num_experts=E, sorted_to_slot=plan[0],
                                                 slot_to_sorted=plan[1], sorted_expert=plan[2],
                                                 tokens_per_expert=plan[3][1:] - plan[3][:-1], expert_offsets=plan[3]),
                          w, w1, w2, v1, activation="silu")  # fmt: skip
    assert_close(y, general, **TOLERANCES[torch.float32], name="one-token vs general")


def test_not_taken_with_grad_or_several_tokens():
    x, ids, w = _case(torch.float32, 2)
    w1, w2 = torch.randn(E, H, F), torch.randn(E, F, H)
    # grad mode on but nothing requires grad: nothing to differentiate, so it is taken
    assert grouped_one_token.one_token_or_none(x, ids, w, w1, w2, None, "silu") is not None
    with torch.no_grad():
        assert grouped_one_token.one_token_or_none(x, ids, w, w1, w2, None, "silu") is not None
        two = torch.cat([x, x])
        assert grouped_one_token.one_token_or_none(two, ids.repeat(2, 1), w.repeat(2, 1), w1, w2, None, "silu") is None
        assert grouped_one_token.one_token_or_none(x, ids, w, w1, w2, None, torch.tanh) is None  # unnamed activation
    w1g = w1.clone().requires_grad_()
    assert grouped_one_token.one_token_or_none(x, ids, w, w1g, w2, None, "silu") is None  # a weight to differentiate


def test_bad_ids_are_refused_as_on_the_general_path(no_plan):
    x, _, w = _case(torch.float32, 2)
    w1, w2 = torch.randn(E, H, F), torch.randn(E, F, H)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, num_experts=7\), found 7"):
            moe_ffn(x, torch.tensor([[0, 7]]), w, w1, w2)
        with pytest.raises(ValueError, match=r"found -1"):
            moe_ffn(x, torch.tensor([[-1, 2]]), w, w1, w2)
        with pytest.raises(TypeError, match="integer tensor"):
            moe_ffn(x, torch.tensor([[0.0, 2.0]]), w, w1, w2)


def test_a_repeated_expert_counts_once_per_choice(product_rule, no_plan):
    x, _, _ = _case(torch.float32, 2)
    ids, w = torch.tensor([[3, 3]]), torch.tensor([[0.25, 0.5]])
    w1, w2 = torch.randn(E, H, F), torch.randn(E, F, H)
    with torch.no_grad():
        y = moe_ffn(x, ids, w, w1, w2, activation="gelu")
    ref = moe_ffn_dense(x.double(), ids, w.double(), w1.double(), w2.double(), activation="gelu")
    assert_close(y, ref, **TOLERANCES[torch.float32], name="repeated expert")

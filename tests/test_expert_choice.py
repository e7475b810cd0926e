"""Expert-choice routing in dMoE against a float64 reference written here (outputs and every gradient).

The reference routes from the definition: each expert takes the ``C`` tokens with
its highest scores, ``C = min(T, ceil(capacity_factor * T * k / E))``, and a token's
output is the sum over the experts that took it of ``s[t, e] * FFN_e(x[t])``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe import MoE, MoEConfig, dMoE
from blocksparse_moe.expert_choice import expert_choice_plan, expert_choice_route
from blocksparse_moe.reference import get_activation

TOL = dict(atol=2e-5, rtol=2e-5)


def reference(layer: dMoE, x: torch.Tensor):
    """float64 output, and the set of tokens each expert takes, from the definition."""
    cfg = layer.config
    p = {n: t.detach().double().requires_grad_(True) for n, t in layer.named_parameters()}
    xd = x.detach().double().requires_grad_(True)
    logits = xd @ p["router.weight"].T
    s = logits.softmax(-1) if cfg.router_score == "softmax" else logits.sigmoid()
    T, E = s.shape
    C = min(T, math.ceil(cfg.capacity_factor * T * cfg.top_k / E))
    act = get_activation(cfg.activation)
    out = torch.zeros_like(xd)
    chosen = []
    for e in range(E):
        tok = s[:, e].detach().topk(C).indices
        chosen.append(set(tok.tolist()))
        h = act(xd[tok] @ p["w1"][e])
        if cfg.glu:
            h = h * (xd[tok] @ p["v1"][e])
        out = out.index_add(0, tok, s[tok, e, None] * cfg.router_scale * (h @ p["w2"][e]))
    if cfg.num_shared_experts:
        sh = {n.split("shared_expert.")[1]: t for n, t in p.items() if n.startswith("shared_expert.")}
        g = act(xd @ sh["gate_proj.weight"].T) * (xd @ sh["up_proj.weight"].T) if cfg.glu else act(xd @ sh["up_proj.weight"].T)
        out = out + g @ sh["down_proj.weight"].T
    return out, xd, p, chosen, C


def check(layer: dMoE, x: torch.Tensor, seed: int = 0):
    y, aux = layer(x.clone().requires_grad_(True), return_aux=True)
    ref, xd, p, chosen, C = reference(layer, x)
    T, E = x.shape[0], layer.config.num_experts
    assert aux.chosen_tokens.shape == (E, C) and aux.tokens_per_expert.tolist() == [C] * E
    assert [set(r) for r in aux.chosen_tokens.tolist()] == chosen
    unrouted = T - len(set().union(*chosen)) if chosen else T
    assert int(aux.unrouted_tokens) == unrouted and int(aux.dropped_tokens) == 0
    assert_close(y, ref, **TOL, name="output")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    xg = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    (layer(xg) * dy).sum().backward()
    (ref * dy.double()).sum().backward()
    assert_close(xg.grad, xd.grad, **TOL, name="x grad")
    for name, t in layer.named_parameters():
        assert_close(t.grad, p[name].grad, **TOL, name=f"{name} grad", scale=float(p[name].grad.abs().max()))
    return aux


@settings(max_examples=examples(12), deadline=None)
@given(
    T=st.integers(1, 40), E=st.integers(1, 6), k=st.integers(1, 3), cf=st.sampled_from([0.5, 1.0, 1.25, 2.0]),
    glu=st.booleans(), score=st.sampled_from(["softmax", "sigmoid"]), seed=st.integers(0, 999),
)  # fmt: skip
def test_matches_float64_reference(T, E, k, cf, glu, score, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    cfg = MoEConfig(16, 32, E, top_k=k, capacity_factor=cf, glu=glu, router_score=score, routing="expert_choice",
                    activation="silu", backend="torch", block_size=16, init_std=0.3)  # fmt: skip
    check(dMoE(cfg), torch.randn(T, 16))


@pytest.mark.parametrize("backend", ["grouped", "triton"])
def test_other_backends_and_shared_experts(backend):
    torch.manual_seed(1)
    cfg = MoEConfig(16, 32, 4, top_k=2, glu=True, activation="gelu", routing="expert_choice", backend=backend,
                    block_size=16, init_std=0.3, num_shared_experts=1, router_scale=1.5)  # fmt: skip
    check(dMoE(cfg), torch.randn(2, 9, 16).reshape(18, 16))


def test_unchosen_tokens_get_zero_and_are_counted():
    # Expert 0's scores rise with the token index: at capacity_factor 0.25 with E=1, k=1
    # the expert takes the last quarter of the tokens, the rest get zeros.
    cfg = MoEConfig(4, 8, 1, top_k=1, capacity_factor=0.25, routing="expert_choice", router_score="sigmoid",
                    backend="torch", block_size=16)  # fmt: skip
    layer = dMoE(cfg)
    with torch.no_grad():
        layer.router.weight.fill_(1.0)
    x = torch.linspace(-2, 2, 16)[:, None].repeat(1, 4)
    y, aux = layer(x, return_aux=True)
    assert int(aux.unrouted_tokens) == 12 and sorted(aux.chosen_tokens[0].tolist()) == [12, 13, 14, 15]
    assert (y[:12] == 0).all() and (y[12:] != 0).any()


def test_full_capacity_chooses_everything_and_empty_batch():
    torch.manual_seed(2)
    cfg = MoEConfig(8, 16, 3, top_k=2, capacity_factor=10.0, routing="expert_choice", backend="torch", block_size=16)
    layer = dMoE(cfg)
    _, aux = layer(torch.randn(5, 8), return_aux=True)
    assert aux.chosen_tokens.shape == (3, 5) and int(aux.unrouted_tokens) == 0  # C capped at T
    y, aux = layer(torch.randn(0, 8), return_aux=True)
    assert y.shape == (0, 8) and aux.chosen_tokens.shape == (3, 0) and int(aux.unrouted_tokens) == 0


def test_routing_reads_nothing_to_the_host():
    class NoHostRead(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                raise AssertionError(f"host read: {func}")
            return func(*args, **(kwargs or {}))

    scores = torch.rand(20, 4)
    with NoHostRead():
        tokens, w = expert_choice_route(scores, 6)
        plan = expert_choice_plan(4, 6, scores.device)
    assert tokens.shape == (4, 6) and plan.expert_offsets.tolist() == [0, 6, 12, 18, 24]


def test_only_dmoe_and_only_meaningful_options():
    cfg = MoEConfig(8, 16, 4, routing="expert_choice")
    with pytest.raises(ValueError, match=r"MoE routes by token choice only; MoEConfig.routing='expert_choice' needs dMoE"):
        MoE(cfg)
    with pytest.raises(ValueError, match=r"router_groups=2 does not apply to routing='expert_choice'; expected 1"):
        MoEConfig(8, 16, 4, routing="expert_choice", router_groups=2)
    with pytest.raises(RuntimeError, match=r"Router.forward chooses experts per token"):
        dMoE(cfg).router(torch.randn(3, 8))

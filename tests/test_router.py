"""The router's choices and weights, its options, and the two losses against formulas written here.

Each expectation is computed in this file from the definition (float64 where it
matters), not by calling the router's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, examples
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import MoEConfig, Router, dMoE

TOL = dict(atol=2e-5, rtol=2e-5)


def make_router(E=8, H=16, k=2, seed=0, **options) -> Router:
    router = Router(MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=E, top_k=k, **options))
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(seed)))
    return router


def inputs(T=32, H=16, seed=1):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_softmax_top_k(k, renormalize):
    router = make_router(k=k, router_renormalize=renormalize)
    x = inputs()
    r = router(x)
    probs = torch.softmax(x.double() @ router.weight.double().T, -1)
    # the k chosen experts are the k largest probabilities, best first
    expected_ids = probs.topk(k, -1).indices
    assert torch.equal(r.expert_ids, expected_ids)
    expected = probs.gather(1, expected_ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
        assert_close(r.weights.sum(-1), torch.ones(32), **TOL, name="renormalized sums")
    assert_close(r.weights, expected, **TOL, name="weights")
    assert_close(r.scores, probs, **TOL, name="scores")
    assert r.weights.dtype == torch.float32 and r.expert_ids.dtype == torch.int64


@pytest.mark.parametrize("renormalize", [False, True])
def test_sigmoid_scores(renormalize):
    router = make_router(k=3, router_score="sigmoid", router_renormalize=renormalize)
    x = inputs()
    r = router(x)
    scores = torch.sigmoid(x.double() @ router.weight.double().T)
    assert torch.equal(r.expert_ids, scores.topk(3, -1).indices)
    expected = scores.gather(1, r.expert_ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    assert_close(r.weights, expected, **TOL, name="sigmoid weights")


def test_selection_bias_chooses_but_never_weighs():
    router = make_router(k=2, router_selection_bias=True)
    x = inputs()
    plain = router(x)
    with torch.no_grad():
        router.selection_bias[5] = 10.0  # larger than any score difference
    biased = router(x)
    assert (biased.expert_ids == 5).any(1).all(), "every token should now pick expert 5"
    # weights are the unbiased scores of the chosen experts
    assert_close(biased.weights, plain.scores.gather(1, biased.expert_ids), atol=0, rtol=0, name="weights")
    assert torch.equal(biased.scores, plain.scores)


def test_update_selection_bias_rule():
    router = make_router(E=4, router_selection_bias=True, router_bias_update_rate=0.25)
    router.update_selection_bias(torch.tensor([10, 0, 5, 5]))  # mean 5
    assert router.selection_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    router.update_selection_bias(torch.tensor([10, 0, 5, 5]), rate=1.0)
    assert router.selection_bias.tolist() == [-1.25, 1.25, 0.0, 0.0]
    assert router.weight.grad is None  # a load rule, not a gradient step


def test_selection_bias_balances_a_skewed_router():
    """Aux-loss-free balancing (DeepSeek-V3: sigmoid scores): repeated updates from the observed load even it out."""
    E, T, k = 8, 256, 2
    router = make_router(E=E, k=k, router_score="sigmoid", router_selection_bias=True, router_bias_update_rate=0.005)
    x = inputs(T=T, seed=3)
    x[:, 0] = 2.0
    with torch.no_grad():
        router.weight.mul_(0.25)
        router.weight[0, 0] += 2.0  # logit of expert 0 up by 4: it is nearly always chosen

    def load():
        return torch.bincount(router(x).expert_ids.reshape(-1), minlength=E)

    before = load()
    for _ in range(150):
        router.update_selection_bias(load())
    after = load()
    ideal = T * k / E
    assert before.max() > 3 * ideal, before.tolist()
    assert after.max() < 1.25 * ideal, after.tolist()
    assert router.selection_bias[0] < 0  # the crowded expert was pushed down


def test_update_selection_bias_errors():
    with pytest.raises(RuntimeError, match="router_selection_bias=True"):
        make_router().update_selection_bias(torch.zeros(8))
    router = make_router(router_selection_bias=True)
    with pytest.raises(ValueError, match=r"tokens_per_expert must be a tensor of shape \(8,\), got \(4,\)"):
        router.update_selection_bias(torch.zeros(4))
    with pytest.raises(ValueError, match="rate must be a number >= 0, got -1"):
        router.update_selection_bias(torch.zeros(8), rate=-1)


def test_jitter_in_training_only():
    eps = 0.1
    router = make_router(router_jitter=eps)
    x = inputs()
    clean = torch.nn.functional.linear(x, router.weight)
    router.eval()
    assert torch.equal(router(x).logits, clean)
    router.train()
    torch.manual_seed(123)
    jittered = router(x).logits
    assert not torch.equal(jittered, clean)
    # the noise is multiplicative on the router's input, drawn from U(1 - eps, 1 + eps)
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    assert_close(jittered, (x * noise) @ router.weight.T, **TOL, name="jittered logits")
    assert noise.min() >= 1 - eps and noise.max() <= 1 + eps


def test_uniform_assignment():
    T, E, k = 30, 8, 3
    router = make_router(E=E, k=k, router_uniform=True)
    r = router(inputs(T))
    counts = torch.bincount(r.expert_ids.reshape(-1), minlength=E)
    assert counts.max() - counts.min() <= 1 and counts.sum() == T * k
    assert all(len(set(row)) == k for row in r.expert_ids.tolist())
    assert torch.equal(r.weights, r.scores.gather(1, r.expert_ids))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_nan_token_gets_valid_distinct_ids(score):
    router = make_router(E=8, k=4, router_score=score, router_selection_bias=True)
    x = inputs(T=10)
    x[3, 2] = float("nan")
    r = router(x)
    ids = r.expert_ids
    assert ids.min() >= 0 and ids.max() < 8
    assert len(set(ids[3].tolist())) == 4
    assert torch.isnan(r.weights[3]).all()
    clean = router(torch.cat([x[:3], x[4:]]))
    assert torch.equal(torch.cat([ids[:3], ids[4:]]), clean.expert_ids)
    assert torch.equal(torch.cat([r.weights[:3], r.weights[4:]]), clean.weights)


# --------------------------------------------------------------------------- losses
def losses_by_formula(x, w_router, ids, E, k, score, lb_weight, z_weight):
    """float64 ``lb_weight * E * sum_i f_i P_i`` and ``z_weight * mean_t lse(logits_t)^2``."""
    logits = x.double() @ w_router.double().T
    T = x.shape[0]
    if score == "softmax":
        p = torch.softmax(logits, -1)
    else:
        s = torch.sigmoid(logits)
        p = s / s.sum(-1, keepdim=True)
    f = torch.zeros(E, dtype=torch.float64)
    for e in ids.reshape(-1).tolist():
        f[e] += 1.0 / (T * k)
    P = p.mean(0)
    lb = lb_weight * E * sum(f[i] * P[i] for i in range(E))
    lse = torch.log(torch.exp(logits).sum(-1))
    z = z_weight * (lse**2).mean()
    return lb, z


@settings(max_examples=examples(15))
@given(
    T=st.integers(1, 40),
    E=st.sampled_from([1, 2, 5, 8, 16]),
    k=st.integers(1, 4),
    score=st.sampled_from(["softmax", "sigmoid"]),
    lb_weight=st.sampled_from([0.0, 0.01, 1.0]),
    z_weight=st.sampled_from([0.0, 0.001, 0.5]),
    seed=st.integers(0, 1000),
)
def test_losses_match_formulas(T, E, k, score, lb_weight, z_weight, seed):
    k = min(k, E)
    layer = dMoE(
        MoEConfig(16, 32, E, top_k=k, block_size=16, router_score=score, backend="torch",
                  load_balancing_loss_weight=lb_weight, z_loss_weight=z_weight)
    )  # fmt: skip
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, 16, generator=torch.Generator().manual_seed(seed)))
    x = inputs(T, seed=seed + 1)
    _, aux = layer(x, return_aux=True)
    lb, z = losses_by_formula(x, layer.router.weight, aux.expert_ids, E, k, score, lb_weight, z_weight)
    assert_close(aux.load_balancing_loss, lb, **TOL, name="load_balancing_loss")
    assert_close(aux.z_loss, z, **TOL, name="z_loss")
    counts = torch.bincount(aux.expert_ids.reshape(-1), minlength=E)
    assert aux.tokens_per_expert.tolist() == counts.tolist()


def test_loss_gradients_match_formulas():
    E, k = 8, 2
    layer = dMoE(MoEConfig(16, 32, E, top_k=k, block_size=16, backend="torch",
                           load_balancing_loss_weight=0.7, z_loss_weight=0.3))  # fmt: skip
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, 16, generator=torch.Generator().manual_seed(0)))
    x = inputs(24)
    _, aux = layer(x, return_aux=True)
    aux.loss.backward()
    w64 = layer.router.weight.detach().double().requires_grad_()
    lb, z = losses_by_formula(x, w64, aux.expert_ids, E, k, "softmax", 0.7, 0.3)
    (lb + z).backward()
    assert_close(layer.router.weight.grad, w64.grad, **TOL, name="grad router.weight")
    assert layer.w1.grad is None  # the losses touch only the router


def test_balanced_routing_gives_unit_loss():
    """Uniform scores and a uniform assignment: f_i = P_i = 1/E, so the loss is exactly 1 (x weight)."""
    E, k, T = 8, 2, 32
    layer = dMoE(MoEConfig(16, 32, E, top_k=k, block_size=16, backend="torch", router_uniform=True,
                           load_balancing_loss_weight=1.0, z_loss_weight=1.0))  # fmt: skip
    with torch.no_grad():
        layer.router.weight.zero_()
    _, aux = layer(inputs(T), return_aux=True)
    assert_close(aux.load_balancing_loss, torch.tensor(1.0), atol=1e-6, rtol=0, name="balanced loss")
    assert_close(aux.z_loss, torch.tensor(math.log(E) ** 2), atol=1e-6, rtol=0, name="z of zero logits")
    assert aux.tokens_per_expert.tolist() == [T * k // E] * E


def test_all_on_one_expert_gives_loss_e():
    """Every token's only choice is one expert with probability ~1: f = P = e_0, loss = E."""
    E = 4
    layer = dMoE(MoEConfig(16, 32, E, top_k=1, block_size=16, backend="torch", load_balancing_loss_weight=1.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 100.0
    x = inputs(16).abs() + 1.0  # x[:, 0] >= 1: logit 0 is at least 100
    _, aux = layer(x, return_aux=True)
    assert aux.tokens_per_expert.tolist() == [16, 0, 0, 0]
    assert_close(aux.load_balancing_loss, torch.tensor(float(E)), atol=1e-6, rtol=0, name="collapsed loss")

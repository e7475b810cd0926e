"""dMoE and MoE against the float64 dense oracle: outputs, every gradient, the losses, capacity drops.

The oracle is independent of the layer's code path: it takes the layer's weights in
float64, recomputes the router (scores, weights, losses) with plain torch formulas,
and runs ``moe_ffn_dense`` (one expert at a time, no routing plan, no blocks). Only
the chosen expert ids are taken from the layer, since a near-tie in top-k may
legitimately go either way between float32 and float64.

Most cases use ``backend="torch"`` (fast on CPU); a few run the Triton kernels (under
the interpreter on CPU, ~4 s each), with the ``device`` fixture of conftest.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import TOLERANCES, assert_close, examples
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import MoE, MoEConfig, dMoE
from blocksparse_moe.reference import moe_ffn_dense

TOL = TOLERANCES[torch.float32]
# The router weight's gradient sums T per-token terms p * (g - <p, g>) that cancel
# when the softmax saturates (skewed routing): its fp32 error scales with the terms,
# not with the (small) result, so it gets ten times the fp32 tolerance.
ROUTER_GRAD_TOL = dict(atol=2e-4, rtol=2e-4)
ACTIVATIONS = ["gelu", "gelu_tanh", "silu", "relu"]


def make_layer(cls=dMoE, *, H=32, ffn=48, E=8, k=2, bs=16, skew=False, seed=0, device="cpu", **options):
    """A layer with O(1) signals (weights ~ 1/sqrt(fan_in)); ``skew`` sends most tokens to E/4 experts."""
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=bs, device=device, **options)
    layer = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        layer.w1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        layer.w2.copy_(torch.randn(E, ffn, H, generator=g) / ffn**0.5)
        if layer.v1 is not None:
            layer.v1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        if skew:
            # Inputs carry +2 along the first axis (see make_input); these rows turn it
            # into a logit offset of +-6: a quarter of the experts take nearly everything.
            hot = torch.full((E,), -3.0, device=layer.router.weight.device)
            hot[: max(1, E // 4)] = 3.0
            layer.router.weight[:, 0] += hot
    return layer


def make_input(T, H=32, *, skew=False, seed=1, device="cpu"):
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    if skew:
        x[:, 0] = 2.0 + 0.1 * x[:, 0]
    return x.to(device)


def reference(layer, x, expert_ids, keep=None):
    """Float64 oracle: ``(out, load_balancing_loss, z_loss, leaves)`` with the layer's ids.

    ``keep [T, k]`` (bool) zeroes the weight of dropped assignments (capacity baseline).
    """
    cfg = layer.config
    names = ["router.weight", "w1", "w2"] + (["v1"] if cfg.glu else [])
    params = dict(layer.named_parameters())
    leaves = {n: params[n].detach().double().cpu().requires_grad_() for n in names}
    leaves["x"] = x.detach().double().cpu().requires_grad_()
    x2 = leaves["x"].reshape(-1, cfg.hidden_size)
    ids = expert_ids.cpu()
    T, E, k = x2.shape[0], cfg.num_experts, cfg.top_k
    logits = x2 @ leaves["router.weight"].T
    if cfg.router_score == "softmax":
        scores = torch.softmax(logits, -1)
        probs = scores
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    weights = scores.gather(1, ids)
    if cfg.router_renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    experts = (leaves["w1"], leaves["w2"], leaves.get("v1"))
    if keep is None:
        out = moe_ffn_dense(x2, ids, weights, *experts, activation=cfg.activation)
    else:
        # A dropped assignment is never computed (as in MoE): it contributes exactly 0, even
        # where its token, its weight or its expert holds a NaN.
        keep = keep.cpu()
        out = torch.zeros_like(x2)
        for j in range(k):
            tok = keep[:, j].nonzero().flatten()
            part = moe_ffn_dense(x2[tok], ids[tok, j : j + 1], weights[tok, j : j + 1], *experts, activation=cfg.activation)
            out = out.index_add(0, tok, part)
    counts = torch.zeros(E, dtype=torch.float64).index_add_(0, ids.reshape(-1), torch.ones(T * k, dtype=torch.float64))
    lb = cfg.load_balancing_loss_weight * E * ((counts / (T * k)) * probs.mean(0)).sum()
    z = cfg.z_loss_weight * torch.logsumexp(logits, -1).pow(2).mean()
    return out.reshape(x.shape), lb, z, leaves


def check_layer(layer, x, *, keep_fn=None, tol=TOL, frozen=()):
    """Forward + backward of ``out * dy + losses`` through the layer and the oracle; compare all."""
    for name in frozen:
        layer.get_parameter(name).requires_grad_(False)
    x = x.detach().clone().requires_grad_()
    out, aux = layer(x, return_aux=True)
    keep = keep_fn(aux.expert_ids) if keep_fn else None
    ref, lb, z, leaves = reference(layer, x, aux.expert_ids, keep)
    assert_close(out, ref, **tol, name="output")
    assert_close(aux.load_balancing_loss, lb, **tol, name="load_balancing_loss")
    assert_close(aux.z_loss, z, **tol, name="z_loss")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ((out * dy.to(out)).sum() + aux.loss).backward()
    ((ref * dy.double()).sum() + lb + z).backward()
    ours = dict(layer.named_parameters())
    ours["x"] = x
    for name, leaf in leaves.items():
        if name in frozen:
            assert ours[name].grad is None, f"frozen {name} got a gradient"
            continue
        assert ours[name].grad is not None, f"no gradient for {name}"
        tol_grad = ROUTER_GRAD_TOL if name == "router.weight" and tol is TOL else tol
        assert_close(ours[name].grad, leaf.grad, **tol_grad, name=f"grad {name}")
    return aux


# --------------------------------------------------------------------------- dMoE, torch backend
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("k,E", [(1, 16), (2, 8), (4, 16)], ids=["k1-E16", "k2-E8", "k4-E16"])
def test_dmoe_torch_backend(k, E, glu, activation):
    layer = make_layer(E=E, k=k, glu=glu, activation=activation, skew=True, backend="torch")
    check_layer(layer, make_input(24, skew=True))


def test_dmoe_skewed_routing_leaves_experts_empty():
    layer = make_layer(E=16, k=2, glu=True, activation="silu", skew=True, backend="torch")
    aux = check_layer(layer, make_input(20, skew=True))
    counts = aux.tokens_per_expert
    assert (counts == 0).sum() >= 8, f"expected many empty experts, got {counts.tolist()}"
    assert int(counts.max()) >= 10, f"expected a crowded expert, got {counts.tolist()}"


@pytest.mark.parametrize(
    "options",
    [
        dict(router_score="sigmoid"),
        dict(router_score="sigmoid", router_renormalize=True),
        dict(router_renormalize=True, load_balancing_loss_weight=0.5, z_loss_weight=0.1),
        dict(activation=lambda t: torch.sigmoid(t) + 0.5),  # act(0) != 0: padding must stay masked
        dict(block_size=32, ffn=80),
    ],
    ids=["sigmoid", "sigmoid-renorm", "renorm-weights", "custom-act", "bs32"],
)
def test_dmoe_router_and_expert_options(options):
    options = dict(options)
    ffn = options.pop("ffn", 48)
    bs = options.pop("block_size", 16)
    layer = make_layer(E=8, k=2, ffn=ffn, bs=bs, glu=True, backend="torch", **options)
    check_layer(layer, make_input(24))


def test_dmoe_keeps_leading_dims():
    layer = make_layer(backend="torch")
    x = make_input(24).reshape(2, 3, 4, 32)
    out, aux = layer(x, return_aux=True)
    assert out.shape == x.shape
    assert aux.expert_ids.shape == (24, 2)
    assert_close(out.reshape(24, 32), layer(x.reshape(24, 32)), atol=0, rtol=0, name="flattened")
    assert layer(x[0, 0, 0]).shape == (32,)
    check_layer(layer, x)


def test_dmoe_empty_batch():
    layer = make_layer(backend="torch")
    out, aux = layer(torch.zeros(0, 32), return_aux=True)
    assert out.shape == (0, 32)
    assert float(aux.load_balancing_loss.detach()) == 0.0 and float(aux.z_loss.detach()) == 0.0
    assert aux.tokens_per_expert.tolist() == [0] * 8


@settings(max_examples=examples(12))
@given(
    T=st.integers(1, 40),
    E=st.sampled_from([1, 3, 4, 7, 16]),
    k=st.integers(1, 4),
    glu=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    bs=st.sampled_from([16, 32]),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_dmoe_torch_backend(T, E, k, glu, activation, bs, skew, seed):
    k = min(k, E)
    layer = make_layer(E=E, k=k, ffn=40, bs=bs, glu=glu, activation=activation, skew=skew, seed=seed, backend="torch")
    check_layer(layer, make_input(T, skew=skew, seed=seed + 1))


# --------------------------------------------------------------------------- dMoE, Triton backend
TRITON_CASES = {
    "k1-E16-gelu-mlp-skewed": dict(E=16, k=1, glu=False, activation="gelu", skew=True),
    "k2-E8-silu-glu": dict(E=8, k=2, glu=True, activation="silu"),
    "k4-E16-relu-glu-skewed": dict(E=16, k=4, glu=True, activation="relu", skew=True),
    "k2-E8-gelu_tanh-mlp-recompute": dict(E=8, k=2, glu=False, activation="gelu_tanh", recompute_activation=True),
    "k2-E4-silu-glu-recompute": dict(E=4, k=2, glu=True, activation="silu", recompute_activation=True),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_dmoe_triton_backend(device, name):
    case = dict(TRITON_CASES[name])
    skew = case.pop("skew", False)
    layer = make_layer(skew=skew, device=device, backend="triton", **case)
    check_layer(layer, make_input(24, skew=skew, device=device))


def test_dmoe_triton_recompute_frozen_weights(device):
    layer = make_layer(E=4, k=2, glu=True, activation="silu", device=device, backend="triton",
                       recompute_activation=True)  # fmt: skip
    check_layer(layer, make_input(20, device=device), frozen=("w1", "w2", "v1"))


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_dmoe_triton_no_host_sync(device, recompute):
    """Forward and backward with the Triton backend never wait on the GPU (CUDA only)."""
    if device.type != "cuda":
        pytest.skip("host syncs are observable on CUDA only (torch.cuda.set_sync_debug_mode)")
    layer = make_layer(E=8, k=2, glu=True, activation="silu", device=device, backend="triton",
                       recompute_activation=recompute)  # fmt: skip
    x = make_input(64, device=device)

    def step():
        out, aux = layer(x.clone().requires_grad_(), return_aux=True)
        (out.sum() + aux.loss).backward()
        return aux

    step()  # autotuning benchmarks (and synchronizes) on first launch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aux = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert aux.dropped_tokens.device.type == "cuda" and aux.tokens_per_expert.device.type == "cuda"


# --------------------------------------------------------------------------- recompute
def saved_activation_bytes(layer, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.requires_grad_())
    return sum(seen.values())


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_recompute_matches_and_saves_memory(glu):
    base = make_layer(E=8, k=2, glu=glu, activation="gelu", backend="torch")
    lean = make_layer(E=8, k=2, glu=glu, activation="gelu", backend="torch", recompute_activation=True)
    lean.load_state_dict(base.state_dict())
    x = make_input(40)
    outs, grads = [], []
    for layer in (base, lean):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert_close(b, a, atol=1e-6, rtol=1e-6, name="recompute grad")
    # One intermediate (the activated h; for GLU also act(h1) and the product) is the
    # sparse size: about T*k*ffn floats, padded to blocks. Require at least that much saved.
    full, kept = saved_activation_bytes(base, x.clone()), saved_activation_bytes(lean, x.clone())
    one_intermediate = 40 * 2 * 48 * 4
    assert full - kept >= (3 if glu else 1) * one_intermediate, (full, kept)


@pytest.mark.parametrize("frozen", [("w1", "w2"), ("w2",), ("w1",), ("w1", "w2", "v1", "router.weight")])
def test_recompute_with_frozen_weights(frozen):
    layer = make_layer(E=8, k=2, glu="v1" in frozen, activation="silu", backend="torch", recompute_activation=True)
    check_layer(layer, make_input(24), frozen=frozen)


def test_recompute_without_grad():
    layer = make_layer(backend="torch", recompute_activation=True, glu=True)
    with torch.no_grad():
        out = layer(make_input(16))
    assert out.shape == (16, 32) and not out.requires_grad


# --------------------------------------------------------------------------- MoE (capacity baseline)
@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("k,E", [(1, 16), (2, 8), (4, 16)], ids=["k1-E16", "k2-E8", "k4-E16"])
def test_moe_with_room_equals_dmoe(k, E, glu):
    dmoe = make_layer(E=E, k=k, glu=glu, activation="silu", skew=True, backend="torch")
    # capacity_factor E: capacity T*k, enough even if every slot picks one expert
    moe = MoE(dataclasses.replace(dmoe.config, capacity_factor=float(E)))
    moe.load_state_dict(dmoe.state_dict(), strict=True)
    x = make_input(24, skew=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (a, aux_a), (b, aux_b) = dmoe(xs[0], return_aux=True), moe(xs[1], return_aux=True)
    assert int(aux_b.dropped_tokens) == 0 and int(aux_a.dropped_tokens) == 0
    assert torch.equal(aux_a.expert_ids, aux_b.expert_ids)
    assert torch.equal(aux_a.tokens_per_expert, aux_b.tokens_per_expert)
    assert torch.equal(aux_a.load_balancing_loss, aux_b.load_balancing_loss)
    assert torch.equal(aux_a.z_loss, aux_b.z_loss)
    # Equal up to the rounding of differently shaped fp32 matmuls (a bmm over
    # [E, capacity] against one matmul per expert), not bit for bit.
    assert_close(b, a, atol=1e-6, rtol=1e-6, name="MoE vs dMoE")
    (a.sin().sum() + aux_a.loss).backward()
    (b.sin().sum() + aux_b.loss).backward()
    assert_close(xs[1].grad, xs[0].grad, atol=1e-6, rtol=1e-6, name="grad x")
    for (name, p), q in zip(dmoe.named_parameters(), moe.parameters()):
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-6, name=f"grad {name}")


def kept_by_position(expert_ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which (token, choice) slots a capacity of ``capacity`` rows keeps, first come first served."""
    T, k = expert_ids.shape
    used: dict[int, int] = {}
    keep = torch.zeros(T, k, dtype=torch.bool)
    for t in range(T):
        for j in range(k):
            e = int(expert_ids[t, j])
            keep[t, j] = used.get(e, 0) < capacity
            used[e] = used.get(e, 0) + 1
    return keep


@pytest.mark.parametrize(
    "k,E,glu", [(1, 8, False), (2, 8, True), (4, 16, True), (2, 4, False)], ids=["k1", "k2-glu", "k4-glu", "k2-E4"]
)
def test_moe_capacity_one_drops_by_position(k, E, glu):
    T = 32
    moe = make_layer(MoE, E=E, k=k, glu=glu, activation="gelu", skew=True, capacity_factor=1.0)
    x = make_input(T, skew=True)
    capacity = math.ceil(1.0 * T * k / E)
    aux = check_layer(moe, x, keep_fn=lambda ids: kept_by_position(ids, capacity))
    # Independent count: whatever order is used, an expert with n rows drops n - capacity.
    counts = torch.bincount(aux.expert_ids.reshape(-1), minlength=E)
    expected = int((counts - capacity).clamp(min=0).sum())
    assert expected > 0, "skewed routing should overflow at capacity factor 1.0"
    assert aux.dropped_tokens.dtype == torch.int64 and aux.dropped_tokens.dim() == 0
    assert int(aux.dropped_tokens) == expected
    assert aux.tokens_per_expert.tolist() == counts.tolist()  # routed, before the drop


@pytest.mark.parametrize("capacity_factor", [0.5, 1.25, 2.0])
def test_moe_capacity_formula(capacity_factor):
    T, k, E = 30, 2, 8
    moe = make_layer(MoE, E=E, k=k, skew=True, capacity_factor=capacity_factor)
    out, aux = moe(make_input(T, skew=True), return_aux=True)
    capacity = math.ceil(capacity_factor * T * k / E)
    assert moe.config.capacity(T) == capacity
    counts = torch.bincount(aux.expert_ids.reshape(-1), minlength=E)
    assert int(aux.dropped_tokens) == int((counts - capacity).clamp(min=0).sum())
    # a token whose every choice was dropped gets exactly zero
    keep = kept_by_position(aux.expert_ids, capacity)
    assert torch.all(out[~keep.any(1)] == 0)


def test_state_dict_moves_between_layers_with_selection_bias():
    a = make_layer(dMoE, glu=True, router_selection_bias=True, backend="torch")
    a.update_selection_bias(torch.arange(8))
    b = MoE(a.config)
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(b.router.selection_bias, a.router.selection_bias)
    assert set(a.state_dict()) == {"router.weight", "router.selection_bias", "w1", "w2", "v1"}
    plain = make_layer(dMoE, backend="torch")
    assert set(plain.state_dict()) == {"router.weight", "w1", "w2"}
    assert {n: tuple(p.shape) for n, p in plain.named_parameters()} == {
        "router.weight": (8, 32), "w1": (8, 32, 48), "w2": (8, 48, 32),
    }  # fmt: skip

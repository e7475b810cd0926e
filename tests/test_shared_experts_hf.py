"""dMoE built from MoEConfig alone equals the MoE blocks of DeepSeek-V3, DeepSeek-V2 and Qwen2-MoE.

Tiny random transformers modules (no hub download), float32: the weights are copied
into a dMoE configured like the family (groups, sigmoid or softmax scores, selection
bias, scaling, shared experts with or without Qwen's sigmoid gate), and the output and
every gradient (input, router, experts, shared experts) must match.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

transformers = pytest.importorskip("transformers", minversion="5.23", reason="needs the [hf] extra (transformers>=5.23)")

from blocksparse_moe import MoEConfig, dMoE  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
H = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny modules: waking a thread pool costs more than the matmuls on a loaded runner.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module


def _load(layer: dMoE, experts, gate, shared, shared_gate=None) -> None:
    """transformers layout -> dMoE: gate_up [E, 2F, H] = [gate; up], down [E, H, F]."""
    F = layer.config.ffn_hidden_size
    with torch.no_grad():
        layer.w1.copy_(experts.gate_up_proj[:, :F].transpose(1, 2))
        layer.v1.copy_(experts.gate_up_proj[:, F:].transpose(1, 2))
        layer.w2.copy_(experts.down_proj.transpose(1, 2))
        layer.router.weight.copy_(gate.weight)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.copy_(gate.e_score_correction_bias)
    layer.shared_expert.load_state_dict(shared.state_dict())
    if shared_gate is not None:
        layer.shared_expert_gate.load_state_dict(shared_gate.state_dict())


def _grads_equal(layer, hf, x, pairs):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya = layer(xa)
    yb = hf(xb)
    assert_close(ya, yb, **TOL, name="output")
    dy = torch.randn_like(ya)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    assert_close(xa.grad, xb.grad, **TOL, name="input grad")
    for name, ours, theirs in pairs:
        assert_close(ours(layer), theirs(hf), **TOL, name=name)


def _common_pairs(F, shared_names=("gate_proj", "up_proj", "down_proj")):
    pairs = [
        ("w1 grad", lambda m: m.w1.grad, lambda h: h.experts.gate_up_proj.grad[:, :F].transpose(1, 2)),
        ("v1 grad", lambda m: m.v1.grad, lambda h: h.experts.gate_up_proj.grad[:, F:].transpose(1, 2)),
        ("w2 grad", lambda m: m.w2.grad, lambda h: h.experts.down_proj.grad.transpose(1, 2)),
        ("router grad", lambda m: m.router.weight.grad, lambda h: h.gate.weight.grad),
    ]
    return pairs


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_moe(norm):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    E, F, k = 16, 24, 4
    hc = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=k,
                                       n_group=4, topk_group=2, n_shared_experts=2, norm_topk_prob=norm,
                                       routed_scaling_factor=2.5, hidden_act="silu")  # fmt: skip
    hf = _init(DeepseekV3MoE(hc).float(), 0)
    cfg = MoEConfig(H, F, E, top_k=k, glu=True, activation="silu", router_score="sigmoid", router_selection_bias=True,
                    router_renormalize=norm, router_groups=4, router_topk_groups=2, router_group_topk=2, router_scale=2.5,
                    num_shared_experts=2, backend="torch", block_size=16)  # fmt: skip
    layer = dMoE(cfg)
    _load(layer, hf.experts, hf.gate, hf.shared_experts)
    x = torch.randn(2, 20, H, generator=torch.Generator().manual_seed(1))
    pairs = _common_pairs(F) + [
        ("shared down grad", lambda m: m.shared_expert.down_proj.weight.grad, lambda h: h.shared_experts.down_proj.weight.grad),
        ("shared gate grad", lambda m: m.shared_expert.gate_proj.weight.grad, lambda h: h.shared_experts.gate_proj.weight.grad),
    ]  # fmt: skip
    _grads_equal(layer, hf, x, pairs)
    _, aux = layer(x, return_aux=True)
    per_token = [len({e // 4 for e in row}) for row in aux.expert_ids.tolist()]
    assert max(per_token) <= 2


def test_deepseek_v2_moe_group_limited_greedy():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    E, F, k = 8, 24, 3
    hc = transformers.DeepseekV2Config(hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=k,
                                       n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
                                       routed_scaling_factor=1.5, hidden_act="silu")  # fmt: skip
    hf = _init(DeepseekV2Moe(hc).float(), 2)
    # V2 ranks a group by its best softmax score (router_group_topk=1) and does not renormalise.
    cfg = MoEConfig(H, F, E, top_k=k, glu=True, activation="silu", router_groups=4, router_topk_groups=2,
                    router_group_topk=1, router_scale=1.5, num_shared_experts=1, backend="torch", block_size=16)  # fmt: skip
    layer = dMoE(cfg)
    _load(layer, hf.experts, hf.gate, hf.shared_experts)
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(3))
    _grads_equal(layer, hf, x[None], _common_pairs(F))


def test_qwen2_moe_block():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    E, F, Fs, k = 6, 24, 40, 2
    hc = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=F, shared_expert_intermediate_size=Fs,
                                     num_experts=E, num_experts_per_tok=k, norm_topk_prob=False, hidden_act="silu")  # fmt: skip
    hf = _init(Qwen2MoeSparseMoeBlock(hc).float(), 4)
    cfg = MoEConfig(H, F, E, top_k=k, glu=True, activation="silu", num_shared_experts=1, shared_ffn_hidden_size=Fs,
                    shared_expert_gate=True, backend="torch", block_size=16)  # fmt: skip
    layer = dMoE(cfg)
    _load(layer, hf.experts, hf.gate, hf.shared_expert, hf.shared_expert_gate)
    x = torch.randn(2, 15, H, generator=torch.Generator().manual_seed(5))
    pairs = _common_pairs(F) + [
        ("shared up grad", lambda m: m.shared_expert.up_proj.weight.grad, lambda h: h.shared_expert.up_proj.weight.grad),
        ("shared gate grad", lambda m: m.shared_expert_gate.weight.grad, lambda h: h.shared_expert_gate.weight.grad),
    ]  # fmt: skip
    _grads_equal(layer, hf, x, pairs)

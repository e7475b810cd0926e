"""The "blocksparse" experts implementation of transformers against the models' own "eager" experts.

Tiny randomly initialised models (no hub download), float32: logits and every
parameter gradient of the loss must match eager to summation-order error, across
the layout flags of ``use_experts_implementation``. Most tests use the torch
backend (fast on CPU); Triton runs (under the interpreter) for one full model and
for the GPT-OSS experts, the layout with the most flags set.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip(
    "transformers",
    minversion="5.23",  # the eager code compared against (older releases differ: GraniteMoE aux loss, missing models)
    reason="needs the [hf] extra (transformers>=5.23): pip install 'blocksparse-moe[hf]'",
)

import blocksparse_moe.integrations.transformers as bst  # noqa: E402  (registers "blocksparse")
from helpers import assert_close  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

# fp32 against fp32 eager: both sum the same products in a different order.
TOL = dict(atol=2e-5, rtol=2e-5)
TORCH_IMPL = "blocksparse_test_torch"
TRITON_IMPL = "blocksparse_test_triton"
bst.register(TORCH_IMPL, backend="torch", block_size=16)
bst.register(TRITON_IMPL, backend="triton", block_size=16)
PERSISTENT_IMPL = "blocksparse_test_persistent"
bst.register(PERSISTENT_IMPL, backend="persistent", block_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with more than one thread, waking the pool costs more than
    # the matmuls (tens of ms per op on a loaded 2-core runner instead of microseconds).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COMMON = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip

# family -> (config class, model class, config overrides, what it covers)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
                "concatenated gate/up [E, 2F, H], softmax top-k"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
                       num_experts_per_tok=2),
                  "shared expert with a sigmoid gate, un-normalised top-k"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
                       norm_topk_prob=True),
                  "concatenated, normalised top-k"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2),
              "concatenated, softmax top-k"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1),
                    "sigmoid routing with selection bias and expert groups, shared expert"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, swiglu_limit=1.0,
                     layer_types=["full_attention", "sliding_attention"], sliding_window=4),
                "transposed, interleaved gate/up, expert biases, clamped (up + 1) * glu gate"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), "concatenated"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
               "concatenated, sparsemixer routing"),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(layers_block_type=["moe", "full_attention"], head_dim=8, intermediate_size=24,
                        moe_intermediate_size=24, moe_shared_expert_intermediate_size=24, n_routed_experts=4,
                        num_experts_per_tok=2, use_mamba_kernels=False,
                        use_cache=False),  # transformers 5.25's hybrid cache fails without a mamba layer (eager too)
                   "no gate (up_proj, relu2), sigmoid routing, shared expert"),
}  # fmt: skip


def build_model(family: str, seed: int = 0, **overrides):
    cfg_name, model_name, kw, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw, **overrides})
    if hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = True  # the aux loss joins the loss: the router gets gradient from it too
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # init leaves these at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                p.normal_(std=0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    return model


def experts_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


def loss_and_grads(model, impl: str, ids: torch.Tensor):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_as_eager(model, impl: str, ids: torch.Tensor) -> None:
    logits_e, loss_e, grads_e = loss_and_grads(model, "eager", ids)
    logits_b, loss_b, grads_b = loss_and_grads(model, impl, ids)
    assert_close(logits_b, logits_e, **TOL, name="logits")
    assert_close(loss_b, loss_e, **TOL, name="loss")
    assert set(grads_b) == set(grads_e), set(grads_b) ^ set(grads_e)
    assert any("experts" in n for n in grads_e)
    for name in grads_e:
        assert_close(grads_b[name], grads_e[name], **TOL, name=f"grad {name}")


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the experts forwards that go through this library."""
    calls = []
    real = bst.experts_forward

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(bst, "experts_forward", counting)
    return calls


# --------------------------------------------------------------------------- registration
def test_registered_on_import():
    assert "blocksparse" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["blocksparse"] == bst.BlocksparseExperts(backend="auto", block_size=64)


def test_register_validates_settings():
    with pytest.raises(ValueError, match="backend"):
        bst.register("blocksparse_bad", backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        bst.register("blocksparse_bad", block_size=48)
    with pytest.raises(ValueError, match="eager"):
        bst.register("eager")


# --------------------------------------------------------------------------- models against eager
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_grads_match_eager(family, count_calls):
    model = build_model(family)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_same_as_eager(model, TORCH_IMPL, ids)
    assert len(count_calls) == len(experts_modules(model)) > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_training_step(family):
    model = build_model(family).train()
    model.set_experts_implementation(TORCH_IMPL)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    for name, before in experts.items():
        assert not torch.equal(model.get_parameter(name).detach(), before), f"{name} was not updated"


def test_triton_backend_full_model(count_calls, device):
    # The kernels under the interpreter (compiled on a GPU run): one layer keeps it to a few seconds.
    model = build_model("qwen3_moe", num_hidden_layers=1).to(device)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3)).to(device)
    assert_same_as_eager(model, TRITON_IMPL, ids)
    assert count_calls == ["Qwen3MoeExperts"]


def test_persistent_backend_full_model(count_calls, device):
    # Mixtral's SwiGLU experts on the persistent kernels (interpreted here): the same logits and gradients as eager.
    model = build_model("mixtral", num_hidden_layers=1).to(device)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(4)).to(device)
    assert_same_as_eager(model, PERSISTENT_IMPL, ids)
    assert count_calls == ["MixtralExperts"]


def test_from_pretrained_one_line(tmp_path):
    build_model("mixtral").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="blocksparse")
    assert model.config._experts_implementation == "blocksparse"
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        model.set_experts_implementation("eager")
        expected = model(input_ids=ids).logits
    assert_close(got, expected, **TOL, name="logits")


def test_bf16_model():
    model = build_model("mixtral").to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(input_ids=ids).logits.float()
        model.set_experts_implementation(TORCH_IMPL)
        got = model(input_ids=ids).logits.float()
    assert got.dtype == expected.dtype
    assert_close(got, expected, atol=4e-2, rtol=4e-2, name="bf16 logits")


# --------------------------------------------------------------------------- experts modules, one per layout
# family -> (experts class, config class, config kwargs): the flag combinations the models above do not cover,
# and the classes with their own `_apply_gate`.
EXPERTS = {
    "muse_spark": ("MuseSparkExperts", "MuseSparkTextConfig",
                   dict(hidden_size=32, moe_hidden_size=32, moe_intermediate_size=24, num_local_experts=4,
                        num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "openai_privacy_filter": ("OpenAIPrivacyFilterExperts", "OpenAIPrivacyFilterConfig",
                              dict(hidden_size=32, intermediate_size=24, num_local_experts=4, swiglu_limit=0.5)),
    "gpt_oss": ("GptOssExperts", "GptOssConfig",
                dict(hidden_size=32, intermediate_size=24, num_local_experts=4, swiglu_limit=0.5)),
    "aria": ("AriaExperts", "AriaTextConfig", dict(hidden_size=32, intermediate_size=24, moe_num_experts=4)),
    "deepseek_v4": ("DeepseekV4Experts", "DeepseekV4Config",
                    dict(hidden_size=32, intermediate_size=24, num_local_experts=4, swiglu_limit=0.5)),
    "minimax_m3_vl": ("MiniMaxM3VLExperts", "MiniMaxM3VLTextConfig",
                      dict(hidden_size=32, intermediate_size=24, num_local_experts=4, swiglu_limit=0.5)),
    "beam": ("BeamExperts", "BeamConfig",
             dict(hidden_size=32, intermediate_size=24, moe_intermediate_size=24, num_local_experts=4)),
    "nemotron_h": ("NemotronHExperts", "NemotronHConfig", dict(hidden_size=32, moe_intermediate_size=24, n_routed_experts=4)),
}  # fmt: skip


def build_experts(family: str, seed: int = 0):
    cls_name, cfg_name, kw = EXPERTS[family]
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configuration = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    cfg = getattr(configuration, cfg_name)(**kw)
    torch.manual_seed(seed)
    experts = getattr(modeling, cls_name)(cfg).float()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.3)
    return experts


def routing(num_tokens: int, num_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    return ids, weights


def experts_output_and_grads(experts, impl: str, x, ids, weights):
    experts.config._experts_implementation = impl
    device = next(experts.parameters()).device
    x = x.detach().to(device).requires_grad_()
    ids = ids.to(device)
    weights = weights.detach().to(device).requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = experts(x, ids, weights)
    (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
    return y.detach(), [x.grad, weights.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("family", sorted(EXPERTS))
def test_experts_module_matches_eager(family):
    experts = build_experts(family)
    ids, weights = routing(13, experts.num_experts, 2, seed=6)
    x = torch.randn(13, 32, generator=torch.Generator().manual_seed(7))
    y_e, g_e = experts_output_and_grads(experts, "eager", x, ids, weights)
    y_b, g_b = experts_output_and_grads(experts, TORCH_IMPL, x, ids, weights)
    assert_close(y_b, y_e, **TOL, name="experts output")
    for i, (gb, ge) in enumerate(zip(g_b, g_e)):
        assert_close(gb, ge, **TOL, name=f"grad {i}")


def test_no_tokens():
    experts = build_experts("gpt_oss")
    experts.config._experts_implementation = TORCH_IMPL
    x = torch.randn(0, 32, requires_grad=True)
    y = experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.all(experts.gate_up_proj.grad == 0)


def test_expert_parallel_sentinels():
    # (GPT-OSS's eager forward has no sentinel slot; MiniMax-M3's, like the generic one, skips it.)
    experts = build_experts("minimax_m3_vl")
    experts._is_expert_parallel = True
    E = experts.num_experts
    ids, weights = routing(9, E, 2, seed=8)
    ids[::3, 1] = E  # a slot routed to another rank
    weights = weights.masked_fill(ids == E, 0.0)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(9))
    y_e, g_e = experts_output_and_grads(experts, "eager", x, ids, weights)
    y_b, g_b = experts_output_and_grads(experts, TORCH_IMPL, x, ids, weights)
    assert_close(y_b, y_e, **TOL, name="experts output")
    assert torch.all(g_b[1][ids == E] == 0), "sentinel slots must get no routing-weight gradient"
    assert_close(g_b[0], g_e[0], **TOL, name="grad x")


# --------------------------------------------------------------------------- weights read in place
def _shares_storage(view: torch.Tensor, param: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_layout_is_views_of_the_parameters(family):
    experts = experts_modules(build_model(family))[0]
    lay = bst.expert_layout(experts)
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    assert _shares_storage(lay.w1, up) and _shares_storage(lay.w2, experts.down_proj)
    if lay.v1 is not None:
        assert _shares_storage(lay.v1, up)
    if experts.has_bias:
        assert _shares_storage(lay.b1, experts.gate_up_proj_bias) and _shares_storage(lay.bv, experts.gate_up_proj_bias)


_VIEW_OPS = {
    "aten.slice.Tensor", "aten.transpose.int", "aten.select.int", "aten.as_strided.default", "aten.t.default",
    "aten.view.default", "aten.alias.default", "aten.detach.default", "aten.unsqueeze.default", "aten.expand.default",
}  # fmt: skip


class _WeightReads(TorchDispatchMode):
    """Records every op that reads the storage of the given tensors."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs for a in flat):
            self.ops.add(str(func))
        return func(*args, **kwargs)


def test_triton_path_copies_no_weight(device):
    # GPT-OSS: transposed, interleaved, with biases. Forward and backward on the Triton
    # backend touch gate_up_proj and down_proj only through views and the kernels' ops.
    experts = build_experts("gpt_oss").to(device)
    ids, weights = routing(7, experts.num_experts, 2, seed=10)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(11))
    y_e, g_e = experts_output_and_grads(experts, "eager", x, ids, weights)
    mode = _WeightReads([experts.gate_up_proj, experts.down_proj])
    with mode:
        y_b, g_b = experts_output_and_grads(experts, TRITON_IMPL, x, ids, weights)
    kernels = {op for op in mode.ops if op.startswith("blocksparse_moe.")}
    assert {"blocksparse_moe.sdd.default", "blocksparse_moe.dsd.default"} <= kernels
    others = mode.ops - kernels - _VIEW_OPS
    assert not others, f"ops other than views that read the weights: {others}"
    assert_close(y_b, y_e, **TOL, name="experts output")
    for i, (gb, ge) in enumerate(zip(g_b, g_e)):
        assert_close(gb, ge, **TOL, name=f"grad {i}")


# --------------------------------------------------------------------------- what it cannot take
def test_quantized_weights_error_names_class_and_flag():
    experts = build_experts("nemotron_h")
    experts.up_proj = torch.nn.Parameter(torch.zeros(experts.up_proj.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(bst.UnsupportedExpertsLayout, match=r"NemotronHExperts \(has_gate=False\).*up_proj.*int8"):
        bst.expert_layout(experts)


def test_wrong_transposed_flag_error():
    experts = build_experts("deepseek_v4")
    experts.is_transposed = True  # [E, 2F, H] weights read as [E, H, 2F]
    with pytest.raises(bst.UnsupportedExpertsLayout, match=r"DeepseekV4Experts \(is_transposed=True\).*down_proj"):
        bst.expert_layout(experts)


def test_odd_gate_up_width_error():
    experts = build_experts("minimax_m3_vl")
    E, two_f, H = experts.gate_up_proj.shape
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(E, two_f + 1, H))
    with pytest.raises(bst.UnsupportedExpertsLayout, match=r"MiniMaxM3VLExperts \(has_gate=True\).*2 \* intermediate"):
        bst.expert_layout(experts)


def test_flag_not_supported_error(monkeypatch):
    # A decorator flag this implementation does not know (simulated by forgetting one).
    monkeypatch.setattr(bst, "SUPPORTED_FLAGS", tuple(f for f in bst.SUPPORTED_FLAGS if f != "has_post_expert_norm"))
    experts = build_experts("muse_spark")
    experts.config._experts_implementation = "blocksparse"
    ids, weights = routing(3, experts.num_experts, 2, seed=12)
    with pytest.raises(bst.UnsupportedExpertsLayout, match=r"MuseSparkExperts \(has_post_expert_norm=True\)"):
        experts(torch.randn(3, 32), ids, weights)


def test_not_an_experts_module():
    with pytest.raises(bst.UnsupportedExpertsLayout, match="Linear is not an experts module"):
        bst.expert_layout(torch.nn.Linear(2, 2))


def test_fp8_experts_get_a_clear_error():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    impl = fp8.ALL_FP8_EXPERTS_FUNCTIONS.get_interface("blocksparse", None)
    with pytest.raises(bst.UnsupportedExpertsLayout, match="FP8"):
        impl(torch.nn.Linear(2, 2), None, None, None)

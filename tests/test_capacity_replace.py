"""replace_capacity_moe: capacity-based layers swapped for dropless ones with the same weights and router.

This library's ``MoE`` needs nothing else; the transformers layers (Switch
Transformers, NLLB-MoE) are tested on tiny random models, skipped without the
``[hf]`` extra. With a capacity that drops nothing the replaced model must equal the
original; with the default capacity the original drops tokens (counted) and the
replaced one drops none.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from blocksparse_moe import MoE, MoEConfig, dMoE
from blocksparse_moe.integrations import ReplaceReport, replace_capacity_moe, to_dropless
from helpers import assert_close

TOL = dict(atol=2e-5, rtol=2e-5)


def _transformers_installed() -> bool:
    """transformers at the version the [hf] extra asks for: the Switch and NLLB eager code
    of older releases returns its router outputs differently (seen on 5.17)."""
    try:
        if importlib.util.find_spec("transformers") is None:
            return False
        from importlib.metadata import version

        return tuple(int(p) for p in version("transformers").split(".")[:2]) >= (5, 23)
    except (ImportError, ValueError):
        return False


requires_hf = pytest.mark.skipif(
    not _transformers_installed(),
    reason="needs the [hf] extra (transformers>=5.23): pip install 'blocksparse-moe[hf]'",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one thread is faster than waking a pool (see test_hf_experts.py).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- this library's MoE
class ExpertChoiceLayer(nn.Module):
    """Stands for an MoE layer of a class the replacement does not know."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 2)
        self.experts = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x):
        p = self.router(x).softmax(-1)
        return sum(p[:, i, None] * e(x) for i, e in enumerate(self.experts))


def _library_moe(capacity_factor: float = 1.0) -> MoE:
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, block_size=16, glu=True, activation="silu",
        capacity_factor=capacity_factor, backend="torch", init_std=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return MoE(cfg)


def test_library_moe_becomes_dmoe_with_the_same_tensors():
    net = nn.Sequential(nn.Linear(16, 16), _library_moe(), ExpertChoiceLayer(), _library_moe())
    old = [net[1], net[3]]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    out_old, aux_old = old[0](x, return_aux=True)
    y_old = net(x)
    report = replace_capacity_moe(net)

    assert isinstance(report, ReplaceReport) and report.num_replaced == 2
    assert [r[0] for r in report.replaced] == ["1", "3"]
    assert report.skipped == (("2", "ExpertChoiceLayer", "unknown MoE layer class"),)
    assert "replaced 2" in str(report) and "ExpertChoiceLayer" in str(report)
    for i, o in zip((1, 3), old):
        new = net[i]
        assert isinstance(new, dMoE)
        assert new.router is o.router
        assert new.w1 is o.w1 and new.w2 is o.w2 and new.v1 is o.v1
        assert {n for n, _ in new.named_parameters()} == {n for n, _ in o.named_parameters()}

    # Default capacity: the original drops assignments, the replaced layer none.
    out_new, aux_new = net[1](x, return_aux=True)
    assert int(aux_old.dropped_tokens) > 0
    assert int(aux_new.dropped_tokens) == 0
    # A capacity that drops nothing: the original equals the replaced layer.
    roomy = MoE(MoEConfig(**{**old[0].config.__dict__, "capacity_factor": 4.0, "device": "meta"}))
    roomy.router, roomy.w1, roomy.w2, roomy.v1 = old[0].router, old[0].w1, old[0].w2, old[0].v1
    out_roomy, aux_roomy = roomy(x, return_aux=True)
    assert int(aux_roomy.dropped_tokens) == 0
    assert_close(out_new, out_roomy, **TOL, name="dropless vs roomy capacity")
    assert not torch.allclose(out_old, out_new)
    assert net(x).shape == y_old.shape


def test_block_size_and_backend_overrides():
    layer = _library_moe()
    new = to_dropless(layer, block_size=32, backend="torch")
    assert new.config.block_size == 32 and new.config.backend == "torch"
    assert layer.config.block_size == 16  # the original's config is not modified


def test_errors():
    with pytest.raises(TypeError, match="no dropless replacement for Linear"):
        to_dropless(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="use to_dropless"):
        replace_capacity_moe(_library_moe())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        replace_capacity_moe("model")
    report = replace_capacity_moe(nn.Sequential(nn.Linear(2, 2)))
    assert report.num_replaced == 0 and report.skipped == ()


# --------------------------------------------------------------------------- Switch Transformers
def _switch(num_experts: int = 4, expert_capacity: int = 64, seed: int = 0, sparse_step: int = 1, num_layers: int = 2):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=num_layers, num_decoder_layers=num_layers, num_heads=4,
        num_experts=num_experts, expert_capacity=expert_capacity,
        encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
        router_jitter_noise=0.0, dropout_rate=0.0, initializer_factor=1.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return SwitchTransformersForConditionalGeneration(cfg).eval()


def _sparse_mlps(model) -> list[nn.Module]:
    names = ("SwitchTransformersSparseMLP", "DroplessSwitchSparseMLP")
    return [m for m in model.modules() if type(m).__name__ in names]


class _DropCounter:
    """Counts the tokens each sparse MLP leaves at exactly zero (a dropped token gets no expert output)
    and, for the original layers, the tokens its router masked out for capacity."""

    def __init__(self, model):
        self.zero_rows = 0
        self.router_dropped = 0
        self.handles = []
        for mlp in _sparse_mlps(model):
            self.handles.append(mlp.register_forward_hook(self._count_zero_rows))
            if type(mlp).__name__ == "SwitchTransformersSparseMLP":
                self.handles.append(mlp.router.register_forward_hook(self._count_router))

    def _count_zero_rows(self, module, args, out):
        self.zero_rows += int((out.reshape(-1, out.shape[-1]) == 0).all(-1).sum())

    def _count_router(self, module, args, out):
        dispatch = out[0]  # [batch, seq, experts] one-hot, capacity-masked
        self.router_dropped += int(dispatch.shape[0] * dispatch.shape[1] - dispatch.sum())

    def close(self):
        for h in self.handles:
            h.remove()


def _switch_forward(model, ids, labels):
    out = model(input_ids=ids, labels=labels, output_router_logits=True)
    return out


@requires_hf
def test_switch_no_drop_capacity_equals_original():
    # sparse_step=2: transformers computes the router z-loss and aux loss only then.
    original = _switch(expert_capacity=10_000, num_layers=4, sparse_step=2)
    replaced = copy.deepcopy(original)
    report = replace_capacity_moe(replaced)
    assert report.num_replaced == 4 == len(_sparse_mlps(original))
    assert {r[2] for r in report.replaced} == {"DroplessSwitchSparseMLP"}
    for name, *_ in report.replaced:
        orig, new = original.get_submodule(name), replaced.get_submodule(name)
        assert type(new.router) is type(orig.router)
        assert_close(new.wi[1], orig.experts["expert_1"].wi.weight, atol=0, rtol=0)

    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(2, 100, (2, 11), generator=g), torch.randint(2, 100, (2, 6), generator=g)
    out_o, out_r = _switch_forward(original, ids, labels), _switch_forward(replaced, ids, labels)
    assert_close(out_r.logits, out_o.logits, **TOL, name="logits")
    assert_close(out_r.loss, out_o.loss, **TOL, name="loss (with router z-loss and aux loss)")
    for field in ("encoder_z_loss", "decoder_z_loss", "encoder_aux_loss", "decoder_aux_loss"):
        assert_close(getattr(out_r, field), getattr(out_o, field), **TOL, name=field)
    for a, b in zip(out_r.encoder_router_logits, out_o.encoder_router_logits):
        assert_close(a, b, **TOL, name="router logits")

    out_o.loss.backward()
    out_r.loss.backward()
    for name, *_ in report.replaced:
        orig, new = original.get_submodule(name), replaced.get_submodule(name)
        # An expert no token reached has no grad in the original (its loop skips it), zero here.
        wi = [orig.experts[f"expert_{e}"].wi.weight for e in range(orig.router.num_experts)]
        wi_grad = torch.stack([torch.zeros_like(w) if w.grad is None else w.grad for w in wi])
        assert_close(new.wi.grad, wi_grad, **TOL, name=f"{name} wi grad")
        assert_close(new.router.classifier.weight.grad, orig.router.classifier.weight.grad, **TOL, name="router grad")


@requires_hf
def test_switch_default_capacity_drops_and_replaced_does_not():
    original = _switch(num_experts=2)  # default expert_capacity=64; 2 experts and 160 tokens a sequence
    assert original.config.expert_capacity == 64
    replaced = copy.deepcopy(original)
    replace_capacity_moe(replaced)
    roomy = copy.deepcopy(original)
    for mlp in _sparse_mlps(roomy):
        mlp.router.expert_capacity = 10_000

    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(2, 100, (2, 160), generator=g), torch.randint(2, 100, (2, 8), generator=g)
    counts = {}
    outs = {}
    for name, model in (("original", original), ("replaced", replaced), ("roomy", roomy)):
        counter = _DropCounter(model)
        with torch.no_grad():
            outs[name] = _switch_forward(model, ids, labels).logits
        counter.close()
        counts[name] = counter
    assert counts["original"].router_dropped > 0
    assert counts["original"].zero_rows == counts["original"].router_dropped
    assert counts["replaced"].zero_rows == 0
    assert counts["roomy"].zero_rows == 0
    assert_close(outs["replaced"], outs["roomy"], **TOL, name="replaced vs original without capacity")
    assert not torch.allclose(outs["original"], outs["replaced"])


@requires_hf
def test_switch_state_dict_and_training_step():
    original = _switch()
    replaced = copy.deepcopy(original)
    replace_capacity_moe(replaced)
    # A checkpoint of the original model (per-expert keys) loads into the replaced one.
    fresh = _switch(seed=5)
    replace_capacity_moe(fresh)
    fresh.load_state_dict(original.state_dict())
    for name, p in replaced.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name

    replaced.train()
    opt = torch.optim.AdamW(replaced.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(2, 100, (2, 11), generator=g), torch.randint(2, 100, (2, 6), generator=g)
    wi = replaced.encoder.block[0].layer[1].mlp.wi
    before = wi.detach().clone()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _switch_forward(replaced, ids, labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.equal(wi.detach(), before)


# --------------------------------------------------------------------------- NLLB-MoE
def _nllb_layer(**overrides):
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    cfg = NllbMoeConfig(
        **{"d_model": 16, "encoder_ffn_dim": 24, "num_experts": 4, "router_dtype": "float32", "moe_token_dropout": 0.2,
           "activation_dropout": 0.0, **overrides}
    )  # fmt: skip
    torch.manual_seed(0)
    layer = NllbMoeSparseMLP(cfg, cfg.encoder_ffn_dim)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def _nllb_mixture(layer, x, scale):
    """``sum_e gate[t, e] * expert_e(x[t])`` with the router's gates (the NLLB-MoE definition)."""
    h = x.reshape(-1, x.shape[-1])
    _, gates, _ = layer.router(h)
    out = sum(gates[:, e : e + 1] * layer.experts[f"expert_{e}"](h) for e in range(layer.num_experts))
    return (out * scale).reshape(x.shape), gates


@requires_hf
@pytest.mark.parametrize("normalize_before", [False, True])
def test_nllb_layer(normalize_before):
    layer = _nllb_layer(normalize_router_prob_before_dropping=normalize_before)
    new = to_dropless(copy.deepcopy(layer), block_size=16, backend="torch")
    assert type(new).__name__ == "DroplessNllbMoeSparseMLP"
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4))

    # Eval: capacity = moe_eval_capacity_token_fraction * tokens = all of them, nothing dropped.
    layer.eval()
    new.eval()
    expected, gates = _nllb_mixture(layer, x, scale=1 - 0.2)
    assert int((gates > 0).sum()) == 2 * 18
    assert_close(new(x), expected, **TOL, name="eval output")

    # Training with the default capacity 2 * ceil(T / E): the original router drops assignments.
    layer.train()
    layer.router.expert_capacity = None
    _, capped, _ = layer.router(x.reshape(-1, 16))
    assert int((capped > 0).sum()) < 2 * 18
    layer.router.expert_capacity = 10_000
    layer.experts.moe_token_dropout = 0.0
    new.moe_token_dropout = 0.0
    new.train()
    expected, _ = _nllb_mixture(layer, x, scale=1.0)
    assert_close(new(x), expected, **TOL, name="dropless training output")


@requires_hf
def test_nllb_padding_tokens_get_no_expert():
    layer = _nllb_layer().eval()
    new = to_dropless(copy.deepcopy(layer), backend="torch")
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(5))
    padding = torch.tensor([0, 0, 0, 1, 1])
    y = new(x, padding)
    assert torch.all(y[0, 3:] == 0) and torch.all(y[0, :3] != 0)


@requires_hf
def test_nllb_full_model_replaced():
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    cfg = NllbMoeConfig(
        vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
        encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4, encoder_sparse_step=2,
        decoder_sparse_step=2, max_position_embeddings=64, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = NllbMoeForConditionalGeneration(cfg).eval()
    report = replace_capacity_moe(model, backend="torch")
    assert report.num_replaced == 2
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(6))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.encoder.layers[1].ffn.fc1.grad is not None


@requires_hf
def test_transformers_dropless_moe_is_left_alone_and_listed():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4,
    )  # fmt: skip
    report = replace_capacity_moe(MixtralForCausalLM(cfg))
    assert report.num_replaced == 0
    assert [(n, c) for n, c, _ in report.skipped] == [("model.layers.0.mlp", "MixtralSparseMoeBlock")]
    assert "set_experts_implementation('blocksparse')" in report.skipped[0][2]

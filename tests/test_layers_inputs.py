"""Bad input to the layers: invalid configs, malformed x, and NaN tokens that must stay contained."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from helpers import assert_close
from test_layers import TOL, make_input, make_layer, reference

from blocksparse_moe import MoE, MoEConfig, dMoE

BASE = dict(hidden_size=16, ffn_hidden_size=32, num_experts=4)

# (field, bad value, exception, text the message must contain besides the field name)
BAD_CONFIGS = [
    ("hidden_size", 0, ValueError, "positive int, got 0"),
    ("ffn_hidden_size", -3, ValueError, "positive int, got -3"),
    ("num_experts", 2.0, ValueError, "positive int, got 2.0"),
    ("top_k", 0, ValueError, "positive int, got 0"),
    ("top_k", 5, ValueError, "must be in [1, num_experts=4], got 5"),
    ("top_k", True, ValueError, "positive int, got True"),
    ("block_size", 48, ValueError, "must be one of (16, 32, 64, 128), got 48"),
    ("activation", "tanh", ValueError, "or a callable, got 'tanh'"),
    ("activation", None, ValueError, "or a callable, got None"),
    ("glu", "yes", TypeError, "must be a bool, got 'yes'"),
    ("recompute_activation", 1, TypeError, "must be a bool, got 1"),
    ("router_score", "softplus", ValueError, "one of ('softmax', 'sigmoid'), got 'softplus'"),
    ("router_jitter", 1.0, ValueError, "in [0, 1), got 1.0"),
    ("router_jitter", -0.1, ValueError, "in [0, 1), got -0.1"),
    ("router_bias_update_rate", float("nan"), ValueError, ">= 0, got nan"),
    ("load_balancing_loss_weight", -0.01, ValueError, ">= 0, got -0.01"),
    ("z_loss_weight", float("inf"), ValueError, ">= 0, got inf"),
    ("capacity_factor", 0.0, ValueError, "> 0, got 0.0"),
    ("backend", "cuda", ValueError, "one of ('auto', 'grouped', 'triton', 'persistent', 'torch'), got 'cuda'"),
    ("dtype", torch.float64, TypeError, "got torch.float64"),
    ("dtype", torch.int32, TypeError, "got torch.int32"),
    ("device", "gpu7", ValueError, "torch device, got 'gpu7'"),
    ("init_std", -1.0, ValueError, ">= 0, got -1.0"),
]


@pytest.mark.parametrize("field,value,exc,text", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v, *_ in BAD_CONFIGS])
def test_invalid_config(field, value, exc, text):
    with pytest.raises(exc, match=re.escape(f"MoEConfig.{field}")) as info:
        MoEConfig(**{**BASE, field: value})
    assert text in str(info.value)


def test_config_revalidates_on_replace():
    cfg = MoEConfig(**BASE)
    with pytest.raises(ValueError, match=re.escape("MoEConfig.top_k must be in [1, num_experts=4], got 8")):
        dataclasses.replace(cfg, top_k=8)


@pytest.mark.parametrize("cls", [dMoE, MoE])
def test_layer_needs_a_config(cls):
    with pytest.raises(TypeError, match="config must be a MoEConfig, got dict"):
        cls(dict(BASE))


@pytest.mark.parametrize("cls", [dMoE, MoE])
def test_bad_x(cls):
    layer = cls(MoEConfig(**BASE, block_size=16, backend="torch"))
    with pytest.raises(ValueError, match=re.escape("x must have shape [..., hidden_size=16], got shape (4, 15)")):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match=re.escape("hidden_size=16], got shape ()")):
        layer(torch.tensor(1.0))
    integer = "x must be a floating-point tensor of dtype torch.float32, got dtype torch.int64"
    with pytest.raises(TypeError, match=integer):
        layer(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        layer([[0.0] * 16])
    with pytest.raises(TypeError, match="return_aux must be a bool, got 'yes'"):
        layer(torch.randn(4, 16), return_aux="yes")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    """backend='triton' with CPU tensors and no interpreter: a ValueError that says what to do."""
    layer = dMoE(MoEConfig(**BASE, block_size=16, backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got tensors on cpu"):
        layer(torch.randn(4, 16))


# --------------------------------------------------------------------------- NaN tokens
NAN_CASES = {
    "dMoE-torch-softmax": (dMoE, dict(backend="torch")),
    "dMoE-torch-sigmoid-renorm": (dMoE, dict(backend="torch", router_score="sigmoid", router_renormalize=True)),
    "dMoE-torch-recompute": (dMoE, dict(backend="torch", recompute_activation=True)),
    "MoE-room": (MoE, dict(capacity_factor=4.0)),
    "MoE-capacity-1": (MoE, dict(capacity_factor=1.0)),
}


def check_nan_contained(layer, T=24, bad=(5, 17)):
    """NaN in some tokens: the others' outputs and input gradients stay finite and correct."""
    x = make_input(T, device=layer.w1.device)
    x[bad[0], 3] = float("nan")
    x[bad[1]] = float("nan")
    x.requires_grad_()
    out, aux = layer(x, return_aux=True)
    good = torch.ones(T, dtype=torch.bool)
    good[list(bad)] = False
    assert torch.isfinite(out[good]).all(), "NaN leaked into other tokens"
    ids = aux.expert_ids
    assert ids.min() >= 0 and ids.max() < layer.config.num_experts
    assert all(len(set(row)) == layer.config.top_k for row in ids.tolist())
    keep = None
    if isinstance(layer, MoE):
        from test_layers import kept_by_position

        keep = kept_by_position(ids, layer.config.capacity(T))
    # The oracle with the NaN rows zeroed: only rows of good tokens are compared.
    x_clean = torch.where(good[:, None].to(x.device), x.detach(), torch.zeros((), device=x.device))
    ref, _, _, leaves = reference(layer, x_clean, ids, keep)
    assert_close(out[good], ref[good.cpu()], **TOL, name="good tokens")
    dy = torch.randn(T, out.shape[1], generator=torch.Generator().manual_seed(3)).to(out)
    (out[good] * dy[good]).sum().backward()
    (ref[good.cpu()] * dy.double().cpu()[good.cpu()]).sum().backward()
    assert torch.isfinite(x.grad[good]).all(), "NaN leaked into other tokens' gradients"
    assert_close(x.grad[good], leaves["x"].grad[good.cpu()], **TOL, name="grad x of good tokens")


@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_token_is_contained(name):
    cls, options = NAN_CASES[name]
    check_nan_contained(make_layer(cls, E=8, k=2, glu=True, activation="silu", **options))


def test_nan_token_is_contained_triton(device):
    check_nan_contained(make_layer(dMoE, E=4, k=2, glu=False, activation="gelu", device=device, backend="triton"))

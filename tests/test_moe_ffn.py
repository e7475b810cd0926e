"""The dropless expert FFN, forward and every gradient, against the float64 dense oracle."""

import pytest
import torch
from helpers import TOLERANCES, assert_close, examples, make_expert_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import moe_ffn
from blocksparse_moe.reference import moe_ffn_dense

PRIMES_AND_MORE = [1, 2, 3, 4, 5, 7, 8, 11, 13, 16]


def run_case(device, *, T, E, k, H, ffn, bs, mode, glu, activation="gelu", dtype=torch.float32, backend="triton", seed=0):
    """Forward + backward through moe_ffn and through the float64 oracle; compare everything."""
    g = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(T, E, k, mode, seed=seed).to(device)
    leaves = {
        "x": torch.randn(T, H, generator=g),
        "weights": torch.rand(T, k, generator=g),
        "w1": torch.randn(E, H, ffn, generator=g) / H**0.5,
        "w2": torch.randn(E, ffn, H, generator=g) / ffn**0.5,
    }
    if glu:
        leaves["v1"] = torch.randn(E, H, ffn, generator=g) / H**0.5
    ours = {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in leaves.items()}
    # the oracle sees the same rounded inputs, in float64
    oracle = {n: t.detach().double().cpu().requires_grad_() for n, t in ours.items()}
    y = moe_ffn(
        ours["x"], ids, ours["weights"], ours["w1"], ours["w2"], ours.get("v1"),
        activation=activation, block_size=bs, backend=backend,
    )  # fmt: skip
    y_ref = moe_ffn_dense(
        oracle["x"], ids.cpu(), oracle["weights"], oracle["w1"], oracle["w2"], oracle.get("v1"), activation=activation
    )
    # Tie every input into the oracle's graph so that unused ones get zero gradients.
    y_ref = y_ref + sum(0.0 * t.sum() for t in oracle.values())
    tol = TOLERANCES[dtype]
    assert_close(y, y_ref, **tol, name="output")
    dy = torch.randn(T, H, generator=g)
    (y * dy.to(device=device, dtype=dtype)).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for name in ours:
        assert ours[name].grad is not None, f"no gradient for {name}"
        scale = _weights_grad_terms(oracle, ids.cpu(), dy.double(), activation) if name == "weights" else None
        assert_close(ours[name].grad, oracle[name].grad, **tol, name=f"grad {name}", scale=scale)


def _weights_grad_terms(oracle: dict, ids: torch.Tensor, dy: torch.Tensor, activation) -> float:
    """``max_{t,j} sum_h |dy[t, h] * FFN_{ids[t, j]}(x[t])[h]|``: the size of the routing-weight gradient's terms."""
    T, k = ids.shape
    if T == 0:
        return 0.0
    with torch.no_grad():
        x = oracle["x"].detach().repeat_interleave(k, 0)
        ones = torch.ones(T * k, 1, dtype=x.dtype)
        rows = moe_ffn_dense(x, ids.reshape(-1, 1), ones, oracle["w1"].detach(), oracle["w2"].detach(),
                             None if "v1" not in oracle else oracle["v1"].detach(), activation=activation)  # fmt: skip
        return float((dy.repeat_interleave(k, 0).abs() * rows.abs()).sum(1).max())


@st.composite
def ffn_cases(draw):
    E = draw(st.sampled_from(PRIMES_AND_MORE))
    return dict(
        E=E,
        k=draw(st.integers(1, min(E, 4))),
        T=draw(st.integers(0, 40)),
        H=draw(st.integers(1, 48)),
        ffn=draw(st.integers(1, 80)),
        bs=draw(st.sampled_from([16, 32, 64])),
        mode=draw(st.sampled_from(["uniform", "one", "skewed"])),
        glu=draw(st.booleans()),
        activation=draw(st.sampled_from(["gelu", "gelu_tanh", "silu", "relu"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=examples(25))
@given(ffn_cases())
def test_property_triton_fp32(device, case):
    run_case(device, **case)


@settings(max_examples=examples(40))
@given(ffn_cases())
def test_property_torch_backend_fp32(case):
    run_case(torch.device("cpu"), backend="torch", **case)


EDGE_CASES = {
    "empty batch": dict(T=0, E=4, k=2, H=24, ffn=40, bs=16, mode="uniform"),
    "one token": dict(T=1, E=5, k=2, H=24, ffn=40, bs=16, mode="uniform"),
    "k equals E": dict(T=9, E=3, k=3, H=24, ffn=40, bs=16, mode="uniform"),
    "all on one expert": dict(T=33, E=4, k=1, H=20, ffn=50, bs=32, mode="one"),
    "empty experts, prime E": dict(T=30, E=13, k=2, H=17, ffn=23, bs=16, mode="skewed"),
    "sizes not block multiples": dict(T=27, E=3, k=2, H=37, ffn=71, bs=64, mode="uniform"),
    "block 128": dict(T=20, E=2, k=1, H=16, ffn=130, bs=128, mode="uniform"),
}


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(device, name, glu):
    run_case(device, glu=glu, **EDGE_CASES[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["empty experts, prime E", "sizes not block multiples"])
def test_half_precision(device, dtype, name):
    run_case(device, dtype=dtype, glu=True, activation="silu", **EDGE_CASES[name])


def test_custom_activation_with_nonzero_at_zero(device):
    """act(0) != 0 puts nonzeros in the padding of h: the kernels must still mask them out."""
    run_case(device, activation=lambda t: torch.sigmoid(t) + 0.5, glu=False, **EDGE_CASES["sizes not block multiples"])


def test_backends_agree(device):
    case = dict(T=25, E=5, k=2, H=24, ffn=40, bs=16, mode="skewed", glu=True, activation="silu")
    run_case(device, backend="torch", **case)
    run_case(device, backend="triton", **case)

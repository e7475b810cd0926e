"""The grouped backend (``backends/grouped.py``), forward and every gradient, against the float64 oracle.

Both product strategies run on the CPU: ``loops`` (``torch.mm`` into reused buffers,
the CPU default) and ``grouped_mm`` (one ``F.grouped_mm`` per product, the CUDA path,
with its layout fallback). Tolerances are the suite's per-dtype ones (tests/helpers.py).
"""

import pytest
import torch
from helpers import TOLERANCES, assert_close, examples, make_expert_ids
from hypothesis import given, settings
from test_moe_ffn import EDGE_CASES, ffn_cases, run_case

from blocksparse_moe import RoutingPlan, moe_ffn, plan_routing
from blocksparse_moe.backends import grouped_ffn, grouped_mm, grouped_mm_layout_ok
from blocksparse_moe.functional import routed_ffn
from blocksparse_moe.reference import activation_name, moe_ffn_dense

PRODUCTS = ["loops", "grouped_mm"]


@pytest.fixture(params=["mm", "row-dots", "cpu-grouped-mm"])
def cpu_rule(request, monkeypatch):
    """Each way the CPU loops may take a product, forced (which one runs depends on the machine and size).

    ``mm``: ``torch.mm`` per expert; ``row-dots``: one- and two-row products as row dots
    (``row_dots_pay`` holds on AMD CPUs); ``cpu-grouped-mm``: one ``F.grouped_mm`` from one
    active expert on (``_GMM_MIN_ACTIVE``; 32 by default).
    """
    monkeypatch.setattr(grouped_mm, "row_dots_pay", lambda: request.param == "row-dots")
    if request.param == "cpu-grouped-mm":
        monkeypatch.setattr(grouped_mm, "_GMM_MIN_ACTIVE", 1)
    return request.param


@settings(max_examples=examples(30))
@given(ffn_cases())
def test_property_grouped_fp32(case):
    run_case(torch.device("cpu"), backend="grouped", **case)


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name, glu):
    run_case(torch.device("cpu"), backend="grouped", glu=glu, **EDGE_CASES[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["empty experts, prime E", "sizes not block multiples", "k equals E"])
def test_half_precision(dtype, name):
    run_case(torch.device("cpu"), backend="grouped", dtype=dtype, glu=True, activation="silu", **EDGE_CASES[name])


def test_custom_activation_takes_the_composed_path():
    run_case(torch.device("cpu"), backend="grouped", activation=lambda t: torch.sigmoid(t) + 0.5, glu=True,
             **EDGE_CASES["empty experts, prime E"])  # fmt: skip


def _leaves(T, E, k, H, F, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(T, E, k, "skewed", seed=seed)
    return ids, {
        "x": torch.randn(T, H, generator=g, dtype=dtype),
        "weights": torch.rand(T, k, generator=g, dtype=dtype),
        "w13": torch.randn(E, 2 * F, H, generator=g, dtype=dtype) / H**0.5,  # transformers' [E, 2F, H]
        "w2t": torch.randn(E, H, F, generator=g, dtype=dtype) / F**0.5,  # down_proj [E, H, F]
    }


def _oracle(ids, leaves, layout, F):
    d = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    up = d["w13"].transpose(1, 2)
    w1, v1 = (up[..., :F], up[..., F:]) if layout == "concat" else (up[..., 0::2], up[..., 1::2])
    y = moe_ffn_dense(d["x"], ids, d["weights"], w1, d["w2t"].transpose(1, 2), v1, activation="silu")
    return y, d


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("layout", ["concat", "interleave"])
@pytest.mark.parametrize("H", [24, 37], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("T", [29, 2, 1], ids=["batch", "two-tokens", "decode"])
def test_fused_gate_up_and_transposed_weights(products, layout, H, T, cpu_rule):
    """A fused [E, 2F, H] gate/up and a [E, H, F] down, read through transposed views, in place.

    One and two tokens: every expert has at most two rows, where the CPU loops may take these
    weights' products as row dots (``_DOT_MAX_ROWS``) rather than ``torch.mm`` (``cpu_rule``).
    """
    E, k, F = 7, 3, 20
    ids, leaves = _leaves(T, E, k, H, F)
    ours = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    plan = plan_routing(ids, E)
    y = grouped_ffn(ours["x"], plan, ours["weights"], ours["w13"].transpose(1, 2), ours["w2t"].transpose(1, 2),
                    activation="silu", layout=layout, products=products)  # fmt: skip
    y_ref, ref = _oracle(ids, leaves, layout, F)
    tol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, **tol, name="output")
    dy = torch.randn(T, H)
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for n in ours:
        assert_close(ours[n].grad, ref[n].grad, **tol, name=f"grad {n}")
        # The weight gradient comes in the parameter's own layout: nothing to copy into .grad.
        assert ours[n].grad.stride() == ours[n].stride(), n


@pytest.mark.parametrize("products", PRODUCTS)
def test_separate_strided_weights(products):
    """w1 and v1 as halves of one tensor and w2 as a transposed view, each passed separately."""
    T, E, k, H, F = 23, 5, 2, 16, 12
    g = torch.Generator().manual_seed(1)
    ids = make_expert_ids(T, E, k, "uniform", seed=1)
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, H, 2 * F, generator=g) / 4).requires_grad_()
    w2t = (torch.randn(E, H, F, generator=g) / 4).requires_grad_()
    y = grouped_ffn(x, plan_routing(ids, E), w, w13[..., :F], w2t.transpose(1, 2), w13[..., F:],
                    activation="gelu", products=products)  # fmt: skip
    d13, d2t = w13.detach().double().requires_grad_(), w2t.detach().double().requires_grad_()
    y_ref = moe_ffn_dense(x.double(), ids, w.double(), d13[..., :F], d2t.transpose(1, 2), d13[..., F:])
    assert_close(y, y_ref, **TOLERANCES[torch.float32], name="output")
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(w13.grad, d13.grad, **TOLERANCES[torch.float32], name="grad w13")
    assert_close(w2t.grad, d2t.grad, **TOLERANCES[torch.float32], name="grad w2t")


def _padded_plan(ids: torch.Tensor, E: int) -> RoutingPlan:
    """A plan whose rows with id ``E`` belong to no expert (sorted last), as the expert-parallel capacity mode builds."""
    full = plan_routing(ids, E + 1, validate_ids=False)
    return RoutingPlan(
        num_tokens=full.num_tokens, top_k=full.top_k, num_experts=E, sorted_to_slot=full.sorted_to_slot,
        slot_to_sorted=full.slot_to_sorted, sorted_expert=full.sorted_expert,
        tokens_per_expert=full.tokens_per_expert[:E], expert_offsets=full.expert_offsets[: E + 1],
    )  # fmt: skip


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_padded_rows_with_nan_inputs_read_as_zero(products, glu, cpu_rule):
    """Rows past the last expert's end are never read: NaN there stays out of every result (pytorch #193633)."""
    T, E, H, F = 30, 3, 16, 24
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, E + 1, (T, 1), generator=g)
    ids[:4] = E  # at least four padding rows
    pad = ids[:, 0] == E
    x = torch.randn(T, H, generator=g)
    x[pad] = float("nan")
    x.requires_grad_()
    w1 = (torch.randn(E, H, F, generator=g) / 4).requires_grad_()
    w2 = (torch.randn(E, F, H, generator=g) / 4).requires_grad_()
    v1 = (torch.randn(E, H, F, generator=g) / 4).requires_grad_() if glu else None
    y = grouped_ffn(x, _padded_plan(ids, E), None, w1, w2, v1, activation="silu", padded=True, products=products)
    assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    real = ~pad
    ref = moe_ffn_dense(x.detach()[real].double(), ids[real], torch.ones(int(real.sum()), 1, dtype=torch.float64),
                        w1.detach().double(), w2.detach().double(), None if v1 is None else v1.detach().double(),
                        activation="silu")  # fmt: skip
    assert_close(y[real], ref, **TOLERANCES[torch.float32], name="real rows")
    y.square().sum().backward()
    for name, t in [("w1", w1), ("w2", w2), ("v1", v1)]:
        if t is not None:
            assert torch.isfinite(t.grad).all(), f"NaN from a padding row reached grad {name}"
    assert torch.isfinite(x.grad[real]).all()


def test_grouped_mm_layout_rules():
    """The rule that picks F.grouped_mm or the loop (checked against torch on the CPU)."""
    assert grouped_mm_layout_ok(torch.empty(8, 16), torch.empty(2, 16, 8))
    assert grouped_mm_layout_ok(torch.empty(8, 16), torch.empty(2, 8, 16).transpose(1, 2))
    assert not grouped_mm_layout_ok(torch.empty(8, 37), torch.empty(2, 37, 8))  # 148-byte rows
    assert not grouped_mm_layout_ok(torch.empty(8, 16), torch.empty(2, 16, 16)[..., 0::2])  # interleaved
    assert not grouped_mm_layout_ok(torch.empty(8, 16, dtype=torch.float64), torch.empty(2, 16, 8, dtype=torch.float64))


def test_activation_names():
    import torch.nn as nn

    assert activation_name("silu") == "silu" and activation_name(torch.nn.functional.silu) == "silu"
    assert activation_name(nn.SiLU()) == "silu" and activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(nn.ReLU()) == "relu" and activation_name(lambda t: t) is None


def test_routed_ffn_auto_on_cpu_is_grouped(monkeypatch):
    """auto resolves to grouped on the CPU: the grouped op runs, not the block ops."""
    called = []
    import blocksparse_moe.functional as functional

    real = functional.grouped_ffn
    monkeypatch.setattr(functional, "grouped_ffn", lambda *a, **k: called.append(1) or real(*a, **k))
    ids = make_expert_ids(9, 4, 2, "uniform")
    x = torch.randn(9, 8)
    y = moe_ffn(x, ids, torch.rand(9, 2), torch.randn(4, 8, 8), torch.randn(4, 8, 8), activation="relu")
    assert called and y.shape == x.shape
    with pytest.raises(ValueError, match="loops"):
        grouped_ffn(x, plan_routing(ids, 4), None, torch.randn(4, 8, 8), torch.randn(4, 8, 8), products="fast")
    assert routed_ffn is functional.routed_ffn


def test_relu_gradient_at_nan_matches_torch():
    """Shrunk by the fuzz soak: relu'(NaN) is 1 in torch's own backward (threshold_backward passes
    anything not <= 0), so a NaN token's finite gradients must match the oracle's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, generator=g)
    x[0, 0] = float("nan")
    x.requires_grad_()
    w1 = torch.randn(1, 16, 1, generator=g).requires_grad_()
    w2 = torch.randn(1, 1, 16, generator=g).requires_grad_()
    ids, w = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    moe_ffn(x, ids, w, w1, w2, activation="relu", backend="grouped").sum().backward()
    xr = x.detach().double().requires_grad_()
    moe_ffn_dense(xr, ids, w.double(), w1.detach().double(), w2.detach().double(), activation="relu").sum().backward()
    finite = torch.isfinite(xr.grad)
    assert finite.any()
    assert torch.allclose(x.grad.double()[finite], xr.grad[finite], atol=1e-5)


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_eager_inference_runs_the_op_bodies_with_the_same_bits(layout, monkeypatch):
    """Under no_grad in eager mode the op bodies run as plain functions (no dispatcher), bit for bit
    what the custom ops return; with a gradient to compute the ops (and autograd) are used."""
    from blocksparse_moe.backends import grouped as grouped_module

    T, E, k, H, F = 9, 5, 5, 16, 12  # k = E: every expert, one token per row block
    g = torch.Generator().manual_seed(4)
    ids = make_expert_ids(T, E, k, "uniform", seed=4)
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    w13 = torch.randn(E, H, 2 * F, generator=g) / 4
    w2 = torch.randn(E, F, H, generator=g) / 4
    args = (w13, w2) if layout == "concat" else (w13[..., :F], w2, w13[..., F:])
    plan = plan_routing(ids, E)
    run = lambda: grouped_ffn(x, plan, w, *args, activation="silu", layout=layout)  # noqa: E731
    with torch.no_grad():
        direct = run()
    calls = []
    real_eager = grouped_module._eager_inference
    monkeypatch.setattr(grouped_module, "_eager_inference", lambda *t: calls.append(real_eager(*t)) or False)
    with torch.no_grad():
        through_ops = run()
    assert calls == [True] and torch.equal(direct, through_ops)
    w2.requires_grad_()
    assert not real_eager(x, w, *args) and real_eager(x, w, *args[:1])
    with torch.no_grad():  # a layer's weights are Parameters: still plain tensors for this purpose
        assert real_eager(x, w, torch.nn.Parameter(w13), torch.nn.Parameter(w2))


def test_eager_inference_keeps_the_ops_for_meta_tensors():
    """Meta tensors have no data for the op bodies: under no_grad they still go through the ops' fake kernels."""
    from blocksparse_moe.backends import grouped as grouped_module

    T, E, k, H, F = 6, 3, 2, 8, 12
    ids = make_expert_ids(T, E, k, "uniform", seed=5).to("meta")
    x, w = torch.randn(T, H, device="meta"), torch.rand(T, k, device="meta")
    w1, w2 = torch.randn(E, H, F, device="meta"), torch.randn(E, F, H, device="meta")
    assert not grouped_module._eager_inference(x, w, w1, w2)
    with torch.no_grad():
        y = moe_ffn(x, ids, w, w1, w2, backend="grouped")
    assert y.device.type == "meta" and y.shape == (T, H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_active_experts_on_the_default_cpu_rule(dtype):
    """A prefill-like plan, 37 experts (prime) all with rows: fp32 takes the CPU's one-``F.grouped_mm`` rule
    (``_GMM_MIN_ACTIVE``), float64 (which ``F.grouped_mm`` refuses) the loop; both against the float64 oracle."""
    T, E, k, H, F = 96, 37, 3, 16, 8
    assert E >= grouped_mm._GMM_MIN_ACTIVE
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    x = torch.randn(T, H, generator=g, dtype=dtype)
    w = torch.rand(T, k, generator=g, dtype=dtype)
    w13 = torch.randn(E, 2 * F, H, generator=g, dtype=dtype) / 4  # transformers' [E, 2F, H]
    w2t = torch.randn(E, H, F, generator=g, dtype=dtype) / 4
    plan = plan_routing(ids, E)
    assert int((plan.tokens_per_expert > 0).sum()) == E
    with torch.no_grad():
        y = grouped_ffn(x, plan, w, w13.transpose(1, 2), w2t.transpose(1, 2), activation="silu", layout="concat")
    ref = moe_ffn_dense(x.double(), ids, w.double(), w13.double().transpose(1, 2)[..., :F],
                        w2t.double().transpose(1, 2), w13.double().transpose(1, 2)[..., F:], activation="silu")  # fmt: skip
    tol = TOLERANCES[torch.float32] if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    assert_close(y, ref, **tol, name=f"output {dtype}")

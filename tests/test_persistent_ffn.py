"""The persistent SwiGLU expert FFN (``backends/persistent_ffn.py``): forward and every gradient against the oracle.

Interpreter (CPU), fp32 and fp16, against the package's float64 dense oracle
(``reference.moe_ffn_dense``, differentiated by torch autograd) over
``helpers.PERSISTENT_CASES`` (an empty expert, one token, a prime expert count E=7,
every token on one expert; hidden and ffn off the block grid) plus k = E. Tolerances
are ``blocksparse_moe.testing.TOLERANCES`` (fp32: summation order only; fp16: 11-bit
inputs and intermediates rounded between the products), the routing-weight gradient
held to the size of its terms (it is a dot product that cancels, as in
``test_moe_ffn.py``). The function takes no out buffers; the weight gradients' buffers
(``_grad_like``, uninitialised in the library) are NaN-poisoned here, so every element
must be written (an expert with no rows gets exact zeros). Also: transposed and strided
weight views (gradients in the same strides), the unweighted form, frozen experts, an
empty batch, the TMA load paths under the interpreter, no host read in forward and backward, and the argument errors.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import PERSISTENT_CASES, TOLERANCES, assert_close, make_expert_ids
from test_moe_ffn import _weights_grad_terms
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe.reference import moe_ffn_dense

PF = importlib.import_module("blocksparse_moe.backends.persistent_ffn")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

CASES = dict(PERSISTENT_CASES)  # (T, E, k, H, ffn, block, routing mode)
CASES["k-equals-experts"] = (11, 4, 4, 32, 48, 16, "uniform")


def _leaves(T, E, k, H, ffn, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(T, H, generator=g),
        "w1": torch.randn(E, H, ffn, generator=g) / H**0.5,
        "v1": torch.randn(E, H, ffn, generator=g) / H**0.5,
        "w2": torch.randn(E, ffn, H, generator=g) / ffn**0.5,
        "weights": torch.rand(T, k, generator=g),
    }, torch.randn(T, H, generator=g)


@pytest.fixture
def poisoned_grads(monkeypatch):
    """Weight-gradient buffers full of NaN: what ``dsd_t_persistent`` does not write shows."""
    monkeypatch.setattr(
        PF, "_grad_like", lambda w: torch.full_like(w, float("nan"), memory_format=torch.preserve_format)
    )


def run_case(device, name, dtype, *, seed=0, layouts=None, weighted=True, use_tma=None, frozen=()):
    """Forward + backward through ``persistent_glu_ffn`` and the float64 oracle; compare everything.

    ``layouts``: ``{name: fn}`` turning a contiguous weight into the view passed in (same values).
    ``frozen``: inputs that do not require a gradient (then none is computed for them).
    """
    T, E, k, H, ffn, bs, mode = CASES[name]
    ids = make_expert_ids(T, E, k, mode, seed=seed)
    plan = plan_routing(ids.to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, dy = _leaves(T, E, k, H, ffn, seed)
    if not weighted:
        del leaves["weights"]
    ours = {}
    for n, t in leaves.items():
        t = t.to(device=device, dtype=dtype)
        ours[n] = (layouts[n](t) if layouts and n in layouts else t).detach().requires_grad_(n not in frozen)
    oracle = {n: t.detach().double().cpu().requires_grad_() for n, t in ours.items()}
    w_oracle = oracle.get("weights", torch.ones(T, k, dtype=torch.float64))
    y = PF.persistent_glu_ffn(ours["x"], ours["w1"], ours["v1"], ours["w2"], plan, topo, ours.get("weights"),
                              use_tma=use_tma)  # fmt: skip
    y_ref = moe_ffn_dense(oracle["x"], ids, w_oracle, oracle["w1"], oracle["w2"], oracle["v1"], activation="silu")
    y_ref = y_ref + sum(0.0 * t.sum() for t in oracle.values())  # an unused input still gets a (zero) gradient
    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (T, H)
    assert_close(y, y_ref, **tol, name=f"{name} output")
    (y * dy.to(device=device, dtype=dtype)).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for n, t in ours.items():
        if n in frozen:
            assert t.grad is None, f"{name}: a gradient for the frozen {n}"
            continue
        assert t.grad is not None, f"{name}: no gradient for {n}"
        assert t.grad.dtype == t.dtype, f"{name}: grad {n} is {t.grad.dtype}, expected {t.dtype}"
        scale = _weights_grad_terms(oracle, ids, dy.double(), "silu") if n == "weights" else None
        assert_close(t.grad, oracle[n].grad, **tol, name=f"{name} grad {n}", scale=scale)
    return plan, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, name, dtype, poisoned_grads):
    plan, _ = run_case(device, name, dtype)
    if name == "skewed-empty-experts":
        assert (plan.tokens_per_expert == 0).any(), "the case lost its empty expert"
    if name == "all-on-one-expert":
        assert int(plan.tokens_per_expert[0]) == plan.num_slots


def test_weight_layouts_and_unweighted(device, poisoned_grads):
    """A gate weight stored ``[E, ffn, H]`` (transposed view), the up weight as the odd columns of an
    interleaved ``[E, H, 2 ffn]`` tensor (column stride 2), transformers' ``down_proj [E, H, ffn]``
    transposed; ``weights=None``. Gradients of the dense views come back in the views' strides."""
    layouts = {
        "w1": lambda w: w.transpose(1, 2).contiguous().transpose(1, 2),
        "v1": lambda w: torch.stack([torch.zeros_like(w), w], dim=-1).flatten(-2)[..., 1::2],
        "w2": lambda w: w.transpose(1, 2).contiguous().transpose(1, 2),
    }
    _, ours = run_case(device, "prime-experts", torch.float32, seed=3, layouts=layouts, weighted=False)
    for n in ("w1", "w2"):
        assert ours[n].grad.stride() == ours[n].stride(), (
            f"grad {n} strides {ours[n].grad.stride()} != {ours[n].stride()}"
        )


def test_frozen_experts(device):
    """Only ``x`` and the routing weights need gradients (frozen experts): the weight gradients are skipped."""
    run_case(device, "one-token", torch.float32, seed=4, frozen=("w1", "v1", "w2"))


def test_no_tokens(device, poisoned_grads):
    """An empty batch: an empty output, and exact zeros for every weight gradient (no expert has a row)."""
    T, E, k, H, ffn, bs, mode = 0, 4, 2, 16, 24, 16, "uniform"
    plan = plan_routing(make_expert_ids(T, E, k, mode).to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, _ = _leaves(T, E, k, H, ffn, 0)
    t = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
    y = PF.persistent_glu_ffn(t["x"], t["w1"], t["v1"], t["w2"], plan, topo, t["weights"])
    assert y.shape == (0, H)
    y.sum().backward()
    assert t["x"].grad.shape == (0, H) and t["weights"].grad.shape == (0, k)
    for n in ("w1", "v1", "w2"):
        assert torch.equal(t[n].grad, torch.zeros_like(t[n])), f"grad {n} is not exactly zero"


def test_saves_only_the_pre_activations(device):
    """Autograd keeps the two pre-activations ``g``, ``u`` (2 of the sparse size, not ``h`` too) and no
    ``[S, H]`` row copy (the gather is fused); besides them only the inputs and int32/fp32 index vectors."""
    T, E, k, H, ffn, bs, mode = CASES["prime-experts"]
    plan = plan_routing(make_expert_ids(T, E, k, mode).to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, _ = _leaves(T, E, k, H, ffn, 0)
    t = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        PF.persistent_glu_ffn(t["x"], t["w1"], t["v1"], t["w2"], plan, topo, t["weights"])
    inputs = {v.data_ptr() for v in t.values()}
    blocks = [s for s in saved if s.shape == (topo.capacity, bs, bs)]
    assert len(blocks) == 2, f"expected g and u saved, got {len(blocks)} block tensors"
    others = [s for s in saved if s.data_ptr() not in inputs and s.shape != (topo.capacity, bs, bs)]
    assert all(s.dim() == 1 for s in others), [tuple(s.shape) for s in others if s.dim() != 1]


def test_backward_writes_over_g_u_and_refuses_a_second_pass(device, monkeypatch):
    """The GLU backward's ``dg``/``du`` go into the saved ``g``/``u`` (one new block tensor, ``h``, not three),
    ``dx`` is one dual-product DSD; a second backward over the same graph is refused, not computed from them."""
    T, E, k, H, ffn, bs, mode = CASES["prime-experts"]
    plan = plan_routing(make_expert_ids(T, E, k, mode).to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, dy = _leaves(T, E, k, H, ffn, 0)
    t = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
    saved, calls = [], []
    glu_bwd, dsd = PF.K.sdd_glu_backward, PF.K.dsd_persistent

    def spy_glu_bwd(dy_sorted, w2, g, u, topo, **kw):
        calls.append(("glu_bwd", kw["out"][0] is g and kw["out"][1] is u, kw.get("weighted_h")))
        return glu_bwd(dy_sorted, w2, g, u, topo, **kw)

    def spy_dsd(*a, **kw):
        calls.append(("dsd", kw.get("also") is not None, kw.get("row_weights") is not None))
        return dsd(*a, **kw)

    monkeypatch.setattr(PF.K, "sdd_glu_backward", spy_glu_bwd)
    monkeypatch.setattr(PF.K, "dsd_persistent", spy_dsd)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        y = PF.persistent_glu_ffn(t["x"], t["w1"], t["v1"], t["w2"], plan, topo, t["weights"])
    g_ptrs = {s.data_ptr() for s in saved if s.shape == (topo.capacity, bs, bs)}
    y.backward(dy.to(device), retain_graph=True)
    # forward: one weighted DSD; backward: the GLU backward over g/u with w * h, one DSD with also= for dx
    assert calls == [("dsd", False, True), ("glu_bwd", True, True), ("dsd", True, False)], calls
    assert len(g_ptrs) == 2
    with pytest.raises(RuntimeError, match=r"persistent_glu_ffn: backward ran twice over one graph \(retain_graph=True\)"):
        y.backward(dy.to(device))


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter's TMA emulation; on a GPU the auto path tests TMA")
def test_tma_paths(device):
    """Every kernel through descriptors (use_tma=True: all operands are 16-byte aligned at these sizes)."""
    run_case(device, "k-equals-experts", torch.float16, seed=2, use_tma=True)


class _NoHostRead(TorchDispatchMode):
    """Fails on the ops that copy a device value to the host (``.item()``, ``bool()``, ``nonzero``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_read(device):
    """Forward and backward read no device value back (dispatch mode here; CUDA's sync-debug mode on a GPU)."""
    T, E, k, H, ffn, bs, mode = CASES["prime-experts"]
    plan = plan_routing(make_expert_ids(T, E, k, mode).to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, dy = _leaves(T, E, k, H, ffn, 0)
    t = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
    dy = dy.to(device)

    def step():
        y = PF.persistent_glu_ffn(t["x"], t["w1"], t["v1"], t["w2"], plan, topo, t["weights"])
        y.backward(dy)

    if device.type == "cuda":
        step()  # the first launch compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        with _NoHostRead():
            step()
    assert all(v.grad is not None for v in t.values())


def test_argument_errors(device):
    T, E, k, H, ffn, bs, mode = CASES["one-token"]
    plan = plan_routing(make_expert_ids(T, E, k, mode).to(device), E)
    topo = build_topology(plan, ffn, bs)
    leaves, _ = _leaves(T, E, k, H, ffn, 0)
    a = {n: v.to(device) for n, v in leaves.items()}
    call = lambda **kw: PF.persistent_glu_ffn(**{**dict(a, plan=plan, topo=topo), **kw})  # noqa: E731
    with pytest.raises(
        ValueError, match=r"w2 must have shape \(4, 40, 24\) \(experts, ffn, hidden\), got \(4, 24, 40\)"
    ):
        call(w2=a["w2"].transpose(1, 2).contiguous())
    with pytest.raises(
        TypeError, match=r"persistent_glu_ffn: x must have dtype float32, float16 or bfloat16, got torch.float64"
    ):
        call(x=a["x"].double())
    with pytest.raises(ValueError, match=r"v1 is torch.float16 on cpu; expected x's torch.float32"):
        call(v1=a["v1"].half())
    with pytest.raises(ValueError, match=r"weights must be \[1, 2\] on cpu, got \(2, 1\)"):
        call(weights=a["weights"].t())
    with pytest.raises(ValueError, match=r"x has 2 rows but plan.num_tokens=1"):
        call(x=a["x"].repeat(2, 1))
    with pytest.raises(TypeError, match=r"topo must be a Topology"):
        call(topo=None)
    other = build_topology(plan_routing(make_expert_ids(3, E, k, mode).to(device), E), ffn, bs)
    with pytest.raises(ValueError, match=r"topo was built for 4 experts and 6 slots, the plan has 4 and 2"):
        call(topo=other)


def test_as_a_backend(device):
    """``backend="persistent"`` through ``moe_ffn`` and the dMoE layer: the oracle's values, and refusals that say why."""
    from blocksparse_moe import MoEConfig, dMoE, moe_ffn

    T, E, k, H, ffn, bs, mode = CASES["prime-experts"]
    ids = make_expert_ids(T, E, k, mode, seed=5).to(device)
    leaves, _ = _leaves(T, E, k, H, ffn, 5)
    a = {n: v.to(device) for n, v in leaves.items()}
    y = moe_ffn(a["x"], ids, a["weights"], a["w1"], a["w2"], a["v1"], activation="silu", block_size=bs,
                backend="persistent")  # fmt: skip
    y_ref = moe_ffn_dense(*(t.double().cpu() for t in (a["x"], ids, a["weights"], a["w1"], a["w2"], a["v1"])),
                          activation="silu")  # fmt: skip
    assert_close(y, y_ref, **TOLERANCES[torch.float32], name="moe_ffn(backend='persistent')")
    with pytest.raises(ValueError, match=r"backend='persistent' cannot compute this FFN: it computes a GLU only"):
        moe_ffn(a["x"], ids, a["weights"], a["w1"], a["w2"], activation="silu", backend="persistent")
    with pytest.raises(ValueError, match=r"activation must be 'silu', got 'gelu'"):
        moe_ffn(a["x"], ids, a["weights"], a["w1"], a["w2"], a["v1"], activation="gelu", backend="persistent")
    with pytest.raises(ValueError, match=r"MoEConfig.backend='persistent' needs glu=True and activation='silu'"):
        MoEConfig(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, glu=True, backend="persistent")

    cfg = dict(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, glu=True, activation="silu",
               block_size=bs, device=device)  # fmt: skip
    torch.manual_seed(0)
    ours = dMoE(MoEConfig(**cfg, backend="persistent"))
    ref = dMoE(MoEConfig(**cfg, backend="torch"))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, H, device=device)
    for layer in (ours, ref):
        layer(x).square().sum().backward()
    assert_close(ours(x), ref(x).detach(), **TOLERANCES[torch.float32], name="dMoE persistent vs torch")
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, **TOLERANCES[torch.float32], name=f"dMoE grad {n}")


def test_integration_ffn_refuses_extras(device):
    """The transformers integration's FFN: biases (gpt-oss style) are not the persistent layer's; said so."""
    from blocksparse_moe.integrations._ffn import dropless_ffn

    T, E, k, H, ffn, bs, mode = CASES["one-token"]
    ids = make_expert_ids(T, E, k, mode).to(device)
    leaves, _ = _leaves(T, E, k, H, ffn, 0)
    a = {n: v.to(device) for n, v in leaves.items()}
    with pytest.raises(ValueError, match=r"backend='persistent' computes the plain SwiGLU FFN only"):
        dropless_ffn(a["x"], ids, a["weights"], a["w1"], a["w2"], a["v1"], activation="silu", backend="persistent",
                     b2=torch.zeros(E, H, device=device))  # fmt: skip

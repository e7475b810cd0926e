"""Tests that kill mutants mutmut found surviving (issue 18, item 6; ``python -m benchmarks.mutation``).

Each test names the behaviour the surviving mutants changed and no earlier test looked at:
the activation lookup's whole table, the placement's bounds and messages, the group-limited
top-k's bounds, the grouped backward when only some inputs need a gradient, relu's derivative
at exactly 0, GLU with gelu_tanh through the grouped backward, and padding rows' gradients.
Survivors left without a test have their reason in benchmarks/results/mutmut-reasons.json.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close, make_expert_ids

from blocksparse_moe import plan_routing
from blocksparse_moe.backends import grouped_ffn
from blocksparse_moe.parallel import ExpertPlacement
from blocksparse_moe.parallel.placement import as_placement
from blocksparse_moe.reference import ACTIVATIONS, activation_name, moe_ffn_dense
from blocksparse_moe.router import group_limited_topk
from blocksparse_moe.routing import RoutingPlan


# --------------------------------------------------------------------------- reference.activation_name
def _named(kind: str, **attrs):
    """An object whose type is called ``kind`` (transformers' activation classes, without transformers)."""
    return type(kind, (), attrs)()


def test_activation_name_whole_table():
    for name, fn in ACTIVATIONS.items():
        assert activation_name(name) == name and activation_name(fn) == name
    assert activation_name("swish") is None and activation_name("") is None
    assert activation_name(nn.SiLU()) == "silu" and activation_name(_named("SiLUActivation")) == "silu"
    assert activation_name(nn.ReLU()) == "relu" and activation_name(nn.ReLU(inplace=True)) is None
    assert activation_name(_named("ReLU")) == "relu"  # no ``inplace`` attribute at all
    assert activation_name(nn.GELU()) == "gelu" and activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(_named("GELU", approximate="sigmoid")) is None
    assert activation_name(_named("GELUActivation", act=F.gelu)) == "gelu"
    assert activation_name(_named("GELUActivation", act=F.silu)) is None
    assert activation_name(_named("GELUActivation")) is None
    tanh = functools.partial(F.gelu, approximate="tanh")
    assert activation_name(_named("GELUTanh", act=tanh)) == "gelu_tanh"
    assert activation_name(_named("GELUTanh", act=functools.partial(F.gelu))) is None
    assert activation_name(_named("GELUTanh", act=functools.partial(F.silu, approximate="tanh"))) is None
    assert activation_name(_named("GELUTanh")) is None
    assert activation_name(_named("Tanh")) is None and activation_name(torch.tanh) is None


# --------------------------------------------------------------------------- parallel.placement
def test_placement_bounds_and_messages():
    one = ExpertPlacement(((0,), (0,)), 1)  # world size 1 is valid
    assert one.experts_of(0) == (0, 1)
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got 0"):
        ExpertPlacement(((0,),), 0)
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got True"):
        ExpertPlacement(((0,),), True)  # a bool is not an int here
    with pytest.raises(ValueError, match=r"ranks\[1\] must be a non-empty tuple of ranks holding expert 1, got \[0\]"):
        ExpertPlacement(((0,), [0]), 2)
    with pytest.raises(ValueError, match=r"ranks\[0\] must be a non-empty tuple .* got \(\)"):
        ExpertPlacement(((),), 2)
    with pytest.raises(ValueError, match=r"\(a rank holds an expert at most once\)$"):
        ExpertPlacement(((1, 1),), 2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        ExpertPlacement(((0,), (1,)), 2).experts_of(2)
    with pytest.raises(ValueError, match=r"rank must be an int"):
        ExpertPlacement(((0,), (1,)), 2).experts_of(False)
    assert ExpertPlacement.contiguous(1, 1).owners == (0,)
    assert ExpertPlacement.contiguous(3, 1).owners == (0, 0, 0)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        ExpertPlacement.contiguous(0, 1)
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got 0"):
        ExpertPlacement.contiguous(2, 0)
    with pytest.raises(TypeError, match=r"owners must be a sequence of ranks \(one per expert\), got 3"):
        ExpertPlacement.from_owners(3, 2)
    assert ExpertPlacement(((1,), (0,), (1,)), 3).describe() == "rank 0: [1]; rank 1: [0, 2]; rank 2: []"


def test_placement_from_rank_experts_bounds_and_messages():
    assert ExpertPlacement.from_rank_experts([[0]]).owners == (0,)  # one expert, one rank
    assert ExpertPlacement.from_rank_experts([[1], [0]]).owners == (1, 0)
    with pytest.raises(ValueError, match=r"non-negative int expert ids, got -1 in \[\(0,\), \(-1,\)\]"):
        ExpertPlacement.from_rank_experts([[0], [-1]])
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        ExpertPlacement.from_rank_experts([[], []])
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        ExpertPlacement.from_rank_experts([[]], num_experts=0)
    with pytest.raises(ValueError, match=r"experts_per_rank\[1\] lists expert 2, outside \[0, num_experts=2\)"):
        ExpertPlacement.from_rank_experts([[0], [2]], num_experts=2)
    with pytest.raises(ValueError, match=r"listed for rank 0 and rank 1: each expert must be placed exactly once"):
        ExpertPlacement.from_rank_experts([[0], [0, 1]])


def test_as_placement_builds_what_it_is_given():
    assert as_placement(None, 5, 2) == ExpertPlacement.contiguous(5, 2)
    assert as_placement(None, 5, 2).counts == (3, 2)
    p = as_placement([1, 0, 1], 3, 2)
    assert p.owners == (1, 0, 1) and p.world_size == 2
    assert as_placement((0, 0), 2, 3).world_size == 3


# --------------------------------------------------------------------------- router.group_limited_topk
def test_group_limited_topk_bounds():
    g = torch.Generator().manual_seed(0)
    select = torch.randn(6, 8, generator=g)
    # every bound at its edge is accepted: all groups kept, the whole group ranked
    everything = group_limited_topk(select, 8, 4, topk_groups=4, group_topk=2)
    assert torch.equal(everything, select.topk(8, dim=-1).indices)
    # the default group_topk is 2
    assert torch.equal(group_limited_topk(select, 3, 4, 2), group_limited_topk(select, 3, 4, 2, group_topk=2))
    for bad in [dict(topk_groups=5), dict(topk_groups=0), dict(topk_groups=1, k=3), dict(group_topk=3)]:
        kw = dict(k=2, topk_groups=2, group_topk=2) | bad
        with pytest.raises(ValueError, match=r"expected 1 <= topk_groups <= 4, topk_groups \* 2 >= k"):
            group_limited_topk(select, kw["k"], 4, kw["topk_groups"], kw["group_topk"])
    members = torch.tensor([[0, 5], [1, 4], [2, 7], [3, 6]], dtype=torch.int32)
    ids = group_limited_topk(select, 8, members, topk_groups=4)
    assert ids.dtype == torch.int64 and torch.equal(ids, select.topk(8, dim=-1).indices)


# --------------------------------------------------------------------------- backends.grouped backward
def _case(T=13, E=4, k=2, H=8, Fh=6, glu=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(T, E, k, "uniform", seed=seed)
    t = dict(x=torch.randn(T, H, generator=g), weights=torch.rand(T, k, generator=g),
             w1=torch.randn(E, H, Fh, generator=g) / 3, w2=torch.randn(E, Fh, H, generator=g) / 3)  # fmt: skip
    if glu:
        t["v1"] = torch.randn(E, H, Fh, generator=g) / 3
    return ids, t


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("wanted", ["x", "weights", "w1", "w2", "v1", "x+w2"])
def test_grouped_backward_when_only_some_inputs_need_grad(glu, wanted):
    """Each input's gradient alone (the others frozen) equals the oracle's; the frozen ones get none."""
    if wanted == "v1" and not glu:
        pytest.skip("no v1 without GLU")
    ids, t = _case(glu=glu)
    need = set(wanted.split("+"))
    ours = {n: v.clone().requires_grad_(n in need) for n, v in t.items()}
    ref = {n: v.double().requires_grad_(n in need) for n, v in t.items()}
    E = t["w1"].shape[0]
    y = grouped_ffn(ours["x"], plan_routing(ids, E), ours["weights"], ours["w1"], ours["w2"], ours.get("v1"),
                    activation="silu")  # fmt: skip
    y_ref = moe_ffn_dense(ref["x"], ids, ref["weights"], ref["w1"], ref["w2"], ref.get("v1"), activation="silu")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for n in t:
        if n in need:
            assert_close(ours[n].grad, ref[n].grad, **TOLERANCES[torch.float32], name=f"grad {n}")
        else:
            assert ours[n].grad is None, n


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_grouped_glu_gelu_tanh_backward(layout):
    """GLU with gelu_tanh: the up half's gradient uses act(g) recomputed in the backward."""
    ids, t = _case(glu=True, seed=3)
    if layout == "concat":
        t["w1"] = torch.cat([t["w1"], t.pop("v1")], dim=-1)
    ours = {n: v.clone().requires_grad_() for n, v in t.items()}
    ref = {n: v.double().requires_grad_() for n, v in t.items()}
    E, Fh = t["w1"].shape[0], t["w2"].shape[1]
    y = grouped_ffn(ours["x"], plan_routing(ids, E), ours["weights"], ours["w1"], ours["w2"], ours.get("v1"),
                    activation="gelu_tanh", layout=layout)  # fmt: skip
    rw1, rv1 = (ref["w1"][..., :Fh], ref["w1"][..., Fh:]) if layout == "concat" else (ref["w1"], ref["v1"])
    y_ref = moe_ffn_dense(ref["x"], ids, ref["weights"], rw1, ref["w2"], rv1, activation="gelu_tanh")
    assert_close(y, y_ref, **TOLERANCES[torch.float32], name="output")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for n in t:
        assert_close(ours[n].grad, ref[n].grad, **TOLERANCES[torch.float32], name=f"grad {n}")


def test_grouped_relu_gradient_at_exact_zero_is_zero():
    """relu'(0) is 0 in torch's backward: a pre-activation of exactly 0 passes no gradient."""
    ids = torch.zeros(2, 1, dtype=torch.long)
    x = torch.tensor([[1.0, -1.0], [2.0, 3.0]], requires_grad=True)
    w1 = torch.ones(1, 2, 1, requires_grad=True)  # token 0: g = 1 - 1 = 0 exactly
    w2 = torch.ones(1, 1, 2, requires_grad=True)
    y = grouped_ffn(x, plan_routing(ids, 1), None, w1, w2, activation="relu")
    y.sum().backward()
    xr = x.detach().double().requires_grad_()
    moe_ffn_dense(xr, ids, torch.ones(2, 1, dtype=torch.float64), w1.detach().double(), w2.detach().double(),
                  activation="relu").sum().backward()  # fmt: skip
    assert torch.equal(x.grad.double(), xr.grad)
    assert torch.equal(x.grad[0], torch.zeros(2))


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_grouped_padding_rows_get_zero_gradient(glu):
    """Tokens whose rows lie past the last expert (padding) get an input gradient of exactly 0."""
    T, E, H, Fh = 12, 3, 8, 6
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, E + 1, (T, 1), generator=g)
    ids[:3] = E
    full = plan_routing(ids, E + 1, validate_ids=False)
    plan = RoutingPlan(num_tokens=full.num_tokens, top_k=full.top_k, num_experts=E,
                       sorted_to_slot=full.sorted_to_slot, slot_to_sorted=full.slot_to_sorted,
                       sorted_expert=full.sorted_expert, tokens_per_expert=full.tokens_per_expert[:E],
                       expert_offsets=full.expert_offsets[: E + 1])  # fmt: skip
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w1 = torch.randn(E, H, Fh, generator=g, requires_grad=True)
    w2 = torch.randn(E, Fh, H, generator=g, requires_grad=True)
    v1 = torch.randn(E, H, Fh, generator=g, requires_grad=True) if glu else None
    y = grouped_ffn(x, plan, torch.rand(T, 1, generator=g), w1, w2, v1, activation="gelu", padded=True)
    y.square().sum().backward()
    assert torch.equal(x.grad[:3], torch.zeros(3, H))


# --------------------------------------------------------------------------- topology: to_dense / to_stk
def _topology(T=21, E=3, k=2, ffn=40, bs=16):
    from blocksparse_moe import build_topology

    return build_topology(plan_routing(make_expert_ids(T, E, k, "skewed", seed=1), E), ffn, bs)


def test_to_dense_keeps_dtype_and_masks_spare_blocks():
    topo = _topology()
    b, n_active = topo.block_size, int(topo.offsets[-1])
    assert n_active < topo.capacity  # spare blocks exist
    data = torch.rand(topo.capacity, b, b, dtype=torch.float64) + 1.0
    dense = topo.to_dense(data)
    assert dense.dtype == torch.float64
    assert int((dense != 0).sum()) == n_active * b * b  # spare blocks (past offsets[-1]) left out
    with pytest.raises(ValueError, match=r"data must have shape \(\d+, 16, 16\), got \(1, 16, 16\)"):
        topo.to_dense(data[:1])


def test_to_stk_fields():
    pytest.importorskip("stk")
    topo = _topology()
    b, F = topo.block_size, topo.ffn_blocks
    n_rows = int(topo.expert_block_offsets[-1])
    m = topo.to_stk()
    assert m.data.shape == (n_rows * F, b, b) and not m.data.any()
    assert m.data.dtype == torch.float32 and m.data.device == topo.row_indices.device
    assert m.row_indices.dtype == m.column_indices.dtype == m.column_indices_t.dtype == torch.int16
    assert m.offsets.dtype == m.offsets_t.dtype == m.block_offsets_t.dtype == torch.int32
    assert m.offsets.shape == (n_rows + 1,) and m.row_indices.shape == (n_rows * F,)
    assert torch.equal(m.offsets.long(), topo.offsets[: n_rows + 1].long())
    assert torch.equal(m.column_indices_t.long(), topo.column_indices_t[: n_rows * F].long())
    assert torch.equal(m.offsets_t.long(), topo.offsets_t.long())
    assert torch.equal(m.block_offsets_t.long(), topo.block_offsets_t[: n_rows * F].long())
    with pytest.raises(ValueError, match=r"data must have shape \(\d+, 16, 16\), got \(2, 16, 16\)"):
        topo.to_stk(torch.zeros(2, b, b))


# --------------------------------------------------------------------------- messages that name the argument
def test_grouped_ffn_messages():
    ids, t = _case(glu=True)
    plan = plan_routing(ids, 4)
    with pytest.raises(ValueError, match=r"layout must be one of .*, got 'fused'"):
        grouped_ffn(t["x"], plan, None, t["w1"], t["w2"], t["v1"], layout="fused")
    with pytest.raises(ValueError, match=r"activation must be one of .* for the fused grouped FFN, got 'tanh'"):
        grouped_ffn(t["x"], plan, None, t["w1"], t["w2"], t["v1"], activation="tanh")
    with pytest.raises(ValueError, match=r"got layout='mlp', v1 set$"):
        grouped_ffn(t["x"], plan, None, t["w1"], t["w2"], t["v1"], layout="mlp")
    with pytest.raises(ValueError, match=r"got layout='separate', v1 None$"):
        grouped_ffn(t["x"], plan, None, t["w1"], t["w2"], None, layout="separate")
    # the default activation is gelu
    ref = moe_ffn_dense(t["x"].double(), ids, torch.ones(13, 2, dtype=torch.float64), t["w1"].double(),
                        t["w2"].double(), activation="gelu")  # fmt: skip
    assert_close(grouped_ffn(t["x"], plan, None, t["w1"], t["w2"]), ref, **TOLERANCES[torch.float32])


def test_layer_input_messages():
    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.layers import add_expert_parameters

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2)
    layer = dMoE(cfg)
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        layer(torch.zeros(2, 8).to_sparse())
    m = nn.Module()
    add_expert_parameters(m, cfg, 2)  # the expert-parallel layer's share: 2 of the 4 experts
    assert m.w1.shape == (2, 8, 16) and m.w2.shape == (2, 16, 8) and m.router.weight.shape == (4, 8)
    f64 = dMoE(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, dtype=torch.bfloat16))
    assert f64.w1.dtype == f64.w2.dtype == torch.bfloat16  # the config's dtype reaches the parameters


def test_torch_backend_meta_message():
    from blocksparse_moe import moe_ffn

    m = dict(device="meta")
    with pytest.raises(ValueError, match=r"^backend='torch' loops over the experts on the host .* for meta tensors$"):
        moe_ffn(torch.empty(4, 8, **m), torch.zeros(4, 1, dtype=torch.long, **m), torch.ones(4, 1, **m),
                torch.empty(2, 8, 16, **m), torch.empty(2, 16, 8, **m), backend="torch", block_size=16)  # fmt: skip


# --------------------------------------------------------------------------- layers: the paths of forward
def test_dmoe_expert_choice_with_shared_expert_matches_reference():
    from test_expert_choice import check

    from blocksparse_moe import MoEConfig, dMoE

    torch.manual_seed(2)
    cfg = MoEConfig(16, 32, 4, top_k=2, glu=True, activation="silu", routing="expert_choice", backend="grouped",
                    block_size=16, init_std=0.3, num_shared_experts=1)  # fmt: skip
    check(dMoE(cfg), torch.randn(11, 16))


def test_token_choice_aux_fields():
    from blocksparse_moe import MoEConfig, dMoE

    torch.manual_seed(3)
    layer = dMoE(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    _, aux = layer(torch.randn(5, 8), return_aux=True)
    assert aux.expert_weights.shape == (5, 2) and aux.expert_weights.dtype == torch.float32
    assert aux.unrouted_tokens.dtype == torch.int64 and aux.unrouted_tokens.shape == () and int(aux.unrouted_tokens) == 0
    assert aux.dropped_tokens.dtype == torch.int64 and int(aux.dropped_tokens) == 0


@pytest.mark.parametrize("backend", ["torch", "grouped"])
def test_half_inputs_give_half_outputs(backend):
    """fp16 in, fp16 out: the fp32 accumulators are cast back (moe_ffn and the capacity MoE)."""
    from blocksparse_moe import MoE, MoEConfig, moe_ffn

    ids, t = _case(glu=False, seed=6)
    h = {n: v.half() for n, v in t.items()}
    y = moe_ffn(h["x"], ids, h["weights"], h["w1"], h["w2"], activation="relu", backend=backend, block_size=16)
    assert y.dtype == torch.float16
    ref = moe_ffn_dense(t["x"].double(), ids, t["weights"].double(), t["w1"].double(), t["w2"].double(),
                        activation="relu")  # fmt: skip
    assert_close(y, ref, **TOLERANCES[torch.float16])
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, dtype=torch.float16, backend=backend))
    assert layer(torch.randn(6, 8, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("elements", [80, 16], ids=["two-chunks", "many-chunks"])
def test_grouped_in_cpu_chunks(monkeypatch, elements):
    """The elementwise passes split the rows in chunks of ``_CPU_CHUNK_ELEMENTS``; several chunks give the same result."""
    from blocksparse_moe.backends import grouped_mm

    monkeypatch.setattr(grouped_mm, "_CPU_CHUNK_ELEMENTS", elements)  # width 6: 13 rows, or 2, per chunk
    ids, t = _case(glu=True, seed=7)
    ours = {n: v.clone().requires_grad_() for n, v in t.items()}
    ref = {n: v.double().requires_grad_() for n, v in t.items()}
    y = grouped_ffn(ours["x"], plan_routing(ids, 4), ours["weights"], ours["w1"], ours["w2"], ours["v1"],
                    activation="gelu", products="loops")  # fmt: skip
    y_ref = moe_ffn_dense(ref["x"], ids, ref["weights"], ref["w1"], ref["w2"], ref["v1"], activation="gelu")
    assert_close(y, y_ref, **TOLERANCES[torch.float32], name="output")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for n in t:
        assert_close(ours[n].grad, ref[n].grad, **TOLERANCES[torch.float32], name=f"grad {n}")
    with torch.no_grad():  # the eager bodies, same chunks
        assert_close(grouped_ffn(t["x"], plan_routing(ids, 4), t["weights"], t["w1"], t["w2"], t["v1"],
                                 activation="gelu", products="loops"), y_ref, **TOLERANCES[torch.float32])  # fmt: skip


def test_init_std_reaches_every_weight_and_expert_choice_needs_dmoe():
    from blocksparse_moe import MoE, MoEConfig, dMoE

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=64, num_experts=4, top_k=2, glu=True, init_std=0.005,
                    num_shared_experts=1, shared_expert_gate=True)  # fmt: skip
    layer = dMoE(cfg)
    for name in ("w1", "w2", "v1", "shared_expert_gate.weight"):
        std = float(layer.get_parameter(name).detach().std())
        assert 0.004 < std < 0.006, (name, std)
    ec = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, routing="expert_choice")
    dMoE(ec)
    with pytest.raises(ValueError, match=r"^MoE routes by token choice only; MoEConfig.routing='expert_choice' needs dMoE"):
        MoE(ec)


# --------------------------------------------------------------------------- select / router
def test_resolve_block_backend():
    from blocksparse_moe.backends.select import resolve_block_backend

    cpu = torch.device("cpu")
    assert resolve_block_backend("auto", cpu) == "torch"
    assert resolve_block_backend("torch", cpu) == "torch" and resolve_block_backend("triton", cpu) == "triton"
    assert resolve_block_backend("auto", torch.device("cuda")) == "triton"  # a device object only; nothing runs there
    with pytest.raises(ValueError, match=r"^backend='grouped' has no block-sparse intermediate: the block ops \(sdd, dsd, "
                       r"dsd_t, gather, combine\) take one of \('auto', 'triton', 'torch'\); use moe_ffn / routed_ffn "
                       r"for that backend's FFN$"):
        resolve_block_backend("grouped", cpu)
    with pytest.raises(ValueError, match=r"^backend='persistent' has no block-sparse intermediate"):
        resolve_block_backend("persistent", cpu)


def test_router_scale_and_expert_choice_message():
    from blocksparse_moe import MoEConfig, Router

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    plain = Router(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    scaled = Router(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, router_scale=2.5))
    scaled.load_state_dict(plain.state_dict())
    a, b = plain(x), scaled(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(b.weights, a.weights * 2.5)
    ec = Router(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, routing="expert_choice"))
    with pytest.raises(RuntimeError, match=r"^Router.forward chooses experts per token; with routing='expert_choice' the "
                       r"layer calls Router.scores and blocksparse_moe.expert_choice.expert_choice_route instead$"):
        ec(x)

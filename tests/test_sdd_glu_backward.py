"""The SwiGLU backward SDD (``kernels/sdd_glu_backward.py``) against float64 autograd.

Interpreter (CPU): both load paths (TMA descriptors and masked pointers), fp32 and fp16,
over ``PERSISTENT_CASES`` (an empty expert, one token, sizes off the block grid, a prime
expert count, every token on one expert), with NaN-poisoned outputs and NaN in the saved
``g``/``u`` blocks wherever they hold no element (``padding_poisoned``): the kernel must
read no padding and write zeros there. The oracle is dense: per sorted row ``i`` of expert
``e``, ``y_i = (silu(g_i) * u_i) @ w2[e]`` in float64 with ``g``/``u`` the rounded values the
kernel reads, ``torch.autograd.grad(<y, dy>, (g, u))``, and the dense gradients placed into
the block layout by ``reference.sdd_torch`` against identity matrices (exact in float64).

Routing weights (``row_weights=``): dg, du scaled and ``d_row_weights`` against autograd of
``y = w * (h @ w2)``, over the same cases and ``k = E``, with a NaN-filled workspace.

sm_90: ``tests/sm90_persistent_worker.py ... glu_bwd`` compiles the bf16 BLOCK=128 launches
(TMA and pointers, with ``store_h`` and ``row_weights``) and the checks of
``tests/test_sdd_persistent.py``'s ``sm90_records`` apply to every one (HGMMA, UTMALDG
exactly where descriptors are used, no local memory, shared memory within 227 KB).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F_
from helpers import PERSISTENT_CASES, TOLERANCES, assert_close, make_expert_ids, padding_poisoned, persistent_case

import blocksparse_moe.kernels as K
from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe import reference as ref

B = importlib.import_module("blocksparse_moe.kernels.sdd_glu_backward")


def _blocks(dense: torch.Tensor, topo) -> torch.Tensor:
    """Dense sorted rows ``[S, ffn]`` -> the block layout (identity per expert: exact in float64)."""
    eye = torch.eye(topo.ffn_size, dtype=dense.dtype, device=dense.device).expand(topo.num_experts, -1, -1)
    return ref.sdd_torch(dense, eye, topo)


# The row-weight cases: the persistent ones and k = E (every token on every expert, each expert's
# last block row partial: every sorted row's weight gradient sums over all the column tiles).
RW_CASES = {**{n: None for n in PERSISTENT_CASES}, "k-equals-e": (11, 4, 4, 40, 72, 16, "uniform")}


def _case(device, name, dtype, seed):
    if RW_CASES.get(name) is None:
        return persistent_case(device, name, dtype, seed)
    return persistent_case(device, name, dtype, seed, cases=RW_CASES)


def _problem(device, name, dtype, seed=3, rw_dtype=None):
    """Inputs and the float64 oracle ``(dg, du, h)`` in block layout; with ``rw_dtype`` also routing
    weights ``[S]`` of that dtype (a stride-2 view, one of them 0) and the oracle ``d_row_weights``."""
    plan, topo, rnd, (E, H, ffn) = _case(device, name, dtype, seed)
    S = plan.num_slots
    x, w1, v1, w2, dy = rnd(S, H), rnd(E, H, ffn), rnd(E, H, ffn), rnd(E, ffn, H), rnd(S, H)
    expert = torch.repeat_interleave(torch.arange(E, device=device), plan.tokens_per_expert.long())
    # The saved pre-activations as the forward stores them: one rounding to the working dtype.
    g_rows = torch.einsum("sh,shf->sf", x.double(), w1.double()[expert]).to(dtype)
    u_rows = torch.einsum("sh,shf->sf", x.double(), v1.double()[expert]).to(dtype)
    g64, u64 = g_rows.double().requires_grad_(), u_rows.double().requires_grad_()
    y = torch.einsum("sf,sfh->sh", F_.silu(g64) * u64, w2.double()[expert])
    inputs, rw = (g64, u64), None
    if rw_dtype is not None:
        buf = torch.rand(2 * S, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=rw_dtype)
        buf[2 * (S // 2)] = 0  # a zero weight: dg/du vanish, its own gradient does not
        rw = buf[::2]
        rw64 = rw.double().requires_grad_()
        y, inputs = y * rw64[:, None], (g64, u64, rw64)  # the forward: y_sorted[r] = w[r] * (h[r] @ w2[e])
    grads = torch.autograd.grad((y * dy.double()).sum(), inputs) if S else inputs
    want = tuple(_blocks(t.detach(), topo) for t in (grads[0], grads[1], F_.silu(g64) * u64))
    if rw is not None:
        want += (grads[2].detach(),)
    g, u = _blocks(g_rows.double(), topo).to(dtype), _blocks(u_rows.double(), topo).to(dtype)
    args = (dy, w2, padding_poisoned(g, topo), padding_poisoned(u, topo))
    return plan, topo, args + ((rw,) if rw is not None else ()), want


def _poisoned(topo, dtype, device, n):
    return tuple(torch.full((topo.capacity, topo.block_size, topo.block_size), float("nan"), dtype=dtype,
                            device=device) for _ in range(n))  # fmt: skip


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(PERSISTENT_CASES))
def test_glu_backward_matches_autograd(device, name, dtype, use_tma):
    plan, topo, (dy, w2, g, u), (dg64, du64, h64) = _problem(device, name, dtype)
    if name == "skewed-empty-experts":
        assert (plan.tokens_per_expert == 0).any()
    assert torch.isnan(g).any() or topo.capacity == 0, "the saved blocks' padding is not poisoned"
    dg, du, h = B.sdd_glu_backward(dy, w2, g, u, topo, store_h=True, out=_poisoned(topo, dtype, device, 3),
                                   use_tma=use_tma, num_programs=3)  # fmt: skip
    tol = TOLERANCES[dtype]
    # Each output rounds once from fp32 terms: held to the size of those terms (dh sums H products).
    assert_close(dg, dg64, **tol, name=f"dg {name}")
    assert_close(du, du64, **tol, name=f"du {name}")
    assert_close(h, h64, **tol, name=f"h {name}")
    pad = padding_poisoned(torch.zeros_like(dg), topo).isnan()  # the elements holding no data
    for what, t in (("dg", dg), ("du", du), ("h", h)):
        assert bool((t[pad] == 0).all()), f"{what}: padding or spare blocks not zero"
    two = B.sdd_glu_backward(dy, w2, g, u, topo, use_tma=use_tma, num_programs=2)
    assert len(two) == 2 and torch.equal(two[0], dg) and torch.equal(two[1], du), "store_h changed dg/du"


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(RW_CASES))
def test_glu_backward_row_weights_matches_autograd(device, name, dtype, use_tma, monkeypatch):
    """``row_weights`` (fp32 or bf16, a strided view, one weight 0): dg, du scaled, h not, and ``d_row_weights``
    against float64 autograd of ``y = w * (h @ w2)``; the workspace starts as NaN (every entry must be written).

    Then ``weighted_h`` (the layer's launch): h stored as ``w[r] * silu(g) * u`` against float64 (one rounding
    from fp32), padding zero; dg, du and ``d_row_weights`` bit-identical to the unweighted-h launch
    (d_row_weights uses the unweighted h). Row r's weight at row r's elements is what makes the layer's
    ``dw2[e] = h_w[e]^T dy = h[e]^T (w * dy)[e]``."""
    rw_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    plan, topo, (dy, w2, g, u, rw), (dg64, du64, h64, drw64) = _problem(device, name, dtype, seed=5, rw_dtype=rw_dtype)
    real = B._workspace
    monkeypatch.setattr(B, "_workspace", lambda *a: real(*a).fill_(float("nan")))
    dg, du, h, drw = B.sdd_glu_backward(dy, w2, g, u, topo, row_weights=rw, store_h=True,
                                        out=_poisoned(topo, dtype, device, 3), use_tma=use_tma, num_programs=3)  # fmt: skip
    tol = TOLERANCES[dtype]
    assert drw.dtype == torch.float32 and drw.shape == (plan.num_slots,)
    assert_close(dg, dg64, **tol, name=f"dg {name}")
    assert_close(du, du64, **tol, name=f"du {name}")
    assert_close(h, h64, **tol, name=f"h {name}")
    assert_close(drw, drw64, **tol, name=f"d_row_weights {name}")
    pad = padding_poisoned(torch.zeros_like(dg), topo).isnan()
    for what, t in (("dg", dg), ("du", du), ("h", h)):
        assert bool((t[pad] == 0).all()), f"{what}: padding or spare blocks not zero"
    *grads_w, hw, drw_w = B.sdd_glu_backward(dy, w2, g, u, topo, row_weights=rw, store_h=True, weighted_h=True,
                                             out=_poisoned(topo, dtype, device, 3), use_tma=use_tma, num_programs=3)  # fmt: skip
    w_blocks = _blocks(rw.double()[:, None].expand(-1, topo.ffn_size).contiguous(), topo)  # w[r] at each element
    assert_close(hw, h64 * w_blocks, **tol, name=f"weighted h {name}")
    assert bool((hw[pad] == 0).all()), "weighted h: padding or spare blocks not zero"
    for what, a, b in zip(("dg", "du", "d_row_weights"), (*grads_w, drw_w), (dg, du, drw)):
        assert torch.equal(a, b), f"{what}: changed by weighted_h"
    if dtype != torch.float32:
        return  # the launch without store_h once per case and path (interpreter time)
    three = B.sdd_glu_backward(dy, w2, g, u, topo, row_weights=rw, use_tma=use_tma, num_programs=2)
    assert len(three) == 3, "without store_h: (dg, du, d_row_weights)"
    for what, a, b in zip(("dg", "du", "d_row_weights"), three, (dg, du, drw)):
        assert torch.equal(a, b), f"{what}: changed with store_h or the program count (not deterministic)"


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(RW_CASES))
def test_glu_backward_out_may_alias_g_and_u(device, name, dtype, use_tma):
    """``out=(g, u[, h_buf])``: dg written over g and du over u in place gives results identical to separate
    buffers (NaN-poisoned h_buf). The layer's launch (store_h, row_weights, weighted_h; default EPI_SPLIT=2) runs
    on every case, dtype and path. The other forms and the EPI_SPLIT chunk counts 1 and 4 run in fp32, each on
    one case per path. The kernel before the read-before-store order failed this (dg and h read back the dg/du
    just stored) under the interpreter too."""
    rw_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    plan, topo, (dy, w2, g, u, rw), _ = _problem(device, name, dtype, seed=7, rw_dtype=rw_dtype)
    layer = dict(store_h=True, row_weights=rw, weighted_h=True)
    variants = [(layer, None)]
    if dtype == torch.float32:
        # Dealt round-robin over the cases, shifted per path, so each form meets two cases. The store order is
        # chosen by constexprs, not by the routing; the full grid made this test 189 s instead of 74 s under the
        # interpreter on a 2-core VM.
        extras = [(dict(store_h=True), None), (dict(), None), (dict(store_h=True, row_weights=rw), None),
                  (dict(row_weights=rw), None), (layer, {"EPI_SPLIT": 1}), (layer, {"EPI_SPLIT": 4})]  # fmt: skip
        variants += extras[(list(RW_CASES).index(name) + 2 * use_tma) % len(RW_CASES) :: len(RW_CASES)]
    for kw, cfg in variants:
        n = 3 if kw.get("store_h") else 2
        common = dict(use_tma=use_tma, num_programs=3, config=cfg, **kw)
        want = B.sdd_glu_backward(dy, w2, g, u, topo, out=_poisoned(topo, dtype, device, n), **common)
        g_buf, u_buf = g.clone(), u.clone()  # the saved blocks, NaN in their padding
        out = (g_buf, u_buf) + _poisoned(topo, dtype, device, n - 2)
        got = B.sdd_glu_backward(dy, w2, g_buf, u_buf, topo, out=out, **common)
        assert got[0] is g_buf and got[1] is u_buf, "out not returned"
        assert len(got) == len(want)
        for what, a, b in zip(("dg", "du", "h" if n == 3 else "d_row_weights", "d_row_weights"), got, want):
            assert not a.isnan().any(), f"{what} aliased {kw.keys()} {cfg}: NaN"
            assert torch.equal(a, b), f"{what}: aliased out differs from separate buffers ({list(kw)}, {cfg})"


def test_glu_backward_strided_w2_and_wide_tile(device):
    """``w2`` as a transposed view (the N-major descriptor), a two-block tile with odd ``F``, 5 programs, FLATTEN,
    the epilogue's column chunks (``EPI_SPLIT``)."""
    dtype = torch.float32
    plan, topo, (dy, w2, g, u), want = _problem(device, "skewed-empty-experts", dtype, seed=4)
    _, _, (*_, rw), want_rw = _problem(device, "skewed-empty-experts", dtype, seed=4, rw_dtype=torch.float16)
    assert topo.ffn_blocks % 2 == 1
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [E, ffn, H] with stride(2) != 1
    assert B._b_layout({"w2^T": w2_t.transpose(1, 2)}) == (False, [])
    for use_tma in (False, True):
        # The epilogue in 4, 2 and 1 column chunks (the last two: by TMA where use_tma, else pointers);
        # the two-block tile with routing weights (each row's gradient summed over cdiv(F, 2) tiles).
        for cfg in ({"BLOCKS_N": 2, "BLOCK_K": 16, "EPI_SPLIT": 4}, {"BLOCKS_N": 1, "FLATTEN": True, "EPI_SPLIT": 2},
                    {"BLOCKS_N": 1, "EPI_SPLIT": 1}):  # fmt: skip
            weighted = {"row_weights": rw} if cfg["BLOCKS_N"] == 2 else {}
            got = B.sdd_glu_backward(dy, w2_t, g, u, topo, store_h=True, out=_poisoned(topo, dtype, device, 3),
                                     use_tma=use_tma, config=cfg, num_programs=5, **weighted)  # fmt: skip
            for what, a, e in zip(("dg", "du", "h", "d_row_weights"), got, want_rw if weighted else want):
                assert_close(a, e, **TOLERANCES[dtype], name=f"{what} {cfg} use_tma={use_tma}")
            assert len(got) == 3 + bool(weighted)


def test_glu_backward_bad_arguments_are_named(device):
    plan, topo, (dy, w2, g, u), _ = _problem(device, "skewed-empty-experts", torch.float32)
    f = B.sdd_glu_backward
    with pytest.raises(ValueError, match=r"w2\.shape\[2\] must equal dy_sorted\.shape\[1\]"):
        f(dy, w2[:, :, :-1], g, u, topo)
    with pytest.raises(ValueError, match=r"w2\.shape\[1\] must equal topo\.ffn_size"):
        f(dy, w2[:, :-1], g, u, topo)
    with pytest.raises(ValueError, match="g must have shape"):
        f(dy, w2, g[:-1], u, topo)
    with pytest.raises(ValueError, match="u must be contiguous"):
        f(dy, w2, g, u.transpose(1, 2), topo)
    with pytest.raises(TypeError, match="u has dtype torch.float16"):
        f(dy, w2, g, u.half(), topo)
    with pytest.raises(ValueError, match=r"out must be a tuple \(dg, du, h\)"):
        f(dy, w2, g, u, topo, store_h=True, out=(g.clone(), u.clone()))
    with pytest.raises(ValueError, match="out du must be torch.float32"):
        f(dy, w2, g, u, topo, out=(g.clone(), u.half()))
    with pytest.raises(ValueError, match=r"dy_sorted\.stride\(0\)"):
        odd = torch.zeros(dy.shape[0], dy.shape[1] + 1, device=device)[:, : dy.shape[1]]  # 164-byte rows
        f(odd, w2, g, u, topo, use_tma=True)
    with pytest.raises(ValueError, match="schedule must be int32"):
        f(dy, w2, g, u, topo, schedule=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="num_programs must be >= 1"):
        f(dy, w2, g, u, topo, num_programs=-1)
    S = dy.shape[0]
    with pytest.raises(ValueError, match=rf"row_weights must be \[{S}\] \(one weight per sorted row\)"):
        f(dy, w2, g, u, topo, row_weights=torch.ones(S + 1, device=device))
    with pytest.raises(ValueError, match="row_weights must be 1-D"):
        f(dy, w2, g, u, topo, row_weights=torch.ones(S, 1, device=device))
    with pytest.raises(TypeError, match="row_weights must have dtype float32, float16 or bfloat16"):
        f(dy, w2, g, u, topo, row_weights=torch.ones(S, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"weighted_h=True needs store_h=True and row_weights"):
        f(dy, w2, g, u, topo, row_weights=torch.ones(S, device=device), weighted_h=True)
    with pytest.raises(ValueError, match=r"weighted_h=True needs store_h=True and row_weights"):
        f(dy, w2, g, u, topo, store_h=True, weighted_h=True)
    with pytest.raises(ValueError, match="config EPI_SPLIT=3 must be 1, 2 or 4"):
        f(dy, w2, g, u, topo, config={"EPI_SPLIT": 3})
    E, ffn, H = w2.shape
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    z = torch.zeros(0, 16, 16, device=device)
    assert [t.shape for t in f(torch.zeros(0, H, device=device), w2, z, z, empty, store_h=True)] == [(0, 16, 16)] * 3
    got = f(torch.zeros(0, H, device=device), w2, z, z, empty, row_weights=torch.zeros(0, device=device))
    assert [t.shape for t in got] == [(0, 16, 16), (0, 16, 16), (0,)] and got[2].dtype == torch.float32
    assert K.sdd_glu_backward is f


def test_glu_backward_compiles_for_sm90():
    """HGMMA, UTMALDG (and the epilogue's UTMASTG) exactly with descriptors, shared <= 227 KB, and no local
    memory (stack, LDL, STL) on every record: both load paths, with store_h and with row_weights. The pointer
    default's epilogue in four column chunks (EPI_SPLIT=4) is what keeps it there (docs/perf-notes.md)."""
    from test_sdd_persistent import sm90_records

    records = sm90_records("glu_bwd")  # no spills_known: a spill anywhere fails
    names = {r["name"] for r in records}
    for path in ("tma", "pointers"):
        for variant in ("", " store_h", " row_weights", " store_h row_weights"):
            assert f"glu_bwd {path}{variant}" in names, f"glu_bwd {path}{variant} not compiled"
    assert "glu_bwd tma store_h row_weights weighted_h" in names, "the layer's launch (weighted_h) not compiled"
    for r in records:
        assert r["resources"]["stack"] == 0 and not (r["sass"]["LDL"] or r["sass"]["STL"]), f"{r['name']}: spills"
        if r["use_tma"] and r["config"].get("BLOCKS_N", 1) == 1:
            assert r["sass"]["UTMASTG"] >= 2, f"{r['name']}: dg/du not stored by TMA: {r['sass']}"
        if not r["use_tma"] and "sweep" not in r["name"]:
            assert r["config"]["EPI_SPLIT"] == 4, f"{r['name']}: not the pointer default {r['config']}"

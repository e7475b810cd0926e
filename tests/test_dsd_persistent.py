"""The persistent DSD (``kernels/dsd_persistent.py``) against the float64 reference.

Interpreter (CPU): both load paths (TMA descriptors, which triton 3.9's interpreter
runs with the hardware's zero fill, and masked pointers), fp32 and fp16 (not bf16:
the interpreter's bf16 dot is wrong), with and without routing weights in the
epilogue, over the suite's edge cases: an empty expert, one token, sizes off the
block and tile grids, a prime expert count, every token on one expert, a K-major
``w2`` view (transformers' ``down_proj`` transposed), 2 to 5 programs. The block
data holds NaN wherever it has no element of ``h`` (rows past an expert's end, columns
past ``ffn``, spare blocks), and the output starts as NaN inside a sentinel-guarded
wider buffer: the kernel must mask every padding element and write every row.

The dual form (``also=(h2_blocks, w2b)``: ``blocks(h) @ w2 + blocks(h2) @ w2b`` in one
launch, the GLU backward's ``dx_sorted = dg @ w1^T + du @ v1^T``) over the same cases,
both pairs NaN-poisoned, with each weight N- or K-major, each pair's TMA decided on
its own operands, and its argument errors.

sm_90: ``tests/sm90_persistent_worker.py`` compiles the default bf16 BLOCK=128
launches (``dsd tma``, ``dsd tma k-major``, ``dsd pointers``, ``dsd tma row_weights``,
and the dual ``dsd dual ...`` records); ``test_dsd_persistent_compiles_for_sm90`` checks them
with ``tests/test_sdd_persistent.py``'s checks.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from helpers import PERSISTENT_CASES, TOLERANCES, assert_close, make_expert_ids, padding_poisoned, persistent_case

import blocksparse_moe.kernels as K
from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe import reference as ref

P = importlib.import_module("blocksparse_moe.kernels.dsd_persistent")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

CASES = PERSISTENT_CASES  # width = H: 40 is off the 32-column tile, ffn 72 and 104 need the K tail


def _case(device, name, dtype, seed=0):
    plan, topo, rnd, (E, H, ffn) = persistent_case(device, name, dtype, seed)
    h = padding_poisoned(ref.sdd_torch(rnd(plan.num_slots, 8), rnd(E, 8, ffn), topo), topo)
    return plan, topo, rnd, h, (E, H, ffn)


def _guarded_out(S, N, dtype, device, sentinel=1234.0):
    """A NaN ``[S, N]`` window of a wider, taller buffer whose guard cells hold ``sentinel``."""
    buf = torch.full((S + 2, N + 8), sentinel, dtype=dtype, device=device)
    out = buf[1 : S + 1, :N]
    out.fill_(float("nan"))
    guard = torch.ones_like(buf, dtype=torch.bool)
    guard[1 : S + 1, :N] = False
    return buf, out, guard


def _expect(h, w2, topo, rw):
    y = ref.dsd_torch(h.double(), w2.double(), topo)
    return y if rw is None else y * rw.double()[:, None]


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "row_weights"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_dsd_persistent_matches_reference(device, name, dtype, use_tma, weighted):
    plan, topo, rnd, h, (E, H, ffn) = _case(device, name, dtype)
    if name == "skewed-empty-experts":
        assert (plan.tokens_per_expert == 0).any()
    assert torch.isnan(h).any() or name == "all-on-one-expert"
    w2 = rnd(E, ffn, H)
    rw = torch.rand(plan.num_slots, generator=torch.Generator().manual_seed(3)).to(device) if weighted else None
    buf, out, guard = _guarded_out(plan.num_slots, H, dtype, device)
    # 3 programs: each walks several tiles, active and spare, in schedule order.
    P.dsd_persistent(h, w2, topo, out=out, row_weights=rw, use_tma=use_tma, num_programs=3)
    assert_close(out, _expect(h, w2, topo, rw), **TOLERANCES[dtype], name=f"dsd_persistent {name}")
    assert torch.all(buf[guard] == 1234.0), "stored outside its output (past a row or column edge)"
    if INTERPRETING and not weighted:
        assert torch.equal(out, K.dsd(h, w2, topo)), "not bit-identical to dsd (same K steps under the interpreter)"


@pytest.mark.parametrize("programs", [2, 5])
def test_k_major_w2_and_programs(device, programs):
    """``w2 = down_proj.transpose(1, 2)`` (K-contiguous) takes the K-major descriptor; 2 and 5 programs."""
    plan, topo, rnd, h, (E, H, ffn) = _case(device, "prime-experts", torch.float32, seed=1)
    down_proj = rnd(E, H, ffn)  # [E, H, ffn], as transformers stores it
    w2 = down_proj.transpose(1, 2)
    assert P._b_k_major(w2) == (True, None)
    rw = torch.rand(plan.num_slots, generator=torch.Generator().manual_seed(4)).to(device)
    for use_tma in (True, False):
        for weights in (None, rw):
            out = P.dsd_persistent(h, w2, topo, row_weights=weights, use_tma=use_tma, num_programs=programs)
            assert_close(out, _expect(h, w2, topo, weights), **TOLERANCES[torch.float32], name=f"k-major tma={use_tma}")


def test_row_weights_make_the_combine_a_gather_sum(device):
    """With the routing weights in the epilogue, ``combine(y, weights=None)`` is the weighted combine."""
    plan, topo, rnd, h, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32, seed=2)
    w2 = rnd(E, ffn, H)
    weights = torch.rand(plan.num_tokens, plan.top_k, generator=torch.Generator().manual_seed(5)).to(device)
    rw = weights.reshape(-1)[plan.sorted_to_slot.long()]  # sorted row i is slot sorted_to_slot[i]
    y = P.dsd_persistent(h, w2, topo, row_weights=rw, use_tma=True)
    expect = ref.combine_torch(ref.dsd_torch(h.double(), w2.double(), topo), plan, weights.double())
    assert_close(ref.combine_torch(y, plan, None), expect, **TOLERANCES[torch.float32], name="gather-sum")


def test_config_and_schedule(device):
    """A wider column tile and a smaller K step than the default; the schedule is a permutation, active first."""
    plan, topo, rnd, h, (E, H, ffn) = _case(device, "prime-experts", torch.float16)
    w2 = rnd(E, ffn, H)
    for use_tma in (False, True):
        for cfg in ({"BLOCK_N": 64, "BLOCK_K": 16}, {"BLOCK_N": 64, "FLATTEN": True}):
            out = P.dsd_persistent(h, w2, topo, use_tma=use_tma, config=cfg, num_programs=4)
            assert_close(out, _expect(h, w2, topo, None), **TOLERANCES[torch.float16], name=f"config {cfg}")
    nt = -(-H // 32)
    sched = P.dsd_tile_schedule(topo, H, 32).long().cpu()
    bits = max(1, (nt - 1).bit_length())
    r, c = sched >> bits, sched & ((1 << bits) - 1)
    assert sorted((r * nt + c).tolist()) == list(range(topo.max_block_rows * nt)), "not a permutation of the tiles"
    r_act = int(topo.expert_block_offsets[-1])
    assert bool((r[: r_act * nt] < r_act).all()) and bool((r[r_act * nt :] >= r_act).all()), "active tiles not first"


def test_bad_arguments_are_named(device):
    plan, topo, rnd, h, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    w2 = rnd(E, ffn, H)
    odd = rnd(E, ffn, H + 1)[:, :, :H]  # row stride 41 floats: neither orientation is a TMA layout
    with pytest.raises(ValueError, match=r"w2\.stride\(1\)"):
        P.dsd_persistent(h, odd, topo, use_tma=True)
    shifted = torch.empty(h.numel() + 1, dtype=h.dtype, device=device)[1:].view(h.shape)  # base 4 bytes off 16
    shifted.copy_(h)
    with pytest.raises(ValueError, match="h_blocks's data pointer must be 16-byte aligned"):
        P.dsd_persistent(shifted, w2, topo, use_tma=True)
    expect = _expect(h, w2, topo, None)
    assert_close(P.dsd_persistent(shifted, w2, topo), expect, **TOLERANCES[torch.float32], name="unaligned, auto")
    assert_close(
        P.dsd_persistent(h, odd, topo, use_tma=False), _expect(h, odd, topo, None), **TOLERANCES[torch.float32]
    )
    with pytest.raises(ValueError, match="BLOCK_N=512"):
        P.dsd_persistent(h, w2, topo, config={"BLOCK_N": 512})
    with pytest.raises(ValueError, match="BLOCK_K=32 must divide the block size 16"):
        P.dsd_persistent(h, w2, topo, config={"BLOCK_K": 32})
    with pytest.raises(ValueError, match="unknown keys"):
        P.dsd_persistent(h, w2, topo, config={"BLOCKS_N": 2})
    with pytest.raises(ValueError, match="row_weights must be"):
        P.dsd_persistent(h, w2, topo, row_weights=torch.ones(plan.num_slots + 1, device=device))
    with pytest.raises(ValueError, match=r"w2 must have shape \[5, 72, N\]"):
        P.dsd_persistent(h, w2[:, :-1], topo)
    with pytest.raises(ValueError, match="schedule must be int32"):
        P.dsd_persistent(h, w2, topo, schedule=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out must be"):
        P.dsd_persistent(h, w2, topo, out=torch.empty(plan.num_slots, H + 1, device=device))
    assert_close(P.dsd_persistent(h, w2, topo), expect, **TOLERANCES[torch.float32], name="defaults")
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    assert P.dsd_persistent(torch.zeros(0, 16, 16, device=device), w2, empty).shape == (0, H)


def test_dsd_persistent_compiles_for_sm90():
    """The default bf16 BLOCK=128 DSD launches: HGMMA, UTMALDG exactly with descriptors, no local memory."""
    from test_sdd_persistent import sm90_records  # the same worker and checks as the SDD's records

    records = sm90_records("dsd")
    names = {r["name"] for r in records}
    assert {"dsd tma", "dsd tma k-major w2 (down_proj^T)", "dsd tma row_weights", "dsd pointers"} <= names
    default = next(r for r in records if r["name"] == "dsd tma")["config"]
    assert (default["BLOCK_N"], default["BLOCK_K"], default["num_warps"]) == (256, 64, 8), default  # 128x256x64
    # The dual form (also=): two K loops, each on wgmma (HGMMA twice the single form's), TMA where asked,
    # no spills (sm90_records' checks: no local memory, shared memory within the 227 KB).
    by_name = {r["name"]: r for r in records}
    duals = [r for r in records if r.get("dual")]
    assert {"dsd dual tma k-major (dx: dg@w1^T + du@v1^T)", "dsd dual tma n-major + k-major", "dsd dual pointers",
            "dsd dual tma k-tail (ffn % 128 != 0)", "dsd dual tma row_weights"} <= {r["name"] for r in duals}  # fmt: skip
    for r in duals:
        single = by_name[
            "dsd tma k-tail (ffn % 128 != 0)" if r["k_tail"] else "dsd tma" if r["use_tma"] else "dsd pointers"
        ]
        assert r["sass"]["HGMMA"] >= 2 * single["sass"]["HGMMA"] > 0, (r["name"], r["sass"], single["sass"])
        if r["use_tma"]:  # both pairs' A and B tiles by descriptor
            assert r["sass"]["UTMALDG"] >= 2 * single["sass"]["UTMALDG"], (r["name"], r["sass"], single["sass"])
        else:
            assert r["sass"]["LDGSTS"] >= 2 * single["sass"]["LDGSTS"], (r["name"], r["sass"], single["sass"])
        assert r["resources"]["stack"] == 0 and r["resources"]["local"] == 0 and r["shared"] <= 227 * 1024, r


def _dual_case(device, name, dtype, layout, seed=0):
    """``(plan, topo, (h, w), (h2, w2b))``: two NaN-poisoned block tensors over one topology, and their weights.

    ``layout`` names the weights' orientations: "kk" both K-major views of ``[E, N, ffn]``
    parameters (the backward's ``w1^T``, ``v1^T``), "nk" an N-major ``w`` and a K-major ``w2b``.
    """
    plan, topo, rnd, h, (E, H, ffn) = _case(device, name, dtype, seed)
    h2 = padding_poisoned(ref.sdd_torch(rnd(plan.num_slots, 8), rnd(E, 8, ffn), topo), topo)
    w = rnd(E, H, ffn).transpose(1, 2) if layout == "kk" else rnd(E, ffn, H)
    w2b = rnd(E, H, ffn).transpose(1, 2)
    return plan, topo, (h, w), (h2, w2b)


def _expect_dual(pair, pair2, topo, rw):
    y = ref.dsd_torch(pair[0].double(), pair[1].double(), topo) + ref.dsd_torch(
        pair2[0].double(), pair2[1].double(), topo
    )
    return y if rw is None else y * rw.double()[:, None]


@pytest.mark.parametrize("layout", ["kk", "nk"], ids=["kmajor-both", "nmajor-kmajor"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "row_weights"])
@pytest.mark.parametrize("use_tma", [False, True, None], ids=["pointers", "tma", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_dual_matches_reference(device, name, dtype, use_tma, weighted, layout):
    """``also=``: both K loops into one accumulator, one store of the sum (every row, nothing outside)."""
    plan, topo, pair, pair2 = _dual_case(device, name, dtype, layout)
    assert torch.isnan(pair2[0]).any() or name == "all-on-one-expert"
    if name == "skewed-empty-experts":
        assert (plan.tokens_per_expert == 0).any()
    if name == "all-on-one-expert":
        assert int((plan.tokens_per_expert > 0).sum()) == 1
    assert P._b_k_major(pair2[1]) == (True, None) and P._b_k_major(pair[1])[0] == (layout == "kk")
    rw = torch.rand(plan.num_slots, generator=torch.Generator().manual_seed(3)).to(device) if weighted else None
    buf, out, guard = _guarded_out(plan.num_slots, pair[1].shape[2], dtype, device)
    got = P.dsd_persistent(*pair, topo, out=out, also=pair2, row_weights=rw, use_tma=use_tma, num_programs=3)
    assert got.data_ptr() == out.data_ptr()
    assert_close(out, _expect_dual(pair, pair2, topo, rw), **TOLERANCES[dtype], name=f"dual {name} {layout}")
    assert torch.all(buf[guard] == 1234.0), "stored outside its output (past a row or column edge)"


def test_dual_is_the_sum_of_two_launches(device):
    """fp32: the one launch equals the two single launches added (to rounding), at 2 and 5 programs, other configs."""
    plan, topo, pair, pair2 = _dual_case(device, "prime-experts", torch.float32, "kk", seed=1)
    two = P.dsd_persistent(*pair, topo) + P.dsd_persistent(*pair2, topo)
    expect = _expect_dual(pair, pair2, topo, None)
    assert_close(two, expect, **TOLERANCES[torch.float32], name="two launches")
    H = pair[1].shape[2]
    for use_tma in (True, False):
        for programs, cfg in ((2, None), (5, {"BLOCK_N": 64, "BLOCK_K": 16}), (4, {"FLATTEN": True})):
            sched = P.dsd_tile_schedule(topo, H, (cfg or {}).get("BLOCK_N", 32))  # one schedule for both pairs
            got = P.dsd_persistent(*pair, topo, also=pair2, use_tma=use_tma, num_programs=programs, config=cfg,
                                   schedule=sched)  # fmt: skip
            assert_close(got, two, **TOLERANCES[torch.float32], name=f"dual vs two, tma={use_tma} {cfg}")
            assert_close(got, expect, **TOLERANCES[torch.float32], name=f"dual, tma={use_tma} {cfg}")


def test_dual_tma_is_decided_per_pair(device, monkeypatch):
    """Auto on a GPU: a pair goes by TMA when both its operands qualify, whatever the other pair's layout."""
    plan, topo, pair, pair2 = _dual_case(device, "skewed-empty-experts", torch.float32, "nk")
    E, ffn, H = pair[1].shape
    odd = torch.randn(E, ffn, H + 1, generator=torch.Generator().manual_seed(6)).to(device)[:, :, :H]
    odd_pair = (pair2[0], odd)  # row stride H + 1 = 41 floats: neither orientation is a TMA layout
    real = P.resolve_tma

    def gpu_auto(op, use_tma, operand, problems):  # what resolve_tma(None) answers on an sm_90 GPU
        return real(op, not problems if use_tma is None else use_tma, operand, problems)

    monkeypatch.setattr(P, "resolve_tma", gpu_auto)
    assert P._pair_tma("op", None, *pair, ("h_blocks", "w2")) == (True, False)
    assert P._pair_tma("op", None, *pair2, ("h2", "w2b")) == (True, True)
    assert P._pair_tma("op", None, *odd_pair, ("h2", "w2b")) == (False, False)
    # Pair 1 by TMA (N-major), pair 2 by pointers (its weight does not qualify).
    got = P.dsd_persistent(*pair, topo, also=odd_pair, num_programs=3)
    assert_close(got, _expect_dual(pair, odd_pair, topo, None), **TOLERANCES[torch.float32], name="tma + pointers")
    # And the other way round: pair 1 by pointers, pair 2 by TMA (K-major).
    got = P.dsd_persistent(pair[0], odd, topo, also=pair2, num_programs=3)
    expect = _expect_dual((pair[0], odd), pair2, topo, None)
    assert_close(got, expect, **TOLERANCES[torch.float32], name="pointers + tma")


def test_dual_bad_arguments_are_named(device):
    plan, topo, pair, pair2 = _dual_case(device, "skewed-empty-experts", torch.float32, "nk")
    h, w = pair
    h2, w2b = pair2
    E, ffn, H = w.shape
    with pytest.raises(TypeError, match=r"also must be a pair \(h2_blocks, w2b\) of tensors, got tuple of length 1"):
        P.dsd_persistent(h, w, topo, also=(h2,))
    with pytest.raises(TypeError, match="also must be a pair .* got Tensor"):
        P.dsd_persistent(h, w, topo, also=h2)
    with pytest.raises(
        ValueError, match=r"also\[0\] \(h2_blocks\) must have shape \(\d+, 16, 16\), got \(\d+, 16, 8\)"
    ):
        P.dsd_persistent(h, w, topo, also=(h2[:, :, :8], w2b))
    with pytest.raises(ValueError, match=r"also\[0\] \(h2_blocks\) must be contiguous"):
        P.dsd_persistent(h, w, topo, also=(h2.transpose(1, 2), w2b))
    with pytest.raises(ValueError, match=r"also\[1\] \(w2b\) must have w2's shape \(5, 72, 40\) .* got \(5, 72, 39\)"):
        P.dsd_persistent(h, w, topo, also=(h2, w2b[:, :, :-1]))
    with pytest.raises(ValueError, match=r"also\[1\] \(w2b\) must be 3-D"):
        P.dsd_persistent(h, w, topo, also=(h2, w2b[0]))
    with pytest.raises(
        TypeError, match=r"also\[0\] \(h2_blocks\) has dtype torch.float16 but h_blocks has torch.float32"
    ):
        P.dsd_persistent(h, w, topo, also=(h2.half(), w2b))
    with pytest.raises(TypeError, match=r"also\[1\] \(w2b\) has dtype torch.float16 but h_blocks has torch.float32"):
        P.dsd_persistent(h, w, topo, also=(h2, w2b.half()))
    with pytest.raises(
        TypeError, match=r"also\[1\] \(w2b\) must have dtype float32, float16 or bfloat16, got torch.float64"
    ):
        P.dsd_persistent(h, w, topo, also=(h2, w2b.double()))
    odd = torch.randn(E, ffn, H + 1, device=device)[:, :, :H]
    with pytest.raises(
        ValueError,
        match=r"use_tma=True but .*also\[1\] \(w2b\)\.stride\(1\) \* 4 bytes must be a positive multiple of 16, got stride 41",
    ):
        P.dsd_persistent(h, w, topo, also=(h2, odd), use_tma=True)
    shifted = torch.empty(h2.numel() + 1, dtype=h2.dtype, device=device)[1:].view(h2.shape)
    shifted.copy_(h2)
    with pytest.raises(ValueError, match=r"also\[0\] \(h2_blocks\)'s data pointer must be 16-byte aligned"):
        P.dsd_persistent(h, w, topo, also=(shifted, w2b), use_tma=True)
    # Neither pair qualifying is still a correct launch without use_tma=True.
    assert_close(P.dsd_persistent(h, w, topo, also=(shifted, odd)), _expect_dual(pair, (h2, odd), topo, None),
                 **TOLERANCES[torch.float32], name="unaligned, auto")  # fmt: skip
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    z = torch.zeros(0, 16, 16, device=device)
    assert P.dsd_persistent(z, w, empty, also=(z, w2b)).shape == (0, H)


def test_device_benchmark_plans_the_dsd(tmp_path):
    """The prepared device timing plans the DSD rows: the 128x256 tile, TMA eligible, no K tail at either shape."""
    from benchmarks import persistent as bench

    assert bench.main(["--dry-run", "--out", str(tmp_path), "--routing", "uniform"]) == 0
    with open(tmp_path / "persistent-plan.json") as f:
        plans = json.load(f)
    for p in plans:
        d = p["dsd"]
        assert d["tma"] == {"h_blocks": "ok", "w2 [E,F,H]": "ok", "down_proj^T view": "ok"}, d["tma"]
        assert (d["default_config"]["BLOCK_N"], d["default_config"]["BLOCK_K"]) == (256, 64) and not d["k_tail"]
        # The backward's dual DSD (dx_sorted): both weights' K-major views TMA eligible, twice the K steps.
        assert d["dual_dx"]["tma"] == {"w1^T view": "ok", "v1^T view": "ok"}, d["dual_dx"]
        assert d["dual_dx"]["k_steps_per_tile"] == 2 * -(-p["shape"]["ffn"] // d["default_config"]["BLOCK_K"])

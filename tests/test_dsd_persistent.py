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

sm_90: ``tests/sm90_persistent_worker.py`` compiles the default bf16 BLOCK=128
launches (``dsd tma``, ``dsd tma k-major``, ``dsd pointers``, ``dsd tma row_weights``);
``tests/test_sdd_persistent.py::test_persistent_kernels_compile_for_sm90`` checks them.
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

"""The persistent DSD^T (``kernels/dsd_t_persistent.py``) against the float64 reference.

Interpreter (CPU): both load paths (TMA descriptors, which triton 3.9's interpreter
runs with the hardware's zero fill, and masked pointers), fp32 and fp16 (not bf16:
the interpreter's bf16 dot is wrong), over the suite's edge cases: empty experts
(their gradients must be exactly zero), one token, sizes off the block and tile grids
(``ffn`` and ``N``), a prime expert count (E=7), every token on one expert, a
transposed ``[E, N, ffn]`` target (``dw1.transpose(1, 2)``), 2 to 5 programs. The block
data holds NaN wherever it has no element of ``h`` (rows past an expert's end, columns
past ``ffn``, spare blocks), and the output starts as NaN inside a sentinel-guarded
wider buffer: the kernel must never use a padding element and must write every element.

sm_90: ``tests/sm90_persistent_worker.py dsd_t`` compiles the default bf16 BLOCK=128
launches; ``test_dsd_t_persistent_compiles_for_sm90`` checks them.
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

P = importlib.import_module("blocksparse_moe.kernels.dsd_t_persistent")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

CASES = PERSISTENT_CASES  # width = N: 40 is off the 32-column tile, ffn 72 and 104 off the block grid


def _case(device, name, dtype, seed=0):
    plan, topo, rnd, (E, N, ffn) = persistent_case(device, name, dtype, seed)
    h = padding_poisoned(ref.sdd_torch(rnd(plan.num_slots, 8), rnd(E, 8, ffn), topo), topo)
    return plan, topo, h, rnd(plan.num_slots, N), (E, N, ffn)


def _guarded_out(E, ffn, N, dtype, device, transposed=False, sentinel=1234.0):
    """A NaN ``[E, ffn, N]`` window (or a ``[E, N, ffn]`` one, transposed) of a wider buffer with guard cells."""
    rows, cols = (N, ffn) if transposed else (ffn, N)
    buf = torch.full((E, rows + 2, cols + 8), sentinel, dtype=dtype, device=device)
    win = buf[:, 1 : rows + 1, :cols]
    win.fill_(float("nan"))
    guard = torch.ones_like(buf, dtype=torch.bool)
    guard[:, 1 : rows + 1, :cols] = False
    return buf, (win.transpose(1, 2) if transposed else win), guard


def _expect(h, b, topo):
    return ref.dsd_t_torch(h.double(), b.double(), topo)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_dsd_t_persistent_matches_reference(device, name, dtype, use_tma):
    plan, topo, h, b, (E, N, ffn) = _case(device, name, dtype)
    assert torch.isnan(h).any() or name == "all-on-one-expert"
    buf, out, guard = _guarded_out(E, ffn, N, dtype, device)
    # 3 programs: each walks several tiles, of heavy, light and empty experts, in schedule order.
    P.dsd_t_persistent(h, b, topo, out=out, use_tma=use_tma, num_programs=3)
    assert_close(out, _expect(h, b, topo), **TOLERANCES[dtype], name=f"dsd_t_persistent {name}")
    assert torch.all(buf[guard] == 1234.0), "stored outside its output (past a row or column edge)"
    empty = plan.tokens_per_expert == 0
    if name in ("skewed-empty-experts", "all-on-one-expert", "one-token"):
        assert empty.any()
    assert torch.all(out[empty.to(out.device)] == 0), "an empty expert's gradient is not exactly zero"
    if INTERPRETING and dtype == torch.float32:
        # dsd_t's K step is a whole block row, this one BLOCK_K rows: compare values, not bits.
        assert_close(out, K.dsd_t(h, b, topo).double(), **TOLERANCES[dtype], name="vs dsd_t")


@pytest.mark.parametrize("programs", [2, 5])
def test_transposed_target_and_programs(device, programs):
    """``out = dw1.transpose(1, 2)`` (a weight stored ``[E, N, ffn]``): the store follows the strides."""
    plan, topo, h, b, (E, N, ffn) = _case(device, "prime-experts", torch.float32, seed=1)
    for use_tma in (True, False):
        buf, out, guard = _guarded_out(E, ffn, N, torch.float32, device, transposed=True)
        assert out.stride(1) == 1
        P.dsd_t_persistent(h, b, topo, out=out, use_tma=use_tma, num_programs=programs)
        assert_close(out, _expect(h, b, topo), **TOLERANCES[torch.float32], name=f"transposed tma={use_tma}")
        assert torch.all(buf[guard] == 1234.0), "stored outside the transposed target"


def test_config_and_schedule(device):
    """A wider hidden tile and a smaller K step; the schedule is a permutation of the tiles, heaviest expert first."""
    plan, topo, h, b, (E, N, ffn) = _case(device, "prime-experts", torch.float16)  # block 32
    expect = _expect(h, b, topo)
    for use_tma in (False, True):
        for cfg in ({"BLOCK_N": 64, "BLOCK_K": 16}, {"BLOCK_N": 16, "FLATTEN": True}):
            out = P.dsd_t_persistent(h, b, topo, use_tma=use_tma, config=cfg, num_programs=4)
            assert_close(out, expect, **TOLERANCES[torch.float16], name=f"config {cfg}")
    plan, topo, h, b, (E, N, ffn) = _case(device, "skewed-empty-experts", torch.float16)
    F, nt = topo.ffn_blocks, -(-N // 32)
    sched = P.dsd_t_tile_schedule(topo, N, 32, programs=1).long().cpu()  # one program: the sorted order itself
    bits = max(1, (nt - 1).bit_length())
    c, n = sched >> bits, sched & ((1 << bits) - 1)
    assert sorted((c * nt + n).tolist()) == list(range(E * F * nt)), "not a permutation of the tiles"
    experts = (c // F).view(E, F * nt)
    assert bool((experts == experts[:, :1]).all()), "an expert's tiles are not consecutive"
    counts = plan.tokens_per_expert.cpu()[experts[:, 0]]
    assert bool((counts[:-1] >= counts[1:]).all()), f"experts not heaviest first: {counts.tolist()}"
    # A prebuilt schedule (the backward's two weight gradients share one: both have N = hidden), for 2 programs.
    shared = P.dsd_t_tile_schedule(topo, N, 32, programs=2)
    for data in (h, h.nan_to_num()):
        got = P.dsd_t_persistent(data, b, topo, config={"BLOCK_N": 32}, schedule=shared, num_programs=2)
        assert_close(got, _expect(data, b, topo), **TOLERANCES[torch.float16], name="shared schedule")


def _snake_positions(num_tiles: int, programs: int) -> list[int]:
    """The sorted tile at each schedule position for ``programs`` programs, written out round by round."""
    p_eff, order = min(programs, num_tiles), []
    for i, start in enumerate(range(0, num_tiles, p_eff)):
        rnd = list(range(start, min(start + p_eff, num_tiles)))
        order += rnd[::-1] if i % 2 else rnd
    return order


@pytest.mark.parametrize("name", ["skewed-empty-experts", "prime-experts"])
def test_schedule_is_snake_ordered(device, name):
    """Position ``i*P + p`` holds sorted tile ``i*P + p`` (even round ``i``) or ``i*P + r-1-p`` (odd round, length ``r``).

    The sorted order is the one-program schedule (every round one tile long): experts
    heaviest first, each one's tiles in grouped order (``test_config_and_schedule``).
    For every ``P`` the schedule is that order permuted within rounds: the same tiles
    as round-robin's in each round, so program ``p`` still gets one tile of every round.
    """
    plan, topo, h, b, (E, N, ffn) = _case(device, name, torch.float16)
    partial = set()  # (odd round?, length > 1) of the partial last rounds seen
    for block_n in (32, 16):
        T = E * topo.ffn_blocks * -(-N // block_n)
        sorted_tiles = P.dsd_t_tile_schedule(topo, N, block_n, programs=1).cpu()
        for programs in (1, 2, 3, 5, 6, 7, 9, 11, 13, 132, T - 1, T, T + 5):
            sched = P.dsd_t_tile_schedule(topo, N, block_n, programs=programs)
            assert sched.dtype == torch.int32 and sched.shape == (T,) and sched.device == topo.device
            sched = sched.cpu()
            assert torch.equal(sched, sorted_tiles[_snake_positions(T, programs)]), f"P={programs} not snake-ordered"
            p_eff = min(programs, T)
            for i, start in enumerate(range(0, T, p_eff)):  # each round: round-robin's tiles, odd rounds reversed
                rnd, rr = sched[start : start + p_eff], sorted_tiles[start : start + p_eff]
                assert torch.equal(rnd, rr.flip(0) if i % 2 else rr), f"P={programs} round {i}"
                if len(rnd) < p_eff:
                    partial.add((i % 2 == 1, len(rnd) > 1))
            assert sorted(sched.tolist()) == sorted(sorted_tiles.tolist()), "not a permutation of round-robin's"
    assert (True, True) in partial and (False, True) in partial, f"no odd and even partial last rounds: {partial}"
    # Two program counts past the tiles launch the same grid (one tile each): the same schedule.
    T = E * topo.ffn_blocks * -(-N // 32)
    assert torch.equal(P.dsd_t_tile_schedule(topo, N, 32, programs=T + 1), P.dsd_t_tile_schedule(topo, N, 32, T + 9))


SNAKE_CASES = {  # skewed, with empty experts, ffn off the block grid, N off the 32-column tile
    "skewed-empty-experts": PERSISTENT_CASES["skewed-empty-experts"],  # E=5, ffn 72 at block 16
    "skewed-prime-experts": (41, 7, 2, 40, 104, 32, "skewed"),  # E=7 (prime), experts 3..6 empty
}


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("name", list(SNAKE_CASES))
def test_snake_schedule_results_unchanged(device, name, use_tma):
    """1, 3 and 5 programs on the snake schedule: the float64 reference, and the same bits as round-robin order.

    The order only changes which program computes a tile, never how: each tile is one
    program's whole K loop. The round-robin run passes the one-program (sorted) schedule
    as a copy, which no longer records its program count, so the launch accepts it.
    """
    plan, topo, rnd, (E, N, ffn) = persistent_case(device, name, torch.float32, cases=SNAKE_CASES)
    h = padding_poisoned(ref.sdd_torch(rnd(plan.num_slots, 8), rnd(E, 8, ffn), topo), topo)
    b = rnd(plan.num_slots, N)
    empty = plan.tokens_per_expert == 0
    assert empty.any() and torch.isnan(h).any()
    expect = _expect(h, b, topo)
    round_robin = P.dsd_t_tile_schedule(topo, N, 32, programs=1).clone()
    assert not hasattr(round_robin, "_dsd_t_programs")
    got = {}
    for programs in (1, 3, 5):
        for order in ("snake", "round-robin"):
            buf, out, guard = _guarded_out(E, ffn, N, torch.float32, device)
            sched = None if order == "snake" else round_robin
            P.dsd_t_persistent(h, b, topo, out=out, use_tma=use_tma, num_programs=programs, schedule=sched)
            assert_close(out, expect, **TOLERANCES[torch.float32], name=f"{name} {order} P={programs}")
            assert torch.all(buf[guard] == 1234.0), "stored outside its output"
            assert torch.all(out[empty.to(out.device)] == 0), "an empty expert's gradient is not exactly zero"
            got[programs, order] = out.clone()
    first = got[1, "snake"]
    for key, out in got.items():
        assert torch.equal(out, first), f"{key}: not the same bits as one program's run"


def test_schedule_for_another_program_count(device):
    """A schedule built for another grid gives the same bits (only the balance differs); ``None`` builds for the
    launcher's default (the SM count), which is what ``persistent_ffn`` relies on when it shares one."""
    plan, topo, h, b, (E, N, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    expect = _expect(h, b, topo)
    built = P.dsd_t_tile_schedule(topo, N, 32, programs=3)
    got = P.dsd_t_persistent(h, b, topo, schedule=built, num_programs=5)
    assert_close(got, expect, **TOLERANCES[torch.float32], name="built for 3, run on 5")
    assert torch.equal(got, P.dsd_t_persistent(h, b, topo, schedule=built, num_programs=3))
    default = P.dsd_t_tile_schedule(topo, N, 32)
    assert torch.equal(default, P.dsd_t_tile_schedule(topo, N, 32, programs=P._default_programs(topo.device)))
    assert torch.equal(P.dsd_t_persistent(h, b, topo, schedule=default), P.dsd_t_persistent(h, b, topo))
    with pytest.raises(ValueError, match="programs must be >= 1"):
        P.dsd_t_tile_schedule(topo, N, 32, programs=0)


def test_one_program_and_all_empty_but_one(device):
    """One program walks every tile; with k=1 all on expert 0, the other experts' blocks are exactly zero."""
    plan, topo, h, b, (E, N, ffn) = _case(device, "all-on-one-expert", torch.float32)
    nan = torch.full((E, ffn, N), float("nan"), device=device)
    out = P.dsd_t_persistent(h, b, topo, out=nan, use_tma=True, num_programs=1)
    assert_close(out, _expect(h, b, topo), **TOLERANCES[torch.float32], name="one program")
    assert torch.all(out[1:] == 0)


def test_bad_arguments_are_named(device):
    plan, topo, h, b, (E, N, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    expect = _expect(h, b, topo)
    odd = torch.randn(plan.num_slots, N + 1, device=device)[:, :N]  # row stride 41 floats: not a TMA layout
    with pytest.raises(ValueError, match=r"b\.stride\(0\) \* 4 bytes must be a positive multiple of 16"):
        P.dsd_t_persistent(h, odd, topo, use_tma=True)
    assert_close(P.dsd_t_persistent(h, odd, topo), _expect(h, odd, topo), **TOLERANCES[torch.float32], name="auto")
    with pytest.raises(ValueError, match=r"b\.stride\(1\) must be 1"):
        P.dsd_t_persistent(h, b.t().contiguous().t(), topo, use_tma=True)
    shifted = torch.empty(h.numel() + 1, dtype=h.dtype, device=device)[1:].view(h.shape)  # base 4 bytes off 16
    shifted.copy_(h)
    with pytest.raises(ValueError, match="data's data pointer must be 16-byte aligned"):
        P.dsd_t_persistent(shifted, b, topo, use_tma=True)
    assert_close(P.dsd_t_persistent(shifted, b, topo), expect, **TOLERANCES[torch.float32], name="unaligned, auto")
    with pytest.raises(ValueError, match="BLOCK_N=512"):
        P.dsd_t_persistent(h, b, topo, config={"BLOCK_N": 512})
    with pytest.raises(ValueError, match="BLOCK_K=32 must divide the block size 16"):
        P.dsd_t_persistent(h, b, topo, config={"BLOCK_K": 32})
    with pytest.raises(ValueError, match="unknown keys"):
        P.dsd_t_persistent(h, b, topo, config={"BLOCKS_N": 2})
    with pytest.raises(ValueError, match="b must have 74 rows"):
        P.dsd_t_persistent(h, b[:-1], topo)
    with pytest.raises(ValueError, match="schedule must be int32"):
        P.dsd_t_persistent(h, b, topo, schedule=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="do not pack into an int32 schedule"):
        P.dsd_t_tile_schedule(topo, 1 << 30, 1)  # 2**30 hidden tiles leave one bit for 25 column blocks
    with pytest.raises(ValueError, match="out must be"):
        P.dsd_t_persistent(h, b, topo, out=torch.empty(E, ffn, N + 1, device=device))
    assert_close(P.dsd_t_persistent(h, b, topo), expect, **TOLERANCES[torch.float32], name="defaults")
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    z = P.dsd_t_persistent(torch.zeros(0, 16, 16, device=device), torch.zeros(0, N, device=device), empty)
    assert z.shape == (E, ffn, N) and bool((z == 0).all())


def test_dsd_t_persistent_compiles_for_sm90():
    """The default bf16 BLOCK=128 DSD^T launches: HGMMA, UTMALDG exactly with descriptors, no local memory."""
    from test_sdd_persistent import sm90_records  # the same worker and checks as the SDD's records

    records = sm90_records("dsd_t")
    names = {r["name"] for r in records}
    assert {"dsd_t tma", "dsd_t tma transposed out (dw1^T)", "dsd_t pointers", "dsd_t schedule"} <= names
    default = next(r for r in records if r["name"] == "dsd_t tma")["config"]
    assert (default["BLOCK_N"], default["BLOCK_K"], default["num_warps"]) == (256, 64, 8), default  # 128x256x64


def test_device_benchmark_plans_the_dsd_t(tmp_path):
    """The prepared device timing plans the DSD^T rows: the 128x256 tile, both operands TMA eligible."""
    from benchmarks import persistent as bench

    assert bench.main(["--dry-run", "--out", str(tmp_path), "--routing", "uniform"]) == 0
    with open(tmp_path / "persistent-plan.json") as f:
        plans = json.load(f)
    for p in plans:
        d = p["dsd_t"]
        assert d["tma"] == {"h_blocks": "ok", "dy_sorted [S,H]": "ok"}, d["tma"]
        assert (d["default_config"]["BLOCK_N"], d["default_config"]["BLOCK_K"]) == (256, 64)

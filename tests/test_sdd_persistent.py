"""The persistent SDD and the fused SwiGLU SDD (``kernels/sdd_persistent.py``) against the references.

Interpreter (CPU): both load paths (TMA descriptors, which triton 3.9's interpreter
runs with the hardware's zero fill past a tensor's bounds, and masked pointers) in
fp32 and fp16, on NaN-poisoned outputs, over the suite's edge cases: an empty
expert, one token, sizes off the block grid, a prime expert count, every token on
one expert. References are float64 (``reference.sdd_torch``; for GLU,
``silu(g) * u`` from the float64 SDD outputs). Under the interpreter the products
are also bit-identical to the existing ``sdd``'s at its one-block tile (same K steps in
the same order; numpy's matmul need not round a two-block tile as two one-block ones).
The fused gather (``gather=``: unsorted ``x`` rows through ``token_index(plan)``) is
bit-identical to the same kernel on the sorted copy ``x[idx]``, on NaN-poisoned ``x``,
index and outputs.

sm_90: ``tests/sm90_persistent_worker.py`` compiles the bf16 BLOCK=128 launches in a
subprocess without TRITON_INTERPRET and checks the SASS: HGMMA in every dot kernel,
``UTMALDG`` exactly where descriptors are used, no local memory, shared memory within
an H100's 227 KB. ``BSMOE_COMPILE_ALL=1`` compiles every config of
``persistent_configs(128, use_tma=...)`` as well; ``BSMOE_COMPILE_REPORT=path`` saves the records.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F_
from helpers import PERSISTENT_CASES, TOLERANCES, assert_close, make_expert_ids, persistent_case

import blocksparse_moe.kernels as K
from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe import reference as ref

P = importlib.import_module("blocksparse_moe.kernels.sdd_persistent")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
H100_MAX_SHARED_BYTES = 227 * 1024

CASES = PERSISTENT_CASES  # width = H


def _case(device, name, dtype, seed=0):
    return persistent_case(device, name, dtype, seed)


def _poisoned(topo, dtype, device):
    return torch.full((topo.capacity, topo.block_size, topo.block_size), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_sdd_persistent_matches_reference(device, name, dtype, use_tma):
    plan, topo, rnd, (E, H, ffn) = _case(device, name, dtype)
    if name == "skewed-empty-experts":
        assert (plan.tokens_per_expert == 0).any()
    a, w = rnd(plan.num_slots, H), rnd(E, H, ffn)
    # 3 programs: each walks several tiles, active and spare, in schedule order.
    out = P.sdd_persistent(a, w, topo, out=_poisoned(topo, dtype, device), use_tma=use_tma, num_programs=3)
    assert_close(out, ref.sdd_torch(a.double(), w.double(), topo), **TOLERANCES[dtype], name=f"sdd_persistent {name}")
    if INTERPRETING:
        # sdd's one-block tile: numpy (2.4.6 here) need not round a two-block-wide tile's dot as two one-block ones.
        one = P.sdd_persistent(a, w, topo, use_tma=use_tma, num_programs=3, config={"BLOCKS_N": 1})
        assert torch.equal(one, K.sdd(a, w, topo)), "not bit-identical to sdd (same tiles and K steps, interpreter)"


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["skewed-empty-experts", "one-token", "prime-experts"])
def test_sdd_glu_matches_reference(device, name, dtype, use_tma):
    plan, topo, rnd, (E, H, ffn) = _case(device, name, dtype, seed=1)
    a, w1, v1 = rnd(plan.num_slots, H), rnd(E, H, ffn), rnd(E, H, ffn)
    pre = [_poisoned(topo, dtype, device) for _ in range(2)]
    h, g, u = P.sdd_glu(a, w1, v1, topo, out=_poisoned(topo, dtype, device), store_pre=True, gate_out=pre[0],
                        up_out=pre[1], use_tma=use_tma, num_programs=2)  # fmt: skip
    g64, u64 = ref.sdd_torch(a.double(), w1.double(), topo), ref.sdd_torch(a.double(), v1.double(), topo)
    tol = TOLERANCES[dtype]
    assert_close(g, g64, **tol, name="gate")
    assert_close(u, u64, **tol, name="up")
    # h rounds once from fp32 g and u: held to the size of its terms, |silu(g)| * |u|.
    expect = F_.silu(g64) * u64
    assert_close(h, expect, **tol, name=f"sdd_glu {name}", scale=float((F_.silu(g64).abs() * u64.abs()).max()))
    assert torch.equal(h, P.sdd_glu(a, w1, v1, topo, use_tma=use_tma)), "store_pre changed h"
    if INTERPRETING:
        assert torch.equal(g, K.sdd(a, w1, topo)) and torch.equal(u, K.sdd(a, v1, topo))


# The fused gather's cases: the persistent ones and k = E (every token on every expert: each
# row of x is read once per expert, and every expert's last block row is partial).
GATHER_CASES = {**{n: None for n in CASES}, "k-equals-e": (11, 4, 4, 40, 72, 16, "uniform")}


def _gather_case(device, name, dtype, seed):
    if GATHER_CASES[name] is None:
        return _case(device, name, dtype, seed)
    return persistent_case(device, name, dtype, seed, cases=GATHER_CASES)


def _poisoned_tokens(x: torch.Tensor, plan, block: int):
    """``(x_view, gather)``: ``x [T, K]`` as a view into a NaN buffer (a NaN row T, NaN columns past K:
    row stride K + 3, no TMA stride), and ``token_index(plan)`` as a stride-2 view whose other
    entries, and the ``block`` entries past its end, point at the NaN row.

    Any load of a column past K reaches the output as NaN (NaN * 0 is NaN), as does a sorted
    row read through a slot that is not its own in a row the epilogue keeps.
    """
    T, K = x.shape
    buf = torch.full((T + 1, K + 3), float("nan"), dtype=x.dtype, device=x.device)
    buf[:T, :K] = x
    idx = torch.full((2 * (plan.num_slots + block),), T, dtype=torch.int32, device=x.device)
    idx[0 : 2 * plan.num_slots : 2] = P.token_index(plan)
    return buf[:T, :K], idx[0 : 2 * plan.num_slots : 2]


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_fused_gather_matches_sorted_copy(device, name, dtype, glu):
    """``gather=`` on the unsorted ``x`` equals the same kernel on the sorted copy ``x[idx]`` bit for bit
    (same loads, same K steps), B by TMA and by pointers, and the float64 reference."""
    plan, topo, rnd, (E, H, ffn) = _gather_case(device, name, dtype, seed=2)
    if name == "k-equals-e":
        assert plan.top_k == E
    x, w1, v1 = rnd(plan.num_tokens, H), rnd(E, H, ffn), rnd(E, H, ffn)
    xv, idx = _poisoned_tokens(x, plan, topo.block_size)
    assert torch.equal(idx, (plan.sorted_to_slot // plan.top_k).to(torch.int32))
    x_sorted = x[idx.long()]  # what the separate gather kernel writes
    tol = TOLERANCES[dtype]
    g64 = ref.sdd_torch(x_sorted.double(), w1.double(), topo)
    for use_tma in (False, True):  # B's load path (A is gathered through pointers either way)
        if not glu:
            got = P.sdd_persistent(xv, w1, topo, out=_poisoned(topo, dtype, device), use_tma=use_tma, num_programs=3,
                                   gather=idx)  # fmt: skip
            copy = P.sdd_persistent(x_sorted, w1, topo, use_tma=use_tma, num_programs=3)
            assert torch.equal(got, copy), f"gathered != sorted copy (use_tma={use_tma})"
            assert_close(got, g64, **tol, name=f"gathered sdd {name}")
            continue
        pre = [_poisoned(topo, dtype, device) for _ in range(2)]
        got = P.sdd_glu(xv, w1, v1, topo, out=_poisoned(topo, dtype, device), store_pre=True, gate_out=pre[0],
                        up_out=pre[1], use_tma=use_tma, num_programs=2, gather=idx)  # fmt: skip
        copy = P.sdd_glu(x_sorted, w1, v1, topo, store_pre=True, use_tma=use_tma, num_programs=2)
        for what, a, b in zip(("h", "gate", "up"), got, copy):
            assert torch.equal(a, b), f"gathered {what} != sorted copy's (use_tma={use_tma})"
        u64 = ref.sdd_torch(x_sorted.double(), v1.double(), topo)
        assert_close(got[1], g64, **tol, name="gathered gate")
        assert_close(got[2], u64, **tol, name="gathered up")
        scale = float((F_.silu(g64).abs() * u64.abs()).max())
        assert_close(got[0], F_.silu(g64) * u64, **tol, name=f"gathered sdd_glu {name}", scale=scale)


def test_fused_gather_bad_arguments_are_named(device):
    plan, topo, rnd, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    x, w = rnd(plan.num_tokens, H), rnd(E, H, ffn)
    idx = P.token_index(plan)
    with pytest.raises(ValueError, match=r"gather must be an int32 \[%d\]" % plan.num_slots):
        P.sdd_persistent(x, w, topo, gather=idx.long())
    with pytest.raises(ValueError, match="gather must be an int32"):
        P.sdd_glu(x, w, w, topo, gather=idx[:-1])
    with pytest.raises(TypeError, match="gather must be a torch.Tensor"):
        P.sdd_persistent(x, w, topo, gather=idx.tolist())
    with pytest.raises(ValueError, match="a has 0 rows"):
        P.sdd_persistent(rnd(0, H), w, topo, gather=idx)
    with pytest.raises(ValueError, match=r"b\.shape\[1\] must equal a\.shape\[1\]"):
        P.sdd_persistent(rnd(plan.num_tokens, H + 1), w, topo, gather=idx)
    # B's TMA rules still hold under gather; A's do not apply (an odd row stride is fine).
    odd = rnd(plan.num_tokens, H + 1)[:, :H]
    with pytest.raises(ValueError, match=r"b\.stride\(1\)"):
        P.sdd_persistent(odd, rnd(E, H, ffn + 1)[:, :, :ffn], topo, gather=idx, use_tma=True)  # row stride 292 B
    got = P.sdd_persistent(odd, w, topo, gather=idx, use_tma=True)
    assert torch.equal(got, P.sdd_persistent(odd[idx.long()], w, topo, use_tma=True))
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    assert P.sdd_persistent(rnd(0, H), w, empty, gather=torch.empty(0, dtype=torch.int32, device=device)).shape == (
        0, 16, 16)  # fmt: skip


def test_strided_weights_tma_orientations(device):
    """K-major views take the K-major descriptor (b = w2^T, gate/up halves of gate_up_proj^T)."""
    plan, topo, rnd, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    a = rnd(plan.num_slots, H)
    fused_t = rnd(E, 2 * ffn, H)  # [E, 2*ffn, H], as transformers stores gate_up_proj
    gate, up = fused_t[:, 0::2, :].transpose(1, 2), fused_t[:, 1::2, :].transpose(1, 2)  # interleaved halves
    assert P._b_layout({"b": gate, "v": up}) == (True, [])
    for w in (gate, rnd(E, ffn, H).transpose(1, 2)):
        out = P.sdd_persistent(a, w, topo, out=_poisoned(topo, torch.float32, device), use_tma=True)
        assert_close(out, ref.sdd_torch(a.double(), w.double(), topo), **TOLERANCES[torch.float32], name="k-major")
    h = P.sdd_glu(a, gate, up, topo, out=_poisoned(topo, torch.float32, device), use_tma=True)
    g64, u64 = ref.sdd_torch(a.double(), gate.double(), topo), ref.sdd_torch(a.double(), up.double(), topo)
    assert_close(h, F_.silu(g64) * u64, **TOLERANCES[torch.float32], name="glu k-major interleaved")


def test_wide_tile_and_schedule(device):
    """BLOCKS_N=2 with F odd (the last tile's second block is not stored), and the schedule's order."""
    plan, topo, rnd, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    assert topo.ffn_blocks % 2 == 1
    a, w = rnd(plan.num_slots, H), rnd(E, H, ffn)
    for use_tma in (False, True):
        out = P.sdd_persistent(a, w, topo, out=_poisoned(topo, torch.float32, device), use_tma=use_tma,
                               config={"BLOCKS_N": 2, "BLOCK_K": 16}, num_programs=5)  # fmt: skip
        assert_close(out, ref.sdd_torch(a.double(), w.double(), topo), **TOLERANCES[torch.float32], name="BLOCKS_N=2")
    nt = -(-topo.ffn_blocks // 2)
    sched = P.tile_schedule(topo, 2).long().cpu()
    bits = max(1, (nt - 1).bit_length())
    r, c = sched >> bits, sched & ((1 << bits) - 1)
    assert sorted((r * nt + c).tolist()) == list(range(topo.max_block_rows * nt)), "not a permutation of the tiles"
    r_act = int(topo.expert_block_offsets[-1])
    assert bool((r[: r_act * nt] < r_act).all()) and bool((r[r_act * nt :] >= r_act).all()), "active tiles not first"


def test_bad_arguments_are_named(device):
    plan, topo, rnd, (E, H, ffn) = _case(device, "skewed-empty-experts", torch.float32)
    a, w = rnd(plan.num_slots, H), rnd(E, H, ffn)
    odd = rnd(plan.num_slots, H + 1)[:, :H]  # row stride 41 floats = 164 bytes: not a TMA stride
    with pytest.raises(ValueError, match=r"a\.stride\(0\)"):
        P.sdd_persistent(odd, w, topo, use_tma=True)
    one_block = {"BLOCKS_N": 1}  # sdd's tile (see test_sdd_persistent_matches_reference)
    assert (
        torch.equal(P.sdd_persistent(odd, w, topo, use_tma=False, config=one_block), K.sdd(odd, w, topo))
        or not INTERPRETING
    )
    with pytest.raises(ValueError, match="BLOCKS_N=32"):
        P.sdd_persistent(a, w, topo, config={"BLOCKS_N": 32})
    with pytest.raises(ValueError, match="schedule must be int32"):
        P.sdd_persistent(a, w, topo, schedule=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="v1 must have w1's shape"):
        P.sdd_glu(a, w, w[:, :, :-1], topo)
    empty = build_topology(plan_routing(make_expert_ids(0, E, 2, "uniform").to(device), E), ffn, 16)
    assert P.sdd_persistent(rnd(0, H), w, empty).shape == (0, 16, 16)


def _problems(r: dict) -> list[str]:
    if not r.get("ok"):
        return ["does not compile: " + r.get("error", "?")]
    found, res, sass = [], r["resources"], r["sass"]
    if res["stack"] or res["local"] or sass["LDL"] or sass["STL"]:
        found.append(f"local memory: STACK:{res['stack']} LOCAL:{res['local']} LDL:{sass['LDL']} STL:{sass['STL']}")
    if r["shared"] > H100_MAX_SHARED_BYTES:
        found.append(f"shared memory {r['shared']} B > {H100_MAX_SHARED_BYTES} B")
    if r.get("kernel") != "schedule":
        if not sass["HGMMA"]:
            found.append(f"no HGMMA (wgmma) in the SASS: {sass}")
        if bool(sass["UTMALDG"]) != r["use_tma"]:
            found.append(f"UTMALDG count {sass['UTMALDG']} with use_tma={r['use_tma']}")
    return found


def sm90_records(family: str, spills_known: frozenset = frozenset()) -> list:
    """Compile ``family``'s ("sdd", "dsd", "dsd_t" or "glu_bwd") persistent kernels for sm_90 in a worker and
    check every record.

    ``spills_known``: record names whose local memory is a known, documented finding (the caller
    checks its size); every other check still applies to them. Skips where the triton wheel has no
    cuobjdump; returns the records for the caller's own checks.
    """
    triton = pytest.importorskip("triton")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        pytest.skip(f"no cuobjdump in the triton wheel ({cuobjdump}): cannot inspect sm_90 code here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_persistent_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        cmd = [sys.executable, worker, path, family] + (["all"] if os.environ.get("BSMOE_COMPILE_ALL") == "1" else [])
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, run.stderr[-3000:]
        with open(path) as f:
            records = json.load(f)
    if os.environ.get("BSMOE_COMPILE_REPORT"):
        with open(os.environ["BSMOE_COMPILE_REPORT"], "w") as f:
            json.dump(records, f, indent=1)
    for r in records:
        if r.get("ok"):
            print(f"{r['name']}: REG {r['resources']['reg']}, shared {r['shared']} B, {r['sass']}")
    failures = [f"  {r['name']} {r.get('config')}: {p}" for r in records for p in _problems(r)
                if not (r["name"] in spills_known and p.startswith("local memory"))]  # fmt: skip
    assert not failures, f"{len(failures)} sm_90 checks failed:\n" + "\n".join(failures)
    return records


def test_persistent_kernels_compile_for_sm90():
    records = sm90_records("sdd")  # the DSD cases are tests/test_dsd_persistent.py's
    names = {r["name"] for r in records}
    assert {"sdd tma", "sdd pointers", "glu tma", "glu pointers", "schedule"} <= names
    gathered = [r for r in records if r.get("gather")]
    assert {"sdd gather tma-b", "glu gather tma-b", "sdd gather pointers"} <= {r["name"] for r in gathered}
    for r in gathered:  # A's gathered rows by cp.async (no descriptor can gather), B's tiles by TMA where asked
        assert r["sass"]["LDGSTS"], f"{r['name']}: no LDGSTS (cp.async) for the gathered A rows: {r['sass']}"


def test_device_benchmark_dry_run(tmp_path):
    """The prepared device timing (benchmarks/device_persistent.sh) sets up its real shapes on the CPU."""
    from benchmarks import persistent as bench

    assert bench.main(["--dry-run", "--out", str(tmp_path), "--routing", "uniform"]) == 0
    with open(tmp_path / "persistent-plan.json") as f:
        plans = json.load(f)
    assert [p["shape"]["name"] for p in plans] == [s.name for s in bench.SHAPES]
    for p in plans:
        assert p["tma"] == {"a": "ok", "w1 [E,H,N]": "ok", "w2^T view": "ok"}, p["tma"]
        assert p["sdd"]["default_config"]["BLOCKS_N"] * p["shape"]["block_size"] == 256  # the 128x256 tile

"""Topology invariants (exact) and equivalence with stk's Matrix."""

import pytest
import torch
from helpers import make_expert_ids
from hypothesis import given
from hypothesis import strategies as st

from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe.topology import max_block_rows


@st.composite
def topology_cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 16]))
    k = draw(st.integers(1, min(E, 4)))
    T = draw(st.integers(0, 120))
    mode = draw(st.sampled_from(["uniform", "one", "skewed"]))
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    ffn = draw(st.integers(1, 300))
    ids = make_expert_ids(T, E, k, mode, seed=draw(st.integers(0, 2**16)))
    return build_topology(plan_routing(ids, E), ffn, bs), plan_routing(ids, E)


@given(topology_cases())
def test_topology_invariants(case):
    topo, plan = case
    b, E, F = topo.block_size, topo.num_experts, topo.ffn_blocks
    R, cap = topo.max_block_rows, topo.capacity
    counts = plan.tokens_per_expert.long()
    assert R == max_block_rows(plan.num_slots, E, b) and cap == R * F
    nb = (counts + b - 1) // b
    n_rows = int(nb.sum())
    assert n_rows <= R
    assert torch.equal(topo.expert_block_offsets[1:].long(), torch.cumsum(nb, 0))
    assert int(topo.num_block_rows) == n_rows and int(topo.num_blocks) == n_rows * F
    # every sorted row lies in exactly one active block row of its own expert
    cover = torch.zeros(plan.num_slots, dtype=torch.long)
    for r in range(R):
        s, t, e = int(topo.block_row_start[r]), int(topo.block_row_end[r]), int(topo.block_row_expert[r])
        if r >= n_rows:
            assert e == E and s == t == plan.num_slots
            continue
        assert int(plan.expert_offsets[e]) <= s < t == int(plan.expert_offsets[e + 1])
        assert (s - int(plan.expert_offsets[e])) % b == 0
        hi = min(s + b, t)
        cover[s:hi] += 1
        assert bool((plan.sorted_expert[s:hi] == e).all())
    assert bool((cover == 1).all())
    # per expert: padding is at most b - 1 rows
    assert bool((nb * b - counts < b).all())
    # COO / BCSR: each active block's block row and expert column
    blk = torch.arange(cap)
    active = blk < n_rows * F
    assert torch.equal(topo.row_indices.long(), blk // F)
    expect_cols = topo.block_row_expert.long()[blk // F] * F + blk % F
    assert torch.equal(topo.column_indices.long()[active], expect_cols[active])
    assert bool((topo.column_indices[~active] == E * F).all())
    assert torch.equal(topo.offsets.long(), torch.clamp(torch.arange(R + 1), max=n_rows) * F)
    # transposed order: a stable sort of the active blocks by column
    order = torch.sort(topo.column_indices.long()[active], stable=True).indices
    assert torch.equal(topo.block_offsets_t.long()[: n_rows * F], order)
    assert torch.equal(topo.column_indices_t.long()[: n_rows * F], topo.row_indices.long()[order])
    col_counts = torch.bincount(topo.column_indices.long()[active], minlength=E * F)
    assert torch.equal(topo.offsets_t[1:].long(), torch.cumsum(col_counts, 0))
    assert torch.equal(topo.block_offsets_t.sort().values.long(), blk)  # a permutation of all blocks


@given(topology_cases())
def test_to_stk_dense_equals_ours(case):
    stk_ops = pytest.importorskip("stk.ops")
    topo, _ = case
    data = torch.randn(topo.capacity, topo.block_size, topo.block_size)
    m = topo.to_stk(data)
    ours = topo.to_dense(data)[: m.shape[0]]
    assert torch.equal(stk_ops.to_dense(m), ours)
    # stk derives its own transposed index (with an unstable argsort, so the order
    # inside one column may differ): the same blocks per column, each with its row.
    from stk.matrix import _transpose

    col_t, off_t, blk_t = _transpose(m.size(), m.data, m.row_indices, m.column_indices, m.offsets)
    assert torch.equal(off_t, m.offsets_t)
    for c in range(off_t.numel() - 1):
        lo, hi = int(off_t[c]), int(off_t[c + 1])
        assert torch.equal(blk_t[lo:hi].long().sort().values, m.block_offsets_t[lo:hi].long().sort().values)
    assert torch.equal(m.column_indices_t.long(), m.row_indices.long()[m.block_offsets_t.long()])


@st.composite
def routing_cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 16, 64]))
    k = draw(st.integers(1, min(E, 4)))
    T = draw(st.integers(0, 200))
    mode = draw(st.sampled_from(["uniform", "one", "skewed"]))
    ids = make_expert_ids(T, E, k, mode, seed=draw(st.integers(0, 2**16)))
    return ids, E, draw(st.integers(1, 300)), draw(st.sampled_from([16, 32, 64, 128]))


@given(case=routing_cases())
def test_triton_topology_equals_torch(case, device):
    """The two-launch Triton construction writes every array exactly as the torch reference."""
    ids, E, ffn, bs = case
    plan = plan_routing(ids.to(device), E)
    ref = build_topology(plan, ffn, bs, backend="torch")
    got = build_topology(plan, ffn, bs, backend="triton")
    for name in ref._TENSOR_FIELDS:
        a, e = getattr(got, name), getattr(ref, name)
        assert a.dtype == torch.int32 and a.shape == e.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {tuple(e.shape)}"
        assert torch.equal(a, e.to(torch.int32)), f"{name}: first difference at {int((a != e).nonzero()[0])}"


@pytest.mark.parametrize(
    "ids, E",
    [
        (torch.zeros(0, 1, dtype=torch.long), 3),  # no tokens
        (torch.tensor([[0]]), 1),  # one token, one expert
        (torch.tensor([[2, 0, 1]] * 5), 3),  # k = E
        (torch.full((130, 1), 4), 5),  # every token on one expert; the others empty
    ],
)
def test_triton_topology_edge_cases(ids, E, device):
    plan = plan_routing(ids.to(device), E)
    for bs in (16, 128):
        ref = build_topology(plan, 40, bs, backend="torch")
        got = build_topology(plan, 40, bs, backend="triton")
        for name in ref._TENSOR_FIELDS:
            assert torch.equal(getattr(got, name), getattr(ref, name).to(torch.int32)), name


def test_build_topology_rejects_unknown_backend():
    plan = plan_routing(torch.tensor([[0]]), 1)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        build_topology(plan, 8, 16, backend="cuda")


def test_triton_topology_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plan = plan_routing(torch.tensor([[0]]), 1)
    with pytest.raises(ValueError, match=r"backend='triton' needs the plan on a CUDA device, got cpu"):
        build_topology(plan, 8, 16, backend="triton")

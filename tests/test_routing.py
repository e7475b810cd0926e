"""Routing metadata invariants, with exact equality."""

import torch
from helpers import make_expert_ids
from hypothesis import given
from hypothesis import strategies as st

from blocksparse_moe import plan_routing


@st.composite
def routing_cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16]))
    k = draw(st.integers(1, min(E, 4)))
    T = draw(st.integers(0, 50))
    mode = draw(st.sampled_from(["uniform", "one", "skewed"]))
    return make_expert_ids(T, E, k, mode, seed=draw(st.integers(0, 2**16))), E


@given(routing_cases())
def test_plan_invariants(case):
    ids, E = case
    T, k = ids.shape
    plan = plan_routing(ids, E)
    S = T * k
    flat = ids.reshape(-1)
    assert plan.num_slots == S and plan.sorted_to_slot.numel() == S
    assert plan.sorted_to_slot.dtype == plan.slot_to_sorted.dtype == torch.int32
    # the two directions are inverse permutations
    assert torch.equal(plan.sorted_to_slot.sort().values, torch.arange(S, dtype=torch.int32))
    assert torch.equal(plan.sorted_to_slot[plan.slot_to_sorted.long()], torch.arange(S, dtype=torch.int32))
    assert torch.equal(plan.slot_to_sorted[plan.sorted_to_slot.long()], torch.arange(S, dtype=torch.int32))
    # sorted by expert, and each sorted row's expert is its slot's choice
    assert torch.equal(plan.sorted_expert.long(), flat[plan.sorted_to_slot.long()])
    assert bool((plan.sorted_expert[1:] >= plan.sorted_expert[:-1]).all())
    # stable: inside one expert, slots (and so tokens) keep their order
    same = plan.sorted_expert[1:] == plan.sorted_expert[:-1]
    assert bool((plan.sorted_to_slot[1:][same] > plan.sorted_to_slot[:-1][same]).all())
    # counts and offsets
    assert torch.equal(plan.tokens_per_expert.long(), torch.bincount(flat, minlength=E))
    assert torch.equal(plan.expert_offsets[1:].long(), torch.cumsum(plan.tokens_per_expert.long(), 0))
    assert int(plan.expert_offsets[0]) == 0 and int(plan.expert_offsets[-1]) == S
    for e in range(E):
        lo, hi = int(plan.expert_offsets[e]), int(plan.expert_offsets[e + 1])
        assert bool((plan.sorted_expert[lo:hi] == e).all())


def test_plan_empty_batch():
    plan = plan_routing(torch.empty(0, 2, dtype=torch.long), 4)
    assert plan.num_slots == 0
    assert torch.equal(plan.expert_offsets, torch.zeros(5, dtype=torch.int32))
    assert torch.equal(plan.tokens_per_expert, torch.zeros(4, dtype=torch.int32))

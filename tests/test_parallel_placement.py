"""``ExpertPlacement`` and ``ExpertParallelGroups`` argument checks, in this process (no process group needed).

The multi-process behaviour of placements (any permutation, a rank with no expert,
E not divisible by W, the fixed-capacity mode, checkpoints) is in
tests/test_parallel_mesh.py and tests/test_parallel_checkpoint.py.
"""

from __future__ import annotations

import pytest

from blocksparse_moe.parallel import ExpertPlacement
from blocksparse_moe.parallel.placement import as_placement


def test_contiguous_split_gives_the_first_ranks_one_more():
    pl = ExpertPlacement.contiguous(6, 4)
    assert [pl.experts_of(r) for r in range(4)] == [(0, 1), (2, 3), (4,), (5,)]
    assert pl.counts == (2, 2, 1, 1) and pl.rank_offsets == (0, 2, 4, 5, 6) and pl.is_contiguous
    assert ExpertPlacement.contiguous(2, 4).counts == (1, 1, 0, 0)  # more ranks than experts: some hold none


def test_any_permutation_and_a_rank_without_experts():
    pl = ExpertPlacement.from_owners([3, 0, 0, 2, 2, 3], 4)
    assert pl.experts_of(1) == () and pl.experts_of(3) == (0, 5)
    assert pl.order == (1, 2, 3, 4, 0, 5) and not pl.is_contiguous
    assert [pl.order[pl.position[e]] for e in range(6)] == list(range(6))
    assert ExpertPlacement.from_rank_experts([[1, 2], [], [3, 4], [0, 5]]) == pl
    assert hash(pl) == hash(ExpertPlacement.from_owners([3, 0, 0, 2, 2, 3], 4))  # a value: same on every rank


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ExpertPlacement.from_rank_experts([[0, 1], [3]]), r"no rank for expert\(s\) \[2\]"),
        (lambda: ExpertPlacement.from_rank_experts([[0, 1], [1, 2]]), "expert 1 is listed for rank 0 and rank 1"),
        (lambda: ExpertPlacement.from_rank_experts([[0], [5]], num_experts=4), r"expert 5, outside \[0, num_experts=4\)"),
        (lambda: ExpertPlacement.from_owners([0, 4, 1], 4), r"ranks\[1\] = \(4,\): ranks must be ints in \[0, world_size=4\)"),
        (lambda: ExpertPlacement(((0,), (1, 1)), 2), r"a rank is listed twice for expert 1"),
        (lambda: ExpertPlacement((), 2), "must be a non-empty tuple"),
        (lambda: ExpertPlacement.contiguous(4, 0), "world_size must be a positive int, got 0"),
        (lambda: as_placement([0, 1, 1], 4, 2, what="placement of layer 'm'"), r"placement of layer 'm'=\[0, 1, 1\] has 3 entries"),
        (lambda: as_placement(ExpertPlacement.contiguous(4, 2), 6, 2), "places 4 experts"),
        (lambda: as_placement(ExpertPlacement.contiguous(4, 2), 4, 4), "is for world_size=2"),
    ],
)  # fmt: skip
def test_bad_placements_name_the_expert_or_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_placement_of_the_wrong_type():
    with pytest.raises(TypeError, match="placement must be None, an ExpertPlacement or a sequence"):
        as_placement("0,1", 2, 2)


def test_groups_need_an_initialized_process_group():
    import torch.distributed as dist

    from blocksparse_moe.parallel import resolve_groups

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        resolve_groups(None)

"""``ExpertPlacement``: which rank of the expert-parallel group holds which expert.

A placement is a value, not a policy: a frozen dataclass validated on construction,
the same on every rank, compared across ranks by the layer's configuration check.
Everything that depends on where experts live reads it: the token exchange (rows
are sorted by *placement order*, rank-major, so a rank's rows are contiguous), the
parameter shapes (rank ``r`` holds ``len(experts_of(r))`` experts, in ascending
global id), :func:`~blocksparse_moe.parallel.shard_state_dict` /
:func:`~blocksparse_moe.parallel.gather_state_dict`, the checkpoints (keyed by
global expert id, so any placement reads any other's files) and the fixed-capacity
mode.

``ranks[e]`` is the tuple of ranks holding expert ``e``: one rank, or several for a
replicated (hot) expert. A placement with replicas expands into *slots*, one per
(expert, holding rank), each on exactly one rank (:attr:`slot_expert`,
:attr:`slot_rank`); :attr:`slot_placement` is the single-replica placement over the
slots that the token exchange runs unchanged (a rank's slots are its local experts,
ascending global id, so the slot placement is contiguous). Which replica a token's
row goes to is decided on the device by :mod:`.replicas`. A rank holds an expert at
most once. A layer moves to another placement between steps with
``replace_experts`` (``parallel/replace.py``).

::

    ExpertPlacement.contiguous(8, 4)                     # 0,1 | 2,3 | 4,5 | 6,7 (the default)
    ExpertPlacement.contiguous(6, 4)                     # 0,1 | 2,3 | 4 | 5    (E need not divide W)
    ExpertPlacement.from_owners([3, 0, 0, 2, 2, 3], 4)   # expert e -> rank owners[e]; rank 1 holds none
    ExpertPlacement.from_rank_experts([[1, 2], [], [3, 4], [0, 5]])
    ExpertPlacement.from_rank_experts([[0, 1], [0, 2]], replicas=True)   # expert 0 on ranks 0 and 1
    ExpertPlacement.from_ranks([[0, 1], [0], [1]], 2)                     # the same, listed per expert
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

__all__ = ["ExpertPlacement", "as_placement"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert id -> the ranks (of the expert-parallel group) that hold it.

    Attributes:
        ranks: ``ranks[e]`` is a tuple of the group ranks holding expert ``e``: at
            least one, each at most once (stored ascending); more than one is a
            replicated expert.
        world_size: the expert-parallel group size ``W``; a rank may hold no expert.

    Derived (computed once): :attr:`owners`, :meth:`experts_of`, :attr:`counts`,
    :attr:`order` (rank-major: rank 0's experts, then rank 1's, ...),
    :attr:`position` (expert -> index in ``order``), :attr:`rank_offsets`.
    """

    ranks: tuple
    world_size: int

    def __post_init__(self) -> None:
        W = self.world_size
        if not _is_int(W) or W < 1:
            raise ValueError(f"ExpertPlacement.world_size must be a positive int, got {W!r}")
        if not isinstance(self.ranks, tuple) or not self.ranks:
            raise ValueError(
                f"ExpertPlacement.ranks must be a non-empty tuple (one entry per expert), got {self.ranks!r}"
            )
        for e, holders in enumerate(self.ranks):
            if not isinstance(holders, tuple) or not holders:
                raise ValueError(
                    f"ExpertPlacement.ranks[{e}] must be a non-empty tuple of ranks holding expert {e}, got {holders!r}"
                )
            if len(holders) > W:
                raise ValueError(
                    f"ExpertPlacement.ranks[{e}] = {holders!r}: {len(holders)} replicas of expert {e}, more than "
                    f"world_size={W}; expected at most one replica per rank"
                )
            for r in holders:
                if not _is_int(r) or not 0 <= r < W:
                    raise ValueError(
                        f"ExpertPlacement.ranks[{e}] = {holders!r}: ranks must be ints in [0, world_size={W})"
                    )
            if len(set(holders)) != len(holders):
                raise ValueError(
                    f"ExpertPlacement.ranks[{e}] = {holders!r}: a rank is listed twice for expert {e}; expected "
                    "distinct ranks (a rank holds an expert at most once)"
                )
        # Holders ascending: equal placements compare (and hash) equal whatever order they were listed in.
        object.__setattr__(self, "ranks", tuple(tuple(sorted(h)) for h in self.ranks))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Consecutive blocks of experts; the first ``E % W`` ranks hold one more (``numpy.array_split``)."""
        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        base, extra = divmod(num_experts, world_size)
        owners = []
        for r in range(world_size):
            owners += [r] * (base + (1 if r < extra else 0))
        return cls(tuple((r,) for r in owners), world_size)

    @classmethod
    def from_owners(cls, owners: Sequence[int], world_size: int) -> "ExpertPlacement":
        """``owners[e]`` = the rank holding expert ``e`` (any permutation, any count per rank)."""
        try:
            owners = tuple(owners)
        except TypeError:
            raise TypeError(f"owners must be a sequence of ranks (one per expert), got {owners!r}") from None
        return cls(tuple((r,) for r in owners), world_size)

    @classmethod
    def from_ranks(cls, ranks_per_expert: Sequence[Sequence[int]], world_size: int) -> "ExpertPlacement":
        """``ranks_per_expert[e]`` = the ranks holding expert ``e`` (several: a replicated expert)."""
        try:
            ranks = tuple(tuple(h) for h in ranks_per_expert)
        except TypeError:
            raise TypeError(
                f"ranks_per_expert must be a sequence of rank sequences (one per expert), got {ranks_per_expert!r}"
            ) from None
        return cls(ranks, world_size)

    @classmethod
    def from_rank_experts(
        cls, experts_per_rank: Sequence[Sequence[int]], num_experts: int | None = None, *, replicas: bool = False
    ):
        """``experts_per_rank[r]`` = the experts rank ``r`` holds; every expert at least once.

        ``num_experts`` defaults to one more than the largest id listed; a missing
        expert is a ``ValueError`` naming it. An expert listed on several ranks is a
        ``ValueError`` too unless ``replicas=True`` (then it is replicated there); one
        listed twice on the same rank always is.
        """
        lists = [tuple(x) for x in experts_per_rank]
        listed = [e for xs in lists for e in xs]
        for e in listed:
            if not _is_int(e) or e < 0:
                raise ValueError(f"experts_per_rank must hold non-negative int expert ids, got {e!r} in {lists!r}")
        E = num_experts if num_experts is not None else (max(listed) + 1 if listed else 0)
        if not _is_int(E) or E < 1:
            raise ValueError(f"num_experts must be a positive int, got {E!r}")
        holders: dict[int, list] = {}
        for r, xs in enumerate(lists):
            for e in xs:
                if e >= E:
                    raise ValueError(f"experts_per_rank[{r}] lists expert {e}, outside [0, num_experts={E})")
                if e in holders and r in holders[e]:
                    raise ValueError(
                        f"experts_per_rank[{r}] = {list(xs)!r} lists expert {e} twice: a rank holds an expert at "
                        "most once"
                    )
                if e in holders and not replicas:
                    raise ValueError(
                        f"expert {e} is listed for rank {holders[e][0]} and rank {r}: each expert must be placed "
                        "exactly once (pass replicas=True to replicate it)"
                    )
                holders.setdefault(e, []).append(r)
        missing = [e for e in range(E) if e not in holders]
        if missing:
            raise ValueError(
                f"experts_per_rank={lists!r} places no rank for expert(s) {missing}: every expert in "
                f"[0, {E}) must be placed {'at least' if replicas else 'exactly'} once"
            )
        return cls(tuple(tuple(holders[e]) for e in range(E)), len(lists))

    # ------------------------------------------------------------------ derived
    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @cached_property
    def replicated(self) -> bool:
        """Whether some expert is held by more than one rank."""
        return any(len(h) > 1 for h in self.ranks)

    def _single(self, what: str) -> None:
        if self.replicated:
            hot = [e for e, h in enumerate(self.ranks) if len(h) > 1]
            raise ValueError(
                f"ExpertPlacement.{what} needs one rank per expert; this placement replicates expert(s) {hot} "
                f"({self.describe()}); use ranks[e] (every holder) or the slot tables (slot_expert, slot_rank)"
            )

    @cached_property
    def owners(self) -> tuple:
        """``owners[e]``: the rank holding expert ``e`` (a ``ValueError`` for a replicated placement)."""
        self._single("owners")
        return tuple(h[0] for h in self.ranks)

    @cached_property
    def primary(self) -> tuple:
        """``primary[e]``: the lowest rank holding expert ``e`` (writes its checkpoint entry, counts it in norms)."""
        return tuple(h[0] for h in self.ranks)

    @property
    def fingerprint(self) -> tuple:
        """What the ranks compare: the owners (as before replicas existed), else every expert's holders."""
        return self.ranks if self.replicated else self.owners

    @cached_property
    def _by_rank(self) -> tuple:
        out = [[] for _ in range(self.world_size)]
        for e, holders in enumerate(self.ranks):
            for r in holders:
                out[r].append(e)
        return tuple(tuple(x) for x in out)

    def experts_of(self, rank: int) -> tuple:
        """The global ids rank ``rank`` holds, ascending: its local expert ``i`` is ``experts_of(rank)[i]``."""
        if not _is_int(rank) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, world_size={self.world_size}), got {rank!r}")
        return self._by_rank[rank]

    @cached_property
    def counts(self) -> tuple:
        """Experts per rank."""
        return tuple(len(x) for x in self._by_rank)

    @cached_property
    def order(self) -> tuple:
        """Every expert in placement order: rank 0's experts, then rank 1's, ... (the send order).

        With replicas an expert appears once per holder: ``order`` is then :attr:`slot_expert`.
        """
        return tuple(e for xs in self._by_rank for e in xs)

    @cached_property
    def position(self) -> tuple:
        """``position[e]``: expert ``e``'s index in :attr:`order` (a ``ValueError`` for a replicated placement)."""
        self._single("position")
        pos = [0] * self.num_experts
        for i, e in enumerate(self.order):
            pos[e] = i
        return tuple(pos)

    @cached_property
    def rank_offsets(self) -> tuple:
        """``[W + 1]``: rank ``r``'s experts are ``order[rank_offsets[r]:rank_offsets[r + 1]]``."""
        out = [0]
        for c in self.counts:
            out.append(out[-1] + c)
        return tuple(out)

    # ------------------------------------------------------------------ slots (replicas)
    @property
    def num_slots(self) -> int:
        """One slot per (expert, holding rank): ``num_experts`` without replicas."""
        return len(self.order)

    @property
    def slot_expert(self) -> tuple:
        """``slot_expert[s]``: the global expert of slot ``s``; slots are numbered rank-major (placement order)."""
        return self.order

    @cached_property
    def slot_rank(self) -> tuple:
        """``slot_rank[s]``: the rank holding slot ``s`` (non-decreasing)."""
        return tuple(r for r in range(self.world_size) for _ in range(self.counts[r]))

    @cached_property
    def slots_of_expert(self) -> tuple:
        """``slots_of_expert[e]``: expert ``e``'s slots, one per holder, in rank order."""
        out = [[] for _ in range(self.num_experts)]
        for s, e in enumerate(self.order):
            out[e].append(s)
        return tuple(tuple(x) for x in out)

    def slots_of(self, rank: int) -> range:
        """Rank ``rank``'s slots: its local expert ``i`` is slot ``rank_offsets[rank] + i``."""
        self.experts_of(rank)  # the range check
        return range(self.rank_offsets[rank], self.rank_offsets[rank + 1])

    @cached_property
    def slot_placement(self) -> "ExpertPlacement":
        """The single-replica, contiguous placement of the :attr:`num_slots` slots (what the exchange runs on)."""
        return ExpertPlacement(tuple((r,) for r in self.slot_rank), self.world_size)

    @property
    def is_contiguous(self) -> bool:
        """Whether placement order is the identity (each rank holds one consecutive range)."""
        return self.order == tuple(range(self.num_experts))

    def describe(self) -> str:
        return "; ".join(f"rank {r}: {list(xs)}" for r, xs in enumerate(self._by_rank))


def as_placement(placement, num_experts: int, world_size: int, what: str = "placement") -> ExpertPlacement:
    """``None`` (contiguous), an :class:`ExpertPlacement`, or a sequence of owner ranks -> a checked placement.

    Raises ``ValueError`` / ``TypeError`` naming ``what``, the value and what was expected;
    it runs before any collective, so every rank given the same value raises the same error.
    """
    if placement is None:
        return ExpertPlacement.contiguous(num_experts, world_size)
    if not isinstance(placement, ExpertPlacement):
        if isinstance(placement, (str, bytes)) or not hasattr(placement, "__len__"):
            raise TypeError(
                f"{what} must be None, an ExpertPlacement or a sequence of owner ranks (one per expert), "
                f"got {placement!r}"
            )
        if len(placement) != num_experts:
            raise ValueError(
                f"{what}={list(placement)!r} has {len(placement)} entries; expected one owner rank per expert "
                f"(num_experts={num_experts})"
            )
        placement = ExpertPlacement.from_owners(placement, world_size)
    if placement.num_experts != num_experts:
        raise ValueError(
            f"{what} places {placement.num_experts} experts ({placement.describe()}); expected "
            f"num_experts={num_experts}: every expert must be placed at least once"
        )
    if placement.world_size != world_size:
        raise ValueError(
            f"{what} is for world_size={placement.world_size}; the expert-parallel group has {world_size} ranks"
        )
    return placement

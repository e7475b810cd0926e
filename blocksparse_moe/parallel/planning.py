"""Data-driven expert placement: routing statistics in, an :class:`ExpertPlacement` out.

Where an expert lives decides where its tokens travel. From recorded statistics,
:func:`plan_placement` puts experts on ranks so that

1. **the rank loads are balanced**: the rows each rank's experts compute (the sum of
   its experts' loads) stay within ``1 + slack`` of the mean where the loads allow it;
2. **co-selected experts share a node, then a rank**: two experts that the same
   tokens pick, placed together, receive one copy of those tokens between them
   instead of two (a dispatch that sends a token once per destination), so a token's
   ``k`` rows reach fewer places, and fewer of them cross the network.

Statistics (:func:`routing_stats`, device ops only, no host read, so it can run in
every forward): ``tokens_per_expert [E]`` and ``coselection [E, E]``, how many tokens
chose both ``i`` and ``j`` (the diagonal is the load). Sum them over steps with ``+``
and over data-parallel ranks with an all-reduce of both tensors.

The algorithm (deterministic, ``O(E * (E + W))``; E=256, W=1024 takes milliseconds):
nodes first, then the ranks of each node, the same greedy at both levels. Experts are
taken in decreasing load (ties by id); each goes to the bin (node, or rank of its
node) with the largest affinity, the co-selection counts with the experts already
there, among the bins with room (``experts_per_rank`` per rank) whose load stays
within the limit (``(1 + slack)`` times the mean bin load); when none does, to the
least-loaded bin with room. Then a pass of pairwise swaps at each level keeps any
swap that lowers the largest bin load, or raises the affinity without breaking the
limit (a few passes at most). It is a heuristic: it balances like
longest-processing-time first and co-locates greedily, no optimality is claimed.

**Replicas** (``replicas=N``): ``N`` extra expert copies, handed out one at a time
to the expert with the largest load per copy (ties by id), so the hottest experts
get them, at most one per rank. Each copy is an item of the same greedy carrying
``load / copies`` of its expert's load and ``co-selection / copies`` of its affinity
(the replica rule of :mod:`.replicas` splits an expert's rows evenly among its
replicas in expectation); two copies of one expert never share a rank, nor a node
when there are several nodes (so a token finds a copy on its own node more often).
``experts_per_rank`` then counts slots (copies): default ``ceil((E + N) / W)``.
Without replicas an expert whose load alone is above the limit stays alone and caps
the balance; replicating it is what lifts that cap.

**Experts on every node** (``node_replicas=M``): the ``M`` hottest experts get one
copy on each node (``N - 1`` extra copies each, before ``replicas``). Copy ``c`` is
fixed to node ``c`` and these copies are placed first; the rest of the greedy is
unchanged. The replica rule then sends a token's row for such an expert to the copy on
the token's node, so those rows never cross a node boundary: this is the option for
traffic, ``replicas`` the one for balance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .placement import ExpertPlacement
from .replicas import ReplicaRule

__all__ = ["RoutingStats", "routing_stats", "plan_placement", "placement_traffic"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RoutingStats:
    """Counts of routing decisions: ``tokens_per_expert [E]`` and ``coselection [E, E]``, int64.

    ``coselection[i, j]`` (``i != j``) counts tokens that chose both ``i`` and ``j``;
    ``coselection[i, i] == tokens_per_expert[i]``. ``num_tokens`` is a 0-d tensor.
    """

    tokens_per_expert: torch.Tensor
    coselection: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if not isinstance(other, RoutingStats) or other.num_experts != self.num_experts:
            raise ValueError(
                f"can only add RoutingStats of {self.num_experts} experts, got "
                f"{other.num_experts if isinstance(other, RoutingStats) else type(other).__name__}"
            )
        return RoutingStats(self.tokens_per_expert + other.tokens_per_expert, self.coselection + other.coselection,
                            self.num_tokens + other.num_tokens)  # fmt: skip


@torch.no_grad()
def routing_stats(expert_ids: torch.Tensor, num_experts: int) -> RoutingStats:
    """The :class:`RoutingStats` of one routing decision ``expert_ids [T, k]`` (distinct ids per token).

    ``T * k * k`` pairs are scattered into an ``[E * E]`` counter: device ops of known
    sizes (no ``bincount``, whose output size is read back on CUDA), so nothing is
    read to the host.
    """
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2 or expert_ids.dtype.is_floating_point:
        got = tuple(expert_ids.shape) if isinstance(expert_ids, torch.Tensor) else type(expert_ids).__name__
        raise ValueError(f"expert_ids must be an integer tensor [tokens, top_k], got {got}")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    E = num_experts
    T, k = expert_ids.shape
    ids = expert_ids.long()
    pairs = (ids[:, :, None] * E + ids[:, None, :]).reshape(-1)
    co = torch.zeros(E * E, dtype=torch.int64, device=ids.device)
    co.scatter_add_(0, pairs, torch.ones_like(pairs))
    co = co.view(E, E)
    load = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(T * k, dtype=torch.int64, device=ids.device)
    )
    return RoutingStats(load, co, torch.tensor(T, dtype=torch.int64, device=ids.device))


def _as_arrays(stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, RoutingStats):
        load, co = stats.tokens_per_expert, stats.coselection
    elif isinstance(stats, torch.Tensor) and stats.dim() == 1:
        load, co = stats, None  # loads only: balance, no co-location
    else:
        raise TypeError(
            f"stats must be a RoutingStats (routing_stats(expert_ids, E)) or a [E] tensor of loads, got "
            f"{type(stats).__name__}{tuple(stats.shape) if isinstance(stats, torch.Tensor) else ''}"
        )
    load = load.detach().cpu().double().numpy()
    E = load.shape[0]
    co = np.zeros((E, E)) if co is None else co.detach().cpu().double().numpy().copy()
    if co.shape != (E, E):
        raise ValueError(f"stats.coselection must be [{E}, {E}] to match tokens_per_expert, got {co.shape}")
    if (load < 0).any() or not np.isfinite(load).all():
        raise ValueError("stats.tokens_per_expert must be finite and >= 0")
    np.fill_diagonal(co, 0.0)  # affinity is between distinct experts
    return load, co


def _greedy(items, load, co, num_bins, room, limit, expert=None, per_bin=None, fixed=None):
    """Assign ``items`` (already in placement order) to bins; returns the bin of each item.

    ``expert[item]``: the expert an item is a copy of, ``per_bin[e]`` the most copies of
    expert ``e`` one bin may take (``None``: no copies). ``fixed[item]``: a bin the item
    must take, or -1 (such items come first in ``items``, so that their bins have room).
    """
    bin_load = np.zeros(num_bins)
    bin_free = np.full(num_bins, room, dtype=np.int64)
    aff = np.zeros((len(items), num_bins))  # affinity of item i with each bin's current members
    where = np.full(len(items), -1, dtype=np.int64)
    sub = co[np.ix_(items, items)]
    loads = load[np.asarray(items)]
    taken: dict = {}  # expert -> copies of it in each bin
    for i in range(len(items)):
        li = loads[i]
        open_ = bin_free > 0
        if expert is not None:
            ex = int(expert[items[i]])
            open_ &= taken.setdefault(ex, np.zeros(num_bins, dtype=np.int64)) < per_bin[ex]
            if not open_.any():
                raise RuntimeError(
                    f"plan_placement: no bin with room left for a copy of expert {ex} that does not hold one "
                    "already; raise experts_per_rank or lower replicas"
                )
        # Every slot left must still be filled: a bin with f free slots will also take
        # at least the f - 1 lightest items still to come, so count them now, or the
        # last (light) items land on bins that the heavy ones already filled to the limit.
        tail = np.concatenate([[0.0], np.cumsum(np.sort(loads[i + 1 :]))])
        reserve = tail[np.clip(bin_free - 1, 0, len(tail) - 1)]
        final = bin_load + li + reserve
        fits = open_ & (final <= limit)
        if fixed is not None and fixed[items[i]] >= 0:
            b = int(fixed[items[i]])
        elif fits.any():
            # most affinity, then least load, then lowest index (argmax takes the first)
            key = np.where(fits, aff[i] - 1e-12 * bin_load, -np.inf)
            b = int(np.argmax(key))
        else:
            b = int(np.argmin(np.where(open_, final, np.inf)))
        where[i] = b
        bin_load[b] += li
        bin_free[b] -= 1
        aff[:, b] += sub[:, i]
        if expert is not None:
            taken[ex][b] += 1
    return where


def _swap_pass(items, load, co, where, num_bins, limit, passes=3, expert=None, per_bin=None):
    """Pairwise swaps between bins: keep one if it lowers the max of the two loads, or adds affinity within the limit.

    With ``expert`` (copies), a swap that would put more than ``per_bin[e]`` copies of expert ``e`` in a bin is
    never made.
    """
    items = np.asarray(items)
    n = len(items)
    sub = co[np.ix_(items, items)]
    ld = load[items]
    ex = None if expert is None else expert[items]
    for _ in range(passes):
        changed = False
        onehot = np.zeros((n, num_bins))
        onehot[np.arange(n), where] = 1.0
        aff = sub @ onehot  # [n, bins]
        bin_load = onehot.T @ ld
        holds = None
        if ex is not None:  # copies of each expert per bin
            holds = np.zeros((len(per_bin), num_bins), dtype=np.int64)
            np.add.at(holds, (ex, where), 1)
        for i in range(n):
            a = where[i]
            bj = where  # bin of every candidate partner j
            la, lb = bin_load[a], bin_load[bj]
            na, nb = la - ld[i] + ld, lb - ld + ld[i]  # loads after swapping i with each j
            old_max, new_max = np.maximum(la, lb), np.maximum(na, nb)
            # affinity change of the swap (i: a -> bj, j: bj -> a), without the pair itself
            gain = (aff[i, bj] - sub[i]) - aff[i, a] + (aff[np.arange(n), a] - sub[:, i]) - aff[np.arange(n), bj]
            ok = bj != a
            if holds is not None:  # i's expert must have room in j's bin, and j's in i's
                ok = ok & (ex != ex[i]) & (holds[ex[i], bj] < per_bin[ex[i]]) & (holds[ex, a] < per_bin[ex])
            better_balance = ok & (new_max < old_max - 1e-9) & (old_max > limit)
            better_aff = ok & (gain > 1e-9) & (new_max <= np.maximum(limit, old_max))
            cand = better_balance | better_aff
            if not cand.any():
                continue
            score = np.where(cand, gain + np.where(better_balance, old_max - new_max, 0.0), -np.inf)
            j = int(np.argmax(score))
            b = where[j]
            where[i], where[j] = b, a
            bin_load[a], bin_load[b] = na[j], nb[j]
            aff[:, a] += sub[:, j] - sub[:, i]
            aff[:, b] += sub[:, i] - sub[:, j]
            if holds is not None:
                holds[ex[i], a] -= 1
                holds[ex[i], b] += 1
                holds[ex[j], b] -= 1
                holds[ex[j], a] += 1
            changed = True
        if not changed:
            break
    return where


def _copies(load: np.ndarray, replicas: int, W: int, node_replicas: int = 0, N: int = 1) -> np.ndarray:
    """Copies per expert: one each, ``N`` (one per node) for the ``node_replicas`` hottest (ties by id), then
    ``replicas`` more, each to the largest load per copy (ties by id)."""
    E = load.shape[0]
    n = np.ones(E, dtype=np.int64)
    n[np.lexsort((np.arange(E), -load))[:node_replicas]] = N
    for _ in range(replicas):
        per = np.where(n < W, load / n, -np.inf)
        if not np.isfinite(per).any():
            raise ValueError(f"replicas={replicas}: every expert already has a copy on each of the {W} ranks")
        n[int(np.argmax(per))] += 1  # argmax takes the lowest id among ties
    return n


def plan_placement(
    stats,
    world_size: int,
    ranks_per_node: int | None = None,
    *,
    experts_per_rank: int | None = None,
    slack: float = 0.05,
    swap_passes: int = 3,
    replicas: int = 0,
    node_replicas: int = 0,
) -> ExpertPlacement:
    """A placement of ``E`` experts over ``world_size`` ranks that balances load and co-locates co-selected experts.

    Args:
        stats: :class:`RoutingStats` (load and co-selection), or a ``[E]`` tensor of
            loads alone (balance only).
        world_size: ``W``, the expert-parallel group size.
        ranks_per_node: ``R``; ranks ``n*R .. (n+1)*R - 1`` form node ``n`` (the
            layout of consecutive ``ep`` ranks). ``None``: one node of ``W`` ranks.
        experts_per_rank: most expert copies (slots) on one rank (its memory); default
            ``ceil((E + extra copies) / W)``, so every rank holds ``E / W`` when ``W``
            divides ``E`` and there are no replicas.
        slack: allowed bin load above the mean, as a fraction, before affinity must
            give way to balance.
        swap_passes: refinement passes per level (0: the greedy alone).
        replicas: extra copies of the hottest experts (see the module docstring);
            0 (default): one replica per expert.
        node_replicas: the ``node_replicas`` hottest experts are held on **every node**
            (one copy per node, ``W / R - 1`` extra copies each, before ``replicas``):
            the replica rule then keeps their rows on the token's node, so they cross
            no node boundary. For traffic; ``replicas`` is for balance.

    Returns:
        An :class:`ExpertPlacement`, the same for the same inputs on every machine.
    """
    load, co = _as_arrays(stats)
    E = load.shape[0]
    W = world_size
    if not _is_int(W) or W < 1:
        raise ValueError(f"world_size must be a positive int, got {W!r}")
    R = W if ranks_per_node is None else ranks_per_node
    if not _is_int(R) or R < 1 or W % R:
        raise ValueError(f"ranks_per_node must be a positive int dividing world_size={W}, got {ranks_per_node!r}")
    if not _is_int(replicas) or replicas < 0:
        raise ValueError(f"replicas must be an int >= 0 (extra expert copies), got {replicas!r}")
    N = W // R
    if not _is_int(node_replicas) or not 0 <= node_replicas <= E:
        raise ValueError(
            f"node_replicas must be an int in [0, num_experts={E}] (experts on every node), got {node_replicas!r}"
        )
    extra = replicas + node_replicas * (N - 1)
    S = E + extra
    cap = math.ceil(S / W) if experts_per_rank is None else experts_per_rank
    if not _is_int(cap) or cap < 1 or cap * W < S:
        need = f"num_experts={E}" if not extra else f"num_experts + replicas={S} (it counts every copy)"
        raise ValueError(f"experts_per_rank must be an int with experts_per_rank * world_size >= {need}, got {cap!r}")
    if not isinstance(slack, (int, float)) or isinstance(slack, bool) or not 0 <= slack < math.inf:
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    if not _is_int(swap_passes) or swap_passes < 0:
        raise ValueError(f"swap_passes must be an int >= 0, got {swap_passes!r}")
    copies = _copies(load, replicas, W, node_replicas, N)
    expert = np.repeat(np.arange(E), copies)  # item -> its expert; the copies of an expert are adjacent
    share = 1.0 / copies[expert]
    load_x = load[expert] * share  # each copy takes an even share of the rows (the replica rule)
    co_x = co[np.ix_(expert, expert)] * share[:, None] * share[None, :] * copies[expert][:, None]
    co_x[expert[:, None] == expert[None, :]] = 0.0  # copies of one expert never share a token
    ex = expert if extra else None
    one = np.ones(E, dtype=np.int64)  # a rank holds an expert at most once
    spread = -(-copies // N)  # a node: ceil(copies / N), so the copies spread over the nodes first
    total = float(load_x.sum())
    # An expert on every node: its copy c goes to node c, and these copies are placed first,
    # so that no node is full before it gets them.
    fixed = None
    if node_replicas and N > 1:
        on_every_node = np.zeros(E, dtype=bool)
        on_every_node[np.lexsort((np.arange(E), -load))[:node_replicas]] = True  # as _copies chose them
        copy_index = np.arange(len(expert)) - (np.cumsum(copies) - copies)[expert]  # c of item = copy c of e
        fixed = np.where(on_every_node[expert] & (copy_index < N), copy_index, -1)
    # decreasing load, ties by item (expert, then copy); the fixed copies first
    first = np.zeros(len(expert)) if fixed is None else fixed < 0
    order = np.lexsort((np.arange(len(expert)), -load_x, first))
    # Level 1: nodes (the copies of one expert on as many nodes as they can).
    node_limit = (1 + slack) * total / N
    node = _greedy(order, load_x, co_x, N, R * cap, node_limit, ex, spread, fixed)
    if swap_passes:
        node = _swap_pass(order, load_x, co_x, node, N, node_limit, swap_passes, ex, spread)
    where = np.empty(len(expert), dtype=np.int64)
    # Level 2: the ranks of each node, against the global mean rank load.
    rank_limit = (1 + slack) * total / W
    for n in range(N):
        items = order[node == n]  # still in decreasing load
        if len(items) == 0:
            continue
        # A node above the mean (a hot expert) cannot meet the global limit; its own mean then.
        limit = max(rank_limit, (1 + slack) * load_x[items].sum() / R)
        local = _greedy(items, load_x, co_x, R, cap, limit, ex, one)
        if swap_passes:
            local = _swap_pass(items, load_x, co_x, local, R, limit, swap_passes, ex, one)
        where[items] = n * R + local
    holders = [[] for _ in range(E)]
    for item, e in enumerate(expert):
        holders[e].append(int(where[item]))
    return ExpertPlacement.from_ranks(holders, W)


@torch.no_grad()
def placement_traffic(
    expert_ids: torch.Tensor, placement: ExpertPlacement, ranks_per_node: int | None = None, token_ranks=None
) -> dict:
    """What a routing decision costs under a placement: rank loads and the rows and copies that leave home.

    ``token_ranks [T]``: the rank holding each token (default: ``T`` tokens split into
    ``W`` equal consecutive blocks, as data parallelism shards a batch). Returns a dict
    of Python numbers: ``rows_per_rank`` (list), ``balancedness`` (mean / max),
    ``cross_rank_rows`` (rows to an expert on another rank: what the all-to-all sends
    today), ``cross_node_rows`` (those of them whose expert is on another node),
    ``cross_rank_copies`` / ``cross_node_copies`` (distinct (token, rank) or
    (token, node) destinations other than home: what a dispatch sending each token
    once per destination sends, the quantity co-location and node-limited routing
    reduce), and the ``rows`` in all.

    A replicated placement sends each row to the replica the layer's rule picks
    (:mod:`.replicas`: own rank, then own node when ``ranks_per_node`` is given, then
    ``(token index + j) mod replicas``, the token index counted over all ``T`` tokens).
    """
    W = placement.world_size
    R = W if ranks_per_node is None else ranks_per_node
    if not _is_int(R) or R < 1 or W % R:
        raise ValueError(f"ranks_per_node must be a positive int dividing world_size={W}, got {ranks_per_node!r}")
    T, k = expert_ids.shape
    dev = expert_ids.device
    home = (torch.arange(T, device=dev) * W // max(T, 1)) if token_ranks is None else token_ranks.long()
    if placement.replicated:
        node_of = None if ranks_per_node is None else tuple(r // R for r in range(W))
        slots = ReplicaRule(placement, node_of).slots(expert_ids, torch.arange(T, device=dev), home)
        dest = torch.tensor(placement.slot_rank, dtype=torch.long, device=dev)[slots]
    else:
        dest = torch.tensor(placement.owners, dtype=torch.long, device=dev)[expert_ids.long()]  # [T, k]
    ones = torch.ones(T * k, dtype=torch.int64)
    rows_per_rank = torch.zeros(W, dtype=torch.int64).scatter_add_(0, dest.reshape(-1).cpu(), ones)
    cross_rows = int((dest != home[:, None]).sum())

    def copies(bins, home_bin, nb):
        hit = torch.zeros(T, nb, dtype=torch.bool, device=dev)
        hit.scatter_(1, bins, True)
        hit[torch.arange(T), home_bin] = False
        return int(hit.sum())

    mean = float(rows_per_rank.double().mean())
    top = float(rows_per_rank.max())
    return dict(
        rows=T * k,
        rows_per_rank=rows_per_rank.tolist(),
        balancedness=mean / top if top > 0 else 1.0,
        cross_rank_rows=cross_rows,
        cross_rank_copies=copies(dest, home, W),
        cross_node_rows=int((dest // R != (home // R)[:, None]).sum()),
        cross_node_copies=copies(dest // R, home // R, W // R),
    )

"""The token exchange of an expert-parallel layer: rows to the ranks holding their experts, and back.

:class:`TokenExchange` is the part of a forward that does not depend on what the
experts are: ``ExpertParallelDMoE`` and the Hugging Face experts modules sharded by
``expert_parallel`` both use it, each with its own expert function::

    plan(expert_ids)        sort the (token, expert) rows by *placement order*: rank 0's
                            experts, then rank 1's, ... so each rank's rows are one range
    run(x, plan, weights, expert_fn, ...)
      count exchange        all_to_all_single of [counts of p's experts..., one word] per rank p
      gather                x_sorted (overlapped with the counts)
      dispatch              all_to_all_single of the rows (variable: uneven splits, read on the
                            host once; fixed capacity: chunks of B rows, no host read)
      expert_fn             y_recv = expert_fn(x_recv, local_ids, padded), unweighted
      return                the same all-to-all with the splits swapped
      combine               y[t] = sum_j weights[t, j] * y_sorted[slot_to_sorted[t*k + j]]

The extra word per destination is 0 (variable mode) or the source's largest chunk
(fixed capacity), and ``-1`` when the source failed before the dispatch
(:meth:`announce_failure`): every rank, even one holding no expert (which receives no
counts), then learns of the failure in the same exchange and leaves the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from ..routing import RoutingPlan, _check_id_range, _validate_expert_ids, plan_routing
from .bounded import bounded_exchange, round_schedule
from .chunked import expert_exchange
from .collectives import CollectiveError, Communicator, PeerFailedError, all_to_all
from .hierarchical import HierarchicalPlan
from .nodes import HIERARCHIES, NodeLayout
from .placement import ExpertPlacement
from .replicas import ReplicaRule
from .stats import AllToAllStats, CapacityOverflowError
from .trace import timed

__all__ = ["ExchangeResult", "TokenExchange", "OVERFLOW_POLICIES"]

OVERFLOW_POLICIES = ("error", "drop")
# expert_fn(x_recv [N, H], local_ids [N] int64, padded) -> y_recv [N, H]: the rows of local
# expert local_ids[i] through that expert, unweighted; with padded=True, ids equal to the
# number of local experts mark padding rows, which must come back as zeros.
ExpertFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def check_exchange_options(name: str, capacity_per_peer, hierarchy: str, chunks) -> None:
    """Local checks of the exchange's options (no collective): the same error on every rank given the same values."""
    where = f"expert-parallel layer {name!r}"
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"{where}: hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"{where}: chunks must be a positive int, got {chunks!r}")
    if capacity_per_peer is not None and (hierarchy != "flat" or chunks != 1):
        raise ValueError(
            f"{where}: capacity_per_peer={capacity_per_peer} runs the flat, single-chunk exchange only; got "
            f"hierarchy={hierarchy!r}, chunks={chunks} (expected hierarchy='flat', chunks=1, or capacity_per_peer=None)"
        )


@dataclass
class ExchangeResult:
    """What one exchange produced: the output, and the counts behind it (device tensors)."""

    out: torch.Tensor  # [T, H]
    tokens_per_expert: torch.Tensor  # [E] this rank's rows per *global* expert
    tokens_per_local_expert: torch.Tensor  # [E_l] rows this rank's experts computed
    rows_sent: torch.Tensor  # [W] int64
    rows_received: torch.Tensor  # [W] int64
    dropped: torch.Tensor  # [] int64
    stats: AllToAllStats
    local: Optional[torch.Tensor] = None  # what run's local_work returned (computed while the counts travelled)


@dataclass(frozen=True)
class _Tables:
    """Index tensors of the placement on one device (built once per device)."""

    position: torch.Tensor  # [E] expert -> placement order
    owner: torch.Tensor  # [E] placement order -> rank
    first: torch.Tensor  # [W] first placement-order index of each rank
    last: torch.Tensor  # [W] one past its last
    count_pos: torch.Tensor  # [E] placement order -> payload slot
    extra_pos: torch.Tensor  # [W] rank -> payload slot of its extra word
    matrix_pos: torch.Tensor  # [W * M] payload slots of the traffic-matrix row (M = W when bounded, else 0)
    slot_expert: torch.Tensor  # [S] slot (placement-order index) -> global expert


class TokenExchange:
    """Routes rows between the ranks of ``comm`` according to ``placement``.

    Args:
        comm: the expert-parallel group, with the layer's name for errors.
        placement: where each expert lives (the same on every rank).
        capacity_per_peer / capacity_overflow: the fixed-capacity mode (see
            :class:`~blocksparse_moe.parallel.ExpertParallelDMoE`).
    """

    def __init__(
        self,
        comm: Communicator,
        placement: ExpertPlacement,
        capacity_per_peer: Optional[int] = None,
        capacity_overflow: str = "error",
        *,
        layout: Optional[NodeLayout] = None,
        hierarchy: str = "flat",
        chunks: int = 1,
        max_recv_rows: Optional[int] = None,
    ):
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        # Replicated experts: the exchange runs on the slots (one per (expert, holder), a
        # single-replica contiguous placement), and plan() maps each row to a slot first.
        self.experts = placement
        self.replica_rule = None
        if placement.replicated:
            node_of = None if layout is None else layout.node_of
            self.replica_rule = ReplicaRule(placement, node_of, ranks=(self.rank,))
            placement = placement.slot_placement
        self.placement = placement
        self.capacity_per_peer = capacity_per_peer
        self.capacity_overflow = capacity_overflow
        self.num_local = placement.counts[self.rank]
        # A chunk is a group of each rank's local experts: more chunks than the most experts a
        # rank holds would only add empty transfers (every rank computes the same cap).
        self.layout, self.hierarchy, self.chunks = layout, hierarchy, max(1, min(chunks, max(placement.counts)))
        self.max_recv_rows = max_recv_rows
        # bounded: every source also sends its row of the traffic matrix (W words) to every rank
        self.matrix_words = self.world_size if max_recv_rows is not None else 0
        self.trace = None  # a StageTrace to record per-stage timestamps (see .trace); None records nothing
        # per destination p: its experts' counts and one extra word (see the module docstring)
        self.payload_splits = [c + 1 + self.matrix_words for c in placement.counts]
        self.recv_splits = [self.num_local + 1 + self.matrix_words] * self.world_size
        self.hplan = None
        if hierarchy == "node":
            self.hplan = HierarchicalPlan(placement, layout, self.rank)
            self.payload_splits, self.recv_splits = self.hplan.payload_splits, self.hplan.recv_splits
        self._tables_by_device: dict = {}

    def tables(self, device: torch.device) -> _Tables:
        t = self._tables_by_device.get(device)
        if t is None:
            pl = self.placement
            offs = pl.rank_offsets
            owner = [r for r in range(pl.world_size) for _ in range(pl.counts[r])]
            as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
            per = 1 + self.matrix_words  # words per destination beside its experts' counts
            W, M = pl.world_size, self.matrix_words
            t = _Tables(
                position=as_t(pl.position), owner=as_t(owner), first=as_t(offs[:-1]), last=as_t(offs[1:]),
                count_pos=as_t([v + owner[v] * per for v in range(pl.num_experts)]),
                extra_pos=as_t([offs[p + 1] + p * per for p in range(W)]),
                matrix_pos=as_t([offs[p + 1] + p * per + 1 + q for p in range(W) for q in range(M)]),
                slot_expert=as_t(self.experts.slot_expert),
            )  # fmt: skip
            self._tables_by_device[device] = t
        return t

    # ------------------------------------------------------------------ before the first collective
    def plan(self, expert_ids: torch.Tensor) -> RoutingPlan:
        """The routing plan over *placement order* (identical to the global plan for a contiguous placement).

        With replicas, over the slots: each row goes to the replica :mod:`.replicas`' rule picks.
        """
        if self.replica_rule is not None:
            E = self.experts.num_experts
            _validate_expert_ids(expert_ids, E)
            _check_id_range(expert_ids, E, None)
            T = expert_ids.shape[0]
            token_index = self.rank * T + torch.arange(T, dtype=torch.int64, device=expert_ids.device)
            slots = self.replica_rule.slots(expert_ids, token_index)
            return plan_routing(slots, self.placement.num_experts, validate_ids=False)  # slots: contiguous
        E = self.placement.num_experts
        if self.placement.is_contiguous:
            return plan_routing(expert_ids, E)
        _validate_expert_ids(expert_ids, E)
        _check_id_range(expert_ids, E, None)
        order_ids = self.tables(expert_ids.device).position[expert_ids.long()]
        return plan_routing(order_ids, E, validate_ids=False)

    def global_counts(self, plan: RoutingPlan) -> torch.Tensor:
        """``plan.tokens_per_expert`` back in global expert order (the replicas of an expert summed)."""
        if self.replica_rule is not None:
            slot_expert = self.tables(plan.device).slot_expert
            counts = plan.tokens_per_expert
            return counts.new_zeros(self.experts.num_experts).index_add_(0, slot_expert, counts)
        if self.placement.is_contiguous:
            return plan.tokens_per_expert
        return plan.tokens_per_expert[self.tables(plan.device).position]

    def announce_failure(self, device: torch.device) -> None:
        """Join the count exchange with -1 everywhere, so the peers raise PeerFailedError instead of waiting."""
        send = torch.full((sum(self.payload_splits),), -1, dtype=torch.int64, device=device)
        recv = torch.empty(sum(self.recv_splits), dtype=torch.int64, device=device)
        what = "count exchange (announcing a failure)"
        try:
            self.comm.wait(self.comm.start_all_to_all(recv, send, what, self.recv_splits, self.payload_splits), what)
        except CollectiveError:
            pass  # the original error is the one to report

    def _peer_failed(self, failed: list) -> PeerFailedError:
        return PeerFailedError(
            f"expert-parallel layer {self.comm.name!r}: rank(s) {failed} of the group failed before the token "
            f"dispatch (bad input or a routing error; see that rank's own error). Rank {self.rank} leaves this "
            "forward too; the process group is still usable."
        )

    # ------------------------------------------------------------------ the exchange
    def _exchange_counts(self, send_counts: torch.Tensor, extra: torch.Tensor, t: _Tables):
        W, E, M = self.world_size, self.placement.num_experts, self.matrix_words
        payload = send_counts.new_zeros(E + W * (1 + M))
        payload.index_copy_(0, t.count_pos, send_counts)
        payload.index_copy_(0, t.extra_pos, extra.reshape(1).expand(W))
        if M:  # our row of the traffic matrix, to every rank
            sent = torch.zeros(W, dtype=send_counts.dtype, device=send_counts.device).index_add_(0, t.owner, send_counts)
            payload.index_copy_(0, t.matrix_pos, sent.repeat(W))
        recv = send_counts.new_empty(sum(self.recv_splits))
        what = "count exchange (all_to_all_single)"
        return recv, self.comm.start_all_to_all(recv, payload, what, self.recv_splits, self.payload_splits)

    def _count_bytes(self, elem: int) -> int:
        return sum(self.payload_splits[p] for p in range(self.world_size) if p != self.rank) * elem

    def run(
        self, x, plan: RoutingPlan, weights, expert_fn: ExpertFn, backend: str, anchor, params=None, local_work=None
    ) -> ExchangeResult:
        """One forward's exchange. A collective: every rank of the group calls it with its own rows.

        ``params``: the tensors ``expert_fn`` reads; needed with ``max_recv_rows`` (the rounds'
        backward recomputes the experts and hands their gradients back).
        ``local_work``: a callable with no arguments, run after the count exchange is issued
        and before this rank waits for it (the wait, and with it the forward's host read,
        is where a rank idles until its slowest peer has routed): compute that needs no
        exchange, such as the shared experts, fills that time. Its result is
        ``ExchangeResult.local``.
        """
        if self.hierarchy == "node":
            res = self._run_hierarchical(x, plan, weights, expert_fn, anchor, local_work)
        elif self.capacity_per_peer is None:
            res = self._run_variable(x, plan, weights, expert_fn, backend, anchor, params, local_work)
        else:
            res = self._run_capacity(x, plan, weights, expert_fn, backend, anchor, local_work)
        return res

    def _local_work(self, fn):
        if fn is None:
            return None
        with timed(self.trace, "local work"):
            return fn()

    def _run_variable(self, x, plan, weights, expert_fn, backend, anchor, params=None, local_work=None):
        comm, W, El, E, M = self.comm, self.world_size, self.num_local, self.placement.num_experts, self.matrix_words
        dev, t = x.device, self.tables(x.device)
        # 1. Counts (rank p gets its experts' counts from us); 2. the gather meanwhile
        #    (gloo: the exchange runs on its own thread; NCCL: on its own stream).
        send_counts = plan.tokens_per_expert.to(torch.int64)  # [E] placement order = by destination
        with timed(self.trace, "count exchange"):
            recv, work = self._exchange_counts(send_counts, send_counts.new_zeros(()), t)
            x_sorted = ops.gather(x, plan, backend)
            local = self._local_work(local_work)
            comm.wait(work, "count exchange (all_to_all_single)")
        # 3. The one host read of the forward: both count vectors in one transfer.
        with timed(self.trace, "host read"):
            host = torch.cat([send_counts, recv]).tolist()
        got, n = host[E:], El + 1 + M  # per source: its counts for my experts, the extra word, its matrix row
        failed = [s for s in range(W) if got[s * n + El] < 0]
        if failed:
            raise self._peer_failed(failed)
        offs = self.placement.rank_offsets
        send_rows = [sum(host[offs[p] : offs[p + 1]]) for p in range(W)]
        recv_rows = [sum(got[s * n : s * n + El]) for s in range(W)]
        # 4-6. Dispatch (rows in placement order are already grouped by destination rank and
        #      expert), the experts, the return: in `chunks` overlapping transfers (.chunked),
        #      or in rounds of at most max_recv_rows received rows (.bounded).
        recv_counts = recv.view(W, n)[:, :El]  # [W, E_l] rows from source s for local expert l
        send_lists = [host[offs[p] : offs[p + 1]] for p in range(W)]
        recv_lists = [got[s * n : s * n + El] for s in range(W)]
        fn = lambda xr, ids: expert_fn(xr, ids, False)  # noqa: E731
        rounds, peak = 1, sum(recv_rows)
        if M:
            schedule = round_schedule([got[s * n + El + 1 : (s + 1) * n] for s in range(W)], self.max_recv_rows)
            rounds, peak = schedule.rounds, schedule.peak[self.rank]
        if rounds > 1:
            if params is None:
                raise ValueError(
                    f"expert-parallel layer {comm.name!r}: max_recv_rows needs the experts' parameters "
                    "(TokenExchange.run(..., params=...)), got params=None"
                )
            y_sorted = bounded_exchange(
                x_sorted, comm, send_lists, recv_lists, schedule, fn, params, anchor=anchor, what="token dispatch",
                back="result return",
            )  # fmt: skip
        else:
            y_sorted = expert_exchange(
                x_sorted, comm, send_lists, recv_lists, fn, chunks=self.chunks, anchor=anchor, trace=self.trace,
                what="token dispatch", back="result return",
            )  # fmt: skip
        # 7. combine with the routing weights.
        with timed(self.trace, "combine"):
            out = ops.combine(y_sorted, plan, weights, backend)
        row_bytes = x.shape[1] * x.element_size()
        r = self.rank
        disp = (sum(send_rows) - send_rows[r]) * row_bytes
        ret = (sum(recv_rows) - recv_rows[r]) * row_bytes
        cross = None
        if self.layout is not None:
            off = [p for p in range(W) if self.layout.node_of[p] != self.layout.node_of[r]]
            cross = sum(send_rows[p] + recv_rows[p] for p in off) * row_bytes
        stats = AllToAllStats(
            send_rows=send_rows, recv_rows=recv_rows, bytes_sent=disp + ret, bytes_received=disp + ret,
            count_bytes=self._count_bytes(send_counts.element_size()), cross_node_bytes_sent=cross,
            cross_node_bytes_received=cross, phase_bytes={"dispatch": disp, "return": ret}, host_reads=1,
            hierarchy="flat", chunks=self.chunks, rounds=rounds, peak_recv_rows=peak,
        )  # fmt: skip
        return ExchangeResult(
            out=out, tokens_per_expert=self.global_counts(plan), tokens_per_local_expert=recv_counts.sum(0),
            rows_sent=torch.zeros(W, dtype=torch.int64, device=dev).index_add_(0, t.owner, send_counts),
            rows_received=recv_counts.sum(1), dropped=torch.zeros((), dtype=torch.int64, device=dev), stats=stats,
            local=local,
        )  # fmt: skip

    def _run_hierarchical(self, x, plan, weights, expert_fn, anchor, local_work=None) -> ExchangeResult:
        """Two stages (across nodes once per (token, node), then inside the node): see .hierarchical."""
        comm, W, El, E, hp = self.comm, self.world_size, self.num_local, self.placement.num_experts, self.hplan
        dev, t = x.device, self.tables(x.device)
        send_counts = plan.tokens_per_expert.to(torch.int64)  # [E] placement order
        expert_ids = self._expert_ids(plan)
        with timed(self.trace, "count exchange"):
            per_node, node_e, mask, recv, work = hp.start(comm, expert_ids, send_counts, send_counts.new_zeros(()))
            local = self._local_work(local_work)
            comm.wait(work, "count exchange (hierarchical, all_to_all_single)")
        with timed(self.trace, "host read"):
            host = torch.cat([send_counts, per_node, recv]).tolist()  # the one host read of the forward
        sizes = hp.split_sizes(host[:E], host[E : E + hp.num_nodes], host[E + hp.num_nodes :])
        if sizes["failed"]:
            raise self._peer_failed(sizes["failed"])
        out = hp.exchange(
            comm, x, expert_ids, weights, node_e, mask, sizes, lambda xr, ids: expert_fn(xr, ids, False),
            self.chunks, anchor, self.trace,
        )  # fmt: skip
        mine = recv[hp.tables(dev).mine].view(W, El)
        st = hp.stats(sizes, x.shape[1] * x.element_size(), x.element_size(), plan.top_k)
        stats = AllToAllStats(
            send_rows=sizes["send_rows"], recv_rows=sizes["recv_rows"],
            count_bytes=self._count_bytes(send_counts.element_size()), host_reads=1, hierarchy="node",
            chunks=self.chunks, **st,
        )  # fmt: skip
        return ExchangeResult(
            out=out, tokens_per_expert=self.global_counts(plan), tokens_per_local_expert=mine.sum(0),
            rows_sent=torch.zeros(W, dtype=torch.int64, device=dev).index_add_(0, t.owner, send_counts),
            rows_received=mine.sum(1), dropped=torch.zeros((), dtype=torch.int64, device=dev), stats=stats,
            local=local,
        )  # fmt: skip

    def _expert_ids(self, plan: RoutingPlan) -> torch.Tensor:
        """``[T, k]`` global expert ids, rebuilt from the plan (placement order -> global id)."""
        order = torch.tensor(self.placement.order, dtype=torch.int64, device=plan.device)
        slot_expert = plan.sorted_expert.long()[plan.slot_to_sorted.long()]  # [T*k] placement order
        return order[slot_expert].view(plan.num_tokens, plan.top_k)

    def _run_capacity(self, x, plan, weights, expert_fn, backend, anchor, local_work=None) -> ExchangeResult:
        comm, W, El = self.comm, self.world_size, self.num_local
        B, dev, H, S = self.capacity_per_peer, x.device, x.shape[1], plan.num_slots
        t = self.tables(dev)
        i64 = dict(dtype=torch.int64, device=dev)
        # 1. Counts plus our largest chunk, so every rank learns every source's largest
        #    chunk and all agree on an overflow.
        send_counts = plan.tokens_per_expert.to(torch.int64)
        eo = plan.expert_offsets.long()
        first = eo[t.first]  # [W] first sorted row for each destination
        rows_to = eo[t.last] - first  # [W] rows for each destination
        recv, work = self._exchange_counts(send_counts, rows_to.max(), t)
        # 2. Meanwhile: the padded send buffer, chunk p = rows for rank p, B rows each.
        x_sorted = ops.gather(x, plan, backend)
        dest = t.owner[plan.sorted_expert.long()]  # [S] destination rank of each sorted row
        rank_in_chunk = torch.arange(S, **i64) - first[dest]
        keep = rank_in_chunk < B
        pos = torch.where(keep, dest * B + rank_in_chunk, torch.full_like(dest, W * B))  # W*B: dropped
        x_send = x_sorted.new_zeros(W * B + 1, H).index_copy(0, pos, x_sorted)[: W * B]
        local = self._local_work(local_work)
        comm.wait(work, "count exchange (all_to_all_single)")
        got = recv.view(W, El + 1)
        recv_counts, extra = got[:, :El], got[:, El]  # [W, E_l]; [W] each source's largest chunk
        self._check_peers(extra)
        self._check_overflow(extra.max())
        # 3. Dispatch, equal chunks: no split sizes, so nothing is read on the host.
        x_recv = all_to_all(x_send, comm, "token dispatch (fixed capacity, all_to_all_single)", anchor=anchor)
        if El == 0:
            y_recv = x_recv * 0  # every received row is padding
            local_counts = torch.zeros(0, **i64)
        else:
            # 4. Regroup: row q of chunk s belongs to local expert searchsorted(cumsum, q);
            #    E_l marks padding (and rows a "drop" source did not send).
            cum = recv_counts.cumsum(1)
            q = torch.arange(B, **i64).expand(W, B).contiguous()
            local_ids = torch.searchsorted(cum, q, right=True).view(-1)
            valid = (local_ids < El).view(-1, 1)
            x_recv = torch.where(valid, x_recv, x_recv.new_zeros(()))  # padding rows: no value, no gradient
            y_recv = expert_fn(x_recv, local_ids, True)
            local_counts = torch.zeros(El + 1, **i64).index_add_(0, local_ids, torch.ones_like(local_ids))[:El]
        # 5. Return, equal chunks; 6. combine: slot -> padded row (dropped: a zero row).
        y_back = all_to_all(y_recv, comm, "result return (fixed capacity, all_to_all_single)")
        y_ext = torch.cat([y_back, y_back.new_zeros(1, H)])
        rows = y_ext[pos[plan.slot_to_sorted.long()]].view(plan.num_tokens, plan.top_k, H)
        acc = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows  # as combine
        out = (acc * weights.to(acc.dtype)[..., None]).sum(1).to(x.dtype)
        chunk_bytes = B * H * x.element_size()
        stats = AllToAllStats(
            send_rows=None, recv_rows=None, bytes_sent=2 * (W - 1) * chunk_bytes,
            bytes_received=2 * (W - 1) * chunk_bytes, count_bytes=self._count_bytes(send_counts.element_size()),
            # on CPU the peer and overflow checks read the host (free there); elsewhere they are device asserts
            host_reads=0 if dev.type != "cpu" else 1 + (self.capacity_overflow == "error"), peak_recv_rows=W * B,
        )  # fmt: skip
        return ExchangeResult(
            out=out, tokens_per_expert=self.global_counts(plan), tokens_per_local_expert=local_counts,
            rows_sent=rows_to.clamp(max=B), rows_received=recv_counts.sum(1).clamp(max=B), dropped=(~keep).sum(),
            stats=stats, local=local,
        )  # fmt: skip

    def _check_peers(self, extra: torch.Tensor) -> None:
        """Fixed-capacity mode: a peer that failed sent -1s (on CPU a free read; elsewhere an assertion)."""
        if extra.device.type == "cpu":
            failed = [s for s, v in enumerate(extra.tolist()) if v < 0]
            if failed:
                raise self._peer_failed(failed)
        else:
            torch._assert_async(extra.min() >= 0, f"expert-parallel layer {self.comm.name!r}: a peer's forward failed")

    def _check_overflow(self, largest: torch.Tensor) -> None:
        if self.capacity_overflow == "drop":
            return
        B = self.capacity_per_peer
        if largest.device.type == "cpu":
            # A host read, but a free one on CPU; every rank holds the same value.
            m = int(largest)
            if m > B:
                raise CapacityOverflowError(
                    f"expert-parallel layer {self.comm.name!r}: a rank has {m} rows for one peer but "
                    f"capacity_per_peer={B}; raise it to at least {m} (T_max * min(top_k, experts per rank) "
                    "never overflows), or pass capacity_overflow='drop'"
                )
        else:
            torch._assert_async(
                largest <= B, f"expert-parallel layer {self.comm.name!r}: rows for one peer exceed capacity_per_peer"
            )

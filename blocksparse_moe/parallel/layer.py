"""``ExpertParallelDMoE``: the dropless layer with its experts sharded over a process group.

Rank ``r`` of a group of ``W`` ranks owns the ``E_l = E / W`` experts
``r * E_l .. (r + 1) * E_l - 1``; the router is replicated. One forward
(see docs/parallel.md for the picture)::

    route locally (replicated router)  -> expert_ids [T, k], weights [T, k]
    plan_routing over the E global experts: rows sorted by expert = by destination rank
    count exchange  all_to_all_single([E] counts)            async, overlapped with the gather
    gather          x_sorted [T*k, H]                        (the local permutation)
    host read       the counts, once per forward             -> split sizes
    dispatch        all_to_all_single(x_sorted, uneven splits)   autograd: backward swaps the splits
    regroup         plan_routing over the E_l local experts of the received rows
    experts         sdd / act / dsd on the block-sparse topology of the received rows
    return          all_to_all_single(y, splits swapped)         autograd: backward swaps them back
    combine         y[t] = sum_j weights[t, j] * y_sorted[slot_to_sorted[t*k + j]]

With ``capacity_per_peer=B`` the two data all-to-alls use equal chunks of ``B`` rows
per (source, destination) pair instead: no host read at all, at the price of
``W * B`` rows per buffer (see :class:`ExpertParallelDMoE`).
"""

from __future__ import annotations

import datetime
import itertools
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..config import MoEConfig
from ..layers import add_expert_parameters
from ..routing import RoutingPlan, plan_routing
from ..topology import Topology, build_topology
from .checks import check_same_config
from .collectives import CollectiveError, Communicator, PeerFailedError, all_to_all
from .stats import AllToAllStats, CapacityOverflowError, ExpertParallelAux

__all__ = ["AllToAllStats", "CapacityOverflowError", "ExpertParallelAux", "ExpertParallelDMoE", "sync_router_grads"]

_counter = itertools.count()
OVERFLOW_POLICIES = ("error", "drop")


def _truncate_plan(plan: RoutingPlan, num_experts: int) -> RoutingPlan:
    """The plan with its last expert (the padding rows, sorted last) removed from the counts."""
    return RoutingPlan(
        num_tokens=plan.num_tokens,
        top_k=plan.top_k,
        num_experts=num_experts,
        sorted_to_slot=plan.sorted_to_slot,
        slot_to_sorted=plan.slot_to_sorted,
        sorted_expert=plan.sorted_expert,
        tokens_per_expert=plan.tokens_per_expert[:num_experts],
        expert_offsets=plan.expert_offsets[: num_experts + 1],
    )


class ExpertParallelDMoE(nn.Module):
    """Dropless MoE whose ``E`` experts are split evenly over the ranks of ``group``.

    Parameters (same names as :class:`~blocksparse_moe.dMoE`, so state dicts map):
    ``router.weight [E, H]`` replicated on every rank; ``w1 [E_l, H, ffn]``,
    ``w2 [E_l, ffn, H]``, ``v1 [E_l, H, ffn]`` (GLU) holding the global experts
    :attr:`expert_range`. Use :func:`~blocksparse_moe.parallel.shard_state_dict`
    and :func:`~blocksparse_moe.parallel.gather_state_dict` to move between a full
    (single-process) state dict and the shards, or :meth:`from_dmoe`.

    Every rank of the group must construct the layer (the constructor checks that
    the configurations agree, a collective) and run each forward and backward.

    Args:
        config: the layer's :class:`~blocksparse_moe.MoEConfig`, the same on every
            rank except ``device``; ``num_experts`` must be divisible by the group size.
        group: the expert-parallel process group; ``None`` is the default group.
        capacity_per_peer: ``None`` (default): exact variable-size all-to-alls, which
            read the counts on the host once per forward. An int ``B``: the
            fixed-capacity mode: every (source, destination) pair exchanges a chunk
            of exactly ``B`` rows, so no count ever reaches the host. Memory: the
            send, receive and return buffers hold ``W * B`` rows each on every rank
            (instead of about ``T * k``), and the received rows' topology is sized for
            ``W * B`` rows. ``B = T_max * min(k, E_l)`` (``T_max`` the most tokens a
            rank holds) can never overflow.
        capacity_overflow: what the fixed-capacity mode does when a pair has more than
            ``B`` rows: ``"error"`` (default; on CPU a :class:`CapacityOverflowError`
            on every rank, on an accelerator a device-side assertion, which needs no
            host read but is fatal to the CUDA context) or ``"drop"`` (the rows past
            ``B`` in expert order are dropped, counted in ``aux.dropped_tokens``).
        timeout: the longest any one collective of this layer may wait before it
            raises :class:`CollectiveError` (gloo); ``None`` uses the group's timeout.
        name: the layer's name in error messages (default ``ExpertParallelDMoE#<n>``;
            give the module path, e.g. ``"blocks.3.moe"``).
        sync_router_init: broadcast the router weight from the group's rank 0 after
            initialisation, so every rank starts from the same router.
    """

    def __init__(
        self,
        config: MoEConfig,
        group=None,
        *,
        capacity_per_peer: Optional[int] = None,
        capacity_overflow: str = "error",
        timeout: Optional[datetime.timedelta] = None,
        name: Optional[str] = None,
        sync_router_init: bool = True,
    ):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if capacity_per_peer is not None and (
            not isinstance(capacity_per_peer, int) or isinstance(capacity_per_peer, bool) or capacity_per_peer < 1
        ):
            raise ValueError(f"capacity_per_peer must be None or a positive int, got {capacity_per_peer!r}")
        if capacity_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"capacity_overflow must be one of {OVERFLOW_POLICIES}, got {capacity_overflow!r}")
        super().__init__()
        self.name = name if name is not None else f"ExpertParallelDMoE#{next(_counter)}"
        self.config = config
        self.capacity_per_peer = capacity_per_peer
        self.capacity_overflow = capacity_overflow
        self.sync_router_init = sync_router_init
        self.comm = Communicator(group, self.name, timeout)
        # Collective, before anything is allocated: every rank raises the same error.
        check_same_config(
            self.comm, config, extra={"capacity_per_peer": capacity_per_peer, "capacity_overflow": capacity_overflow}
        )
        W, E = self.comm.world_size, config.num_experts
        if E % W:
            raise ValueError(
                f"expert-parallel layer {self.name!r}: num_experts={E} is not divisible by the expert-parallel "
                f"world size {W}; each rank must own the same number of experts (choose E a multiple of {W})"
            )
        self.num_local_experts = E // W
        self.expert_offset = self.comm.rank * self.num_local_experts
        add_expert_parameters(self, config, self.num_local_experts)
        self.reset_parameters()

    # ------------------------------------------------------------------ properties
    @property
    def group(self):
        return self.comm.group

    @property
    def rank(self) -> int:
        """This process's rank in the expert-parallel group."""
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def expert_range(self) -> range:
        """The global expert ids whose weights this rank holds (``w1[i]`` is expert ``expert_range[i]``)."""
        return range(self.expert_offset, self.expert_offset + self.num_local_experts)

    @property
    def expert_slice(self) -> slice:
        return slice(self.expert_offset, self.expert_offset + self.num_local_experts)

    def extra_repr(self) -> str:
        c = self.config
        mode = "variable" if self.capacity_per_peer is None else f"capacity_per_peer={self.capacity_per_peer}"
        return (
            f"name={self.name!r}, hidden={c.hidden_size}, ffn={c.ffn_hidden_size}, experts={c.num_experts} "
            f"({self.num_local_experts} on rank {self.rank} of {self.world_size}: {self.expert_range.start}.."
            f"{self.expert_range.stop - 1}), top_k={c.top_k}, glu={c.glu}, all_to_all={mode}"
        )

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights; with ``sync_router_init`` the router is then broadcast (a collective)."""
        std = self.config.init_std
        for p in (self.w1, self.w2, self.v1):
            if p is not None:
                nn.init.normal_(p, std=std)
        self.router.reset_parameters()
        if self.sync_router_init:
            self.broadcast_router()

    @torch.no_grad()
    def broadcast_router(self, src: int = 0) -> None:
        """Copy the router (weight and selection bias) from group rank ``src`` to every rank."""
        self.comm.broadcast_(self.router.weight.data, "router broadcast", src)
        if self.router.selection_bias is not None:
            self.comm.broadcast_(self.router.selection_bias, "router broadcast", src)

    @classmethod
    def from_dmoe(cls, layer, group=None, **kwargs) -> "ExpertParallelDMoE":
        """This rank's shard of a full :class:`~blocksparse_moe.dMoE` (the same on every rank).

        Handy for tests and small models; a large model loads a sharded checkpoint
        instead (:func:`~blocksparse_moe.parallel.shard_state_dict`).
        """
        kwargs.setdefault("sync_router_init", False)
        ep = cls(layer.config, group, **kwargs)
        from .sharding import shard_state_dict

        ep.load_state_dict(shard_state_dict(layer.state_dict(), ep))
        return ep

    def sync_router_grad(self, op: str = "sum") -> None:
        """All-reduce the replicated router's gradient over the group (a collective; call on every rank).

        After backward, rank ``r``'s router gradient holds only the contribution of
        its own tokens. ``"sum"`` makes every rank's gradient that of the sum of the
        ranks' losses, the gradient a single process holding all the tokens would
        get (the expert weights' gradients already are: they see every rank's
        tokens). ``"mean"`` divides by the group size. Skip it when something else
        (e.g. DDP over a group that contains these ranks) reduces the router already.
        """
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        p = self.router.weight
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        self.comm.all_reduce_(grad, "router gradient all-reduce")
        if op == "mean":
            grad.div_(self.world_size)
        p.grad = grad

    def update_selection_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None, reduce: bool = True):
        """The router's bias step on the group's load: ``tokens_per_expert`` is summed over ranks first.

        With ``reduce=True`` (a collective) every rank applies the same step, so the
        replicated bias stays identical.
        """
        load = tokens_per_expert.detach().to(torch.int64).clone()
        if reduce:
            self.comm.all_reduce_(load, "selection-bias load all-reduce")
        self.router.update_selection_bias(load, rate)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        H = self.config.hidden_size
        where = f"expert-parallel layer {self.name!r}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: x must be a floating-point tensor of dtype {self.w1.dtype}, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != H:
            raise ValueError(f"{where}: x must have shape [..., hidden_size={H}], got shape {tuple(x.shape)}")
        if x.dtype != self.w1.dtype:
            raise TypeError(f"{where}: x has dtype {x.dtype} but the layer's parameters are {self.w1.dtype}")
        if x.device != self.w1.device:
            raise ValueError(f"{where}: x is on {x.device} but the layer's parameters are on {self.w1.device}")

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """``x [..., hidden] -> [..., hidden]`` (this rank's tokens), or ``(out, ExpertParallelAux)``.

        A collective: every rank of the group must call it (a rank with no tokens
        passes an empty ``[0, hidden]`` tensor), and later run backward if any does.
        """
        cfg = self.config
        try:  # everything before the first collective: a failure here is announced to the peers
            if not isinstance(return_aux, bool):
                raise TypeError(f"return_aux must be a bool, got {return_aux!r}")
            self._check_input(x)
            x2 = x.reshape(-1, cfg.hidden_size)
            backend = ops.resolve_backend(cfg.backend, x2.device)
            route = self.router(x2)
            plan = plan_routing(route.expert_ids, cfg.num_experts)
        except Exception:
            self._abort_forward()
            raise
        # A zero-size leaf that requires grad: both all-to-alls then take part in
        # backward on every rank, even one whose x and weights need no gradient.
        anchor = x2.new_zeros(0).requires_grad_() if torch.is_grad_enabled() else None
        if self.capacity_per_peer is None:
            out, local_counts, stats = self._forward_variable(x2, route, plan, backend, anchor)
            dropped = torch.zeros((), dtype=torch.int64, device=x2.device)
        else:
            out, local_counts, stats, dropped = self._forward_capacity(x2, route, plan, backend, anchor)
        out = out.reshape(x.shape)
        if not return_aux:
            return out
        lb, z = self.router.losses(route, plan.tokens_per_expert)
        aux = ExpertParallelAux(
            load_balancing_loss=lb,
            z_loss=z,
            tokens_per_expert=plan.tokens_per_expert,
            dropped_tokens=dropped,
            expert_ids=route.expert_ids,
            expert_weights=route.weights,
            tokens_per_local_expert=local_counts,
            all_to_all=stats,
        )
        return out, aux

    def _abort_forward(self) -> None:
        """Join the count exchange with -1 counts, so the peers raise PeerFailedError instead of waiting."""
        W, El, dev = self.world_size, self.num_local_experts, self.w1.device
        shape = (W * El,) if self.capacity_per_peer is None else (W, El + 1)
        send = torch.full(shape, -1, dtype=torch.int64, device=dev)
        try:
            self.comm.wait(
                self.comm.start_all_to_all(torch.empty_like(send), send, "count exchange (announcing a failure)"),
                "count exchange (announcing a failure)",
            )
        except CollectiveError:
            pass  # the original error is the one to report

    def _peer_failed(self, failed: list) -> PeerFailedError:
        return PeerFailedError(
            f"expert-parallel layer {self.name!r}: rank(s) {failed} of the group failed before the token "
            f"dispatch (bad input or a routing error; see that rank's own error). Rank {self.rank} leaves this "
            "forward too; the process group is still usable."
        )

    def _forward_variable(self, x, route, plan: RoutingPlan, backend: str, anchor):
        comm, W, El, E = self.comm, self.world_size, self.num_local_experts, self.config.num_experts
        dev = x.device
        # 1. Counts: rank p gets the El counts of its experts; we get ours from every rank.
        send_counts = plan.tokens_per_expert.to(torch.int64)  # [E] = [W, El] by destination
        recv_counts = torch.empty_like(send_counts)  # [W * El] = [W, El] by source
        work = comm.start_all_to_all(recv_counts, send_counts, "count exchange (all_to_all_single)")
        # 2. The local permutation runs while the counts travel (gloo: its own thread;
        #    NCCL: its own stream, the gather is queued on the compute stream meanwhile).
        x_sorted = ops.gather(x, plan, backend)
        comm.wait(work, "count exchange (all_to_all_single)")
        # 3. The one host read of the forward: both count vectors in one transfer.
        counts = torch.cat([send_counts, recv_counts]).tolist()
        failed = [s for s in range(W) if counts[E + s * El] < 0]
        if failed:
            raise self._peer_failed(failed)
        send_rows = [sum(counts[p * El : (p + 1) * El]) for p in range(W)]
        recv_rows = [sum(counts[E + s * El : E + (s + 1) * El]) for s in range(W)]
        # 4. Dispatch: rows sorted by global expert are already grouped by destination rank.
        x_recv = all_to_all(x_sorted, comm, "token dispatch (all_to_all_single)", recv_rows, send_rows, anchor)
        # 5. Regroup by local expert: received rows come source-major, [s][l] blocks.
        n_recv = sum(recv_rows)
        local_ids = torch.repeat_interleave(
            torch.arange(El, device=dev).repeat(W), recv_counts.to(dev), output_size=n_recv
        )
        local_plan = plan_routing(local_ids.view(-1, 1), El, validate_ids=False)
        topo = build_topology(local_plan, self.config.ffn_hidden_size, self.config.block_size)
        y_recv = self._local_experts(x_recv, local_plan, topo, backend, padded=False)
        # 6. Return: the same splits, swapped; 7. combine with the routing weights.
        y_sorted = all_to_all(y_recv, comm, "result return (all_to_all_single)", send_rows, recv_rows)
        out = ops.combine(y_sorted, plan, route.weights, backend)
        row_bytes = x.shape[1] * x.element_size()
        r = self.rank
        remote_sent = sum(send_rows) - send_rows[r] + sum(recv_rows) - recv_rows[r]
        remote_recv = sum(recv_rows) - recv_rows[r] + sum(send_rows) - send_rows[r]
        stats = AllToAllStats(
            send_rows=send_rows,
            recv_rows=recv_rows,
            bytes_sent=remote_sent * row_bytes,
            bytes_received=remote_recv * row_bytes,
            count_bytes=(W - 1) * El * send_counts.element_size(),
        )
        return out, local_plan.tokens_per_expert, stats

    def _forward_capacity(self, x, route, plan: RoutingPlan, backend: str, anchor):
        comm, W, El, E = self.comm, self.world_size, self.num_local_experts, self.config.num_experts
        B, dev, H = self.capacity_per_peer, x.device, x.shape[1]
        S = plan.num_slots
        i64 = dict(dtype=torch.int64, device=dev)
        # 1. Counts plus each source's largest chunk, one equal-split exchange: every
        #    rank learns every source's largest chunk, so all agree on an overflow.
        send_counts = plan.tokens_per_expert.to(torch.int64).view(W, El)
        largest = send_counts.sum(1).max().reshape(1, 1).expand(W, 1)
        payload = torch.cat([send_counts, largest], 1).contiguous()  # [W, El + 1]
        recv_payload = torch.empty_like(payload)
        work = comm.start_all_to_all(recv_payload, payload, "count exchange (all_to_all_single)")
        # 2. Meanwhile: the padded send buffer, chunk p = rows for rank p, B rows each.
        x_sorted = ops.gather(x, plan, backend)
        dest = plan.sorted_expert.long() // El  # [S] destination rank of each sorted row
        first = plan.expert_offsets.long()[0:E:El]  # [W] first sorted row for each rank
        rank_in_chunk = torch.arange(S, **i64) - first[dest]
        keep = rank_in_chunk < B
        pos = torch.where(keep, dest * B + rank_in_chunk, torch.full_like(dest, W * B))  # W*B: dropped
        x_send = x_sorted.new_zeros(W * B + 1, H).index_copy(0, pos, x_sorted)[: W * B]
        comm.wait(work, "count exchange (all_to_all_single)")
        recv_counts = recv_payload[:, :El]  # [W, El] rows from source s for local expert l
        self._check_peers(recv_payload)
        self._check_overflow(recv_payload[:, El].max())
        # 3. Dispatch, equal chunks: no split sizes, so nothing is read on the host.
        x_recv = all_to_all(x_send, comm, "token dispatch (fixed capacity, all_to_all_single)", anchor=anchor)
        # 4. Regroup: row q of chunk s belongs to local expert searchsorted(cumsum, q);
        #    El marks padding (and rows a "drop" source did not send).
        cum = recv_counts.cumsum(1)
        q = torch.arange(B, **i64).expand(W, B).contiguous()
        local_ids = torch.searchsorted(cum, q, right=True).view(-1, 1)
        valid = (local_ids < El).view(-1, 1)
        x_recv = torch.where(valid, x_recv, x_recv.new_zeros(()))  # padding rows: no value, no gradient
        local_plan = _truncate_plan(plan_routing(local_ids, El + 1, validate_ids=False), El)
        topo = build_topology(local_plan, self.config.ffn_hidden_size, self.config.block_size)
        y_recv = self._local_experts(x_recv, local_plan, topo, backend, padded=True)
        # 5. Return, equal chunks; 6. combine: slot -> padded row (dropped: a zero row).
        y_back = all_to_all(y_recv, comm, "result return (fixed capacity, all_to_all_single)")
        y_ext = torch.cat([y_back, y_back.new_zeros(1, H)])
        rows = y_ext[pos[plan.slot_to_sorted.long()]].view(plan.num_tokens, plan.top_k, H)
        acc = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows  # as combine
        out = (acc * route.weights.to(acc.dtype)[..., None]).sum(1).to(x.dtype)
        chunk_bytes = B * H * x.element_size()
        stats = AllToAllStats(
            send_rows=None,
            recv_rows=None,
            bytes_sent=2 * (W - 1) * chunk_bytes,
            bytes_received=2 * (W - 1) * chunk_bytes,
            count_bytes=(W - 1) * (El + 1) * payload.element_size(),
        )
        return out, local_plan.tokens_per_expert, stats, (~keep).sum()

    def _check_peers(self, recv_payload: torch.Tensor) -> None:
        """Fixed-capacity mode: a peer that failed sent -1s (on CPU a free read; elsewhere an assertion)."""
        if recv_payload.device.type == "cpu":
            failed = [s for s, v in enumerate(recv_payload[:, 0].tolist()) if v < 0]
            if failed:
                raise self._peer_failed(failed)
        else:
            torch._assert_async(
                recv_payload.min() >= 0, f"expert-parallel layer {self.name!r}: a peer's forward failed"
            )

    def _check_overflow(self, largest: torch.Tensor) -> None:
        if self.capacity_overflow == "drop":
            return
        B = self.capacity_per_peer
        if largest.device.type == "cpu":
            # A host read, but a free one on CPU; every rank holds the same value.
            m = int(largest)
            if m > B:
                raise CapacityOverflowError(
                    f"expert-parallel layer {self.name!r}: a rank has {m} rows for one peer but "
                    f"capacity_per_peer={B}; raise it to at least {m} (T_max * min(top_k, experts per rank) "
                    "never overflows), or pass capacity_overflow='drop'"
                )
        else:
            torch._assert_async(
                largest <= B, f"expert-parallel layer {self.name!r}: rows for one peer exceed capacity_per_peer"
            )

    def _local_experts(self, x_recv, plan: RoutingPlan, topo: Topology, backend: str, padded: bool):
        """Every local expert's FFN over the received rows, back in received order (unweighted)."""
        w1, w2, v1, act = self.w1, self.w2, self.v1, self.activation
        xs = ops.gather(x_recv, plan, backend)
        h1 = ops.sdd(xs, w1, topo, backend)
        h3 = None if v1 is None else ops.sdd(xs, v1, topo, backend)
        if self.config.recompute_activation:
            from ..layers import _ActThenDown  # the single-process layer's node: same numbers

            ys = _ActThenDown.apply(h1, h3, w2, act, topo, backend)
        else:
            h = act(h1) if h3 is None else act(h1) * h3
            ys = ops.dsd(h, w2, topo, backend)
        if padded:
            # Padding rows (sorted last) belong to no expert: the torch backend returns
            # only the real rows, the Triton dsd leaves the rest unwritten.
            S = plan.num_slots
            if ys.shape[0] < S:
                ys = torch.cat([ys, ys.new_zeros(S - ys.shape[0], ys.shape[1])])
            real = torch.arange(S, device=ys.device) < plan.expert_offsets[-1]
            ys = torch.where(real[:, None], ys, ys.new_zeros(()))
        return ops.combine(ys, plan, None, backend)


def sync_router_grads(model: nn.Module, op: str = "sum") -> None:
    """:meth:`ExpertParallelDMoE.sync_router_grad` for every expert-parallel layer of ``model`` (in module order)."""
    for m in model.modules():
        if isinstance(m, ExpertParallelDMoE):
            m.sync_router_grad(op)

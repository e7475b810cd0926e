"""``ExpertParallelDMoE``: the dropless layer with its experts sharded over a process group.

Rank ``r`` of the expert-parallel group holds the experts its
:class:`~blocksparse_moe.parallel.ExpertPlacement` names (by default a contiguous
split, ``E`` need not divide the group size); the router is replicated. One forward
(see docs/parallel.md for the picture)::

    route locally (replicated router)  -> expert_ids [T, k], weights [T, k]
    plan_routing in placement order: rows sorted by expert = grouped by destination rank
    count exchange  all_to_all_single(counts per destination)   async, overlapped with the gather
    gather          x_sorted [T*k, H]                           (the local permutation)
    host read       the counts, once per forward                -> split sizes
    dispatch        all_to_all_single(x_sorted, uneven splits)  autograd: backward swaps the splits
    experts         routed_ffn over the received rows, grouped by local expert
    return          all_to_all_single(y, splits swapped)        autograd: backward swaps them back
    combine         y[t] = sum_j weights[t, j] * y_sorted[slot_to_sorted[t*k + j]]

The exchange itself lives in :mod:`.dispatch` (shared with the Hugging Face
integration); with ``capacity_per_peer=B`` it uses equal chunks of ``B`` rows per
(source, destination) pair instead: no host read at all.

In a data-parallel x expert-parallel job (``group`` a ``DeviceMesh`` with dims
``("dp", "ep")``), the layer's all-to-alls run over ``ep``; the gradients are then
reduced by :func:`~blocksparse_moe.parallel.reduce_gradients` (experts over ``dp``,
everything else over ``dp x ep``).
"""

from __future__ import annotations

import datetime
import itertools
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..config import MoEConfig
from ..expert_choice import expert_choice_aux_fields, expert_choice_combine, expert_choice_select
from ..functional import routed_ffn
from ..layers import add_expert_parameters
from ..routing import RoutingPlan, plan_routing
from ..shared_expert import add_shared_experts, shared_output
from .bounded import check_max_recv_rows
from .checks import check_same_config
from .collectives import Communicator
from .grads import _all_reduce_flat
from .dispatch import OVERFLOW_POLICIES, TokenExchange, check_exchange_options
from .nodes import mesh_groups, resolve_node_layout
from .groups import ExpertParallelGroups, resolve_groups
from .load_stats import ExpertLoadTracker
from .microbatch import Gap
from .placement import ExpertPlacement, as_placement
from .stats import AllToAllStats, CapacityOverflowError, ExpertParallelAux
from .units import ExpertShard

__all__ = ["AllToAllStats", "CapacityOverflowError", "ExpertParallelAux", "ExpertParallelDMoE", "sync_router_grads"]

_counter = itertools.count()
DEFAULT_CHUNKS = 1  # measured: docs/parallel.md, "Overlap"
EXPERT_PARAMS = ("w1", "w2", "v1")


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
    """Dropless MoE whose ``E`` experts are placed over the ranks of an expert-parallel group.

    Parameters (same names as :class:`~blocksparse_moe.dMoE`, so state dicts map):
    ``router.weight [E, H]`` replicated on every rank; ``w1 [E_l, H, ffn]``,
    ``w2 [E_l, ffn, H]``, ``v1 [E_l, H, ffn]`` (GLU), where ``w1[i]`` is global expert
    :attr:`local_experts` ``[i]``. Use :func:`~blocksparse_moe.parallel.shard_state_dict`
    / :func:`~blocksparse_moe.parallel.gather_state_dict`, :meth:`from_dmoe`, or the
    resharding checkpoints :func:`~blocksparse_moe.parallel.save_sharded` /
    :func:`~blocksparse_moe.parallel.load_sharded`.

    Every rank of the group must construct the layer (the constructor checks that
    the configurations agree, a collective) and run each forward and backward.

    Args:
        config: the layer's :class:`~blocksparse_moe.MoEConfig`, the same on every
            rank except ``device``.
        group: where the experts live: ``None`` (the default group), a
            ``ProcessGroup`` (expert parallelism only), a ``DeviceMesh`` with dims
            ``("dp", "ep")`` (experts sharded over ``ep``, replicated over ``dp``) or
            ``("ep",)``, a pair ``(ep_group, dp_group)``, or an
            :class:`~blocksparse_moe.parallel.ExpertParallelGroups`.
        placement: which ``ep`` rank holds which expert: ``None`` (contiguous, the
            first ``E % W`` ranks one more), an
            :class:`~blocksparse_moe.parallel.ExpertPlacement`, or the owner rank of
            each expert. Checked before any collective.
        capacity_per_peer: ``None`` (default): exact variable-size all-to-alls, which
            read the counts on the host once per forward. An int ``B``: the
            fixed-capacity mode: every (source, destination) pair exchanges a chunk
            of exactly ``B`` rows, so no count ever reaches the host. Memory: the
            send, receive and return buffers hold ``W * B`` rows each on every rank
            (instead of about ``T * k``). ``B = T_max * min(k, E_max)`` (``T_max`` the
            most tokens a rank holds, ``E_max`` the most experts a rank holds) can
            never overflow.
        capacity_overflow: what the fixed-capacity mode does when a pair has more than
            ``B`` rows: ``"error"`` (default; on CPU a :class:`CapacityOverflowError`
            on every rank, on an accelerator a device-side assertion) or ``"drop"``
            (the rows past ``B`` in placement order are dropped, counted in
            ``aux.dropped_tokens``).
        hierarchy: ``"flat"`` (default): one all-to-all over the group each way.
            ``"node"``: the hierarchical exchange (see :mod:`.hierarchical`): a token
            crosses to another node once per node holding any of its experts, and a
            node's experts are summed there before the row travels back. Needs the node
            layout (``ranks_per_node``, a mesh with dims ``("node", "local")``, or
            torchrun's ``LOCAL_WORLD_SIZE``). Variable mode only.
        ranks_per_node: the ranks per node (group rank ``r`` on node
            ``global_rank // ranks_per_node``); overrides the mesh and ``LOCAL_WORLD_SIZE``.
            With ``"flat"`` it only adds the cross-node figures to the statistics.
        chunks: the transfers feeding the experts are cut into this many chunks by
            groups of local experts, so the experts compute on one chunk while the
            others travel (forward and backward; see :mod:`.chunked`). Variable mode
            only; ``1`` (default, measured in docs/parallel.md) is one transfer each way;
            capped at the most experts any rank holds (``aux.all_to_all.chunks`` is what ran).
        max_recv_rows: ``None`` (default) or ``R``: no rank receives more than ``R`` rows
            at once. When the routing would send a rank more (every token to one
            expert), the dispatch, the experts and the return run in rounds of at most
            ``R`` received rows per rank, forward and backward (the backward recomputes
            each round's experts instead of keeping their activations; see
            :mod:`.bounded`): dropless, within the bound. Flat variable-size exchange
            only (a ``ValueError`` with ``capacity_per_peer``, ``hierarchy="node"`` or
            ``chunks > 1``); the same on every rank (checked).
            ``aux.all_to_all.rounds`` / ``peak_recv_rows`` are what ran.
        timeout: the longest any one collective of this layer may wait before it
            raises :class:`CollectiveError` (gloo); ``None`` uses the group's timeout.
        name: the layer's name in error messages and statistics (default
            ``ExpertParallelDMoE#<n>``; give the module path, e.g. ``"blocks.3.moe"``).
        sync_router_init: after initialisation, broadcast the router from rank 0 of
            ``dp x ep`` and the expert shards from rank 0 of ``dp``, so that every
            replica starts identical.
    """

    def __init__(
        self,
        config: MoEConfig,
        group=None,
        *,
        placement=None,
        capacity_per_peer: Optional[int] = None,
        capacity_overflow: str = "error",
        hierarchy: str = "flat",
        ranks_per_node: Optional[int] = None,
        chunks: int = DEFAULT_CHUNKS,
        max_recv_rows: Optional[int] = None,
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
        check_exchange_options(self.name, capacity_per_peer, hierarchy, chunks)
        check_max_recv_rows(f"expert-parallel layer {self.name!r}", max_recv_rows, capacity_per_peer, hierarchy, chunks)
        self.max_recv_rows = max_recv_rows
        self.config = config
        self.capacity_per_peer = capacity_per_peer
        self.capacity_overflow = capacity_overflow
        self.sync_router_init = sync_router_init
        # Local checks first (a mesh without "ep", a bad placement): no collective yet,
        # so every rank given the same arguments raises the same error at once.
        node_mesh = mesh_groups(group)  # a ("node", "local") mesh: its flattened group and its layout
        if node_mesh is not None:
            group = ExpertParallelGroups(ep=node_mesh[0], dp=None, replicated=node_mesh[0])
        self.groups: ExpertParallelGroups = resolve_groups(group, what=f"group of layer {self.name!r}")
        self.comm = Communicator(self.groups.ep, self.name, timeout)
        self.placement: ExpertPlacement = as_placement(
            placement, config.num_experts, self.comm.world_size, what=f"placement of layer {self.name!r}"
        )
        self.layout = resolve_node_layout(
            hierarchy, ranks_per_node, self.groups.ep, mesh_layout=None if node_mesh is None else node_mesh[1],
            what=f"expert-parallel layer {self.name!r}",
        )  # fmt: skip
        self.hierarchy, self.chunks = hierarchy, chunks
        self._replicated = Communicator(self.groups.replicated, self.name, timeout)
        self._dp = None if self.groups.dp is None else Communicator(self.groups.dp, self.name, timeout)
        # Collective, before anything is allocated: every rank raises the same error.
        check_same_config(
            self.comm, config,
            extra={"capacity_per_peer": capacity_per_peer, "capacity_overflow": capacity_overflow,
                   "placement": self.placement.fingerprint, "dp_size": self.groups.dp_size, "hierarchy": hierarchy,
                   "chunks": chunks, "max_recv_rows": max_recv_rows,
                   # the layout shapes the hierarchical exchange's collectives; flat, only its statistics
                   "nodes": self.layout.describe() if hierarchy == "node" else None},
        )  # fmt: skip
        self._set_placement(self.placement)
        add_expert_parameters(self, config, self.num_local_experts)
        add_shared_experts(self, config)  # dense, replicated like the router: each rank runs its own tokens
        self.reset_parameters()

    def _set_placement(self, placement: ExpertPlacement) -> None:
        """Everything that follows from the placement: the exchange, the local experts, the load tracker."""
        trace = self.exchange.trace if hasattr(self, "exchange") else None
        self.placement = placement
        self.exchange = TokenExchange(
            self.comm, placement, self.capacity_per_peer, self.capacity_overflow, layout=self.layout,
            hierarchy=self.hierarchy, chunks=self.chunks, max_recv_rows=self.max_recv_rows,
        )  # fmt: skip
        self.exchange.trace = trace
        self.local_experts = placement.experts_of(self.comm.rank)
        self.num_local_experts = len(self.local_experts)
        self.load_tracker = ExpertLoadTracker(placement, self.comm.rank)

    def replace_experts(self, new_placement, optimizer=None):
        """Move the experts, their gradients and ``optimizer``'s state to ``new_placement``, between steps.

        A collective on every rank of the group; see :func:`~.replace.replace_experts`. Returns
        the :class:`~.replace.ExpertMove` (experts and bytes moved, seconds).
        """
        from .replace import replace_experts

        return replace_experts(self, new_placement, optimizer)

    def sync_replica_grads(self) -> int:
        """Sum each replicated expert's gradient over the ranks holding it, after backward (a collective over ``ep``).

        Nothing to do (and no collective) without replicas. :func:`~.grads.reduce_gradients`
        calls it itself; see :mod:`.replicas`. Returns the bytes all-reduced on this rank.
        """
        from .replicas import sync_replica_grads

        return sync_replica_grads(self.expert_shard())

    # ------------------------------------------------------------------ properties
    @property
    def trace(self):
        """A :class:`~.trace.StageTrace` recording per-stage timestamps, or ``None`` (default: nothing recorded)."""
        return self.exchange.trace

    @trace.setter
    def trace(self, value) -> None:
        self.exchange.trace = value

    @property
    def group(self):
        """The expert-parallel process group (the all-to-alls run here)."""
        return self.comm.group

    @property
    def rank(self) -> int:
        """This process's rank in the expert-parallel group."""
        return self.comm.rank

    @property
    def world_size(self) -> int:
        """The expert-parallel group size."""
        return self.comm.world_size

    @property
    def expert_offset(self) -> int:
        """The first global expert of a contiguous placement (see :attr:`expert_range`)."""
        return self.expert_range.start

    @property
    def expert_range(self) -> range:
        """The global experts this rank holds, as a range; only for a contiguous placement."""
        if not self.placement.is_contiguous:
            raise ValueError(
                f"expert-parallel layer {self.name!r}: expert_range needs a contiguous placement, this one is "
                f"{self.placement.describe()}; use local_experts (global id of each local expert) instead"
            )
        start = self.placement.rank_offsets[self.rank]
        return range(start, start + self.num_local_experts)

    @property
    def expert_slice(self) -> slice:
        r = self.expert_range
        return slice(r.start, r.stop)

    def expert_shard(self, name: str = "") -> ExpertShard:
        """This layer's expert tensors for the gradient, norm, checkpoint and statistics helpers."""
        return ExpertShard(
            name=name, module=self, param_names=EXPERT_PARAMS, placement=self.placement, rank=self.rank,
            groups=self.groups, comm=self.comm, tracker=self.load_tracker,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        mode = "variable" if self.capacity_per_peer is None else f"capacity_per_peer={self.capacity_per_peer}"
        dp = f", dp={self.groups.dp_size}" if self.groups.dp is not None else ""
        return (
            f"name={self.name!r}, hidden={c.hidden_size}, ffn={c.ffn_hidden_size}, experts={c.num_experts} "
            f"({self.num_local_experts} on rank {self.rank} of {self.world_size}: {list(self.local_experts)}){dp}, "
            f"top_k={c.top_k}, glu={c.glu}, all_to_all={mode}, hierarchy={self.hierarchy!r}, chunks={self.chunks}"
            + (f", max_recv_rows={self.max_recv_rows}" if self.max_recv_rows is not None else "")
        )

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights; with ``sync_router_init`` the replicas are then synced (collectives)."""
        std = self.config.init_std
        for p in (self.w1, self.w2, self.v1):
            if p is not None:
                nn.init.normal_(p, std=std)
        self.router.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=std)
        if self.sync_router_init:
            self.broadcast_router()
            if self._dp is not None:
                with torch.no_grad():
                    for p in (self.w1, self.w2, self.v1):
                        if p is not None:
                            self._dp.broadcast_(p.data, "expert broadcast over dp")

    @torch.no_grad()
    def broadcast_router(self, src: int = 0) -> None:
        """Copy the replicated parameters (router weight and selection bias, shared experts) from rank ``src`` of ``dp x ep``."""
        self._replicated.broadcast_(self.router.weight.data, "router broadcast", src)
        if self.router.selection_bias is not None:
            self._replicated.broadcast_(self.router.selection_bias, "router broadcast", src)
        for p in self._shared_params():
            self._replicated.broadcast_(p.data, "shared-expert broadcast", src)

    def _shared_params(self) -> list:
        """The shared experts' parameters (replicated on every rank, like the router), in a fixed order."""
        mods = (self.shared_expert, self.shared_expert_gate)
        return [p for m in mods if m is not None for _, p in sorted(m.named_parameters())]

    @classmethod
    def from_dmoe(cls, layer, group=None, **kwargs) -> "ExpertParallelDMoE":
        """This rank's shard of a full :class:`~blocksparse_moe.dMoE` (the same on every rank).

        Handy for tests and small models; a large model loads a sharded checkpoint
        instead (:func:`~blocksparse_moe.parallel.load_sharded`).
        """
        kwargs.setdefault("sync_router_init", False)
        ep = cls(layer.config, group, **kwargs)
        from .sharding import shard_state_dict

        ep.load_state_dict(shard_state_dict(layer.state_dict(), ep))
        return ep

    def sync_router_grad(self, op: str = "sum") -> None:
        """All-reduce the replicated router's (and shared experts') gradient over the expert-parallel group (a collective).

        After backward, rank ``r``'s router gradient holds only the contribution of
        its own tokens. ``"sum"`` makes every rank's gradient that of the sum of the
        ranks' losses, the gradient a single process holding all the tokens would
        get (the expert weights' gradients already are: they see every rank's
        tokens). ``"mean"`` divides by the group size. With data parallelism use
        :func:`~blocksparse_moe.parallel.reduce_gradients` instead (it reduces over
        ``dp x ep``).
        """
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        grads = []
        for p in [self.router.weight, *self._shared_params()]:
            if p.grad is None:  # no token reached it here: it still joins the sum
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        scale = 1.0 / self.world_size if op == "mean" else 1.0
        _all_reduce_flat(self.comm, grads, "router gradient all-reduce", scale)  # one collective per dtype

    def update_selection_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None, reduce: bool = True):
        """The router's bias step on the job's load: ``tokens_per_expert`` is summed over ``dp x ep`` first.

        With ``reduce=True`` (a collective) every rank applies the same step, so the
        replicated bias stays identical.
        """
        load = tokens_per_expert.detach().to(torch.int64).clone()
        if reduce:
            self._replicated.all_reduce_(load, "selection-bias load all-reduce")
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

    def forward(self, x: torch.Tensor, return_aux: bool = False, beside=None):
        """``x [..., hidden] -> [..., hidden]`` (this rank's tokens), or ``(out, ExpertParallelAux)``.

        A collective: every rank of the group must call it (a rank with no tokens
        passes an empty ``[0, hidden]`` tensor), and later run backward if any does.
        ``beside``: a callable with no arguments run while the counts travel (after the shared
        experts, before the host read; :mod:`.microbatch`); the return is then ``(result,
        beside())``. If it raises, this rank finishes the exchange, then raises that error.
        """
        cfg = self.config
        try:  # everything before the first collective: a failure here is announced to the peers
            if not isinstance(return_aux, bool):
                raise TypeError(f"return_aux must be a bool, got {return_aux!r}")
            self._check_input(x)
            x2 = x.reshape(-1, cfg.hidden_size)
            # gather/combine around the exchange; the local experts resolve their own backend
            backend = ops.resolve_backend(cfg.backend, x2.device, x2.dtype, cfg.num_experts, cfg.ffn_hidden_size)
            if cfg.routing == "expert_choice":
                # Each expert's C picks among this rank's tokens become rows of one expert
                # each (k = 1), so the exchange is the token-choice one unchanged.
                logits, chosen, ec_weights = expert_choice_select(self.router, x2, self.training)
                rows, row_ids, row_weights = x2[chosen.reshape(-1)], _choice_ids(chosen), ec_weights.reshape(-1, 1)
            else:
                route = self.router(x2)
                rows, row_ids, row_weights = x2, route.expert_ids, route.weights
            plan = self.exchange.plan(row_ids)
            # The shared experts need no exchange: they run while the counts travel, then `beside`.
            shared_fn = None if self.shared_expert is None else (lambda: shared_output(self, x2))
            gap = Gap.of(self.name, shared_fn, beside, self.trace)
        except Exception:
            self.exchange.announce_failure(self.w1.device)
            raise
        # A zero-size leaf that requires grad: both all-to-alls then take part in
        # backward on every rank, even one whose x and weights need no gradient.
        anchor = x2.new_zeros(0).requires_grad_() if torch.is_grad_enabled() else None
        params = tuple(getattr(self, n) for n in EXPERT_PARAMS)
        res = self.exchange.run(rows, plan, row_weights, self._experts_on_received, backend, anchor, params, gap)
        beside_out = None if beside is None else gap.result()  # its error, now that the exchange is done
        self.load_tracker.record(
            res.tokens_per_expert, res.tokens_per_local_expert, res.rows_sent, res.rows_received, res.dropped,
            res.stats,
        )  # fmt: skip
        out = res.out
        if cfg.routing == "expert_choice":
            out, unrouted = expert_choice_combine(out, chosen, x2.shape[0])
        if res.local is not None:
            out = out + res.local
        out = out.reshape(x.shape)
        if not return_aux:
            return out if beside is None else (out, beside_out)
        traffic = dict(tokens_per_local_expert=res.tokens_per_local_expert, all_to_all=res.stats)
        if cfg.routing == "expert_choice":
            fields = expert_choice_aux_fields(cfg, logits, chosen, ec_weights, unrouted)
        else:
            lb, z = self.router.losses(route, res.tokens_per_expert)
            fields = dict(
                load_balancing_loss=lb, z_loss=z, tokens_per_expert=res.tokens_per_expert, dropped_tokens=res.dropped,
                expert_ids=route.expert_ids, expert_weights=route.weights,
                unrouted_tokens=torch.zeros((), dtype=torch.int64, device=x.device),
            )  # fmt: skip
        aux = ExpertParallelAux(**fields, **traffic)
        return (out, aux) if beside is None else ((out, aux), beside_out)

    def _experts_on_received(self, x_recv: torch.Tensor, local_ids: torch.Tensor, padded: bool) -> torch.Tensor:
        """The exchange's expert function: group the received rows by local expert and run them."""
        El = self.num_local_experts
        if padded:  # id El marks padding rows: a plan over El + 1 experts, the last one cut off
            plan = _truncate_plan(plan_routing(local_ids.view(-1, 1), El + 1, validate_ids=False), El)
        else:
            plan = plan_routing(local_ids.view(-1, 1), El, validate_ids=False)
        return self._local_experts(x_recv, plan, padded)

    def _local_experts(self, x_recv, plan: RoutingPlan, padded: bool):
        """Every local expert's FFN over the received rows, back in received order (unweighted)."""
        cfg = self.config
        # cfg.activation, not self.activation: a name lets the grouped backend fuse it.
        return routed_ffn(
            x_recv, plan, None, self.w1, self.w2, self.v1, cfg.activation, backend=cfg.backend,
            block_size=cfg.block_size, recompute=cfg.recompute_activation, padded=padded,
        )  # fmt: skip


def _choice_ids(chosen: torch.Tensor) -> torch.Tensor:
    """``[E * C, 1]``: the expert of each expert-choice row (row ``e * C + c`` is expert ``e``'s)."""
    E, C = chosen.shape
    return torch.arange(E, device=chosen.device).repeat_interleave(C).view(-1, 1)


def sync_router_grads(model: nn.Module, op: str = "sum") -> None:
    """:meth:`ExpertParallelDMoE.sync_router_grad` for every expert-parallel layer of ``model`` (in module order)."""
    for m in model.modules():
        if isinstance(m, ExpertParallelDMoE):
            m.sync_router_grad(op)

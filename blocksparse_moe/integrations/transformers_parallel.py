"""Expert parallelism for Hugging Face MoE models: ``expert_parallel(model, group_or_mesh)``.

Every experts module that the ``"blocksparse"`` implementation reads (the classes
decorated with ``use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GPT-OSS, GraniteMoE, PhiMoE, ...) is sharded in place over the
``ep`` ranks: its expert tensors (``gate_up_proj`` or ``up_proj``, ``down_proj``,
and their biases) keep only the rows of the experts its placement gives this rank,
cut from the full weights the model already holds. Everything else stays
replicated: the router (``gate``), DeepSeek's shared experts, attention,
embeddings, norms.

The sharded module's forward receives what the MoE block always hands its experts
(this rank's tokens, global expert ids, routing weights) and runs the same token
exchange as :class:`~blocksparse_moe.parallel.ExpertParallelDMoE`: rows to the ranks
holding their experts, each rank's experts through the ``"blocksparse"`` experts
forward (the module's own layout, gate and biases; weight 1), results back, weighted
with the routing weights at home. So a sharded model gives every rank the logits and
gradients the unsharded model gives for its tokens, and the
:mod:`blocksparse_moe.parallel` helpers (``reduce_gradients``, ``grad_norm``,
``save_sharded`` / ``load_sharded``, ``collect_load_stats``) take it as they take a
model of ``ExpertParallelDMoE`` layers.

::

    import blocksparse_moe.integrations.transformers as bst
    model = AutoModelForCausalLM.from_pretrained(name)          # the full weights, on every rank
    bst.expert_parallel(model, mesh)                             # mesh dims ("dp", "ep"), or a group
    loss = model(input_ids=ids, labels=ids).loss; loss.backward()
    reduce_gradients(model)                                      # experts over dp, the rest over dp x ep

Every rank of the group must call the model's forward and backward together (a rank
without tokens passes an empty batch). The router's auxiliary loss, where a model
adds one, is computed per rank, a data-parallel convention.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from functools import partial
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..parallel.checks import check_same_fingerprint
from ..parallel.collectives import Communicator
from ..parallel.dispatch import OVERFLOW_POLICIES, TokenExchange
from ..parallel.groups import ExpertParallelGroups, resolve_groups
from ..parallel.load_stats import ExpertLoadTracker
from ..parallel.placement import ExpertPlacement, as_placement
from ..parallel.units import HF_EXPERT_PARAMS, ExpertShard

__all__ = ["expert_parallel"]


def _is_experts(m: nn.Module) -> bool:
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed")


def _expert_params(m: nn.Module) -> tuple:
    return tuple(n for n in HF_EXPERT_PARAMS if isinstance(getattr(m, n, None), nn.Parameter))


class _ShardState:
    """What a sharded experts module needs at forward time: the exchange, its placement, its options."""

    def __init__(self, name, groups: ExpertParallelGroups, placement: ExpertPlacement, param_names, *,
                 backend, block_size, capacity_per_peer, capacity_overflow, timeout):  # fmt: skip
        self.name = name
        self.groups = groups
        self.comm = Communicator(groups.ep, name, timeout)
        self.placement = placement
        self.param_names = param_names
        self.backend, self.block_size = backend, block_size
        self.exchange = TokenExchange(self.comm, placement, capacity_per_peer, capacity_overflow)
        self.tracker = ExpertLoadTracker(placement, self.comm.rank)

    def __deepcopy__(self, memo):
        return self  # process groups and the exchange are handles, shared by copies of the model

    def shard(self, name: str, module: nn.Module) -> ExpertShard:
        return ExpertShard(
            name=name, module=module, param_names=self.param_names, placement=self.placement,
            rank=self.comm.rank, groups=self.groups, comm=self.comm, tracker=self.tracker,
        )  # fmt: skip

    def forward(self, module, hidden_states, top_k_index, top_k_weights):
        w = getattr(module, self.param_names[0])
        try:  # everything before the first collective: a failure here is announced to the peers
            if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() == 0:
                raise TypeError(f"{self.name}: hidden_states must be a [tokens, hidden] tensor, got {hidden_states!r}")
            x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(w.dtype)
            ids = top_k_index.reshape(x.shape[0], -1)
            weights = top_k_weights.reshape(ids.shape)
            backend = ops.resolve_backend(self.backend, x.device, x.dtype)
            plan = self.exchange.plan(ids)
        except Exception:
            self.exchange.announce_failure(w.device)
            raise
        # A zero-size leaf that requires grad keeps both all-to-alls in every rank's backward.
        anchor = x.new_zeros(0).requires_grad_() if torch.is_grad_enabled() else None
        res = self.exchange.run(x, plan, weights, partial(self._local, module), backend, anchor)
        self.tracker.record(
            res.tokens_per_expert, res.tokens_per_local_expert, res.rows_sent, res.rows_received, res.dropped,
            res.stats,
        )  # fmt: skip
        return res.out.to(hidden_states.dtype).reshape(hidden_states.shape)

    def _local(self, module, x_recv, local_ids, padded):
        """This rank's experts on the received rows, unweighted; padding ids (= local count) give zero rows."""
        from .transformers import experts_forward

        ids = local_ids.view(-1, 1)
        ones = torch.ones(ids.shape, dtype=x_recv.dtype, device=x_recv.device)
        return experts_forward(module, x_recv, ids, ones, backend=self.backend, block_size=self.block_size)


class _ShardedForward:
    """The sharded module's ``forward`` (an instance attribute, so no implementation switch bypasses it)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        m = self.module
        return m._bsmoe_expert_parallel.forward(m, hidden_states, top_k_index, top_k_weights)


def _placement_for(placement, name: str):
    if isinstance(placement, Mapping):
        return placement.get(name)
    return placement


def expert_parallel(
    model: nn.Module,
    group_or_mesh=None,
    *,
    placement=None,
    backend: str = "auto",
    block_size: int = 64,
    capacity_per_peer: Optional[int] = None,
    capacity_overflow: str = "error",
    timeout: Optional[datetime.timedelta] = None,
) -> nn.Module:
    """Shard the experts of every experts module of ``model`` over ``group_or_mesh``; returns ``model``.

    Args:
        model: a transformers model holding its full weights (the same on every rank).
        group_or_mesh: ``None`` (the default group), a ``ProcessGroup``, a ``DeviceMesh``
            with dims ``("dp", "ep")`` or ``("ep",)``, ``(ep_group, dp_group)``, or an
            :class:`~blocksparse_moe.parallel.ExpertParallelGroups`.
        placement: ``None`` (contiguous), one placement for every module (an
            :class:`~blocksparse_moe.parallel.ExpertPlacement` or owner ranks), or a
            mapping from module name (e.g. ``"model.layers.0.mlp.experts"``) to one.
        backend, block_size: the experts' backend (``"auto"``, ``"grouped"``,
            ``"triton"``, ``"torch"``) and the block size of the block backends.
        capacity_per_peer, capacity_overflow, timeout: as for
            :class:`~blocksparse_moe.parallel.ExpertParallelDMoE`.

    Every rank must call it (one configuration check over the group). A layout the
    ``"blocksparse"`` implementation cannot read, or a bad placement, raises before
    any collective, on every rank.
    """
    from .transformers import BlocksparseExperts, expert_layout

    BlocksparseExperts(backend=backend, block_size=block_size)  # validates both
    if capacity_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"capacity_overflow must be one of {OVERFLOW_POLICIES}, got {capacity_overflow!r}")
    groups = resolve_groups(group_or_mesh, what="expert_parallel(group_or_mesh)")
    targets = [(n, m) for n, m in model.named_modules() if _is_experts(m)]
    if not targets:
        raise ValueError(
            f"expert_parallel: {type(model).__name__} has no experts module (a class decorated with "
            "transformers' use_experts_implementation); nothing to shard"
        )
    plans, fingerprint = [], {}
    for name, m in targets:
        if getattr(m, "_bsmoe_expert_parallel", None) is not None:
            raise ValueError(f"expert_parallel: {name} ({type(m).__name__}) is sharded already")
        expert_layout(m)  # an unreadable layout raises here, naming the class and the flag
        names = _expert_params(m)
        E = getattr(m, names[0]).shape[0]
        pl = as_placement(_placement_for(placement, name), E, groups.ep_size, what=f"placement of {name}")
        plans.append((name, m, names, pl))
        shapes = [tuple(getattr(m, n).shape) for n in names]
        fingerprint[name] = repr((type(m).__name__, shapes, str(getattr(m, names[0]).dtype), pl.fingerprint))
    fingerprint["options"] = repr((backend, block_size, capacity_per_peer, capacity_overflow, groups.dp_size))
    check_same_fingerprint(
        Communicator(groups.ep, "expert_parallel(model)", timeout), fingerprint,
        "Every rank must shard the same model (same classes, shapes and dtypes) with the same placement and options.",
    )  # fmt: skip
    for name, m, names, pl in plans:
        local = pl.experts_of(groups.ep_rank)
        for n in names:
            old = getattr(m, n)
            idx = torch.tensor(local, dtype=torch.long, device=old.device)
            setattr(m, n, nn.Parameter(old.detach()[idx].clone(), requires_grad=old.requires_grad))
        m._bsmoe_expert_parallel = _ShardState(
            name, groups, pl, names, backend=backend, block_size=block_size, capacity_per_peer=capacity_per_peer,
            capacity_overflow=capacity_overflow, timeout=timeout,
        )  # fmt: skip
        m.num_experts = len(local)  # transformers' own convention for a sharded experts module
        m._is_expert_parallel = True  # experts_forward then treats id == num_experts as padding
        m.forward = _ShardedForward(m)
    return model

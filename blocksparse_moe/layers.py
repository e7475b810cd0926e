"""The MoE layers: ``dMoE`` (dropless, block-sparse) and ``MoE`` (capacity-based baseline).

Both hold the same parameters under the same names, so a state dict moves between
them::

    router.weight [E, hidden]   w1 [E, hidden, ffn]   w2 [E, ffn, hidden]   v1 [E, hidden, ffn] (glu)

``forward(x)`` maps ``[..., hidden]`` to the same shape; ``forward(x, return_aux=True)``
also returns a :class:`MoEAux` with the (weighted) auxiliary losses and the load.
Losses are returned, never collected in module-global lists.

dMoE builds the routing plan and the block-sparse topology once per forward and runs
:func:`~blocksparse_moe.functional.expert_ffn` on them; nothing is read back to the
host with the Triton backend. MoE is pure torch: a ``[E, capacity, hidden]`` dispatch
buffer, batched matmuls, and tokens past an expert's capacity dropped by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .config import MoEConfig
from .functional import expert_ffn
from .reference import get_activation
from .router import Router, RouterOutput
from .routing import RoutingPlan, plan_routing
from .topology import Topology, build_topology

__all__ = ["MoEAux", "dMoE", "MoE"]


@dataclass
class MoEAux:
    """What ``forward(x, return_aux=True)`` returns beside the output.

    Attributes:
        load_balancing_loss: scalar, ``load_balancing_loss_weight * E * sum_i f_i P_i``.
        z_loss: scalar, ``z_loss_weight * mean_t logsumexp(logits_t)^2``.
        tokens_per_expert: ``[E] int32`` rows routed to each expert, before any
            capacity drop (a token counts once per expert it chose).
        dropped_tokens: int64 scalar tensor, the (token, expert) assignments dropped
            for capacity; always 0 for dMoE. With ``top_k=1`` this is tokens.
        expert_ids: ``[T, k]`` the chosen experts (``T`` = tokens after flattening).
        expert_weights: ``[T, k]`` float32 routing weights.
    """

    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """The sum of the weighted auxiliary losses, to add to the training loss."""
        return self.load_balancing_loss + self.z_loss


def add_expert_parameters(module: nn.Module, config: MoEConfig, num_experts: int) -> None:
    """Give ``module`` a router and ``num_experts`` experts' ``w1``, ``w2`` (and ``v1``), uninitialised.

    Shared by :class:`dMoE`, :class:`MoE` and the expert-parallel layer (which holds
    ``E / world_size`` experts), so that their parameter names and shapes match and a
    state dict moves between them.
    """
    H, ffn = config.hidden_size, config.ffn_hidden_size
    factory = dict(dtype=config.dtype, device=config.device)
    module.router = Router(config)
    module.w1 = nn.Parameter(torch.empty(num_experts, H, ffn, **factory))
    module.w2 = nn.Parameter(torch.empty(num_experts, ffn, H, **factory))
    if config.glu:
        module.v1 = nn.Parameter(torch.empty(num_experts, H, ffn, **factory))
    else:
        module.register_parameter("v1", None)
    module.activation = get_activation(config.activation)


class _MoEBase(nn.Module):
    """Parameters, input checks, routing and losses shared by both layers."""

    def __init__(self, config: MoEConfig):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        add_expert_parameters(self, config, config.num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights; the router's selection bias back to zero."""
        std = self.config.init_std
        for p in (self.w1, self.w2, self.v1):
            if p is not None:
                nn.init.normal_(p, std=std)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden_size}, ffn={c.ffn_hidden_size}, experts={c.num_experts}, top_k={c.top_k}, "
            f"glu={c.glu}, activation={c.activation if isinstance(c.activation, str) else 'custom'}"
        )

    def update_selection_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None) -> None:
        """Move the router's selection bias toward balance (see :meth:`Router.update_selection_bias`)."""
        self.router.update_selection_bias(tokens_per_expert, rate)

    def _check_input(self, x) -> None:
        H = self.config.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of dtype {self.w1.dtype}, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != H:
            raise ValueError(f"x must have shape [..., hidden_size={H}], got shape {tuple(x.shape)}")
        if x.dtype != self.w1.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {self.w1.dtype}; "
                f"expected x.dtype == {self.w1.dtype} (cast x, or the layer with .to())"
            )
        if x.device != self.w1.device:
            raise ValueError(
                f"x is on {x.device} but the layer's parameters are on {self.w1.device}; expected one device"
            )

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """``x [..., hidden] -> [..., hidden]``, or ``(out, MoEAux)`` with ``return_aux=True``."""
        if not isinstance(return_aux, bool):
            raise TypeError(f"return_aux must be a bool, got {return_aux!r}")
        self._check_input(x)
        cfg = self.config
        x2 = x.reshape(-1, cfg.hidden_size)
        route = self.router(x2)
        plan = plan_routing(route.expert_ids, cfg.num_experts)
        out, dropped = self._experts(x2, route, plan)
        out = out.reshape(x.shape)
        if not return_aux:
            return out
        lb, z = self.router.losses(route, plan.tokens_per_expert)
        aux = MoEAux(
            load_balancing_loss=lb,
            z_loss=z,
            tokens_per_expert=plan.tokens_per_expert,
            dropped_tokens=dropped,
            expert_ids=route.expert_ids,
            expert_weights=route.weights,
        )
        return out, aux

    def _experts(self, x: torch.Tensor, route: RouterOutput, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class dMoE(_MoEBase):  # noqa: N801 - the name MegaBlocks gave it
    """Dropless MoE: every token reaches all k of its experts; no capacity, no padding to one."""

    def _experts(self, x, route, plan):
        cfg = self.config
        backend = ops.resolve_backend(cfg.backend, x.device)
        topo = build_topology(plan, cfg.ffn_hidden_size, cfg.block_size)
        args = (x, plan, topo, route.weights, self.w1, self.w2, self.v1, self.activation, backend)
        out = _expert_ffn_recompute(*args) if cfg.recompute_activation else expert_ffn(*args)
        # A tensor, not an int: the aux fields have one type in both layers, and
        # building it costs no host read.
        return out, torch.zeros((), dtype=torch.int64, device=x.device)


class MoE(_MoEBase):
    """Capacity-based baseline: at most ``ceil(capacity_factor * T * k / E)`` rows per expert.

    Rows past an expert's capacity are dropped by position, in slot order
    (``slot = t * k + j``: earlier tokens first, as Switch Transformer and MegaBlocks'
    ``MoE`` do); a dropped (token, expert) assignment contributes nothing to the
    output. ``config.backend`` is ignored: this layer is pure torch.
    """

    def _experts(self, x, route, plan):
        cfg = self.config
        T, H = x.shape
        E, k = cfg.num_experts, cfg.top_k
        C = cfg.capacity(T)
        ids = route.expert_ids.reshape(-1)
        # The plan's sort is stable, so a slot's rank inside its expert is its sorted
        # position minus the expert's first row: exactly "position among the tokens
        # routed to this expert, in slot order".
        rank = plan.slot_to_sorted.long() - plan.expert_offsets.long()[ids]
        keep = rank < C
        # Dropped slots all go to one scratch row (E*C), cut off before the experts run.
        dest = torch.where(keep, ids * C + rank, torch.full_like(ids, E * C))
        token = torch.arange(T * k, device=x.device) // k
        buf = x.new_zeros(E * C + 1, H).index_add(0, dest, x[token])
        xb = buf[: E * C].view(E, C, H)
        h = self.activation(torch.bmm(xb, self.w1))
        if self.v1 is not None:
            h = h * torch.bmm(xb, self.v1)
        yb = torch.bmm(h, self.w2).reshape(E * C, H)
        yb = torch.cat([yb, yb.new_zeros(1, H)])  # dropped slots read a zero row
        rows = yb[dest].view(T, k, H)
        # Zero weight as well as zero row: a NaN token that was dropped stays 0, and
        # its weight gets no gradient from an expert it never reached.
        w = torch.where(keep.view(T, k), route.weights, torch.zeros((), dtype=route.weights.dtype, device=x.device))
        acc = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows  # as combine_torch
        out = (acc * w.to(acc.dtype)[..., None]).sum(1).to(x.dtype)
        return out, (~keep).sum()


# --------------------------------------------------------------------------- recompute
class _ActThenDown(torch.autograd.Function):
    """``y = dsd(act(h1) [* h3], w2)`` that keeps ``h1`` (and ``h3``) but not the activation.

    Without it, backward keeps the pre-activation ``h1`` (for ``act``'s gradient)
    *and* the activated ``h`` (for ``dsd``'s weight gradient), plus ``act(h1)`` and
    ``h3`` for the GLU product: 2 (MLP) or 4 (GLU) intermediates of the sparse size.
    This node keeps 1 or 2 and recomputes the elementwise part in backward; the
    matmuls are not redone (a checkpoint of the whole segment would redo ``dsd``).
    MegaBlocks' memory-optimized MLP does the same, but this one skips the gradients
    nobody asked for, so frozen ``w1``/``w2``/``v1`` work.
    """

    @staticmethod
    def forward(ctx, h1, h3, w2, act, topo: Topology, backend: str):
        h = act(h1) if h3 is None else act(h1) * h3
        y = ops.dsd(h, w2, topo, backend)
        ctx.save_for_backward(h1, h3, w2, *topo.tensors())
        ctx.act, ctx.sizes, ctx.backend = act, topo.sizes(), backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h1, h3, w2, *topo_tensors = ctx.saved_tensors
        topo = Topology.from_parts(ctx.sizes, topo_tensors)
        need_h1, need_h3, need_w2 = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        with torch.enable_grad():
            a = h1.detach().requires_grad_(need_h1)
            r = ctx.act(a)
        # The GLU product is formed outside the graph and only for dw2, then freed
        # before dh is allocated: keeps backward's peak near that of the plain layer.
        d_w2 = None
        if need_w2:
            h = r.detach() if h3 is None else r.detach() * h3
            d_w2 = _down_weight_grad(h, grad, topo, ctx.backend)
            del h
        d_h1 = d_h3 = None
        if need_h1 or need_h3:
            d_h = _down_input_grad(grad, w2, topo, ctx.backend)
            if h3 is not None:
                d_h3 = d_h * r.detach() if need_h3 else None
                d_h = d_h.mul_(h3)  # now d(act(h1)); d_h is ours, fresh from sdd
            if need_h1:
                # an activation that ignores its input (a constant) leaves no graph
                d_h1 = torch.autograd.grad(r, a, d_h)[0] if r.requires_grad else torch.zeros_like(h1)
        return d_h1, d_h3, d_w2, None, None, None


def _down_input_grad(grad: torch.Tensor, w2: torch.Tensor, topo: Topology, backend: str) -> torch.Tensor:
    """``dh = sdd(grad, w2^T)``: dsd's input gradient, as ``ops``' own backward computes it."""
    return ops.sdd(grad, w2.transpose(1, 2), topo, backend)


def _down_weight_grad(h: torch.Tensor, grad: torch.Tensor, topo: Topology, backend: str) -> torch.Tensor:
    """``dw2[e] = rows(h of e)^T @ grad[rows of e]``, as ``ops``' own dsd backward computes it."""
    return ops.dsd_t(h, grad, topo, backend)


def _expert_ffn_recompute(x, plan, topo, weights, w1, w2, v1, act, backend) -> torch.Tensor:
    """:func:`expert_ffn` with the activation and down projection as one :class:`_ActThenDown` node.

    expert_ffn composes ``ops`` calls whose saved tensors cannot be dropped from
    outside, hence this four-line twin; the ops, and so the numbers, are the same.
    """
    xs = ops.gather(x, plan, backend)
    h1 = ops.sdd(xs, w1, topo, backend)
    h3 = None if v1 is None else ops.sdd(xs, v1, topo, backend)
    ys = _ActThenDown.apply(h1, h3, w2, act, topo, backend)
    return ops.combine(ys, plan, weights, backend)

"""The MoE layers: ``dMoE`` (dropless, block-sparse) and ``MoE`` (capacity-based baseline).

Both hold the same parameters under the same names, so a state dict moves between
them::

    router.weight [E, hidden]   w1 [E, hidden, ffn]   w2 [E, ffn, hidden]   v1 [E, hidden, ffn] (glu)
    shared_expert.{gate_proj, up_proj, down_proj}.weight, shared_expert_gate.weight  (only when configured)

``forward(x)`` maps ``[..., hidden]`` to the same shape; ``forward(x, return_aux=True)``
also returns a :class:`MoEAux` with the (weighted) auxiliary losses and the load.
Losses are returned, never collected in module-global lists. Shared experts
(:mod:`~blocksparse_moe.shared_expert`) are added to the routed output; dMoE also
routes by expert choice (:mod:`~blocksparse_moe.expert_choice`).

dMoE builds the routing plan and the block-sparse topology once per forward and runs
:func:`~blocksparse_moe.functional.expert_ffn` on them; nothing is read back to the
host with the Triton backend. MoE is pure torch: a ``[E, capacity, hidden]`` dispatch
buffer, batched matmuls, and tokens past an expert's capacity dropped by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends.block import _ActThenDown  # noqa: F401 - kept importable from here (it lived here)
from .config import MoEConfig
from .expert_choice import expert_choice_aux_fields, expert_choice_ffn, expert_choice_select
from .functional import routed_ffn
from .reference import get_activation
from .router import Router, RouterOutput
from .routing import RoutingPlan, plan_routing
from .shared_expert import add_shared_experts, shared_output

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
        expert_ids: ``[T, k]`` the chosen experts (``T`` = tokens after flattening);
            with expert choice ``[E, C]``, row ``e`` all ``e``.
        expert_weights: ``[T, k]`` float32 routing weights; with expert choice ``[E, C]``.
        unrouted_tokens: int64 scalar tensor, tokens that reached no routed expert
            (expert choice: no expert picked them; their routed output is zero). 0 for
            token choice.
        chosen_tokens: expert choice only: ``[E, C]`` int64, the tokens each expert
            picked, best first (``None`` for token choice).
    """

    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    # Defaults: the expert-parallel aux (a subclass) is built without them.
    unrouted_tokens: torch.Tensor = None
    chosen_tokens: torch.Tensor = None

    @property
    def loss(self) -> torch.Tensor:
        """The sum of the weighted auxiliary losses, to add to the training loss."""
        return self.load_balancing_loss + self.z_loss


def add_expert_parameters(module: nn.Module, config: MoEConfig, num_experts: int) -> None:
    """Give ``module`` a router and ``num_experts`` experts' ``w1``, ``w2`` (and ``v1``), uninitialised.

    Shared by :class:`dMoE`, :class:`MoE` and the expert-parallel layer (which holds
    its placement's share of the experts), so that their parameter names and shapes
    match and a state dict moves between them.
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
        if config.routing == "expert_choice" and type(self)._expert_choice is _MoEBase._expert_choice:
            raise ValueError(
                f"{type(self).__name__} routes by token choice only; MoEConfig.routing='expert_choice' needs dMoE"
            )
        self.config = config
        add_expert_parameters(self, config, config.num_experts)
        add_shared_experts(self, config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights; the router's selection bias back to zero."""
        std = self.config.init_std
        for p in (self.w1, self.w2, self.v1):
            if p is not None:
                nn.init.normal_(p, std=std)
        self.router.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=std)

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
        if x.layout != torch.strided:
            raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}")
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
        if cfg.routing == "expert_choice":
            out, aux = self._expert_choice(x2)
        else:
            route = self.router(x2)
            plan = plan_routing(route.expert_ids, cfg.num_experts)
            out, dropped = self._experts(x2, route, plan)
            aux = (route, plan, dropped)
        shared = shared_output(self, x2)
        if shared is not None:
            out = out + shared
        out = out.reshape(x.shape)
        if not return_aux:
            return out
        if isinstance(aux, MoEAux):
            return out, aux
        route, plan, dropped = aux
        lb, z = self.router.losses(route, plan.tokens_per_expert)
        aux = MoEAux(
            load_balancing_loss=lb,
            z_loss=z,
            tokens_per_expert=plan.tokens_per_expert,
            dropped_tokens=dropped,
            expert_ids=route.expert_ids,
            expert_weights=route.weights,
            unrouted_tokens=torch.zeros((), dtype=torch.int64, device=x.device),
        )
        return out, aux

    def _expert_choice(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        raise ValueError(
            f"{type(self).__name__} routes by token choice only; routing='expert_choice' needs dMoE "
            f"(MoEConfig.routing={self.config.routing!r})"
        )

    def _experts(self, x: torch.Tensor, route: RouterOutput, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class dMoE(_MoEBase):  # noqa: N801 - the name MegaBlocks gave it
    """Dropless MoE: every token reaches all k of its experts; no capacity, no padding to one.

    With ``routing="expert_choice"`` each expert takes its top-``C`` tokens instead
    (``C = config.capacity(T)``, at most ``T``); see :mod:`~blocksparse_moe.expert_choice`.
    """

    def _expert_choice(self, x):
        cfg = self.config
        logits, tokens, weights = expert_choice_select(self.router, x, self.training)
        out, unrouted = expert_choice_ffn(
            x, tokens, weights, self.w1, self.w2, self.v1, cfg.activation,
            backend=cfg.backend, block_size=cfg.block_size, recompute=cfg.recompute_activation,
        )  # fmt: skip
        return out, MoEAux(**expert_choice_aux_fields(cfg, logits, tokens, weights, unrouted))

    def _experts(self, x, route, plan):
        cfg = self.config
        # cfg.activation, not self.activation: a name lets the grouped backend fuse it.
        out = routed_ffn(
            x, plan, route.weights, self.w1, self.w2, self.v1, cfg.activation,
            backend=cfg.backend, block_size=cfg.block_size, recompute=cfg.recompute_activation,
        )  # fmt: skip
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

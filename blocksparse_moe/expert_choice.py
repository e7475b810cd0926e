"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-``C`` tokens.

With token choice every token picks ``k`` experts and the load per expert is what
the router makes of it; with expert choice every expert picks ``C`` tokens, so every
load is exactly ``C`` by construction, and a token gets zero, one or several
experts. ``C = min(T, ceil(capacity_factor * T * k / E))`` (``MoEConfig.capacity``),
so ``E * C`` rows are computed, about ``capacity_factor * T * k``.

It maps onto the sorted layout of token choice unchanged: the ``E * C`` chosen
(expert, token) pairs are already grouped by expert (row ``e * C + c`` is expert
``e``'s ``c``-th pick), so they form a :class:`~blocksparse_moe.routing.RoutingPlan`
with one slot per row whose sort is the identity. The rows are gathered from ``x``
once, every expert runs through :func:`~blocksparse_moe.functional.routed_ffn` as
usual (weighted by ``w = s[token, e]``), and the rows are summed back per token with
one ``index_add``. A token no expert chose gets zeros (the residual around the
layer passes it through); they are counted on the device, never read.

Under expert parallelism (``ExpertParallelDMoE``) each rank's experts choose among
that rank's tokens (``C`` from the rank's own ``T``), the per-group capacity of
Switch/GShard: the ``E * C`` chosen rows travel to the experts' ranks as rows of
one expert each and are summed back per token on the token's rank. It equals a
single process applying expert choice to each rank's batch separately; a global
choice over every rank's tokens would need every rank's scores on every rank.

Causality: an expert's pick depends on every token of the batch, including later
positions of the same sequence, so a causal language model trained this way sees
the future through the routing, and a decode step (one token) cannot reproduce it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .functional import routed_ffn
from .router import router_z_loss
from .routing import RoutingPlan

__all__ = [
    "expert_choice_aux_fields",
    "expert_choice_combine",
    "expert_choice_ffn",
    "expert_choice_plan",
    "expert_choice_route",
    "expert_choice_select",
]


def expert_choice_route(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [E, C] int64, weights [E, C])``: each expert's ``C`` best tokens by score, best first.

    ``weights`` are gathered from ``scores [T, E]`` (differentiable); the choice uses
    detached scores, NaN as ``-inf`` (a NaN token is picked last; its own output is NaN).
    """
    T, E = scores.shape
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 <= capacity <= T:
        raise ValueError(f"capacity must be an int in [0, tokens={T}], got {capacity!r}")
    select = scores.detach()
    select = torch.where(torch.isnan(select), float("-inf"), select)
    tokens = select.t().topk(capacity, dim=1).indices  # [E, C]
    weights = scores.t().gather(1, tokens)
    return tokens, weights


def expert_choice_select(router, x: torch.Tensor, training: bool):
    """``(logits [T, E], tokens [E, C], weights [E, C])``: the router's expert-choice decision for ``x [T, H]``.

    ``C = min(config.capacity(T), T)``; jitter (training only) and ``router_scale``
    as token choice applies them. Shared by ``dMoE`` and the expert-parallel layer.
    """
    cfg = router.config
    if training and cfg.router_jitter > 0:
        eps = cfg.router_jitter
        logits, scores = router.scores(x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps))
    else:
        logits, scores = router.scores(x)
    tokens, weights = expert_choice_route(scores, min(cfg.capacity(x.shape[0]), x.shape[0]))
    if cfg.router_scale != 1.0:
        weights = weights * cfg.router_scale
    return logits, tokens, weights


def expert_choice_combine(rows: torch.Tensor, tokens: torch.Tensor, num_tokens: int):
    """``(out [T, H], unrouted)``: the weighted rows ``[E * C, H]`` summed per token, and the tokens no expert chose.

    ``unrouted`` is an int64 scalar tensor (counted on the device, never read); those
    tokens' rows of ``out`` are zero. Half inputs are summed in float32, as the
    token-choice combine does.
    """
    T, H = num_tokens, rows.shape[-1]
    flat = tokens.reshape(-1)
    acc_dtype = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    out = torch.zeros(T, H, dtype=acc_dtype, device=rows.device).index_add(0, flat, rows.to(acc_dtype))
    chosen = torch.zeros(T, dtype=torch.bool, device=rows.device).index_fill(0, flat, True)
    return out.to(rows.dtype), T - chosen.sum()


def expert_choice_aux_fields(config, logits, tokens, weights, unrouted) -> dict:
    """The :class:`~blocksparse_moe.layers.MoEAux` fields of an expert-choice forward (this batch's)."""
    E, C = tokens.shape
    dev = logits.device
    return dict(
        # Every expert's load is C by construction: nothing to balance.
        load_balancing_loss=logits.sum() * 0.0,
        z_loss=config.z_loss_weight * router_z_loss(logits),
        tokens_per_expert=torch.full((E,), C, dtype=torch.int32, device=dev),
        dropped_tokens=torch.zeros((), dtype=torch.int64, device=dev),
        expert_ids=torch.arange(E, device=dev)[:, None].expand(E, C),
        expert_weights=weights,
        unrouted_tokens=unrouted,
        chosen_tokens=tokens,
    )


def expert_choice_plan(num_experts: int, capacity: int, device) -> RoutingPlan:
    """The plan of ``E * C`` rows already in expert order: slot ``e * C + c`` is sorted row ``e * C + c``."""
    E, C = num_experts, capacity
    rows = torch.arange(E * C, device=device, dtype=torch.int32)
    offsets = torch.arange(E + 1, device=device, dtype=torch.int32) * C
    return RoutingPlan(
        num_tokens=E * C,
        top_k=1,
        num_experts=E,
        sorted_to_slot=rows,
        slot_to_sorted=rows,
        sorted_expert=rows // max(C, 1),
        tokens_per_expert=offsets[1:] - offsets[:-1],
        expert_offsets=offsets,
    )


def expert_choice_ffn(
    x: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None,
    activation: str | Callable,
    **routed_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, H], unrouted)``: ``out[t] = sum_{(e, c): tokens[e, c] = t} weights[e, c] * FFN_e(x[t])``.

    ``unrouted`` is an int64 scalar tensor, the tokens no expert chose (their rows of
    ``out`` are zero). ``routed_kwargs`` go to :func:`routed_ffn` (backend, block size,
    recompute).
    """
    T = x.shape[0]
    E, C = tokens.shape
    flat = tokens.reshape(-1)
    plan = expert_choice_plan(E, C, x.device)
    rows = routed_ffn(x[flat], plan, weights.reshape(-1, 1), w1, w2, v1, activation, **routed_kwargs)
    return expert_choice_combine(rows, tokens, T)

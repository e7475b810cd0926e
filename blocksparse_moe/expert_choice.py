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

Causality: an expert's pick depends on every token of the batch, including later
positions of the same sequence, so a causal language model trained this way sees
the future through the routing, and a decode step (one token) cannot reproduce it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .functional import routed_ffn
from .routing import RoutingPlan

__all__ = ["expert_choice_route", "expert_choice_plan", "expert_choice_ffn"]


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
    T, H = x.shape
    E, C = tokens.shape
    flat = tokens.reshape(-1)
    plan = expert_choice_plan(E, C, x.device)
    rows = routed_ffn(x[flat], plan, weights.reshape(-1, 1), w1, w2, v1, activation, **routed_kwargs)
    # Half inputs are summed in float32, as the token-choice combine does.
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = torch.zeros(T, H, dtype=acc_dtype, device=x.device).index_add(0, flat, rows.to(acc_dtype))
    chosen = torch.zeros(T, dtype=torch.bool, device=x.device).index_fill(0, flat, True)
    return out.to(x.dtype), T - chosen.sum()

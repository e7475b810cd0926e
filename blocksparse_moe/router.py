"""The router: scores, top-k choice, routing weights, and the two auxiliary losses.

``Router(config)(x [T, H])`` returns a :class:`RouterOutput`. Every step is a device
op (linear, softmax/sigmoid, topk, gather): nothing is read back to the host, so the
router adds no sync to a CUDA forward.

Formulas (``T`` tokens, ``E`` experts, ``k`` choices, ``s`` the scores):

* softmax scores ``s_t = softmax(x_t W^T)``; sigmoid scores ``s_t = sigmoid(x_t W^T)``.
* chosen experts ``top-k(s_t + b)``, ``b`` the selection bias (zero unless enabled);
  routing weights ``w_tj = s_t[id_tj]`` (the bias never enters a weight), optionally
  divided by ``sum_j w_tj``, then multiplied by ``router_scale``.
* group-limited choice (``router_groups=G``, ``router_topk_groups=M``): group ``g``'s
  rank is the sum of its best ``router_group_topk`` values of ``s_t + b``; the top-k
  is taken over the experts of the best ``M`` groups only, so a token's experts lie
  in at most ``M`` groups (nodes or devices).
* load-balancing loss ``E * sum_i f_i * P_i`` with ``f_i = c_i / (T k)`` (``c_i`` rows
  routed to expert ``i``) and ``P_i = mean_t p_ti``, ``p`` the softmax scores or, for
  sigmoid scores, the scores normalised per token (``s_ti / sum_i s_ti``).
* router z-loss ``mean_t logsumexp(logits_t)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig

__all__ = ["Router", "RouterOutput", "group_limited_topk", "load_balancing_loss", "router_z_loss"]


@dataclass
class RouterOutput:
    """One routing decision.

    Attributes:
        logits: ``[T, E]`` router logits, float32 (upcast from half inputs).
        scores: ``[T, E]`` softmax probabilities or sigmoid scores, float32.
        expert_ids: ``[T, k]`` int64, the chosen experts (distinct per token).
        weights: ``[T, k]`` float32 routing weights of the chosen experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


def load_balancing_loss(
    scores: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int, score_type: str = "softmax"
) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` (Switch / GShard), unweighted; 1.0 when perfectly balanced.

    ``f_i = tokens_per_expert[i] / (T * top_k)`` is not differentiable (it counts
    choices); the gradient reaches the router through ``P_i = mean_t p_ti``.
    """
    T, E = scores.shape
    if T == 0:
        return scores.sum() * 0.0  # keeps the graph; a mean over no tokens would be NaN
    if score_type == "softmax":
        probs = scores
    else:
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    frac = tokens_per_expert.to(probs.dtype) / (T * top_k)
    return E * torch.dot(frac, probs.mean(0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_t logsumexp(logits_t)^2`` (ST-MoE), unweighted: keeps the logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def group_limited_topk(
    select: torch.Tensor, k: int, groups, topk_groups: int, group_topk: int = 2
) -> torch.Tensor:
    """Top-``k`` of ``select [T, E]`` per token among the experts of its best ``topk_groups`` groups.

    ``groups``: an int ``G`` (group ``g`` = experts ``g*E/G .. (g+1)*E/G - 1``, the
    contiguous placement's nodes) or an integer tensor ``[G, E/G]`` listing each
    group's experts (any placement's nodes; every expert exactly once, unchecked).
    A group's rank is the sum of its best ``group_topk`` values (DeepSeek-V3: 2,
    V2: 1). Returns ``[T, k]`` int64 expert ids, best first. Device ops only.
    """
    T, E = select.shape
    if isinstance(groups, torch.Tensor):
        members = groups.to(device=select.device, dtype=torch.long)
        G, per = members.shape
        grouped = select[:, members.reshape(-1)].view(T, G, per)
    else:
        G, per = groups, E // groups
        members = None
        grouped = select.view(T, G, per)
    if not (1 <= topk_groups <= G and topk_groups * per >= k and 1 <= group_topk <= per):
        raise ValueError(
            f"topk_groups={topk_groups}, group_topk={group_topk} with {G} groups of {per} experts and k={k}: "
            f"expected 1 <= topk_groups <= {G}, topk_groups * {per} >= k and 1 <= group_topk <= {per}"
        )
    # -inf for the groups left out, so that the top-k below can only reach the kept
    # ones (the caller has turned NaN scores into finite values, see _choose).
    rank = grouped.topk(group_topk, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.zeros(T, G, dtype=torch.bool, device=select.device)
    keep.scatter_(1, rank.topk(topk_groups, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, G * per)
    ids = masked.topk(k, dim=-1).indices
    return ids if members is None else members.reshape(-1)[ids]


class Router(nn.Module):
    """Linear router without bias: ``weight [E, hidden]``, plus the options of :class:`MoEConfig`."""

    def __init__(self, config: MoEConfig):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        E = config.num_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=config.dtype, device=config.device))
        # A buffer, not a parameter: it is moved by a load rule, not by gradients,
        # and it is saved with the model. Absent when the option is off, so that a
        # plain model's state dict holds only the weights.
        bias = torch.zeros(E, dtype=torch.float32, device=config.device) if config.router_selection_bias else None
        self.register_buffer("selection_bias", bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.init_std)
        if self.selection_bias is not None:
            self.selection_bias.zero_()

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x [T, hidden]``; the caller (the layer) has validated ``x``."""
        cfg = self.config
        if self.training and cfg.router_jitter > 0:
            eps = cfg.router_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits, scores = self.scores(x)
        if cfg.routing == "expert_choice":
            raise RuntimeError(
                "Router.forward chooses experts per token; with routing='expert_choice' the layer calls "
                "Router.scores and blocksparse_moe.expert_choice.expert_choice_route instead"
            )
        expert_ids = self._choose(scores)
        weights = scores.gather(1, expert_ids)
        if cfg.router_renormalize:
            # tiny floor: sigmoid scores can underflow to 0 for every chosen expert
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        if cfg.router_scale != 1.0:
            weights = weights * cfg.router_scale
        return RouterOutput(logits=logits, scores=scores, expert_ids=expert_ids, weights=weights)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, scores)`` of ``x [T, hidden]``, both ``[T, E]`` float32 (no jitter here)."""
        # Scores in fp32: a bf16 softmax over many experts rounds small probabilities
        # away and makes near-ties in top-k arbitrary.
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if self.config.router_score == "softmax" else torch.sigmoid(logits)
        return logits, scores

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        T, E, k = scores.shape[0], cfg.num_experts, cfg.top_k
        if cfg.router_uniform:
            # Slot t*k + j -> expert (t*k + j) % E: every expert gets T*k/E rows (+-1),
            # and k <= E keeps a token's k experts distinct.
            return torch.arange(T * k, device=scores.device).remainder(E).view(T, k)
        select = scores.detach()
        if self.selection_bias is not None:
            select = select + self.selection_bias
        if cfg.topk_groups < cfg.router_groups:
            # NaN -> the lowest finite value rather than -inf: the groups left out are
            # -inf, so even a NaN token's k picks stay inside its M groups.
            select = torch.where(torch.isnan(select), torch.finfo(select.dtype).min, select)
            return group_limited_topk(select, k, cfg.router_groups, cfg.topk_groups, cfg.group_topk)
        # A NaN token (NaN in x) has NaN scores; topk over NaN may pick any ids, and
        # backends disagree. -inf keeps its choice k distinct valid experts, while its
        # weights (gathered from the NaN scores) still carry the NaN to its own output.
        select = torch.where(torch.isnan(select), float("-inf"), select)
        return select.topk(k, dim=-1).indices

    def losses(self, route: RouterOutput, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(load_balancing_loss, z_loss)``, each multiplied by its config weight."""
        cfg = self.config
        lb = load_balancing_loss(route.scores, tokens_per_expert, cfg.top_k, cfg.router_score)
        z = router_z_loss(route.logits)
        return cfg.load_balancing_loss_weight * lb, cfg.z_loss_weight * z

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): ``b_i += rate * sign(mean(c) - c_i)``.

        ``tokens_per_expert [E]`` is the observed load (``aux.tokens_per_expert``, or
        its sum over several steps or data-parallel ranks). Overloaded experts are
        pushed down, underloaded ones up. In place, on the device: no host read.
        """
        if self.selection_bias is None:
            raise RuntimeError("update_selection_bias needs MoEConfig(router_selection_bias=True)")
        E = self.config.num_experts
        if not isinstance(tokens_per_expert, torch.Tensor) or tuple(tokens_per_expert.shape) != (E,):
            is_tensor = isinstance(tokens_per_expert, torch.Tensor)
            got = tuple(tokens_per_expert.shape) if is_tensor else type(tokens_per_expert).__name__
            raise ValueError(f"tokens_per_expert must be a tensor of shape ({E},), got {got}")
        rate = self.config.router_bias_update_rate if rate is None else rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate >= 0:
            raise ValueError(f"rate must be a number >= 0, got {rate!r}")
        load = tokens_per_expert.to(device=self.selection_bias.device, dtype=torch.float32)
        self.selection_bias.add_(torch.sign(load.mean() - load), alpha=rate)

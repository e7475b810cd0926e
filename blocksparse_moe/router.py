"""The router: scores, top-k choice, routing weights, and the two auxiliary losses.

``Router(config)(x [T, H])`` returns a :class:`RouterOutput`. Every step is a device
op (linear, softmax/sigmoid, topk, gather): nothing is read back to the host, so the
router adds no sync to a CUDA forward.

Formulas (``T`` tokens, ``E`` experts, ``k`` choices, ``s`` the scores):

* softmax scores ``s_t = softmax(x_t W^T)``; sigmoid scores ``s_t = sigmoid(x_t W^T)``.
* chosen experts ``top-k(s_t + b)``, ``b`` the selection bias (zero unless enabled);
  routing weights ``w_tj = s_t[id_tj]`` (the bias never enters a weight), optionally
  divided by ``sum_j w_tj``.
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

__all__ = ["Router", "RouterOutput", "load_balancing_loss", "router_z_loss"]


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
        # Scores in fp32: a bf16 softmax over many experts rounds small probabilities
        # away and makes near-ties in top-k arbitrary.
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if cfg.router_score == "softmax" else torch.sigmoid(logits)
        expert_ids = self._choose(scores)
        weights = scores.gather(1, expert_ids)
        if cfg.router_renormalize:
            # tiny floor: sigmoid scores can underflow to 0 for every chosen expert
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return RouterOutput(logits=logits, scores=scores, expert_ids=expert_ids, weights=weights)

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

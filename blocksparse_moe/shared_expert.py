"""Shared experts: one dense FFN that every token passes through, beside the routed experts.

DeepSeek-V2/V3 and Qwen2-MoE add "shared experts" to each MoE layer: experts that
are not routed, computed on every token. ``n`` shared experts of width ``F`` are
one dense FFN of width ``n * F`` (a sum of FFNs over the same input is an FFN over
the concatenated intermediate), which is how those models store them too.

Parameters are ``nn.Linear`` weights named as the transformers modules name them
(``gate_proj``, ``up_proj``, ``down_proj``), so a model's shared expert loads with
``load_state_dict`` as is, and none ends in ``w1`` / ``w2`` / ``v1``: the
expert-parallel sharding (which cuts tensors with those names along the expert
dimension) leaves them replicated.

* GLU (``glu=True``): ``down(act(gate(x)) * up(x))``.
* MLP: ``down(act(up(x)))``.
* ``shared_expert_gate=True`` (Qwen2-MoE): the result times ``sigmoid(x @ g^T)``, ``g [1, H]``,
  which lives on the parent as ``shared_expert_gate`` (its name in Qwen2-MoE).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .reference import get_activation

__all__ = ["SharedExpert", "add_shared_experts", "shared_output"]


class SharedExpert(nn.Module):
    """The dense FFN of :attr:`MoEConfig.shared_ffn_size` columns, in the layer's dtype and device."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        H, F = config.hidden_size, config.shared_ffn_size
        if F < 1:
            raise ValueError(f"SharedExpert needs MoEConfig.num_shared_experts >= 1, got {config.num_shared_experts!r}")
        factory = dict(bias=False, dtype=config.dtype, device=config.device)
        self.gate_proj = nn.Linear(H, F, **factory) if config.glu else None
        self.up_proj = nn.Linear(H, F, **factory)
        self.down_proj = nn.Linear(F, H, **factory)
        self.act = get_activation(config.activation)
        self.init_std = config.init_std

    def reset_parameters(self) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def add_shared_experts(module: nn.Module, config: MoEConfig) -> None:
    """Give ``module`` ``shared_expert`` (and ``shared_expert_gate``) as the config asks, else ``None``s.

    Absent (registered as ``None``) without shared experts, so a plain layer's state
    dict keeps only its routed parameters.
    """
    if config.num_shared_experts == 0:
        module.shared_expert = None
        module.shared_expert_gate = None
        return
    module.shared_expert = SharedExpert(config)
    module.shared_expert_gate = (
        nn.Linear(config.hidden_size, 1, bias=False, dtype=config.dtype, device=config.device)
        if config.shared_expert_gate
        else None
    )


def shared_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The shared experts' contribution for ``x [T, H]``, or ``None`` when the layer has none."""
    if module.shared_expert is None:
        return None
    y = module.shared_expert(x)
    if module.shared_expert_gate is not None:
        y = torch.sigmoid(module.shared_expert_gate(x)) * y
    return y

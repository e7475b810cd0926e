"""``MoEConfig``: every option of the dMoE layer and its capacity-based baseline, validated once.

The config is a plain dataclass: layers read it, nothing writes to it, and no option
lives in module-global state. Validation runs on construction (and again on
``dataclasses.replace``), so a bad value fails where it is written, with a message
naming the field, the value and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .backends.select import persistent_unsupported
from .ops import BACKENDS
from .reference import ACTIVATIONS, activation_name
from .topology import SUPPORTED_BLOCK_SIZES

__all__ = ["MoEConfig", "ROUTER_SCORES", "ROUTING_MODES"]

ROUTER_SCORES = ("softmax", "sigmoid")
# token_choice: each token picks its top-k experts (dropless); expert_choice: each
# expert picks its top-C tokens (Zhou et al. 2022; dMoE only).
ROUTING_MODES = ("token_choice", "expert_choice")
# The kernels and check_ffn_args accept these; float64 is for the oracle only.
_LAYER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def _is_int(v) -> bool:
    # bool is an int subclass; True as a size is always a mistake.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class MoEConfig:
    """Options of :class:`~blocksparse_moe.dMoE` and :class:`~blocksparse_moe.MoE`.

    Sizes:
        hidden_size: model width ``H`` (the last dimension of the input).
        ffn_hidden_size: width of one expert's intermediate ``ffn``.
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        block_size: block of the sparse intermediate, one of ``SUPPORTED_BLOCK_SIZES``.

    Experts:
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu"`` or a callable.
        glu: gated experts ``(act(x @ w1) * (x @ v1)) @ w2`` (SwiGLU with ``"silu"``).
        recompute_activation: keep only the pre-activation (and the GLU up
            projection) for backward and recompute ``act`` there, instead of also
            keeping the activated intermediate (see docs/layer.md, Memory).

    Router (see docs/layer.md, Router):
        router_score: ``"softmax"`` over all experts then top-k, or ``"sigmoid"``
            (independent scores per expert, DeepSeek-V3 style).
        router_renormalize: rescale each token's k weights to sum to 1.
        router_jitter: ``eps`` of the multiplicative jitter ``x * U(1-eps, 1+eps)``
            applied to the router's input in training mode; 0 disables it.
        router_selection_bias: keep a per-expert bias buffer that is added to the
            scores when choosing experts only (auxiliary-loss-free balancing);
            update it with ``update_selection_bias``.
        router_bias_update_rate: step ``gamma`` of that update.
        router_uniform: ignore the scores when choosing and assign slot ``t*k + j``
            to expert ``(t*k + j) % E`` (balanced load, for benchmarks).
        router_groups: ``G``, split the experts into ``G`` groups of ``E / G``
            consecutive ids (the experts of one node or device); 1 = no groups.
        router_topk_groups: ``M``, each token picks its k experts among the experts
            of its best ``M`` groups only (DeepSeek-V2/V3 node-/device-limited
            routing); ``None`` = ``G`` (no limit). Needs ``M * E / G >= top_k``.
        router_group_topk: a group's rank is the sum of its best this-many
            selection scores (DeepSeek-V3: 2; V2: 1, the max); ``None`` =
            ``min(2, E / G)``.
        router_scale: multiply the routing weights by this after any
            renormalisation (DeepSeek's ``routed_scaling_factor``).
        routing: ``"token_choice"`` (each token its top-k experts) or
            ``"expert_choice"`` (each expert its top-``capacity(T)`` tokens; dMoE only).

    Shared experts (computed densely on every token, beside the routed ones):
        num_shared_experts: how many (0: none); they are one dense FFN of width
            ``shared_ffn_hidden_size``, with the routed experts' activation and GLU.
        shared_ffn_hidden_size: its width; ``None`` = ``num_shared_experts * ffn_hidden_size``
            (DeepSeek); Qwen2-MoE gives its own.
        shared_expert_gate: scale the shared output by ``sigmoid(x @ g)`` per token
            (Qwen2-MoE's ``shared_expert_gate``).

    Losses (returned in ``aux``, already multiplied by their weights):
        load_balancing_loss_weight: weight of ``E * sum_i f_i * P_i``.
        z_loss_weight: weight of ``mean_t(logsumexp(logits_t)^2)``.

    Baseline:
        capacity_factor: :class:`~blocksparse_moe.MoE` keeps at most
            ``ceil(capacity_factor * T * k / E)`` rows per expert; with
            ``routing="expert_choice"`` each expert of dMoE picks that many tokens
            (at most ``T``). Token-choice dMoE ignores it.

    Placement:
        backend: ``"auto"`` (grouped GEMMs on a CPU; on CUDA the backend measured fastest
            at the nearest measured shape: ``backends/select.py``), ``"grouped"``,
            ``"triton"``, ``"persistent"`` (SwiGLU: ``glu`` with ``"silu"``) or ``"torch"``
            (the block reference); dMoE only (MoE is pure torch).
        dtype: parameter dtype (float32, float16 or bfloat16).
        device: parameter device; ``None`` is the CPU.
        init_std: standard deviation of the normal initialisation of every weight.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    block_size: int = 64
    activation: Activation = "gelu"
    glu: bool = False
    recompute_activation: bool = False
    router_score: str = "softmax"
    router_renormalize: bool = False
    router_jitter: float = 0.0
    router_selection_bias: bool = False
    router_bias_update_rate: float = 1e-3
    router_uniform: bool = False
    router_groups: int = 1
    router_topk_groups: Union[int, None] = None
    router_group_topk: Union[int, None] = None
    router_scale: float = 1.0
    routing: str = "token_choice"
    num_shared_experts: int = 0
    shared_ffn_hidden_size: Union[int, None] = None
    shared_expert_gate: bool = False
    load_balancing_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    capacity_factor: float = 1.0
    backend: str = "auto"
    dtype: torch.dtype = torch.float32
    device: Union[str, torch.device, None] = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.block_size not in SUPPORTED_BLOCK_SIZES or not _is_int(self.block_size):
            raise ValueError(f"MoEConfig.block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size!r}")
        if not callable(self.activation) and not (isinstance(self.activation, str) and self.activation in ACTIVATIONS):
            raise ValueError(
                f"MoEConfig.activation must be one of {sorted(ACTIVATIONS)} or a callable, got {self.activation!r}"
            )
        for name in ("glu", "recompute_activation", "router_renormalize", "router_selection_bias", "router_uniform",
                     "shared_expert_gate"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"MoEConfig.{name} must be a bool, got {v!r}")
        if self.router_score not in ROUTER_SCORES:
            raise ValueError(f"MoEConfig.router_score must be one of {ROUTER_SCORES}, got {self.router_score!r}")
        if not _is_real(self.router_jitter) or not 0 <= self.router_jitter < 1:
            raise ValueError(f"MoEConfig.router_jitter must be a number in [0, 1), got {self.router_jitter!r}")
        for name in ("router_bias_update_rate", "load_balancing_loss_weight", "z_loss_weight", "init_std"):
            v = getattr(self, name)
            if not _is_real(v) or v < 0:
                raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {v!r}")
        self._check_groups()
        self._check_shared()
        if not _is_real(self.router_scale) or self.router_scale <= 0:
            raise ValueError(f"MoEConfig.router_scale must be a finite number > 0, got {self.router_scale!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"MoEConfig.routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.routing == "expert_choice":
            # These options shape a token's own top-k; an expert ranking tokens has no use
            # for them, so accepting them silently would mislead.
            for name, off in (("router_uniform", False), ("router_selection_bias", False),
                              ("router_renormalize", False), ("router_groups", 1)):
                if getattr(self, name) != off:
                    raise ValueError(
                        f"MoEConfig.{name}={getattr(self, name)!r} does not apply to routing='expert_choice'; "
                        f"expected {off!r}"
                    )
        if not _is_real(self.capacity_factor) or self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be a finite number > 0, got {self.capacity_factor!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MoEConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "persistent":
            why = persistent_unsupported(self.glu, activation_name(self.activation))
            if why is not None:
                raise ValueError(f"MoEConfig.backend='persistent' needs glu=True and activation='silu': {why}")
        if self.dtype not in _LAYER_DTYPES:
            raise TypeError(f"MoEConfig.dtype must be one of {_LAYER_DTYPES}, got {self.dtype!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"MoEConfig.device must name a torch device, got {self.device!r}") from err

    def _check_groups(self) -> None:
        E, G = self.num_experts, self.router_groups
        if not _is_int(G) or G < 1 or E % G:
            raise ValueError(f"MoEConfig.router_groups must be a positive int dividing num_experts={E}, got {G!r}")
        M = self.router_topk_groups
        if M is not None and (not _is_int(M) or not 1 <= M <= G):
            raise ValueError(f"MoEConfig.router_topk_groups must be None or an int in [1, router_groups={G}], got {M!r}")
        if M is not None and M * (E // G) < self.top_k:
            raise ValueError(
                f"MoEConfig.router_topk_groups={M} leaves {M * (E // G)} experts ({M} groups of {E // G}); "
                f"expected at least top_k={self.top_k}"
            )
        g = self.router_group_topk
        if g is not None and (not _is_int(g) or not 1 <= g <= E // G):
            raise ValueError(
                f"MoEConfig.router_group_topk must be None or an int in [1, experts per group={E // G}], got {g!r}"
            )
        if self.router_uniform and self.topk_groups < G:
            raise ValueError(
                f"MoEConfig.router_uniform=True ignores the scores, so router_topk_groups={M} cannot limit it; "
                "expected router_topk_groups=None"
            )

    def _check_shared(self) -> None:
        n = self.num_shared_experts
        if not _is_int(n) or n < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be an int >= 0, got {n!r}")
        f = self.shared_ffn_hidden_size
        if f is not None and (not _is_int(f) or f < 1):
            raise ValueError(f"MoEConfig.shared_ffn_hidden_size must be None or a positive int, got {f!r}")
        if n == 0 and (f is not None or self.shared_expert_gate):
            raise ValueError(
                f"MoEConfig.shared_ffn_hidden_size={f!r} / shared_expert_gate={self.shared_expert_gate!r} "
                "need num_shared_experts >= 1; got num_shared_experts=0"
            )

    @property
    def topk_groups(self) -> int:
        """``M``: the groups each token may pick experts from (``router_groups`` when unlimited)."""
        return self.router_groups if self.router_topk_groups is None else self.router_topk_groups

    @property
    def group_topk(self) -> int:
        """How many of a group's best scores rank it (``router_group_topk``, default ``min(2, E / G)``)."""
        return min(2, self.num_experts // self.router_groups) if self.router_group_topk is None else self.router_group_topk

    @property
    def shared_ffn_size(self) -> int:
        """Width of the dense shared FFN (0 without shared experts)."""
        if self.num_shared_experts == 0:
            return 0
        f = self.shared_ffn_hidden_size
        return self.num_shared_experts * self.ffn_hidden_size if f is None else f

    def capacity(self, num_tokens: int) -> int:
        """Rows per expert of the baseline: ``ceil(capacity_factor * T * k / E)``."""
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

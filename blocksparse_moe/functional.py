"""The dropless expert FFN as one function: route, sort, compute every expert at once, combine.

``moe_ffn`` is the functional core that the layers build on::

    y = moe_ffn(x, expert_ids, weights, w1, w2, v1=None, activation="silu", block_size=64)

computes ``y[t] = sum_j weights[t, j] * FFN_{expert_ids[t, j]}(x[t])`` with
``FFN_e(x) = act(x @ w1[e]) @ w2[e]``, or ``(act(x @ w1[e]) * (x @ v1[e])) @ w2[e]``
when ``v1`` is given (GLU; SwiGLU is ``activation="silu"``). No token is dropped
and no expert is padded to a capacity. The weights are read through their strides:
transposed or sliced views (e.g. halves of a fused gate/up tensor) are used in place.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch

from . import ops
from .backends.block import block_ffn
from .backends.grouped import grouped_ffn
from .backends.grouped_composed import grouped_ffn_composed
from .backends.grouped_one_token import one_token_or_none
from .backends.persistent_ffn import persistent_ffn
from .backends.select import persistent_unsupported
from .reference import activation_name, get_activation
from .routing import RoutingPlan, plan_routing
from .topology import SUPPORTED_BLOCK_SIZES, Topology
from .kernels.checks import FLOAT_DTYPES

__all__ = ["moe_ffn", "routed_ffn", "expert_ffn", "check_ffn_args"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_ffn_args(x, expert_ids, weights, w1, w2, v1=None, block_size: int = 64) -> None:
    """Validate the public arguments of :func:`moe_ffn` (messages name the argument)."""
    named = {"x": x, "w1": w1, "w2": w2, "weights": weights}
    if v1 is not None:
        named["v1"] = v1
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {_shape(x)}")
    if w1.dim() != 3:
        raise ValueError(f"w1 must be [num_experts, hidden, ffn], got shape {_shape(w1)}")
    E, H, ffn = w1.shape
    if E == 0 or ffn == 0:
        raise ValueError(f"w1 must be [num_experts >= 1, hidden, ffn >= 1], got shape {_shape(w1)}")
    if x.shape[1] != H:
        raise ValueError(f"x has hidden size {x.shape[1]} but w1 expects {H} (w1 shape {_shape(w1)})")
    if _shape(w2) != (E, ffn, H):
        raise ValueError(f"w2 must have shape {(E, ffn, H)} to match w1 {_shape(w1)}, got {_shape(w2)}")
    if v1 is not None and _shape(v1) != _shape(w1):
        raise ValueError(f"v1 must have the shape of w1 {_shape(w1)}, got {_shape(v1)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must be [tokens={x.shape[0]}, top_k], got shape {_shape(expert_ids)}")
    if _shape(weights) != _shape(expert_ids):
        raise ValueError(f"weights must have the shape of expert_ids {_shape(expert_ids)}, got {_shape(weights)}")
    for name in ("w1", "w2", "v1"):
        t = named.get(name)
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; expected the same dtype")
    for name, t in list(named.items()) + [("expert_ids", expert_ids)]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected one device")
    # an integer: 16.0 == 16 would pass `in` and reach the index arithmetic
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")


def routed_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    weights: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None = None,
    activation: str | Callable = "gelu",
    *,
    backend: str = "auto",
    block_size: int = 64,
    recompute: bool = False,
    padded: bool = False,
    fused_gate_up: tuple[torch.Tensor, str] | None = None,
) -> torch.Tensor:
    """Every expert's FFN over a routing plan, on the backend chosen once here; ``weights=None``: unweighted.

    The one entry point of the layers (dMoE, the expert-parallel layer's local experts,
    the transformers integration): ``backend`` is resolved for this device, dtype and
    shape (:mod:`blocksparse_moe.backends.select`), then one sibling computes:

    * ``grouped``: grouped GEMMs over the sorted rows (:mod:`~blocksparse_moe.backends.grouped`);
      ``fused_gate_up=(w13, "concat" | "interleave")`` hands it a model's fused
      ``[E, H, 2F]`` gate/up tensor whole (``w1``/``v1`` are then its halves, for the
      other backends). It always recomputes the activation in backward.
    * ``triton`` / ``torch``: the block-sparse layout (:mod:`~blocksparse_moe.backends.block`),
      with ``block_size`` and ``recompute`` (keep only the pre-activations).
    * ``persistent``: SwiGLU (``v1``, ``activation="silu"``) without padding on the persistent
      kernels (:mod:`~blocksparse_moe.backends.persistent_ffn`), at ``block_size``; it always
      keeps only the pre-activations (``recompute`` changes nothing).

    ``padded``: rows past ``plan.expert_offsets[-1]`` belong to no expert (the
    expert-parallel capacity mode) and contribute zero.
    """
    name = activation_name(activation)
    backend = ops.resolve_backend(backend, x.device, x.dtype, plan.num_experts, w1.shape[2], hidden=x.shape[1],
                                  top_k=plan.top_k, glu=v1 is not None,
                                  persistent_ok=persistent_unsupported(v1 is not None, name, padded) is None)  # fmt: skip
    if backend == "persistent":
        return persistent_ffn(x, plan, weights, w1, w2, v1, name, block_size=block_size, padded=padded)
    if backend != "grouped":
        act = get_activation(activation)
        return block_ffn(x, plan, weights, w1, w2, v1, act, backend=backend, block_size=block_size,
                         recompute=recompute, padded=padded)  # fmt: skip
    if name is None:  # a callable of the user's: differentiable products, the activation in torch
        act = get_activation(activation)
        return grouped_ffn_composed(x, plan, weights, w1, w2, v1, activation=act, padded=padded)
    if fused_gate_up is not None:
        w13, layout = fused_gate_up
        return grouped_ffn(x, plan, weights, w13, w2, activation=name, layout=layout, padded=padded)
    return grouped_ffn(x, plan, weights, w1, w2, v1, activation=name, padded=padded)


def expert_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    topo: Topology,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None = None,
    activation: str | Callable = "gelu",
    backend: str = "auto",
) -> torch.Tensor:
    """The block-sparse FFN of every expert over a routing plan and topology built once by the caller.

    A block backend only (``triton``, ``torch``; ``"auto"`` is Triton on CUDA, torch
    elsewhere): the topology is its metadata. :func:`routed_ffn` picks any backend.
    """
    backend = ops.resolve_block_backend(backend, x.device)
    return block_ffn(x, plan, weights, w1, w2, v1, get_activation(activation), backend=backend, topo=topo)


def moe_ffn(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None = None,
    *,
    activation: str | Callable = "gelu",
    block_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """Dropless MoE FFN: ``x [T, H]``, ``expert_ids [T, k]`` (integers), ``weights [T, k]``,
    ``w1 [E, H, ffn]``, ``w2 [E, ffn, H]``, optional ``v1 [E, H, ffn]`` -> ``[T, H]``.

    Differentiable in ``x``, ``weights``, ``w1``, ``w2`` and ``v1``. ``backend``:
    ``"auto"`` (grouped GEMMs on CPU, Triton or grouped on CUDA by measured shape),
    ``"grouped"``, ``"triton"``, ``"persistent"`` (SwiGLU only) or ``"torch"``
    (see :mod:`blocksparse_moe.backends.select`).
    No host sync on CUDA with the Triton backend (the torch backend reads counts back;
    see :mod:`blocksparse_moe.reference`).
    """
    check_ffn_args(x, expert_ids, weights, w1, w2, v1, block_size)
    # once, before any work: a bad name is refused here, and the result is what routed_ffn would pick
    get_activation(activation)
    name = activation_name(activation)
    backend = ops.resolve_backend(backend, x.device, x.dtype, w1.shape[0], w1.shape[2], hidden=x.shape[1],
                                  top_k=expert_ids.shape[1], glu=v1 is not None,
                                  persistent_ok=persistent_unsupported(v1 is not None, name) is None)  # fmt: skip
    if backend == "grouped":
        y = one_token_or_none(x, expert_ids, weights, w1, w2, v1, activation)  # a decode step on a CPU
        if y is not None:
            return y
    plan = plan_routing(expert_ids, w1.shape[0])
    return routed_ffn(x, plan, weights, w1, w2, v1, activation, backend=backend, block_size=block_size)

"""The dropless expert FFN with the extras that model code carries: biases, a custom gate, a per-expert post op.

``moe_ffn`` / ``expert_ffn`` compute ``act(x @ w1[e]) [* (x @ v1[e])] @ w2[e]`` and
nothing else. Models add, per expert:

- a bias on the first layer (``b1``, and ``bv`` on the up half of a GLU). It sits
  *inside* the activation, so it cannot be applied to the combined output. It is
  added to the block-sparse intermediate instead: block ``i`` belongs to column
  block ``column_indices[i] = e * F + f``, so its bias is the ``bs``-wide slice
  ``f`` of ``b1[e]``, broadcast over the block's rows. That is one gather of
  ``capacity * bs`` values and one broadcast add, no copy of any weight. (The
  other option, a ones column appended to ``x`` and the bias appended to ``w1``
  as an extra row, needs a copy of ``w1`` every call.) Padding rows of a block
  get the bias too; they are never read into an output row, and their gradient
  is zero because SDD writes zeros there, so the bias gradient is exact.
- a custom gate ``gate(h1, h3) -> h`` in place of ``act(h1) * h3`` (clamped
  SwiGLU, ``(up + 1) * glu``, ...). It runs on the block data, so it must be
  elementwise in the pair ``(h1, h3)``, which every gate of this kind is.
- a bias on the second layer (``b2``): added to each expert-ordered output row
  as ``b2[sorted_expert]`` before the routing weights, which is the same as
  ``sum_j w[t, j] * b2[ids[t, j]]`` after combine.
- ``post(rows) -> rows``: a row-wise op on each (token, expert) output before
  it is weighted, e.g. a post-expert norm or token dropout.

With none of these it is exactly :func:`~blocksparse_moe.functional.routed_ffn`. On the
grouped backend the intermediate is rows ``[S, ffn]``, not blocks, and the extras are
plain row ops there (:func:`~blocksparse_moe.backends.grouped.grouped_ffn_composed`);
what follows is how the block backends place them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..backends.grouped_composed import grouped_ffn_composed
from ..backends.grouped_one_token import one_token_or_none
from ..functional import check_ffn_args, routed_ffn
from ..backends.select import persistent_unsupported
from ..reference import activation_name, get_activation
from ..routing import plan_routing
from ..topology import Topology, build_topology

__all__ = ["dropless_ffn", "block_bias"]


def block_bias(bias: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``bias [E, ffn]`` laid out like the block data: ``[capacity, 1, bs]``, zero on spare blocks."""
    E, ffn = bias.shape
    bs, nf = topo.block_size, topo.ffn_blocks
    table = F.pad(bias, (0, nf * bs - ffn)).reshape(E * nf, bs)
    table = torch.cat([table, table.new_zeros(1, bs)])  # column index E*F marks a spare block
    return table[topo.column_indices.long()].unsqueeze(1)


def _check_bias(name: str, b: torch.Tensor | None, shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor | None:
    if b is None:
        return None
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(b).__name__}")
    if tuple(b.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(b.shape)}")
    if b.device != x.device:
        raise ValueError(f"{name} is on {b.device} but x is on {x.device}; expected one device")
    return b if b.dtype == x.dtype else b.to(x.dtype)  # a bias-sized cast at most


def dropless_ffn(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None = None,
    *,
    b1: torch.Tensor | None = None,
    bv: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str | Callable = "gelu",
    gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    block_size: int = 64,
    backend: str = "auto",
    fused_gate_up: tuple[torch.Tensor, str] | None = None,
) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * post(FFN_{ids[t, j]}(x[t]))`` with biases and an optional custom gate.

    Shapes as :func:`~blocksparse_moe.moe_ffn` (weights read through their strides),
    plus ``b1``/``bv [E, ffn]`` and ``b2 [E, H]``. ``FFN_e(x) = g(x @ w1[e] + b1[e],
    x @ v1[e] + bv[e]) @ w2[e] + b2[e]`` with ``g = gate`` if given, else
    ``act(h1) * h3`` (GLU) or ``act(h1)`` (no ``v1``; ``gate`` and ``bv`` need ``v1``).
    Differentiable in ``x``, ``weights`` and every weight and bias.
    """
    check_ffn_args(x, expert_ids, weights, w1, w2, v1, block_size)
    E, H, ffn = w1.shape
    b1 = _check_bias("b1", b1, (E, ffn), x)
    bv = _check_bias("bv", bv, (E, ffn), x)
    b2 = _check_bias("b2", b2, (E, H), x)
    if v1 is None and (gate is not None or bv is not None):
        raise ValueError("gate and bv apply to the up projection of a GLU: they need v1")
    act = get_activation(activation)
    plain = b1 is None and bv is None and b2 is None and gate is None and post is None
    why_not_persistent = persistent_unsupported(v1 is not None, activation_name(activation))
    backend = ops.resolve_backend(backend, x.device, x.dtype, E, ffn, hidden=H, top_k=expert_ids.shape[1],
                                  glu=v1 is not None, persistent_ok=plain and why_not_persistent is None)  # fmt: skip
    if backend == "persistent" and not plain:
        raise ValueError("backend='persistent' computes the plain SwiGLU FFN only; these experts have biases, a "
                         "custom gate or a post function: use backend='auto', 'triton' or 'grouped'")  # fmt: skip
    if plain and backend == "grouped":  # a decode step on a CPU: no routing plan (.backends.grouped_one_token)
        y = one_token_or_none(x, expert_ids, weights, w1, w2, v1, activation, fused_gate_up)
        if y is not None:
            return y
    plan = plan_routing(expert_ids, E)
    if plain:
        return routed_ffn(x, plan, weights, w1, w2, v1, activation, backend=backend, block_size=block_size,
                          fused_gate_up=fused_gate_up)  # fmt: skip
    if backend == "grouped":
        return grouped_ffn_composed(x, plan, weights, w1, w2, v1, activation=act, b1=b1, bv=bv, b2=b2,
                                    gate=gate, post=post)  # fmt: skip
    topo = build_topology(plan, ffn, block_size)
    xs = ops.gather(x, plan, backend)
    h1 = ops.sdd(xs, w1, topo, backend)
    if b1 is not None:
        h1 = h1 + block_bias(b1, topo)
    if v1 is None:
        h = act(h1)
    else:
        h3 = ops.sdd(xs, v1, topo, backend)
        if bv is not None:
            h3 = h3 + block_bias(bv, topo)
        h = gate(h1, h3) if gate is not None else act(h1) * h3
    ys = ops.dsd(h.to(w2.dtype).contiguous(), w2, topo, backend)
    if b2 is not None:
        ys = ys + b2[plan.sorted_expert.long()]
    if post is not None:
        ys = post(ys).to(x.dtype)
    return ops.combine(ys, plan, weights, backend)

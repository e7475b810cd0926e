"""The grouped backend's decode step: one token on a CPU, in inference, without a routing plan.

A decode step routes one token to its ``k`` experts. The general path sorts the ``k``
choices (``plan_routing``: a dozen small ops), builds the products' bounds over all ``E``
experts, gathers the token ``k`` times and scatters the rows back; for one token all of
that is bookkeeping around ``2k`` matrix-vector products that stream the chosen
experts' weights from memory. This path reads the ``k`` expert ids once (a CPU tensor:
no sync), runs the products for the token's row straight into one ``[k, 2F]`` and one
``[k, H]`` buffer, and sums the ``k`` rows::

    pre[j] = x @ w13[e_j]                         one product per expert (or w1, v1)
    h      = act(gate) [* up] * w[j]              one pass, routing weight folded in
    y      = sum_j h[j] @ w2[e_j]                 one product per expert, a row sum

Measured on a 2-core Xeon VM (2026-12-03), a one-token forward of a Qwen3-MoE-shaped
model (4 layers, hidden 512, 64 experts, top-8), interleaved with transformers'
``grouped_mm`` experts, 60 rounds, three runs: 1.16 / 1.18 / 1.16 of transformers'
speed with this path, 0.97 / 0.99 / 0.97 through the plan.

It is taken by :func:`one_token_applies`: one token, CPU tensors, eager and nothing to
differentiate (the general path's custom ops exist for autograd and ``torch.compile``),
an activation known by name. Products as the CPU loops take them
(:class:`~.grouped_mm.GroupedProducts`): ``torch.mm``, or row dots where
:func:`~.grouped_mm.row_dots_pay`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import activation_name
from ..routing import _validate_expert_ids
from .grouped import ACTIVATION_NAMES, _act_fwd, _compute_dtype, _eager_inference, _split_gate_up
from .grouped_mm import row_dots_pay

__all__ = ["one_token_applies", "one_token_ffn", "one_token_or_none"]

Tensor = torch.Tensor


def one_token_applies(x: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, v1: Optional[Tensor], activation) -> bool:
    """Whether :func:`one_token_ffn` serves this call (see the module docstring)."""
    # Compiling first: under torch.compile the row count may be symbolic, and comparing it
    # with 1 would add a guard (a recompile at one token) for a path compiled code never takes.
    if torch.compiler.is_compiling():
        return False
    return (x.shape[0] == 1 and x.device.type == "cpu" and isinstance(activation, str)
            and activation in ACTIVATION_NAMES and _eager_inference(x, weights, w1, w2, v1))  # fmt: skip


def _row_product(a_row: Tensor, b: Tensor, out_row: Tensor, dots: bool) -> None:
    """``out_row = a_row @ b`` for one row: a matrix-vector product, or row dots against ``b^T``."""
    if dots:  # b [K, N] stored [N, K]: its N rows dotted with a_row, on every intra-op thread
        torch.linalg.vecdot(b.t(), a_row[0], out=out_row[0])
    else:
        torch.mm(a_row, b, out=out_row)


def _dots(b: Tensor) -> bool:
    return b.stride(1) == 1 and b.dtype in (torch.float32, torch.float64) and row_dots_pay()


def one_token_ffn(x: Tensor, expert_ids: Tensor, weights: Tensor, w1: Tensor, w2: Tensor,
                  v1: Optional[Tensor] = None, *, activation: str, layout: str) -> Tensor:  # fmt: skip
    """``y = sum_j weights[0, j] * FFN_{expert_ids[0, j]}(x[0])`` for ``x [1, H]``: ``[1, H]``.

    ``w1``, ``v1``, ``w2`` and ``layout`` as :func:`~.grouped.grouped_ffn` takes them (a fused
    ``[E, H, 2F]`` gate/up with ``concat``/``interleave``), any strides. A repeated expert
    id counts once per choice, as on the general path.
    """
    E = w1.shape[0]
    _validate_expert_ids(expert_ids, E)  # the checks plan_routing makes, with its messages
    ids = expert_ids.reshape(-1).tolist()  # host read: a CPU tensor (one_token_applies), no sync
    for e in ids:
        if not 0 <= e < E:
            raise ValueError(f"expert_ids must lie in [0, num_experts={E}), found {e}")  # as _check_id_range
    k = len(ids)
    separate = layout == "separate"
    pre1 = x.new_empty(k, w1.shape[2])
    pre3 = x.new_empty(k, v1.shape[2]) if separate else x.new_empty(0)
    d1, d3, d2 = _dots(w1), separate and _dots(v1), _dots(w2)
    for j, e in enumerate(ids):
        _row_product(x, w1[e], pre1[j : j + 1], d1)
        if separate:
            _row_product(x, v1[e], pre3[j : j + 1], d3)
    g, u = _split_gate_up(pre1, pre3, layout)
    cd = _compute_dtype(x.dtype)  # elementwise in fp32 for half inputs, as the general path
    h = _act_fwd(activation, g.to(cd))
    if u is not None:
        h = h.mul_(u) if h.dtype == u.dtype else h.mul_(u.to(cd))
    h = h.mul_(weights.reshape(k, 1).to(cd)).to(x.dtype)
    ys = x.new_empty(k, w2.shape[2])
    for j, e in enumerate(ids):
        _row_product(h[j : j + 1], w2[e], ys[j : j + 1], d2)
    y = ys.sum(0, keepdim=True, dtype=cd)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def one_token_or_none(x: Tensor, expert_ids: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, v1: Optional[Tensor],
                      activation, fused_gate_up: Optional[tuple] = None) -> Optional[Tensor]:  # fmt: skip
    """:func:`one_token_ffn`'s result where :func:`one_token_applies` (the grouped backend resolved), else ``None``.

    ``activation`` a name or a module :func:`~blocksparse_moe.reference.activation_name`
    knows; ``fused_gate_up=(w13, "concat" | "interleave")`` as ``routed_ffn`` takes it.
    """
    name = activation_name(activation)
    if name is None or not one_token_applies(x, weights, w1, w2, v1, name):
        return None
    if fused_gate_up is not None:
        w13, layout = fused_gate_up
        return one_token_ffn(x, expert_ids, weights, w13, w2, activation=name, layout=layout)
    return one_token_ffn(x, expert_ids, weights, w1, w2, v1, activation=name, layout="mlp" if v1 is None else "separate")

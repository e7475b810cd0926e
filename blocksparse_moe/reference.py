"""Pure-torch references: the dense oracle and the torch backend of the block-sparse ops.

One copy, imported by the tests, the benchmarks and :mod:`blocksparse_moe.ops`
(``backend="torch"``). Everything here is differentiable through ordinary torch
autograd and runs in any dtype, float64 included.

The torch backend loops over experts on the host: it reads the per-expert counts
back (``.tolist()``), free on CPU, one sync per op on an accelerator, and one graph
break per op under ``torch.compile``. It is a readable statement of what the Triton
kernels compute (tests compare the kernels' block data against it), not a fast path:
``backend="auto"`` never picks it (the CPU path is the ``grouped`` backend).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F_

from .routing import RoutingPlan
from .topology import Topology

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "activation_name",
    "moe_ffn_dense",
    "sdd_torch",
    "dsd_torch",
    "dsd_t_torch",
    "gather_torch",
    "combine_torch",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F_.gelu,
    "gelu_tanh": lambda t: F_.gelu(t, approximate="tanh"),
    "silu": F_.silu,
    "relu": F_.relu,
}


def get_activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Resolve an activation name (``gelu``, ``gelu_tanh``, ``silu``, ``relu``) or pass a callable through."""
    if callable(activation):
        return activation
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}"
        ) from None


def activation_name(activation) -> str | None:
    """The :data:`ACTIVATIONS` name of ``activation`` (a name, one of its functions, or a module

    that computes exactly it: ``nn.SiLU``, ``nn.ReLU``, ``nn.GELU``, transformers'
    ``SiLUActivation`` / ``GELUActivation`` / ``GELUTanh``), or ``None`` for anything else.
    Fused paths that need the activation's derivative in closed form take only these.
    """
    if isinstance(activation, str):
        return activation if activation in ACTIVATIONS else None
    for name, fn in ACTIVATIONS.items():
        if activation is fn:
            return name
    kind = type(activation).__name__
    if kind in ("SiLU", "SiLUActivation"):
        return "silu"
    if kind == "ReLU" and not getattr(activation, "inplace", False):
        return "relu"
    if kind == "GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(activation, "approximate", None))
    inner = getattr(activation, "act", None)  # transformers' wrappers hold the torch function
    if kind == "GELUActivation" and inner is F_.gelu:
        return "gelu"
    if kind == "GELUTanh" and getattr(inner, "func", None) is F_.gelu and getattr(inner, "keywords", {}) == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def moe_ffn_dense(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    v1: torch.Tensor | None = None,
    activation: str | Callable = "gelu",
) -> torch.Tensor:
    """The oracle: ``y[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])``, one expert at a time.

    ``x [T, H]``, ``expert_ids [T, k]``, ``weights [T, k]``, ``w1 [E, H, ffn]``,
    ``w2 [E, ffn, H]``, optional ``v1 [E, H, ffn]`` (GLU: ``act(x@w1) * (x@v1)``).
    Computes in the dtype it is given: pass float64 for a reference.
    """
    act = get_activation(activation)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, choice = (expert_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = act(xe @ w1[e])
        if v1 is not None:
            h = h * (xe @ v1[e])
        out = out.index_add(0, tok, (h @ w2[e]) * weights[tok, choice, None].to(x.dtype))
    return out


def _expert_ranges(topo: Topology) -> list[tuple[int, int, int, int]]:
    """Per expert: (first sorted row, rows, first block, blocks), read back to the host."""
    if topo.expert_offsets.device.type == "meta":
        raise ValueError(
            "backend='torch' loops over the experts on the host and reads their counts, which tensors on the "
            "meta device do not hold; use backend='grouped' or backend='triton' for meta tensors"
        )
    rows = topo.expert_offsets.tolist()  # host read: the torch backend loops over experts on the host
    block_rows = topo.expert_block_offsets.tolist()  # the same host read, for the block rows
    F = topo.ffn_blocks
    return [
        (rows[e], rows[e + 1] - rows[e], block_rows[e] * F, (block_rows[e + 1] - block_rows[e]) * F)
        for e in range(topo.num_experts)
    ]


def _rows_to_blocks(h: torch.Tensor, b: int, F: int) -> torch.Tensor:
    """``[c, ffn]`` rows of one expert -> its ``[ceil(c/b) * F, b, b]`` blocks (zero padded)."""
    c, n = h.shape
    nb = -(-c // b)
    h = F_.pad(h, (0, F * b - n, 0, nb * b - c))
    return h.reshape(nb, b, F, b).permute(0, 2, 1, 3).reshape(nb * F, b, b)


def _blocks_to_rows(blocks: torch.Tensor, c: int, n: int, b: int, F: int) -> torch.Tensor:
    """Inverse of :func:`_rows_to_blocks`: ``[nb * F, b, b]`` -> ``[c, n]`` (padding dropped)."""
    nb = blocks.shape[0] // F
    return blocks.reshape(nb, F, b, b).permute(0, 2, 1, 3).reshape(nb * b, F * b)[:c, :n]


def _per_expert(topo: Topology, a: torch.Tensor, b: torch.Tensor, rows_of_a: bool):
    """``a`` split once into the experts' pieces (rows, or blocks plus the spare tail), ``b`` unbound once.

    Why once: indexing ``b[e]`` or slicing ``a[start:end]`` per expert inside autograd
    gives every piece's gradient as a zero tensor of the *whole* input that is then
    summed, O(E^2) work and memory; ``split``/``unbind`` have one backward that
    concatenates/stacks, O(E).
    """
    ranges = _expert_ranges(topo)
    sizes = [c for _, c, _, _ in ranges] if rows_of_a else [n for _, _, _, n in ranges]
    # the tail no expert owns: spare blocks, or a padded plan's rows (zip drops it below)
    sizes.append(a.shape[0] - sum(sizes))
    return ranges, a.split(sizes), b.unbind(0)


def sdd_torch(a: torch.Tensor, b: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``data[blocks of expert e] = blocks(a[rows of e] @ b[e])``; spare blocks are zero.

    ``a [S, K]`` sorted rows, ``b [E, K, N]`` with ``N = topo.ffn_size`` -> ``[capacity, bs, bs]``.
    """
    bs, F = topo.block_size, topo.ffn_blocks
    _, rows, mats = _per_expert(topo, a, b, rows_of_a=True)
    # Empty experts still contribute a zero-size product: it keeps every input in the
    # autograd graph, so unused weights get zero gradients rather than None.
    pieces = [_rows_to_blocks(r @ m, bs, F) for r, m in zip(rows, mats)]
    used = sum(p.shape[0] for p in pieces)
    pieces.append(a.new_zeros(topo.capacity - used, bs, bs))
    return torch.cat(pieces)


def dsd_torch(data: torch.Tensor, b: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``out[rows of e] = rows(data of e) @ b[e]``: ``data [capacity, bs, bs]``, ``b [E, ffn, N]`` -> ``[S, N]``."""
    bs, F, n = topo.block_size, topo.ffn_blocks, topo.ffn_size
    ranges, blocks, mats = _per_expert(topo, data, b, rows_of_a=False)
    pieces = [_blocks_to_rows(blk, c, n, bs, F) @ m for (_, c, _, _), blk, m in zip(ranges, blocks, mats)]
    return torch.cat(pieces)


def dsd_t_torch(data: torch.Tensor, d: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``out[e] = rows(data of e)^T @ d[rows of e]``: the weight-gradient product, ``[E, ffn, N]``."""
    bs, F, n = topo.block_size, topo.ffn_blocks, topo.ffn_size
    ranges = _expert_ranges(topo)
    blocks = data.split([nb for _, _, _, nb in ranges] + [data.shape[0] - sum(nb for _, _, _, nb in ranges)])
    rows = d.split([c for _, c, _, _ in ranges] + [d.shape[0] - sum(c for _, c, _, _ in ranges)])
    out = [_blocks_to_rows(blk, c, n, bs, F).T @ r for (_, c, _, _), blk, r in zip(ranges, blocks, rows)]
    return torch.stack(out)


def gather_torch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """``x_sorted[i] = x[sorted_to_slot[i] // k]``: tokens into expert order, ``[S, H]``."""
    return x[(plan.sorted_to_slot // plan.top_k).long()]


def combine_torch(y_sorted: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * y_sorted[slot_to_sorted[t*k + j]]`` (fp32 accumulation)."""
    rows = y_sorted[plan.slot_to_sorted.long()].reshape(plan.num_tokens, plan.top_k, y_sorted.shape[1])
    acc = rows.float() if y_sorted.dtype in (torch.float16, torch.bfloat16) else rows
    if weights is not None:
        acc = acc * weights.to(acc.dtype)[..., None]
    return acc.sum(1).to(y_sorted.dtype)

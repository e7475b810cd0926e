"""Routing metadata: which sorted row holds which (token, choice) slot, and back.

Glossary (``T`` tokens, ``k`` choices per token, ``E`` experts, ``S = T * k`` slots):

slot
    One (token, choice) pair, numbered ``slot = token * k + choice``: the row-major
    flattening of the router's ``[T, k]`` outputs.
sorted position
    A row of the expert-ordered buffer ``x_sorted [S, hidden]``. Rows of expert 0
    come first, then expert 1, ...; inside one expert, slots keep their original
    order (the sort is stable), so token order is preserved per expert.

Every array lives on the device of the expert ids and is built with torch ops that
never read a value back to the host (sort, searchsorted, scatter), so a forward
pass built on it can be captured by CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingPlan", "plan_routing"]

# Sorted positions are stored in int32; the kernels widen them to int64 before
# multiplying by a stride, so only the count of slots itself must fit.
_MAX_SLOTS = 2**31 - 1


@dataclass(frozen=True)
class RoutingPlan:
    """Stable sort of the router's top-k choices by expert.

    Attributes (direction of each index in brackets):
        num_tokens: ``T``.
        top_k: ``k``.
        num_experts: ``E``.
        sorted_to_slot: ``[S] int32`` [sorted position -> slot]. The token of a
            sorted row is ``sorted_to_slot // k``.
        slot_to_sorted: ``[S] int32`` [slot -> sorted position], the inverse
            permutation: ``sorted_to_slot[slot_to_sorted[s]] == s``.
        sorted_expert: ``[S] int32`` [sorted position -> expert], non-decreasing.
        tokens_per_expert: ``[E] int32`` rows routed to each expert (a token that
            picks one expert twice counts twice).
        expert_offsets: ``[E + 1] int32`` [expert -> first sorted position];
            expert ``e`` owns sorted rows ``expert_offsets[e]:expert_offsets[e+1]``
            and ``expert_offsets[E] == S``.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    sorted_to_slot: torch.Tensor
    slot_to_sorted: torch.Tensor
    sorted_expert: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor

    @property
    def num_slots(self) -> int:
        """``S = T * k``, the rows of the expert-ordered buffer."""
        return self.num_tokens * self.top_k

    @property
    def device(self) -> torch.device:
        return self.sorted_to_slot.device


def _validate_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(
            f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}; "
            "expected the indices returned by torch.topk"
        )
    if expert_ids.dim() != 2:
        raise ValueError(
            f"expert_ids must have shape [tokens, top_k], got shape {tuple(expert_ids.shape)}"
        )
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    top_k = expert_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k (expert_ids.shape[1]) must be in [1, num_experts={num_experts}], got {top_k}"
        )
    if expert_ids.numel() > _MAX_SLOTS:
        raise ValueError(
            f"tokens * top_k = {expert_ids.numel()} exceeds the int32 index range ({_MAX_SLOTS})"
        )


def _check_id_range(expert_ids: torch.Tensor, num_experts: int, validate_ids: bool | None) -> None:
    """Reject ids outside ``[0, E)``: they would leave rows that no expert computes.

    On CPU the check is free and raises ValueError. On an accelerator (or while
    torch.compile traces) raising needs a host read, so by default a device-side
    assertion (``torch._assert_async``) guards it instead: no sync, still no silent
    wrong result. ``validate_ids=True`` pays for one host read to get the ValueError.
    """
    if expert_ids.numel() == 0 or validate_ids is False:
        return
    # Runs inside the plan op, so always eagerly, also under torch.compile.
    if expert_ids.device.type == "cpu" or validate_ids:
        lo, hi = (int(v) for v in torch.aminmax(expert_ids))  # host read: CPU, or requested
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_ids must lie in [0, num_experts={num_experts}), found {lo if lo < 0 else hi}"
            )
    else:
        in_range = (expert_ids.min() >= 0) & (expert_ids.max() < num_experts)
        torch._assert_async(in_range, "expert_ids out of range [0, num_experts)")


# One custom op: under torch.compile the plan is a single opaque node (its sizes are
# known from the input's shape), rather than a dozen traced index ops for Inductor to
# generate and compile code for. The id-range check runs inside it, at run time.
def _plan_impl(expert_ids: torch.Tensor, num_experts: int, validate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_id_range(expert_ids, num_experts, {0: None, 1: True, 2: False}[validate])
    device = expert_ids.device
    flat = expert_ids.reshape(-1).to(torch.int32)
    sorted_expert, order = torch.sort(flat, stable=True)  # order: int64, the scatter's index as it is
    sorted_to_slot = order.to(torch.int32)
    num_slots = flat.numel()
    slot_to_sorted = torch.empty_like(sorted_to_slot)
    slot_to_sorted.scatter_(0, order, torch.arange(num_slots, device=device, dtype=torch.int32))
    # searchsorted over the sorted ids gives every expert's first row without
    # bincount, which reads its output size back to the host on CUDA.
    boundaries = torch.arange(num_experts + 1, device=device, dtype=torch.int32)
    expert_offsets = torch.searchsorted(sorted_expert, boundaries, out_int32=True)
    return sorted_to_slot, slot_to_sorted, sorted_expert, expert_offsets


_plan_op = torch.library.custom_op("blocksparse_moe::plan_routing", mutates_args=())(_plan_impl)


@_plan_op.register_fake
def _(expert_ids, num_experts, validate):
    S = expert_ids.numel()
    new = lambda n: expert_ids.new_empty(n, dtype=torch.int32)  # noqa: E731
    return new(S), new(S), new(S), new(num_experts + 1)


def plan_routing(
    expert_ids: torch.Tensor, num_experts: int, *, validate_ids: bool | None = None
) -> RoutingPlan:
    """Sort the router's choices ``expert_ids [T, k]`` by expert (stably).

    Args:
        expert_ids: integer tensor ``[T, k]``, e.g. the indices of ``torch.topk``.
        num_experts: ``E``; every id must lie in ``[0, E)``.
        validate_ids: how to check the id range. ``None`` (default): ValueError on
            CPU, a device-side assertion elsewhere (no host sync). ``True``: always a
            ValueError, paying one host read on an accelerator. ``False``: no check.

    Returns:
        The :class:`RoutingPlan`; nothing in it was read back to the host.
    """
    _validate_expert_ids(expert_ids, num_experts)
    num_tokens, top_k = expert_ids.shape
    validate = {None: 0, True: 1, False: 2}[validate_ids]
    # Eager, on a plain tensor with data, the body runs as a function: the op (there for torch.compile
    # and fake/meta tensors; the plan has no gradient) would only add the dispatcher's ~20 us, a
    # tenth of a decode step's expert call.
    direct = type(expert_ids) is torch.Tensor and not expert_ids.is_meta and not torch.compiler.is_compiling()
    plan_fn = _plan_impl if direct else _plan_op
    sorted_to_slot, slot_to_sorted, sorted_expert, expert_offsets = plan_fn(expert_ids, num_experts, validate)
    return RoutingPlan(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        sorted_to_slot=sorted_to_slot,
        slot_to_sorted=slot_to_sorted,
        sorted_expert=sorted_expert,
        tokens_per_expert=expert_offsets[1:] - expert_offsets[:-1],
        expert_offsets=expert_offsets,
    )

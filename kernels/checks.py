"""Argument checks shared by the launchers: clear errors before any launch.

Every message names the operation, the argument, what it got and what was expected,
so a bad call fails in Python instead of reading past a buffer on the device.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, dim: int | None = None) -> None:
    """``t`` is a floating tensor of a supported dtype (and rank ``dim`` if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype float32, float16 or bfloat16, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_same(op: str, named: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """All tensors share one dtype and one device (``device`` too, if given)."""
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; expected one dtype")
    for name, t in items:
        if t.device != (device or first.device):
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name if device is None else 'the routing metadata'} "
                f"is on {device or first.device}; expected one device"
            )


def check_block_args(op: str, rows: torch.Tensor, experts: torch.Tensor, topo, rows_name: str, expert_name: str) -> None:
    """Rows ``[S, *]`` in sorted order and per-expert dense ``[E, *, *]`` against ``topo``."""
    check_tensor(op, rows_name, rows, dim=2)
    check_tensor(op, expert_name, experts, dim=3)
    check_same(op, {rows_name: rows, expert_name: experts}, device=topo.device)
    if rows.shape[0] != topo.num_slots:
        raise ValueError(
            f"{op}: {rows_name} must have {topo.num_slots} rows (tokens * top_k), got {rows.shape[0]}"
        )
    if experts.shape[0] != topo.num_experts:
        raise ValueError(
            f"{op}: {expert_name} must hold {topo.num_experts} experts in dim 0, got {experts.shape[0]}"
        )


def check_block_data(op: str, name: str, data: torch.Tensor, topo) -> None:
    """Block data ``[capacity, bs, bs]`` for ``topo``."""
    check_tensor(op, name, data, dim=3)
    bs = topo.block_size
    if tuple(data.shape) != (topo.capacity, bs, bs):
        raise ValueError(f"{op}: {name} must have shape {(topo.capacity, bs, bs)}, got {tuple(data.shape)}")
    if not data.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (blocks are read as bs x bs tiles)")

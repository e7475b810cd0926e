"""Helpers shared by the persistent kernels (``sdd_persistent.py``, ``dsd_persistent.py``, ``dsd_t_persistent.py``).

The device tile schedule over output tiles (``schedule_tiles``, one small launch, no
host read), the persistent grid size (``_default_programs``: the SM count on a GPU),
TMA eligibility (``tma_problem``, ``resolve_tma``) and the descriptors' scratch
allocator (``_ensure_allocator``), and the config key check. Moved here from
``sdd_persistent.py`` unchanged; that module re-exports the names it always had.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .config import interpreting
from .tiling import GROUP

_TMA_ALIGN = 16  # bytes: TMA needs a 16-byte aligned base and 16-byte multiple strides
_SCHEDULE_TILE = 1024
DEFAULT_NUM_PROGRAMS_CPU = 4  # under the interpreter: a few programs, so the striding is exercised


@triton.jit
def _schedule_kernel(
    offsets_ptr,  # [R + 1] int32: offsets[R] = active blocks
    schedule_ptr,  # [R * NT] int32 out: tile -> (r << COL_BITS) | c
    R,
    F,
    NT,  # column tiles per block row: cdiv(F, BLOCKS_N)
    COL_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    TILE: tl.constexpr,
):
    """Grid ``(cdiv(R * NT, TILE),)``: the active tiles in grouped order, then the spare ones row-major."""
    t = tl.program_id(0) * TILE + tl.arange(0, TILE)
    valid = t < R * NT
    r_act = tl.load(offsets_ptr + R) // F  # active block rows (all F blocks of a row are active)
    n_act = r_act * NT
    # Grouped order over the r_act active rows (tiling.grouped_tile, with its divisor kept
    # >= 1 on the lanes that are not active tiles and take the spare branch below).
    width = GROUP * NT
    first = (t // width) * GROUP
    rows_here = tl.maximum(tl.minimum(r_act - first, GROUP), 1)
    r_grouped = first + (t % width) % rows_here
    c_grouped = (t % width) // rows_here
    spare = t - n_act
    r = tl.where(t < n_act, r_grouped, r_act + spare // NT)
    c = tl.where(t < n_act, c_grouped, spare % NT)
    tl.store(schedule_ptr + t, (r << COL_BITS) | c, mask=valid)


@triton.jit
def expert_weight_desc(ptr, E, K, N, stride_e, stride_k, stride_n, K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr,
                       BN: tl.constexpr):  # fmt: skip
    """The 3-D TMA descriptor :func:`load_expert_tile` reads an ``[E, K, N]`` expert weight through.

    ``[E, K, N]`` with box ``[1, BLOCK_K, BN]`` when N is contiguous; ``[E, N, K]`` with box
    ``[1, BN, BLOCK_K]`` for a K-contiguous view (``K_MAJOR``: a transposed weight, read in place).
    """
    if K_MAJOR:
        desc = tl.make_tensor_descriptor(ptr, shape=[E, N, K], strides=[stride_e, stride_n, 1],
                                         block_shape=[1, BN, BLOCK_K])  # fmt: skip
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[E, K, N], strides=[stride_e, stride_k, 1],
                                         block_shape=[1, BLOCK_K, BN])  # fmt: skip
    return desc


@triton.jit
def load_expert_tile(desc, ptr, off, e, k0, col0, k_mask, col_mask, stride_k, TMA: tl.constexpr,
                     K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """The ``[BLOCK_K, BN]`` tile at rows ``k0..``, columns ``col0..`` of expert ``e``'s ``[K, N]`` weight.

    By TMA from a 3-D ``[E, K, N]`` descriptor (``[E, N, K]`` for a K-contiguous view,
    ``K_MAJOR``: loaded ``[BN, BLOCK_K]`` and transposed), the box zero-filling past K and
    N; or by masked pointer loads at ``ptr + off`` (``off``: the tile's int64 offsets at
    ``k0 = 0``). The persistent SDDs' K loops load every weight operand through this one.
    """
    if TMA:
        if K_MAJOR:
            t = tl.trans(desc.load([e, col0, k0]).reshape(BN, BLOCK_K))
        else:
            t = desc.load([e, k0, col0]).reshape(BLOCK_K, BN)
    else:
        t = tl.load(ptr + off + k0 * stride_k, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return t


def schedule_tiles(topo, nt: int, what: str) -> torch.Tensor:
    """``[R * nt]`` int32 tiles ``r << COL_BITS | c`` over ``nt`` column tiles, active block rows first (SDD and DSD)."""
    R, F = topo.max_block_rows, topo.ffn_blocks
    col_bits = max(1, (nt - 1).bit_length())
    if R >= 1 << (31 - col_bits):
        raise ValueError(f"{what}: {R} block rows x {nt} column tiles do not pack into an int32 schedule "
                         f"(block rows must be < 2**{31 - col_bits})")  # fmt: skip
    schedule = torch.empty(R * nt, dtype=torch.int32, device=topo.device)
    if R * nt:
        _schedule_kernel[(triton.cdiv(R * nt, _SCHEDULE_TILE),)](
            topo.offsets, schedule, R, F, nt, COL_BITS=col_bits, GROUP=GROUP, TILE=_SCHEDULE_TILE
        )
    return schedule


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_programs(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_PROGRAMS_CPU


def resolve_tma(op: str, use_tma, operand: torch.Tensor, problems: list) -> bool:
    """Whether a persistent kernel loads through TMA; sets the descriptors' allocator when it does.

    ``use_tma=None`` (auto): on a Hopper-or-newer GPU when no operand has a ``problem``
    (:func:`tma_problem`); ``True`` with a problem is a ``ValueError`` naming the operands.
    """
    if use_tma is None:
        use_tma = (operand.is_cuda and not interpreting() and torch.cuda.get_device_capability(operand.device)[0] >= 9
                   and not problems)  # fmt: skip
    elif use_tma and problems:
        raise ValueError(f"{op}: use_tma=True but an operand does not qualify for TMA: " + "; ".join(problems))
    if use_tma:
        _ensure_allocator()
    return bool(use_tma)


def check_config_keys(op: str, cfg: dict, keys: tuple) -> None:
    """A config of a persistent kernel holds only ``keys``: else a ``ValueError`` naming the others."""
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ValueError(f"{op}: config has unknown keys {sorted(unknown)}; expected {', '.join(keys)}")


def tma_problem(name: str, t: torch.Tensor, unit_dim: int) -> str | None:
    """Why ``t`` cannot be read through a TMA descriptor with ``unit_dim`` contiguous, or None if it can."""
    es = t.element_size()
    if t.stride(unit_dim) != 1:
        return f"{name}.stride({unit_dim}) must be 1, got {t.stride(unit_dim)} (strides {tuple(t.stride())})"
    if t.data_ptr() % _TMA_ALIGN:
        return f"{name}'s data pointer must be {_TMA_ALIGN}-byte aligned, got address % {_TMA_ALIGN} = {t.data_ptr() % _TMA_ALIGN}"
    for d in range(t.dim()):
        if d != unit_dim and (t.stride(d) <= 0 or (t.stride(d) * es) % _TMA_ALIGN):
            return (f"{name}.stride({d}) * {es} bytes must be a positive multiple of {_TMA_ALIGN}, "
                    f"got stride {t.stride(d)} (strides {tuple(t.stride())})")  # fmt: skip
    return None


@functools.lru_cache(maxsize=1)
def _ensure_allocator() -> None:
    """Give Triton a scratch allocator for in-kernel tensormaps unless the user set one.

    Runs once per process (the cache; Triton's allocator is itself process state): a user's
    allocator set before the first TMA launch is kept, one set later replaces ours.
    """
    try:  # a ContextVar in triton 3.9, a plain module attribute in some older versions
        from triton.runtime import _allocation

        holder = _allocation._allocator
        current = holder.get() if hasattr(holder, "get") else holder
        unset = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:

        def alloc(size: int, alignment: int, stream):
            device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
            return torch.empty(size, dtype=torch.int8, device=device)

        triton.set_allocator(alloc)

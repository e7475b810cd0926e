"""Tile configurations and the interpreter switch, shared by every kernel.

Under ``TRITON_INTERPRET=1`` (CPU) each kernel gets one pinned, small config: the
interpreter's cost grows with tile size and autotuning there would only time numpy.
On a GPU the autotuner picks among the configs built here, after dropping those whose
pipelined tiles would not fit the shared memory of the device.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton

# Shared memory we allow the software pipeline to use; an H100 gives a block 227 KB.
SHARED_MEMORY_BUDGET = 200 * 1024


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are upcast to fp32 under the interpreter, whose bf16 dot is wrong."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use full-precision dots (Triton would default to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fits(block_m: int, block_n: int, block_k: int, stages: int, elem_bytes: int) -> bool:
    per_stage = (block_m * block_k + block_k * block_n) * elem_bytes
    return per_stage * max(stages - 1, 1) <= SHARED_MEMORY_BUDGET


def _warps_for(tile_elems: int) -> tuple[int, ...]:
    # An fp32 accumulator of tile_elems spread over 32 * warps threads: keep it at
    # or under 128 registers per thread so that nothing spills.
    return tuple(w for w in (4, 8) if tile_elems // (32 * w) <= 128)


def sdd_configs(block: int | None = None, elem_bytes: int = 2) -> list[triton.Config]:
    """Configs for the SDD kernel: the output tile is one ``block x block`` block; BLOCK_K varies."""
    if interpreting():
        # One program per block already; a wide K step means fewer interpreted iterations.
        return [triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1)]
    out = []
    for block_k, stages in itertools.product((32, 64, 128), (2, 3, 4)):
        for warps in _warps_for((block or 128) ** 2):
            if block is None or _fits(block, block, block_k, stages, elem_bytes):
                out.append(triton.Config({"BLOCK_K": block_k}, num_warps=warps, num_stages=stages))
    return out


def dsd_configs(block: int | None = None, elem_bytes: int = 2) -> list[triton.Config]:
    """Configs for DSD and DSD^T: output tile ``block x BLOCK_N``, inner step one block."""
    if interpreting():
        # The interpreter pays per program, not per element: few, wide tiles.
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    out = []
    for block_n, stages in itertools.product((64, 128, 256), (2, 3, 4)):
        for warps in _warps_for((block or 128) * block_n):
            if block is None or _fits(block, block_n, block, stages, elem_bytes):
                out.append(triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return out


def prune_by_block(configs_for):
    """An autotune ``early_config_prune`` keeping the configs ``configs_for(BLOCK, bytes)`` allows."""

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        block = args["BLOCK"]
        elem_bytes = args["b_ptr"].element_size()
        allowed = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs_for(block, elem_bytes)}
        kept = [c for c in configs if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in allowed]
        return kept or configs[:1]

    return prune

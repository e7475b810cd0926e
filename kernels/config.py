"""Tile configurations and the interpreter switch, shared by every kernel.

Under ``TRITON_INTERPRET=1`` (CPU) each kernel gets one pinned, small config: the
interpreter's cost grows with tile size and autotuning there would only time numpy.
On a GPU the autotuner picks among the configs built here for the launch's block size
and element size, after dropping those whose pipelined tiles would not fit the shared
memory of the device or whose tiles would not fit the registers without spilling.
``tests/test_compile_sm90.py`` compiles them for sm_90 and checks both.

``BSMOE_AUTOTUNE=0`` (read when this module is imported) keeps one config per block size
and element size instead of the list: each launch then compiles once and times
nothing. The GPU test run sets it, since its hypothesis examples meet hundreds of
distinct shapes, each of which would otherwise be autotuned; timings want the default.
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


def autotuning() -> bool:
    """False under ``BSMOE_AUTOTUNE=0``: one default config per block and element size."""
    return os.environ.get("BSMOE_AUTOTUNE", "1") != "0"


def needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are upcast to fp32 under the interpreter, whose bf16 dot is wrong."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use full-precision dots (Triton would default to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Candidate tiles, by element size. fp32 also gets smaller tiles and 16 warps: its dot
# runs on the FMA units with the operands in registers (see _registers_fit).
_SDD_BLOCK_K = {2: (32, 64, 128), 4: (16, 32, 64, 128)}
_DSD_BLOCK_N = {2: (64, 128, 256), 4: (16, 32, 64, 128, 256)}
_WARPS = {2: (4, 8), 4: (4, 8, 16)}
_SDD_STAGES = (2, 3, 4)
# SDD tiles of one or two neighbouring blocks (BLOCK x 2*BLOCK: the 128 x 256 tile that
# Hopper GEMMs favour). Two only for blocks of 64 and up: smaller tiles are latency-bound
# and would only add autotuning.
_SDD_BLOCKS_N = {16: (1,), 32: (1,), 64: (1, 2), 128: (1, 2)}
# The DSD kernels walk their operands with affine pointers (an active block row holds
# all F column blocks of its expert in order), so deeper pipelines can prefetch.
_DSD_STAGES = (2, 3, 4)
_BLOCKS = (16, 32, 64, 128)  # topology.SUPPORTED_BLOCK_SIZES
_ELEM_BYTES = (2, 4)


def _fits(block_m: int, block_n: int, block_k: int, stages: int, elem_bytes: int) -> bool:
    # The software pipeline keeps up to `stages` copies of both operand tiles in shared
    # memory (with wgmma on sm_90 all of them: the MMA reads its operands in place).
    per_stage = (block_m * block_k + block_k * block_n) * elem_bytes
    return per_stage * stages <= SHARED_MEMORY_BUDGET


def _registers_fit(m: int, n: int, k: int, warps: int, elem_bytes: int) -> bool:
    """Whether an ``m x n`` output tile with inner step ``k`` on ``warps`` warps fits the registers.

    Calibrated on sm_90 against ``tests/test_compile_sm90.py`` (``cuobjdump`` resource
    usage of every config, both operand layouts).
    """
    threads = 32 * warps
    acc = m * n // threads  # fp32 accumulator registers per thread
    if elem_bytes <= 2:
        # 16-bit operands go through the tensor cores (wgmma / mma.sync) from shared
        # memory: the accumulator is what holds registers, at most 128 per thread. A
        # second warpgroup only where each thread still keeps 32 of it (tiles of
        # 64 x 128 and up): on smaller tiles the extra warps only replicate work.
        return acc <= 128 and (warps == 4 or acc >= 32)
    # fp32 dots are full precision (dot_precision "ieee"): they run on the FMA units,
    # each thread holding its rows of A and columns of B for the whole k step, so the
    # registers follow the multiply-adds per thread per step, m*n*k / threads, more
    # than the accumulator. Up to 2048 fit the 255 registers a thread may have at 4 or
    # 8 warps, 1024 the 128 it gets at 16; past that ptxas spills (kilobytes of stack
    # for 128 x 128 tiles on 4 warps, 200+ bytes for 64x64x128 on 4). More than 4 warps
    # only where each thread keeps 32 accumulators or 2048 of work: with less, ptxas
    # held a 64x64x64 tile on 8 warps to 80 registers and spilled (B read transposed).
    work = m * n * k // threads
    limit = 2048 if threads <= 256 else 1024
    return acc <= 32 and work <= limit and (warps == 4 or acc >= 32 or work >= 2048)


def _default(configs: list[triton.Config], **prefer: int) -> list[triton.Config]:
    """The one config nearest (in log2 steps) to the preferred values, for ``BSMOE_AUTOTUNE=0``."""

    def distance(c: triton.Config) -> tuple:
        have = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        return tuple(abs(have[k].bit_length() - v.bit_length()) for k, v in prefer.items())

    return [min(configs, key=distance)] if configs else configs


def _config_key(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _union(configs_for) -> list[triton.Config]:
    """Every config any supported block size and dtype may use, each once (the autotuner's list)."""
    out, seen = [], set()
    for block in _BLOCKS:
        for elem_bytes in _ELEM_BYTES:
            for c in configs_for(block, elem_bytes):
                if _config_key(c) not in seen:
                    seen.add(_config_key(c))
                    out.append(c)
    return out


def sdd_configs(block: int | None = None, elem_bytes: int = 2) -> list[triton.Config]:
    """Configs for the SDD kernel: the output tile is one ``block x block`` block; BLOCK_K varies.

    ``block=None``: the union over supported block sizes and dtypes, the autotuner's list,
    which ``prune_by_block`` narrows to ``sdd_configs(BLOCK, element size)`` per launch.
    """
    if interpreting():
        return [triton.Config({"BLOCK_K": 32, "BLOCKS_N": 1}, num_warps=4, num_stages=1)]
    if block is None:
        return _union(sdd_configs)
    eb = 4 if elem_bytes >= 4 else 2
    out = []
    for blocks_n, block_k, warps, stages in itertools.product(
        _SDD_BLOCKS_N[block], _SDD_BLOCK_K[eb], _WARPS[eb], _SDD_STAGES
    ):
        n = blocks_n * block
        if _registers_fit(block, n, block_k, warps, eb) and _fits(block, n, block_k, stages, elem_bytes):
            out.append(triton.Config({"BLOCK_K": block_k, "BLOCKS_N": blocks_n}, num_warps=warps, num_stages=stages))
    return out if autotuning() else _default(out, BLOCKS_N=1, BLOCK_K=64, num_stages=3, num_warps=4)


def dsd_configs(block: int | None = None, elem_bytes: int = 2) -> list[triton.Config]:
    """Configs for DSD and DSD^T: output tile ``block x BLOCK_N``, inner step one block.

    ``block=None``: the union over supported block sizes and dtypes (see ``sdd_configs``).
    """
    if interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if block is None:
        return _union(dsd_configs)
    eb = 4 if elem_bytes >= 4 else 2
    out = []
    for block_n, warps, stages in itertools.product(_DSD_BLOCK_N[eb], _WARPS[eb], _DSD_STAGES):
        if _registers_fit(block, block_n, block, warps, eb) and _fits(block, block_n, block, stages, elem_bytes):
            out.append(triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return out if autotuning() else _default(out, BLOCK_N=128, num_stages=2, num_warps=4)


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

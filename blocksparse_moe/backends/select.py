"""Which backend computes the expert FFN: chosen once per call, from device, dtype and shape.

=========  ===================================================================  ==========================
backend    what it is                                                           where ``"auto"`` picks it
=========  ===================================================================  ==========================
grouped    sorted rows stay rows; each projection is one grouped GEMM           CPU (any dtype); CUDA bf16
           (``torch.nn.functional.grouped_mm``) over the expert offsets         on sm_90+ except the
                                                                                shapes below
triton     block-sparse SDD/DSD Triton kernels over the topology                CUDA otherwise
torch      the block-layout reference in pure torch (a host loop over experts)  never: it reads the counts
                                                                                back (one graph break per
                                                                                op under torch.compile)
=========  ===================================================================  ==========================

Why on CUDA only bf16 on sm_90+: there ``grouped_mm`` runs CUTLASS; every other dtype
or GPU takes torch's fallback loop, which copies the offsets to the host (a hidden
sync that breaks CUDA graphs), so Triton is the faster and sync-free choice.

Why the fine-grained exception: the committed H100 layer results
(``benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-22-layers*.json``, bf16, fwd+bwd)
have ``grouped_mm`` ahead of dMoE on Triton at every shape but one, the fine-grained
layer (E=128, ffn=768, top-8: 14.7 ms against 15.6 ms). :data:`TRITON_WINS` holds that
measured shape class; it changes only when a results file says so.
"""

from __future__ import annotations

import torch

__all__ = ["BACKENDS", "BLOCK_BACKENDS", "TRITON_WINS", "resolve_backend", "resolve_block_backend"]

BACKENDS = ("auto", "grouped", "triton", "torch")
#: Backends whose intermediate is the block-sparse layout (``ops.sdd`` / ``ops.dsd``).
BLOCK_BACKENDS = ("triton", "torch")

#: Shape classes where the Triton kernels beat ``grouped_mm`` on a measured Hopper GPU:
#: ``(min_experts, max_ffn)``; see the module docstring for the figures.
TRITON_WINS = ((128, 1024),)


def _interpreting() -> bool:
    from ..kernels.config import interpreting  # lazy: importing kernels imports triton

    return interpreting()


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _cuda_grouped_is_fast(device: torch.device, dtype: torch.dtype | None) -> bool:
    if dtype is not torch.bfloat16 or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    num_experts: int | None = None,
    ffn: int | None = None,
) -> str:
    """``"auto"`` -> the measured-fastest backend for this device, dtype and shape; checks the others can run.

    ``dtype``, ``num_experts`` and ``ffn`` only matter on CUDA (see the module docstring).
    """
    _check_name(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "grouped"
        if not _cuda_grouped_is_fast(device, dtype):
            return "triton"
        fine = any(num_experts is not None and ffn is not None and num_experts >= e and ffn <= f
                   for e, f in TRITON_WINS)  # fmt: skip
        return "triton" if fine else "grouped"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernels on the CPU interpreter, or use backend='grouped'"
        )
    return backend


def resolve_block_backend(backend: str, device: torch.device) -> str:
    """For the block-sparse ops alone: ``"auto"`` -> ``"triton"`` on CUDA, ``"torch"`` elsewhere."""
    _check_name(backend)
    if backend == "grouped":
        raise ValueError(
            "backend='grouped' has no block-sparse intermediate: the block ops (sdd, dsd, dsd_t, gather, "
            f"combine) take one of {('auto',) + BLOCK_BACKENDS}; use moe_ffn / routed_ffn for the grouped FFN"
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return resolve_backend(backend, device)

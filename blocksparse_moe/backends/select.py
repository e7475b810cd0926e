"""Which backend computes the expert FFN: chosen once per call, from device, dtype and shape.

==========  ==================================================================  ===========================
backend     what it is                                                          where ``"auto"`` picks it
==========  ==================================================================  ===========================
grouped     sorted rows stay rows; each projection is one grouped GEMM          CPU (any dtype); CUDA bf16
            (``torch.nn.functional.grouped_mm``) over the expert offsets        on sm_90+ where measured
                                                                                fastest (below)
triton      block-sparse SDD/DSD Triton kernels over the topology               CUDA otherwise
persistent  the SwiGLU FFN on the persistent TMA-fed kernels (issue 15:         CUDA, SwiGLU, no padding,
            fused gather, GLU and routing weights in the epilogues)             where measured fastest
torch       the block-layout reference in pure torch (a host loop over experts) never: it reads the counts
                                                                                back (one graph break per
                                                                                op under torch.compile)
==========  ==================================================================  ===========================

On CUDA ``auto`` follows measurements, not a rule of thumb: ``measured_layers.json``
(:mod:`~blocksparse_moe.backends.measured`, regenerated from the committed results files by
``python -m benchmarks.auto_table``) holds each backend's fwd+bwd layer time per GPU
architecture, dtype and shape; a call takes the fastest backend that can run it at the
measured shape nearest its own. The committed H100 files (``benchmarks/results/
nvidia-h100-80gb-hbm3-2026-11-22-layers*.json``, bf16) have ``grouped_mm`` ahead of
Triton at every shape but the fine-grained layer (E=128, ffn=768, top-8: 15.3 ms against
16.0 ms, mean of uniform and skewed), so that is where Triton is picked; ``persistent``
has no GPU timing yet, so ``auto`` never picks it until a device run adds one.

Where nothing is measured (another architecture or dtype, or a call that does not give
its shape), the rule is: ``grouped`` for bf16 on sm_90/sm_100, else ``triton``. Why only
bf16 on sm_90+: there ``grouped_mm`` runs CUTLASS; every other dtype or GPU takes torch's
fallback loop, which copies the offsets to the host (a hidden sync that breaks CUDA
graphs), so Triton is the faster and sync-free choice (and ``grouped`` is never picked
there from a table either).
"""

from __future__ import annotations

import torch

from .measured import load_timings, nearest_timing

__all__ = ["BACKENDS", "BLOCK_BACKENDS", "persistent_unsupported", "resolve_backend", "resolve_block_backend"]

BACKENDS = ("auto", "grouped", "triton", "persistent", "torch")
#: Backends whose intermediate is the block-sparse layout (``ops.sdd`` / ``ops.dsd``).
BLOCK_BACKENDS = ("triton", "torch")
#: Backends that launch Triton kernels (CUDA, or the CPU interpreter).
TRITON_BACKENDS = ("triton", "persistent")


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


def persistent_unsupported(glu: bool, activation: str | None, padded: bool = False) -> str | None:
    """Why the ``persistent`` backend cannot compute this FFN, or None when it can.

    It is the SwiGLU layer only (``backends/persistent_ffn.py``), and every sorted row
    must belong to an expert (no expert-parallel capacity padding).
    """
    if not glu:
        return "it computes a GLU only: pass v1 (the up projection)"
    if activation != "silu":
        return f"its epilogue computes SwiGLU only: activation must be 'silu', got {activation!r}"
    if padded:
        return "it takes no padding rows (padded=True, the expert-parallel capacity mode)"
    return None


def _auto_cuda(device, dtype, num_experts, ffn, hidden, top_k, glu, persistent_ok) -> str:
    """The fastest backend at the nearest measured shape that can run this call; the rule where none is measured."""
    grouped_fast = _cuda_grouped_is_fast(device, dtype)
    allowed = {"triton"} | ({"grouped"} if grouped_fast else set()) | ({"persistent"} if persistent_ok else set())
    if num_experts is not None and ffn is not None and dtype is not None:
        major, minor = torch.cuda.get_device_capability(device)
        near = nearest_timing(load_timings(), 10 * major + minor, str(dtype).replace("torch.", ""), num_experts,
                              ffn, hidden, top_k, glu)  # fmt: skip
        choice = near.fastest(allowed) if near is not None else None
        if choice is not None:
            return choice
    return "grouped" if grouped_fast else "triton"


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    num_experts: int | None = None,
    ffn: int | None = None,
    *,
    hidden: int | None = None,
    top_k: int | None = None,
    glu: bool = False,
    persistent_ok: bool = False,
) -> str:
    """``"auto"`` -> the measured-fastest backend for this device, dtype and shape; checks the others can run.

    Everything but ``backend`` and ``device`` only matters on CUDA (see the module
    docstring): the shape finds the nearest measured one (unknown sizes are skipped),
    ``persistent_ok`` says the call is one the ``persistent`` backend computes
    (:func:`persistent_unsupported` is None), so ``auto`` may pick it.
    """
    _check_name(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "grouped"
        return _auto_cuda(device, dtype, num_experts, ffn, hidden, top_k, glu, persistent_ok)
    if backend in TRITON_BACKENDS and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernels on the CPU interpreter, or use backend='grouped'"
        )
    return backend


def resolve_block_backend(backend: str, device: torch.device) -> str:
    """For the block-sparse ops alone: ``"auto"`` -> ``"triton"`` on CUDA, ``"torch"`` elsewhere."""
    _check_name(backend)
    if backend in ("grouped", "persistent"):
        raise ValueError(
            f"backend={backend!r} has no block-sparse intermediate: the block ops (sdd, dsd, dsd_t, gather, "
            f"combine) take one of {('auto',) + BLOCK_BACKENDS}; use moe_ffn / routed_ffn for that backend's FFN"
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return resolve_backend(backend, device)

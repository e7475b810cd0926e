"""The shapes each suite runs, and the routings (uniform, skewed) fed to them.

Kernel shapes (``--full``) follow the issue: MegaBlocks' own grid (tokens 16K to 64K,
hidden 1024/2048/4096, ffn 4096/8192, E 8/16/64, top-1/top-2; a curated list that
uses every value at least once, or the whole product with ``--grid``), a
Mixtral-like shape (hidden 4096, ffn 14336, E 8, top-2) and a fine-grained one
(hidden 2048, ffn 768, E 128, top-8). ``--quick`` and ``--smoke`` run tiny shapes
of the same families, so that the CPU (Triton's interpreter, the torch backend)
gets through them in seconds; they exercise the code, they are not measurements
of anything a GPU would do.

Routing:

``uniform``  every token draws its k distinct experts uniformly at random.
``skewed``   expert popularity follows a Zipf law ``p_e ~ (e + 1) ** -1.2`` (experts
             in a random order); a token's k distinct experts are a Gumbel top-k
             sample of it, so a few experts get most rows and some may get none.

The layers route with their own router, so skew there comes from the inputs: see
:func:`layer_inputs`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "KernelShape",
    "LayerShape",
    "ROUTINGS",
    "ZIPF_EXPONENT",
    "kernel_shapes",
    "layer_shapes",
    "layer_inputs",
    "load_stats",
    "make_expert_ids",
]

ROUTINGS = ("uniform", "skewed")
ZIPF_EXPONENT = 1.2
# Skewed layer inputs: x = noise + SKEW_OFFSET * u with one random u shared by all
# tokens, so each expert's logit gets a constant offset SKEW_OFFSET times as large
# as the token-dependent part (for a router with i.i.d. weights).
SKEW_OFFSET = 1.0


@dataclass(frozen=True)
class KernelShape:
    """One expert-FFN size for the kernel products (``S = tokens * top_k`` rows)."""

    name: str
    family: str  # "megablocks" | "mixtral" | "fine-grained"
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    block_size: int = 128

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer (router + experts) for the layer benchmarks."""

    name: str
    family: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    glu: bool = False
    activation: str = "gelu"
    block_size: int = 128

    def asdict(self) -> dict:
        return asdict(self)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 and tokens >= 1024 else str(tokens)


def _mb(tokens, hidden, ffn, experts, top_k) -> KernelShape:
    return KernelShape(
        f"mb-h{hidden}-f{ffn}-e{experts}-k{top_k}-t{_k(tokens)}", "megablocks", tokens, hidden, ffn, experts, top_k
    )


MIXTRAL = KernelShape("mixtral-h4096-f14336-e8-k2-t16K", "mixtral", 16384, 4096, 14336, 8, 2)
FINE_GRAINED = KernelShape("fine-h2048-f768-e128-k8-t16K", "fine-grained", 16384, 2048, 768, 128, 8)

# Every MegaBlocks value appears at least once: tokens 16K/32K/64K, hidden
# 1024/2048/4096, ffn 4096/8192, E 8/16/64, top-1/top-2.
_MEGABLOCKS_CURATED = [
    _mb(16384, 1024, 4096, 8, 1),
    _mb(16384, 1024, 4096, 64, 1),
    _mb(16384, 1024, 4096, 16, 2),
    _mb(16384, 2048, 8192, 64, 1),
    _mb(32768, 2048, 8192, 8, 2),
    _mb(16384, 4096, 8192, 16, 2),
    _mb(65536, 1024, 4096, 64, 2),
    _mb(65536, 2048, 4096, 16, 1),
    _mb(65536, 4096, 4096, 8, 1),
]


def _megablocks_grid() -> list[KernelShape]:
    return [
        _mb(t, h, f, e, k)
        for t, h, f, e, k in itertools.product((16384, 32768, 65536), (1024, 2048, 4096), (4096, 8192), (8, 16, 64), (1, 2))
    ]


# Tiny versions of the three families. Block 128 appears once (stk's kernels only
# run 128 x 128 blocks); the others use small blocks so that the interpreter is quick.
_QUICK_KERNELS = [
    KernelShape("mb-tiny-h128-f256-e4-k1-t128", "megablocks", 128, 128, 256, 4, 1, 128),
    KernelShape("mixtral-tiny-h64-f96-e8-k2-t64", "mixtral", 64, 64, 96, 8, 2, 32),
    KernelShape("fine-tiny-h32-f32-e16-k4-t16", "fine-grained", 16, 32, 32, 16, 4, 16),
]
_SMOKE_KERNELS = [KernelShape("smoke-h32-f64-e4-k2-t32", "megablocks", 32, 32, 64, 4, 2, 16)]

_FULL_LAYERS = [
    LayerShape("mb-medium-h1024-f4096-e64-k1-t16K", "megablocks", 16384, 1024, 4096, 64, 1),
    LayerShape("mb-h2048-f8192-e16-k2-t16K", "megablocks", 16384, 2048, 8192, 16, 2),
    LayerShape("mixtral-h4096-f14336-e8-k2-t16K", "mixtral", 16384, 4096, 14336, 8, 2, True, "silu"),
    LayerShape("fine-h2048-f768-e128-k8-t16K", "fine-grained", 16384, 2048, 768, 128, 8, True, "silu"),
]
_QUICK_LAYERS = [
    LayerShape("mb-tiny-h64-f256-e8-k1-t512", "megablocks", 512, 64, 256, 8, 1, False, "gelu", 32),
    LayerShape("mixtral-tiny-h64-f112-e8-k2-t256", "mixtral", 256, 64, 112, 8, 2, True, "silu", 32),
    LayerShape("fine-tiny-h64-f48-e16-k4-t256", "fine-grained", 256, 64, 48, 16, 4, True, "silu", 16),
]
_SMOKE_LAYERS = [LayerShape("smoke-h32-f64-e4-k2-t64", "megablocks", 64, 32, 64, 4, 2, False, "gelu", 16)]


def kernel_shapes(suite: str, grid: bool = False) -> list[KernelShape]:
    """Kernel shapes of ``suite`` (``smoke``, ``quick`` or ``full``)."""
    if suite == "smoke":
        return list(_SMOKE_KERNELS)
    if suite == "quick":
        return list(_QUICK_KERNELS)
    if suite == "full":
        return (_megablocks_grid() if grid else list(_MEGABLOCKS_CURATED)) + [MIXTRAL, FINE_GRAINED]
    raise ValueError(f"unknown suite {suite!r}")


def layer_shapes(suite: str) -> list[LayerShape]:
    """Layer shapes of ``suite``."""
    return {"smoke": _SMOKE_LAYERS, "quick": _QUICK_LAYERS, "full": _FULL_LAYERS}[suite][:]


def make_expert_ids(
    tokens: int, experts: int, top_k: int, routing: str, generator: torch.Generator
) -> torch.Tensor:
    """Router-like ids ``[tokens, top_k]`` (int64, distinct per token), on the CPU."""
    if routing == "uniform":
        logp = torch.zeros(experts)
    elif routing == "skewed":
        order = torch.randperm(experts, generator=generator)
        logp = -ZIPF_EXPONENT * torch.log1p(order.double()).float()
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    u = torch.rand(tokens, experts, generator=generator).clamp_(1e-12, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    return (logp + gumbel).topk(top_k, dim=1).indices


def load_stats(expert_ids: torch.Tensor, experts: int) -> dict:
    """How balanced a routing is: max and min rows per expert over the mean, empty experts."""
    counts = torch.bincount(expert_ids.reshape(-1).cpu(), minlength=experts).double()
    mean = counts.mean().item() if experts else 0.0
    return {
        "max_over_mean": round(counts.max().item() / mean, 4) if mean else None,
        "min_over_mean": round(counts.min().item() / mean, 4) if mean else None,
        "empty_experts": int((counts == 0).sum()),
    }


def layer_inputs(
    tokens: int, hidden: int, routing: str, generator: torch.Generator, dtype: torch.dtype, device
) -> torch.Tensor:
    """Layer inputs ``[tokens, hidden]``: standard normal, plus a shared offset when skewed."""
    x = torch.randn(tokens, hidden, generator=generator)
    if routing == "skewed":
        x = x + SKEW_OFFSET * torch.randn(1, hidden, generator=generator)
    elif routing != "uniform":
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return x.to(device=device, dtype=dtype)

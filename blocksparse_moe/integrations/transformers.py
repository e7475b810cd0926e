"""The ``"blocksparse"`` experts implementation for Hugging Face transformers (5.x).

transformers routes the experts of its MoE families (every class decorated with
``use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
GPT-OSS, GraniteMoE, PhiMoE, ...) through ``ALL_EXPERTS_FUNCTIONS``. Importing
this module registers this library's dropless SDD/DSD path there as
``"blocksparse"``::

    import blocksparse_moe.integrations.transformers  # registers "blocksparse"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="blocksparse")
    # or, on a loaded model: model.set_experts_implementation("blocksparse")

The implementation reads the module's own parameters in place, as the
decorator's flags describe them (no weight is copied, cast or re-laid out):

=======================  ==========================================================
flag                     how the weights are read
=======================  ==========================================================
``is_transposed``        ``gate_up_proj [E, H, 2F]`` / ``down_proj [E, F, H]`` as they
                         are; otherwise ``[E, 2F, H]`` / ``[E, H, F]`` through
                         ``transpose(1, 2)`` views
``is_concatenated``      gate/up halves ``[..., :F]`` / ``[..., F:]``; otherwise
                         interleaved ``[..., 0::2]`` / ``[..., 1::2]`` (strided views)
``has_gate``             GLU from ``gate_up_proj``; otherwise ``act(x @ up_proj)``
``has_bias``             ``*_proj_bias``: the first-layer bias is added to the
                         block-sparse intermediate (inside the activation), the
                         down bias to each expert's output row
``has_post_expert_norm`` ``post_expert_norm`` on each (token, expert) row before the
                         routing weight
=======================  ==========================================================

A class that overrides ``_apply_gate`` (GPT-OSS's clamped ``(up + 1) * glu``,
DeepSeek-V4's clamped SwiGLU, ...) gets that very method, applied to the
block-sparse gate and up halves packed back into the class's own layout; it must be
elementwise over the intermediate, as all of them are. A layout that this path
cannot take raises :class:`UnsupportedExpertsLayout` naming the class and the flag.

Backend and block size: ``register(backend=..., block_size=...)`` registers an
implementation object carrying them (frozen); ``register("blocksparse_triton",
backend="triton")`` adds a second name without touching the first. The default is
``backend="auto"`` (see :mod:`blocksparse_moe.backends.select`: the grouped-GEMM path on
the CPU, Triton or grouped on CUDA by measured shape) and ``block_size=64``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..kernels.checks import FLOAT_DTYPES
from ..ops import BACKENDS
from ..topology import SUPPORTED_BLOCK_SIZES
from ._ffn import dropless_ffn
from ._hub_kernels import unshadow_hub_kernels

unshadow_hub_kernels()  # before transformers imports the Hub's `kernels` (see ._hub_kernels)

try:
    from transformers.integrations import moe as _hf_moe
except ImportError as _err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "blocksparse_moe.integrations.transformers needs transformers>=5 "
        "(pip install 'blocksparse-moe[hf]')"
    ) from _err


__all__ = [
    "BlocksparseExperts",
    "ExpertsLayout",
    "SUPPORTED_FLAGS",
    "UnsupportedExpertsLayout",
    "experts_forward",
    "expert_layout",
    "register",
]

DEFAULT_NAME = "blocksparse"

#: The ``use_experts_implementation`` flags this implementation understands.
SUPPORTED_FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")


def _decorator_flags() -> tuple[tuple[str, object], ...]:
    """The installed decorator's layout flags and their defaults, read once, as a tuple of pairs.

    A tuple, not a dict or ``MappingProxyType``: ``expert_layout`` runs inside traced
    forwards, and once a traced ``generate`` has mutated any dict Dynamo refuses to read
    a mapping proxy (``fullgraph=True`` then fails); a tuple of constants always traces.
    """
    params = inspect.signature(_hf_moe.use_experts_implementation).parameters
    return tuple((n, p.default) for n, p in params.items() if n not in ("experts_class", "experts_interface"))


_FLAG_DEFAULTS = _decorator_flags()


def _flag_default(flag: str):
    for name, default in _FLAG_DEFAULTS:
        if name == flag:
            return default
    return None


class UnsupportedExpertsLayout(ValueError):
    """An experts module whose layout the ``"blocksparse"`` implementation cannot read."""


def _fail(module: torch.nn.Module, flag: str, what: str) -> UnsupportedExpertsLayout:
    value = getattr(module, flag, _flag_default(flag))
    return UnsupportedExpertsLayout(
        f"{type(module).__name__} ({flag}={value!r}): the 'blocksparse' experts implementation {what}"
    )


@dataclass(frozen=True)
class ExpertsLayout:
    """An experts module's weights as the kernels take them: views of its own parameters.

    ``w1``/``v1 [E, H, F]`` (gate and up, or ``v1=None`` without a gate), ``w2 [E, F, H]``,
    optional biases ``b1``/``bv [E, F]`` and ``b2 [E, H]``; ``activation`` for
    ``act(h1) [* h3]``, or ``gate(h1, h3)`` for a class-specific gate; ``post`` the
    per-row op after the down projection. ``gate_up`` is the fused ``[E, H, 2F]`` view
    whose halves ``w1``/``v1`` are, when the default gate reads it (concatenated halves):
    the grouped backend takes it whole, one GEMM of width ``2F``.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    v1: torch.Tensor | None
    b1: torch.Tensor | None
    bv: torch.Tensor | None
    b2: torch.Tensor | None
    activation: Callable | None
    gate: Callable | None
    post: Callable | None
    gate_up: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]


def _param(module: torch.nn.Module, name: str, flag: str, dim: int) -> torch.Tensor:
    t = getattr(module, name, None)
    if t is None:
        raise _fail(module, flag, f"expects the parameter `{name}`, which this module does not have")
    if not isinstance(t, torch.Tensor):
        raise _fail(module, flag, f"needs `{name}` to be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise _fail(
            module, flag,
            f"needs `{name}` in float32, float16 or bfloat16, got {t.dtype} (quantized experts are not supported)",
        )  # fmt: skip
    if t.dim() != dim:
        raise _fail(module, flag, f"expects `{name}` to be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _split(t: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves of the last dimension: ``[:F]``/``[F:]`` or ``[0::2]``/``[1::2]`` (views)."""
    if concatenated:
        half = t.shape[-1] // 2
        return t[..., :half], t[..., half:]
    return t[..., 0::2], t[..., 1::2]


def _packed_gate(module: torch.nn.Module, concatenated: bool, h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    """The class's own ``_apply_gate`` on the gate/up blocks packed back into its layout."""
    packed = torch.cat([h1, h3], dim=-1) if concatenated else torch.stack([h1, h3], dim=-1).flatten(-2)
    return module._apply_gate(packed)


def expert_layout(module: torch.nn.Module) -> ExpertsLayout:
    """Read an experts module (decorated with ``use_experts_implementation``) as kernel operands.

    Every tensor returned is a view of the module's parameters. Raises
    :class:`UnsupportedExpertsLayout` naming the class and the flag otherwise.
    """
    for flag, default in _FLAG_DEFAULTS:
        if flag not in SUPPORTED_FLAGS and getattr(module, flag, default) != default:
            raise _fail(module, flag, "does not support this flag yet")
    flags = {f: getattr(module, f, _flag_default(f)) for f in SUPPORTED_FLAGS}
    if any(not hasattr(module, f) for f in ("has_gate", "is_transposed")):
        raise UnsupportedExpertsLayout(
            f"{type(module).__name__} is not an experts module decorated with use_experts_implementation "
            "(it has no `has_gate` / `is_transposed` flags)"
        )
    has_gate, transposed, concatenated = flags["has_gate"], flags["is_transposed"], flags["is_concatenated"]

    up_name = "gate_up_proj" if has_gate else "up_proj"
    up = _param(module, up_name, "has_gate", 3)
    down = _param(module, "down_proj", "is_transposed", 3)
    up_t = up if transposed else up.transpose(1, 2)  # [E, H, out]
    w2 = down if transposed else down.transpose(1, 2)  # [E, F, H]
    E, H, out = up_t.shape
    if up.dtype != down.dtype:
        raise _fail(module, "is_transposed", f"needs one dtype, got {up_name} {up.dtype} and down_proj {down.dtype}")

    v1 = None
    if has_gate:
        if out % 2:
            raise _fail(module, "has_gate", f"expects 2 * intermediate columns in {up_name}, got {out}")
        w1, v1 = _split(up_t, concatenated)
    else:
        w1 = up_t
    F = w1.shape[2]
    if tuple(w2.shape) != (E, F, H):
        layout = "[E, F, H]" if transposed else "[E, H, F]"
        raise _fail(
            module, "is_transposed",
            f"expects down_proj {layout} = {(E, F, H) if transposed else (E, H, F)} to match {up_name} "
            f"{tuple(up.shape)}, got {tuple(down.shape)}",
        )  # fmt: skip

    b1 = bv = b2 = None
    if flags["has_bias"]:
        bias = _param(module, f"{up_name}_bias", "has_bias", 2)
        b2 = _param(module, "down_proj_bias", "has_bias", 2)
        if tuple(bias.shape) != (E, out) or tuple(b2.shape) != (E, H):
            raise _fail(
                module, "has_bias",
                f"expects {up_name}_bias {(E, out)} and down_proj_bias {(E, H)}, "
                f"got {tuple(bias.shape)} and {tuple(b2.shape)}",
            )  # fmt: skip
        b1, bv = _split(bias, concatenated) if has_gate else (bias, None)

    gate = activation = None
    custom_gate = getattr(type(module), "_apply_gate", None) is not _hf_moe._default_apply_gate
    if has_gate and (custom_gate or not concatenated):
        # The class's gate, on exactly the packed tensor grouped_mm would hand it.
        gate = partial(_packed_gate, module, concatenated)
    else:
        activation = getattr(module, "act_fn", None)
        if not callable(activation):
            raise _fail(module, "has_gate", "expects an `act_fn` attribute (the expert activation)")

    post = None
    if flags["has_post_expert_norm"]:
        post = getattr(module, "post_expert_norm", None)
        if not callable(post):
            raise _fail(module, "has_post_expert_norm", "expects a `post_expert_norm` module")

    gate_up = up_t if has_gate and gate is None else None
    return ExpertsLayout(
        w1=w1, w2=w2, v1=v1, b1=b1, bv=bv, b2=b2, activation=activation, gate=gate, post=post, gate_up=gate_up
    )  # fmt: skip


def experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend: str = "auto",
    block_size: int = 64,
) -> torch.Tensor:
    """The experts forward of ``module``: ``hidden_states [T, H]`` routed by ``top_k_index``, ``top_k_weights``."""
    lay = expert_layout(module)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    ids = top_k_index.reshape(x.shape[0], top_k_index.shape[-1])
    weights = top_k_weights.reshape(ids.shape)
    if getattr(module, "_is_expert_parallel", False):
        # Expert-parallel sentinels (ids >= E) carry zero weight already; point them at a
        # real expert and zero their weight so they add nothing, in value or gradient.
        sentinel = ids >= lay.num_experts
        ids = ids.clamp(0, lay.num_experts - 1)
        weights = weights.masked_fill(sentinel, 0.0)
    y = dropless_ffn(
        x.to(lay.w1.dtype), ids, weights, lay.w1, lay.w2, lay.v1,
        b1=lay.b1, bv=lay.bv, b2=lay.b2,
        activation=lay.activation if lay.activation is not None else "gelu",
        gate=lay.gate, post=lay.post, block_size=block_size, backend=backend,
        fused_gate_up=None if lay.gate_up is None else (lay.gate_up, "concat"),
    )  # fmt: skip
    return y.to(hidden_states.dtype).reshape(shape)


@dataclass(frozen=True)
class BlocksparseExperts:
    """The registered implementation: an experts forward with its backend and block size fixed."""

    backend: str = "auto"
    block_size: int = 64

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size!r}")

    def __call__(self, module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return experts_forward(
            module, hidden_states, top_k_index, top_k_weights, backend=self.backend, block_size=self.block_size
        )


def _quantized_experts(module, *args, **kwargs):
    raise UnsupportedExpertsLayout(
        f"{type(module).__name__}: the 'blocksparse' experts implementation does not support "
        "FP8-quantized experts (weights must be float32, float16 or bfloat16)"
    )


def register(name: str = DEFAULT_NAME, *, backend: str = "auto", block_size: int = 64) -> BlocksparseExperts:
    """Register the dropless block-sparse experts forward in transformers as ``name``.

    Then ``model.set_experts_implementation(name)`` or ``from_pretrained(...,
    experts_implementation=name)`` selects it. Registering a name again replaces it
    (transformers' registry is process-wide). Returns the registered object.
    """
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name must be a non-empty string other than 'eager', got {name!r}")
    impl = BlocksparseExperts(backend=backend, block_size=block_size)
    _hf_moe.ExpertsInterface.register(name, impl)
    try:  # FP8 experts dispatch through their own registry: answer there with a clear error
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # pragma: no cover - depends on the transformers build
        pass
    else:
        FP8ExpertsInterface.register(name, _quantized_experts)
    return impl


register()
from .transformers_parallel import expert_parallel  # noqa: E402,F401  (expert parallelism; its own module)

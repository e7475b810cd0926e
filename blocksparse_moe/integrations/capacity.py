"""Replace capacity-based MoE layers by dropless ones holding the same weights and the same router.

``replace_capacity_moe(model)`` walks a model and swaps, in place:

================================================  =============================================
capacity layer                                     dropless replacement
================================================  =============================================
:class:`blocksparse_moe.MoE`                       :class:`blocksparse_moe.dMoE` sharing the very
                                                   same parameters and router
transformers ``SwitchTransformersSparseMLP``       :class:`DroplessSwitchSparseMLP`
transformers ``NllbMoeSparseMLP``                  :class:`DroplessNllbMoeSparseMLP`
================================================  =============================================

It returns a :class:`ReplaceReport`: which layers were replaced, and which
MoE-looking layers it left alone and why (unknown classes are never touched).

The transformers layers keep their router module (the same object, so
``output_router_logits``, the router z-loss and the load-balancing loss see the
same logits). Their routers also compute a capacity mask; the replacement ignores
it and routes every token to its top-1 (Switch) or top-2 (NLLB) experts. Their
experts are separate ``nn.Linear`` modules, which the kernels cannot read as one
``[E, ...]`` tensor, so their weights are stacked once, at replacement, into
``wi``/``wo`` (Switch) or ``fc1``/``fc2`` (+ biases, NLLB) parameters; a
state dict saved from the original model still loads (the per-expert keys are
stacked on load). Build the optimizer after replacing.

transformers is imported only if a model holds its classes: this module works
without the ``[hf]`` extra.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import MoE, dMoE
from ._ffn import dropless_ffn

__all__ = [
    "DroplessNllbMoeSparseMLP",
    "DroplessSwitchSparseMLP",
    "ReplaceReport",
    "replace_capacity_moe",
    "to_dropless",
]

_HF_SWITCH = ("transformers.models.switch_transformers.modeling_switch_transformers", "SwitchTransformersSparseMLP")
_HF_NLLB = ("transformers.models.nllb_moe.modeling_nllb_moe", "NllbMoeSparseMLP")
# Class names that look like an MoE layer, for the "left alone" list.
_MOE_LIKE = re.compile(r"moe|expert|sparse_?mlp|mixture", re.IGNORECASE)


def _hf_class(spec: tuple[str, str]):
    """The transformers class if its module is already imported (a model holding it imported it)."""
    mod = sys.modules.get(spec[0])
    return getattr(mod, spec[1], None) if mod is not None else None


def _check_settings(block_size: int, backend: str) -> None:
    from ..ops import BACKENDS
    from ..topology import SUPPORTED_BLOCK_SIZES

    if block_size not in SUPPORTED_BLOCK_SIZES or isinstance(block_size, bool):
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------- stacked per-expert weights
def _get(module: nn.Module, path: str):
    """``module.a.b.c`` for ``path = "a.b.c"``, or None where an attribute is missing or None."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class _StackedExperts(nn.Module):
    """Per-expert ``nn.Linear`` weights stacked into ``[E, ...]`` parameters, loadable from per-expert keys.

    ``_STACKED`` maps a parameter of this module to the key of one expert's tensor
    in the original layer's state dict (``{e}`` is the expert index).
    """

    _STACKED: dict[str, str] = {}

    def _stack_from(self, experts: nn.ModuleDict, num_experts: int) -> None:
        for name, key in self._STACKED.items():
            parts = [_get(experts, key.format(e=e).removeprefix("experts.")) for e in range(num_experts)]
            if any(p is None for p in parts):
                self.register_parameter(name, None)
                continue
            with torch.no_grad():
                stacked = torch.stack([p.detach() for p in parts])
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=parts[0].requires_grad))
        self.register_load_state_dict_pre_hook(_StackedExperts._load_per_expert_keys)

    @staticmethod
    def _load_per_expert_keys(module, state_dict, prefix, *args) -> None:
        # A state dict of the original layer holds `experts.expert_{e}.<linear>.<param>`: stack them.
        E = module.num_experts
        for name, key in module._STACKED.items():
            keys = [prefix + key.format(e=e) for e in range(E)]
            if prefix + name not in state_dict and all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def _expert_linear_weights(experts: nn.ModuleDict, num_experts: int, linear: str) -> list[nn.Linear]:
    mods = [getattr(experts[f"expert_{e}"], linear) for e in range(num_experts)]
    shapes = {tuple(m.weight.shape) for m in mods}
    if len(shapes) != 1:
        raise ValueError(f"experts' {linear} weights differ in shape: {sorted(shapes)}")
    return mods


class DroplessSwitchSparseMLP(_StackedExperts):
    """Switch Transformers' sparse MLP without the capacity: every token reaches its top-1 expert.

    Holds the original ``router`` (same module) and the experts' ``wi``/``wo`` weights
    stacked as ``wi [E, d_ff, d_model]`` and ``wo [E, d_model, d_ff]`` (the
    ``nn.Linear`` layout, read through transposed views). The expert activation and
    its dropout are the original experts' own modules.
    """

    _STACKED = {
        "wi": "experts.expert_{e}.wi.weight",
        "wo": "experts.expert_{e}.wo.weight",
        "wi_bias": "experts.expert_{e}.wi.bias",
        "wo_bias": "experts.expert_{e}.wo.bias",
    }

    def __init__(self, layer: nn.Module, *, block_size: int = 64, backend: str = "auto"):
        super().__init__()
        _check_settings(block_size, backend)
        self.router = layer.router
        self.num_experts = int(layer.router.num_experts)
        _expert_linear_weights(layer.experts, self.num_experts, "wi")
        _expert_linear_weights(layer.experts, self.num_experts, "wo")
        self._stack_from(layer.experts, self.num_experts)
        first = layer.experts["expert_0"]
        self.act = first.act
        self.dropout = first.dropout
        self.block_size = block_size
        self.backend = backend
        self.train(layer.training)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k=1, dropless, block_size={self.block_size}, backend={self.backend!r}"

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(h))

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_ids [T, 1], weights [T, 1])``: the router's top-1 choice, no capacity applied."""
        # The router is called as a module so that hooks (output_router_logits) see it;
        # its capacity-masked dispatch is not used.
        _, max_prob, logits = self.router(hidden_states)
        probs = nn.functional.softmax(logits, dim=-1, dtype=self.router.dtype).to(hidden_states.dtype)
        return probs.argmax(dim=-1).reshape(-1, 1), max_prob.reshape(-1, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(hidden_states)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        y = dropless_ffn(
            x.to(self.wi.dtype), ids, weights, self.wi.transpose(1, 2), self.wo.transpose(1, 2),
            b1=self.wi_bias, b2=self.wo_bias, activation=self._activation,
            block_size=self.block_size, backend=self.backend,
        )  # fmt: skip
        return y.to(hidden_states.dtype).reshape(hidden_states.shape)


class DroplessNllbMoeSparseMLP(_StackedExperts):
    """NLLB-MoE's sparse MLP without the capacity: every token reaches its top-2 experts.

    Holds the original ``router`` and the experts' ``fc1``/``fc2`` weights and biases
    stacked as ``fc1 [E, ffn, d_model]``, ``fc1_bias [E, ffn]``, ``fc2 [E, d_model, ffn]``,
    ``fc2_bias [E, d_model]``. Routing follows the router's own rules (second-expert
    policy, normalisation before or after dropping, padding tokens) with the capacity
    left out; ``moe_token_dropout`` is applied to each expert's output as in fairseq.

    The output is ``sum_e gate[t, e] * expert_e(x[t])`` over the router's gates, the
    NLLB-MoE definition. (The eager ``NllbMoeExperts.forward`` of transformers 5.x
    one-hot encodes the 0/1 top-1 mask again and so runs ``expert_0``/``expert_1``
    only; this layer does not reproduce that.)
    """

    _STACKED = {
        "fc1": "experts.expert_{e}.fc1.weight",
        "fc1_bias": "experts.expert_{e}.fc1.bias",
        "fc2": "experts.expert_{e}.fc2.weight",
        "fc2_bias": "experts.expert_{e}.fc2.bias",
    }

    def __init__(self, layer: nn.Module, *, block_size: int = 64, backend: str = "auto"):
        super().__init__()
        _check_settings(block_size, backend)
        self.router = layer.router
        self.num_experts = int(layer.router.num_experts)
        _expert_linear_weights(layer.experts, self.num_experts, "fc1")
        _expert_linear_weights(layer.experts, self.num_experts, "fc2")
        self._stack_from(layer.experts, self.num_experts)
        first = layer.experts["expert_0"]
        self.act = first.act
        self.dropout = first.dropout
        self.moe_token_dropout = float(layer.experts.moe_token_dropout)
        self.token_dropout = layer.experts.token_dropout
        self.block_size = block_size
        self.backend = backend
        self.train(layer.training)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k=2, dropless, block_size={self.block_size}, backend={self.backend!r}"

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(h))

    def _token_dropout(self, rows: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.token_dropout(rows)
        return rows * (1 - self.moe_token_dropout)

    def route(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_ids [T, 2], gates [T, 2])`` for ``x [T, H]``: NllbMoeTop2Router.route_tokens without capacity."""
        r = self.router
        _, _, logits = r(x, padding_mask)  # hooks see the call; the capacity-masked gates are not used
        if r.second_expert_policy == "sampling":
            # The router added Gumbel noise to `logits` in place; start again from clean ones.
            logits = r.classifier(x.to(r.dtype))
        probs = nn.functional.softmax(logits, dim=-1, dtype=r.dtype).to(x.dtype)
        top1 = probs.argmax(dim=-1)
        second = logits
        if r.second_expert_policy == "sampling":
            second = logits + torch.distributions.gumbel.Gumbel(0, 1).rsample(logits.shape).to(logits.device)
        top1_mask = nn.functional.one_hot(top1, num_classes=self.num_experts).bool()
        top2 = second.masked_fill(top1_mask, float("-inf")).argmax(dim=-1)
        p1 = probs.gather(1, top1[:, None]).squeeze(1)
        p2 = probs.gather(1, top2[:, None]).squeeze(1)

        keep1 = torch.ones_like(p1)
        keep2 = torch.ones_like(p2)
        if r.second_expert_policy == "random":
            keep2 = keep2 * ((2 * p2) > torch.rand_like(p2.float())).to(p2.dtype)
        if padding_mask is not None and not r.router_ignore_padding_tokens:
            mask = padding_mask
            if mask.dim() == 4:  # an attention mask: the last row's keys
                mask = mask[:, :, -1, :].reshape(-1)[-x.shape[0]:]
            non_padding = (~mask.bool()).to(p1.dtype).reshape(-1)
            keep1, keep2 = keep1 * non_padding, keep2 * non_padding

        eps = torch.finfo(probs.dtype).eps
        if r.normalize_router_prob_before_dropping:
            denom = torch.clamp(p1 + p2, min=eps)
            g1, g2 = p1 / denom * keep1, p2 / denom * keep2
        else:
            denom = torch.clamp(p1 * keep1 + p2 * keep2, min=eps)
            g1, g2 = p1 * keep1 / denom, p2 * keep2 / denom
        return torch.stack([top1, top2], dim=1), torch.stack([g1, g2], dim=1)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        ids, gates = self.route(x, padding_mask)
        post = self._token_dropout if self.moe_token_dropout > 0 else None
        y = dropless_ffn(
            x.to(self.fc1.dtype), ids, gates, self.fc1.transpose(1, 2), self.fc2.transpose(1, 2),
            b1=self.fc1_bias, b2=self.fc2_bias, activation=self._activation, post=post,
            block_size=self.block_size, backend=self.backend,
        )  # fmt: skip
        return y.to(hidden_states.dtype).reshape(hidden_states.shape)


# --------------------------------------------------------------------------- this library's MoE
def _moe_to_dmoe(layer: MoE, block_size: int | None, backend: str | None) -> dMoE:
    """A dMoE holding ``layer``'s own parameters and router (no copy)."""
    changes = {k: v for k, v in (("block_size", block_size), ("backend", backend)) if v is not None}
    config = dataclasses.replace(layer.config, **changes) if changes else layer.config
    # Built on the meta device (nothing allocated), then given the original tensors.
    new = dMoE(dataclasses.replace(config, device="meta"))
    new.config = config
    new.router = layer.router
    for name in ("w1", "w2", "v1"):
        p = getattr(layer, name)
        if p is None:
            new.register_parameter(name, None)
        else:
            setattr(new, name, p)
    new.train(layer.training)
    return new


# --------------------------------------------------------------------------- public API
def _replacement(layer: nn.Module):
    """The dropless class for a known capacity layer, or None."""
    if isinstance(layer, MoE):
        return dMoE
    for spec, cls in ((_HF_SWITCH, DroplessSwitchSparseMLP), (_HF_NLLB, DroplessNllbMoeSparseMLP)):
        hf = _hf_class(spec)
        if hf is not None and isinstance(layer, hf):
            return cls
    return None


def to_dropless(layer: nn.Module, *, block_size: int | None = None, backend: str | None = None) -> nn.Module:
    """The dropless replacement of one capacity-based layer (see the module table).

    ``block_size``/``backend`` default to the layer's config for :class:`MoE`, else to
    64 and ``"auto"``. Raises ``TypeError`` for a layer of another class.
    """
    cls = _replacement(layer)
    if cls is None:
        raise TypeError(
            f"no dropless replacement for {type(layer).__name__}; known capacity layers: blocksparse_moe.MoE, "
            "SwitchTransformersSparseMLP, NllbMoeSparseMLP"
        )
    if cls is dMoE:
        return _moe_to_dmoe(layer, block_size, backend)
    return cls(
        layer,
        block_size=64 if block_size is None else block_size,
        backend="auto" if backend is None else backend,
    )


@dataclass(frozen=True)
class ReplaceReport:
    """What :func:`replace_capacity_moe` did.

    Attributes:
        replaced: ``(qualified name, old class, new class)`` of each layer swapped.
        skipped: ``(qualified name, class, reason)`` of each MoE-looking layer left alone.
    """

    replaced: tuple[tuple[str, str, str], ...]
    skipped: tuple[tuple[str, str, str], ...]

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"replaced {self.num_replaced} capacity-based MoE layer(s) by dropless ones"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.replaced]
        if self.skipped:
            lines.append(f"left alone {len(self.skipped)} MoE-like layer(s):")
            lines += [f"  {name}: {cls} ({why})" for name, cls, why in self.skipped]
        return "\n".join(lines)


_ROUTER_NAMES = ("router", "gate", "gating", "gate_network", "switch")


def _looks_like_moe(module: nn.Module) -> bool:
    """An MoE layer by shape: a child named ``experts``, or a router child in a class named like an MoE.

    (A class name alone would not do: in transformers whole models and their
    attention modules are called ``*Moe*`` after their family.)
    """
    names = {n for n, _ in module.named_children()} | {n for n, _ in module.named_parameters(recurse=False)}
    if names & {"experts", "expert"}:
        return True
    return bool(names & set(_ROUTER_NAMES)) and bool(_MOE_LIKE.search(type(module).__name__))


def _skip_reason(module: nn.Module) -> str | None:
    """Why an MoE-looking module is left alone, or None if it does not look like an MoE layer."""
    if not _looks_like_moe(module):
        return None
    if isinstance(module, (dMoE, DroplessSwitchSparseMLP, DroplessNllbMoeSparseMLP)):
        return "dropless already"
    if any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in module.modules()):
        return (
            "dropless already (transformers experts interface: use "
            "set_experts_implementation('blocksparse') from blocksparse_moe.integrations.transformers)"
        )
    return "unknown MoE layer class"


def replace_capacity_moe(
    model: nn.Module, *, block_size: int | None = None, backend: str | None = None
) -> ReplaceReport:
    """Swap, in place, every known capacity-based MoE layer of ``model`` for a dropless one.

    Each replacement holds the original router module and the same expert weights
    (:func:`to_dropless`). Layers of unknown classes are left alone and listed in the
    report with the reason. ``model`` itself must be a container: replace a single
    layer with :func:`to_dropless`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _replacement(model) is not None:
        raise ValueError(
            f"model is itself a capacity layer ({type(model).__name__}); use to_dropless(layer) to get its replacement"
        )
    replaced, skipped = [], []
    done: list[str] = []  # prefixes not to descend into

    def inside(name: str) -> bool:
        return any(name.startswith(p + ".") for p in done)

    for name, module in list(model.named_modules()):
        if not name or inside(name):
            continue
        if _replacement(module) is None:
            why = _skip_reason(module)
            if why is not None:
                skipped.append((name, type(module).__name__, why))
                done.append(name)
            continue
        new = to_dropless(module, block_size=block_size, backend=backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append((name, type(module).__name__, type(new).__name__))
        done.append(name)
    return ReplaceReport(replaced=tuple(replaced), skipped=tuple(skipped))

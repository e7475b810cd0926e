"""Finding the expert tensors of a model: which parameters hold experts, which experts, on which groups.

Gradient reduction, the gradient norm, checkpoints, state-dict sharding and the load
statistics all need the same answer, so it is computed here, from the model alone:

* :class:`~blocksparse_moe.parallel.ExpertParallelDMoE`: ``w1``, ``w2``, ``v1`` hold
  the experts of its placement on this rank.
* A Hugging Face experts module sharded by ``expert_parallel``: the parameters its
  shard state names (``gate_up_proj``/``up_proj``, ``down_proj``, their biases).
* With ``include_unsharded=True`` also the plain layers (``dMoE``, ``MoE``) and the
  unsharded Hugging Face experts modules: all ``E`` experts, in one process.

Module paths are those of ``torch.distributed.checkpoint.state_dict``: wrappers
(DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, activation checkpointing's
``_checkpoint_wrapped_module.``) are not part of a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .groups import ExpertParallelGroups
from .placement import ExpertPlacement

__all__ = ["ExpertShard", "expert_shards", "unwrap", "HF_EXPERT_PARAMS"]

#: Parameter names of a Hugging Face experts module (``use_experts_implementation``) that hold experts.
HF_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
_WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


@dataclass(frozen=True, eq=False)
class ExpertShard:
    """One module's expert tensors: dimension 0 of each is ``placement.experts_of(rank)``.

    ``groups``/``comm`` are ``None`` for an unsharded module (every expert in this process).
    """

    name: str
    module: nn.Module
    param_names: tuple
    placement: ExpertPlacement
    rank: int
    groups: Optional[ExpertParallelGroups] = None
    comm: Optional[object] = None
    tracker: Optional[object] = None

    @property
    def local_experts(self) -> tuple:
        return self.placement.experts_of(self.rank)

    @property
    def sharded(self) -> bool:
        return self.groups is not None

    def params(self) -> list:
        """``[(attribute, Parameter)]`` of the expert tensors that exist (``v1`` may be ``None``)."""
        out = []
        for n in self.param_names:
            p = getattr(self.module, n, None)
            if p is not None:
                out.append((n, p))
        return out

    def fqn(self, attr: str) -> str:
        return f"{self.name}.{attr}" if self.name else attr


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (its parameters' names then match the checkpoint's)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _clean(name: str) -> str:
    return ".".join(s for s in name.split(".") if s and s not in _WRAPPER_SEGMENTS)


def _is_hf_experts(m: nn.Module) -> bool:
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(m, nn.Module)


def _unsharded(name: str, m: nn.Module) -> Optional[ExpertShard]:
    from ..layers import _MoEBase

    if isinstance(m, _MoEBase):
        E = m.config.num_experts
        return ExpertShard(_clean(name), m, ("w1", "w2", "v1"), ExpertPlacement.contiguous(E, 1), 0)
    if _is_hf_experts(m):
        names = tuple(n for n in HF_EXPERT_PARAMS if isinstance(getattr(m, n, None), nn.Parameter))
        if not names:
            return None
        E = getattr(m, names[0]).shape[0]
        return ExpertShard(_clean(name), m, names, ExpertPlacement.contiguous(E, 1), 0)
    return None


def expert_shards(model: nn.Module, *, include_unsharded: bool = False) -> list:
    """Every module of ``model`` holding expert tensors, in module order, as :class:`ExpertShard`."""
    from .layer import ExpertParallelDMoE

    out = []
    for name, m in unwrap(model).named_modules():
        if isinstance(m, ExpertParallelDMoE):
            out.append(m.expert_shard(_clean(name)))
        elif getattr(m, "_bsmoe_expert_parallel", None) is not None:
            out.append(m._bsmoe_expert_parallel.shard(_clean(name), m))
        elif include_unsharded:
            s = _unsharded(name, m)
            if s is not None:
                out.append(s)
    return out

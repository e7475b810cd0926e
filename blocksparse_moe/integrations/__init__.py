"""Drop-in use of the dropless kernels in existing models.

- :mod:`blocksparse_moe.integrations.transformers` (needs the ``[hf]`` extra):
  importing it registers the ``"blocksparse"`` experts implementation in Hugging
  Face transformers, so ``model.set_experts_implementation("blocksparse")`` runs
  every decorated experts module on the SDD/DSD path, reading its weights in place.
  It is not imported here: transformers stays optional.
- :mod:`blocksparse_moe.integrations.capacity`: :func:`replace_capacity_moe` swaps
  capacity-based MoE layers (this library's ``MoE``; transformers' Switch
  Transformers and NLLB-MoE sparse MLPs) for dropless ones holding the same
  weights and the same router.
"""

from .capacity import ReplaceReport, replace_capacity_moe, to_dropless

__all__ = ["ReplaceReport", "replace_capacity_moe", "to_dropless"]

"""Triton kernels and their launchers, installed as ``blocksparse_moe.kernels``.

One product per file: ``sdd`` (sampled dense x dense -> blocks), ``dsd`` (blocks x
dense -> rows), ``dsd_t`` (blocks^T x rows -> per-expert dense, the weight
gradients), ``permute`` (gather into expert order, weighted combine back) and
``topology`` (the block-sparse index arrays from the expert offsets).
``sdd_persistent`` / ``sdd_glu`` (``sdd_persistent.py``) are opt-in persistent,
TMA-fed SDD variants (the second with SwiGLU in the epilogue; both can gather ``x``'s
rows themselves, ``gather=token_index(plan)``) and ``dsd_persistent``
(``dsd_persistent.py``) the persistent, TMA-fed DSD with optional routing weights in
its epilogue, and ``dsd_t_persistent`` (``dsd_t_persistent.py``) the persistent,
TMA-fed DSD^T (the weight gradients); not timed yet, so nothing calls them by default.
Nothing here imports the layer; the autograd ops in ``blocksparse_moe.ops`` call
these launchers.
"""

from .dsd import dsd
from .dsd_persistent import dsd_persistent, dsd_tile_schedule
from .dsd_t import dsd_t
from .dsd_t_persistent import dsd_t_persistent, dsd_t_tile_schedule
from .permute import combine, combine_weight_grad, gather
from .sdd import sdd
from .sdd_glu_backward import sdd_glu_backward
from .sdd_persistent import sdd_glu, sdd_persistent, tile_schedule, token_index
from .topology import topology_arrays

__all__ = [
    "sdd", "dsd", "dsd_t", "gather", "combine", "combine_weight_grad", "topology_arrays",
    "sdd_persistent", "sdd_glu", "tile_schedule", "token_index", "dsd_persistent", "dsd_tile_schedule",
    "dsd_t_persistent", "dsd_t_tile_schedule", "sdd_glu_backward",
]

"""Triton kernels and their launchers, installed as ``blocksparse_moe.kernels``.

One product per file: ``sdd`` (sampled dense x dense -> blocks), ``dsd`` (blocks x
dense -> rows), ``dsd_t`` (blocks^T x rows -> per-expert dense, the weight
gradients), ``permute`` (gather into expert order, weighted combine back) and
``topology`` (the block-sparse index arrays from the expert offsets).
Nothing here imports the layer; the autograd ops in ``blocksparse_moe.ops`` call
these launchers.
"""

from .dsd import dsd
from .dsd_t import dsd_t
from .permute import combine, combine_weight_grad, gather
from .sdd import sdd
from .topology import topology_arrays

__all__ = ["sdd", "dsd", "dsd_t", "gather", "combine", "combine_weight_grad", "topology_arrays"]

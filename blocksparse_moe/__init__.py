"""blocksparse-moe: dropless Mixture-of-Experts with block-sparse Triton kernels."""

from .config import MoEConfig
from .functional import expert_ffn, moe_ffn
from .layers import MoE, MoEAux, dMoE
from .router import Router
from .routing import RoutingPlan, plan_routing
from .topology import SUPPORTED_BLOCK_SIZES, Topology, build_topology

__all__ = [
    "MoE",
    "MoEAux",
    "MoEConfig",
    "Router",
    "dMoE",
    "RoutingPlan",
    "SUPPORTED_BLOCK_SIZES",
    "Topology",
    "build_topology",
    "expert_ffn",
    "moe_ffn",
    "plan_routing",
]
__version__ = "0.1.0"

"""Expert parallelism over ``torch.distributed``: the dMoE layer with its experts sharded over ranks.

::

    import torch.distributed as dist
    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict, sync_router_grads

    dist.init_process_group("gloo")            # or "nccl"; torchrun sets the rendezvous
    cfg = MoEConfig(hidden_size=256, ffn_hidden_size=704, num_experts=8, top_k=2)
    layer = ExpertParallelDMoE(cfg, group=None, name="blocks.0.moe")   # 8 / world_size experts here
    layer.load_state_dict(shard_state_dict(full_state_dict, layer))    # optional: from a full checkpoint
    y = layer(x)                                # x: this rank's tokens [..., 256]
    loss(y).backward()
    sync_router_grads(model)                    # the replicated router's gradient, summed over ranks

A data-parallel x expert-parallel job passes a ``DeviceMesh`` with dims ``("dp", "ep")``
as ``group``, reduces with ``reduce_gradients(model)`` (experts over dp, the rest over
dp x ep, DDP's mean), clips with ``clip_grad_norm_``, and checkpoints with
``save_sharded`` / ``load_sharded`` (keyed by global expert id: any layout reads any
other's). ``placement=`` puts any expert on any rank, or on several ranks (a
replicated hot expert: ``ExpertPlacement.from_ranks``, ``plan_placement(...,
replicas=N)``; ``reduce_gradients`` sums its replicas' gradients), and
``collect_load_stats(model)`` reports each layer's load and traffic after a step.
``interleaved_forward(blocks, [x_a, x_b])`` runs two micro-batches so that one's dense
compute hides the other's count exchange and host read (``layer(x, beside=fn)``).

Two all-to-alls (tokens out, results back) wrap the block-sparse expert compute;
the split sizes come from one count exchange whose result is read on the host once
per forward, or never with ``capacity_per_peer`` (fixed-size chunks). See
docs/parallel.md for the data flow, the host read, the memory of the fixed mode and
the measured traffic.
"""

from .collectives import CollectiveError, Communicator, PeerFailedError, all_to_all
from .checks import ConfigMismatchError, check_same_config, config_fingerprint
from .checkpoint import load_sharded, save_sharded
from .grads import clip_grad_norm_, expert_parameter_names, expert_parameters, grad_norm, reduce_gradients
from .groups import ExpertParallelGroups, resolve_groups
from .layer import (
    AllToAllStats,
    CapacityOverflowError,
    ExpertParallelAux,
    ExpertParallelDMoE,
    sync_router_grads,
)
from .load_stats import ExpertLoadStats, collect_load_stats
from .microbatch import interleaved_forward
from .placement import ExpertPlacement
from .planning import RoutingStats, placement_traffic, plan_placement, routing_stats  # noqa: F401 (issue 14)
from .replace import ExpertMove, replace_experts
from .sharding import EXPERT_PARAMS, expert_range, gather_state_dict, shard_state_dict
from .units import ExpertShard, expert_shards

__all__ = [
    "AllToAllStats",
    "CapacityOverflowError",
    "CollectiveError",
    "Communicator",
    "ConfigMismatchError",
    "EXPERT_PARAMS",
    "ExpertLoadStats",
    "ExpertMove",
    "ExpertParallelAux",
    "ExpertParallelDMoE",
    "ExpertParallelGroups",
    "ExpertPlacement",
    "ExpertShard",
    "PeerFailedError",
    "all_to_all",
    "check_same_config",
    "clip_grad_norm_",
    "collect_load_stats",
    "config_fingerprint",
    "expert_parameter_names",
    "expert_parameters",
    "expert_range",
    "expert_shards",
    "gather_state_dict",
    "grad_norm",
    "interleaved_forward",
    "load_sharded",
    "reduce_gradients",
    "replace_experts",
    "resolve_groups",
    "save_sharded",
    "shard_state_dict",
    "sync_router_grads",
]

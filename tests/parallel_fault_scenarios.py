"""Fault scenarios for the expert-parallel tests: errors that name the rank, field or layer, never a hang.

Configurations that differ across ranks, a placement missing an expert, placements that
differ, a mesh without an ``ep`` dim, bad input on one rank, collectives that time out and a rank that dies; each runs on
every rank of a launch (``parallel_harness.launch``, by name). Timeouts leave their
groups unusable, so tests run them last; ``dead_rank`` needs a launch of its own.
"""

from __future__ import annotations

import datetime
import time

from parallel_harness import scenario


# --------------------------------------------------------------------------- fault scenarios
def _mismatch(rank, W, field):
    """The last rank builds the layer with another ``field``: every rank raises, naming rank and field."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    base = dict(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    other = {"num_experts": 4 * W, "hidden_size": 24, "top_k": 1, "dtype": torch.bfloat16}[field]
    cfg = MoEConfig(**{**base, field: other} if rank == W - 1 else base)
    try:
        ExpertParallelDMoE(cfg, name="blocks.2.moe")
    except ConfigMismatchError as err:
        msg = str(err)
        assert f"rank {W - 1}: {field}=" in msg and "blocks.2.moe" in msg, msg
        return {"message": msg}
    raise AssertionError("no ConfigMismatchError")


@scenario
def mismatch_num_experts(rank, W):
    return _mismatch(rank, W, "num_experts")


@scenario
def mismatch_hidden_size(rank, W):
    return _mismatch(rank, W, "hidden_size")


@scenario
def mismatch_top_k(rank, W):
    return _mismatch(rank, W, "top_k")


@scenario
def mismatch_dtype(rank, W):
    return _mismatch(rank, W, "dtype")


@scenario
def placement_missing_expert(rank, W):
    """A placement that leaves an expert out: every rank raises before any collective, naming it."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, ExpertPlacement

    E = 2 * W
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=E, top_k=1, block_size=16)
    messages = []
    for bad in (lambda: ExpertPlacement.from_rank_experts([list(range(E - 1))] + [[] for _ in range(W - 1)], E),
                lambda: [0] * (E - 1)):  # fmt: skip
        try:
            ExpertParallelDMoE(cfg, placement=bad(), name="blocks.4.moe")
        except ValueError as err:
            messages.append(str(err))
        else:
            raise AssertionError("no ValueError")
    assert f"expert(s) [{E - 1}]" in messages[0], messages[0]
    assert "blocks.4.moe" in messages[1] and f"num_experts={E}" in messages[1], messages[1]
    return {"message": " | ".join(messages)}


@scenario
def mismatch_placement(rank, W):
    """Valid placements that differ across ranks: the configuration check names the rank and the field."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    E = 2 * W
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=E, top_k=1, block_size=16)
    owners = [e % W for e in range(E)] if rank == W - 1 else None
    try:
        ExpertParallelDMoE(cfg, placement=owners, name="blocks.5.moe")
    except ConfigMismatchError as err:
        assert f"rank {W - 1}: placement=" in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no ConfigMismatchError")


@scenario
def mesh_without_ep(rank, W):
    """A DeviceMesh without an "ep" dim: a ValueError naming the dims, on every rank, before any collective."""
    from torch.distributed.device_mesh import init_device_mesh

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("dp",))
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=1, block_size=16)
    try:
        ExpertParallelDMoE(cfg, mesh)
    except ValueError as err:
        assert "mesh_dim_names=('dp',)" in str(err) and "'ep'" in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no ValueError")


@scenario
def bad_input_one_rank(rank, W):
    """The last rank passes a wrong hidden size: it raises its ValueError, the others a PeerFailedError
    naming it, at once (both all-to-all modes); the group stays usable."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, PeerFailedError

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    messages = []
    for capacity in (None, 8):
        ep = ExpertParallelDMoE(cfg, capacity_per_peer=capacity, name="blocks.4.moe")
        x = torch.randn(3, 12 if rank == W - 1 else 16)
        t = time.monotonic()
        try:
            ep(x)
        except PeerFailedError as err:
            assert rank != W - 1 and f"rank(s) [{W - 1}]" in str(err) and "blocks.4.moe" in str(err), str(err)
            messages.append(str(err))
        except ValueError as err:
            assert rank == W - 1 and "hidden_size=16" in str(err), str(err)
            messages.append(str(err))
        else:
            raise AssertionError("no error")
        assert time.monotonic() - t < 5.0
        ep(torch.randn(2, 16)).sum().backward()  # the group still works
    return {"messages": messages}


@scenario
def group_timeout(rank, W):
    """Only rank 0 runs the forward: its collective times out after the group's timeout, naming the layer."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    limit = 2.0
    group = dist.new_group(timeout=datetime.timedelta(seconds=limit))
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, group, name="blocks.5.moe")
    if rank != 0:
        time.sleep(limit + 2.0)
        return {}
    t = time.monotonic()
    try:
        ep(torch.randn(4, 16))
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.5.moe" in str(err) and "rank 0" in str(err), str(err)
        assert elapsed < limit + 3.0, elapsed
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")


@scenario
def layer_timeout(rank, W):
    """The layer's own ``timeout`` (shorter than the group's) bounds each wait, naming the layer."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    limit = 1.0
    group = dist.new_group()
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, group, name="blocks.6.moe", timeout=datetime.timedelta(seconds=limit))
    if rank != 0:
        time.sleep(limit + 1.5)
        # Complete rank 0's abandoned count exchange, so that its group can be torn down:
        # per destination, its 2 experts' counts and one status word.
        counts = torch.zeros(3 * W, dtype=torch.int64)
        dist.all_to_all_single(torch.empty_like(counts), counts, group=group)
        return {}
    t = time.monotonic()
    try:
        ep(torch.randn(4, 16))
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.6.moe" in str(err) and "count exchange" in str(err), str(err)
        assert elapsed < limit + 2.0, elapsed
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")


@scenario
def dead_rank(rank, W):
    """The last rank dies after building the layer; the others' forward fails within the group timeout."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=W, top_k=1, block_size=16)
    ep = ExpertParallelDMoE(cfg, name="blocks.9.moe")
    if rank == W - 1:
        return {"exit_after": 17}  # the worker exits right after reporting, without teardown
    time.sleep(0.5)
    t = time.monotonic()
    try:
        out = ep(torch.randn(6, 16))
        out.sum().backward()
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.9.moe" in str(err), str(err)
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")

"""Scenarios for the communication tests: flat and hierarchical exchanges, chunked overlap, faults.

Each equality scenario runs the expert-parallel layer with the given exchange
options against one process holding every expert (outputs, input, router and expert
gradients, as ``parallel_scenarios.check_against_single``), and returns what the
layer reported (``AllToAllStats``) together with every rank's routing, so that the
test can recount the traffic from the routing alone (``benchmarks/ep_traffic.py``)
and hold the layer to it byte for byte. Launched by ``tests/test_parallel_comm.py``
with ``LOCAL_WORLD_SIZE=2``: 4 ranks are 2 simulated nodes of 2.
"""

from __future__ import annotations

import datetime
import time

from parallel_harness import scenario
from parallel_scenarios import ROUTER_TOL, compare, make_full, make_inputs

STAT_FIELDS = ("send_rows", "recv_rows", "bytes_sent", "bytes_received", "count_bytes", "cross_node_bytes_sent",
               "cross_node_bytes_received", "meta_bytes", "phase_bytes", "hierarchy", "chunks")  # fmt: skip


def run_against_single(rank, W, *, tokens, E, k, H=32, ffn=32, hot_rank=None, glu=False, placement=None, mesh=False,
                       **layer):  # fmt: skip
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    tokens = tokens[:W]
    act = dict(glu=True, activation="silu") if glu else {}
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=16, backend="torch", **act)
    full = make_full(cfg, hot_rank=hot_rank, world_size=W)
    xs, gs = make_inputs(tokens, H, hot=hot_rank is not None), make_inputs(tokens, H, seed=2)
    ref = dMoE(cfg)
    ref.load_state_dict(full.state_dict())
    x_all = torch.cat(xs).requires_grad_()
    out_all = ref(x_all)
    (out_all * torch.cat(gs)).sum().backward()

    group = None
    if mesh:  # the node layout from a ("node", "local") mesh, not from LOCAL_WORLD_SIZE
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh("cpu", (2, W // 2), mesh_dim_names=("node", "local"))
    ep = ExpertParallelDMoE(cfg, group, placement=placement, name="comm", sync_router_init=False, **layer)
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    x = xs[rank].clone().requires_grad_()
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    compare("dx", x.grad, x_all.grad[rows])
    compare("d router.weight", ep.router.weight.grad, ref.router.weight.grad, ROUTER_TOL)
    local = list(ep.local_experts)
    for pname in ("w1", "w2", "v1"):
        p = getattr(ep, pname)
        if p is not None and local:  # a rank holding no expert has empty weights, never used
            compare(f"d{pname}", p.grad, getattr(ref, pname).grad[local])
    st = aux.all_to_all
    assert int(aux.tokens_per_local_expert.sum()) == sum(st.recv_rows)
    ids = [None] * W  # every rank's routing, for the byte count from the routing alone
    dist.all_gather_object(ids, aux.expert_ids.tolist())
    return {
        "stats": {f: getattr(st, f) for f in STAT_FIELDS},
        "expert_ids": ids,
        "owners": list(ep.placement.owners),
        "node_of": None if ep.layout is None else list(ep.layout.node_of),
        "hidden": H,
        "elem": x.element_size(),
    }


# --------------------------------------------------------------------------- equality (+ exact bytes)
def _case(name, **kw):
    def fn(rank, W):
        return run_against_single(rank, W, **kw)

    fn.__name__ = name
    scenario(fn)


for _h in ("flat", "node"):
    for _c in (1, 2):
        _case(f"comm_{_h}_c{_c}", tokens=[13, 5, 9, 7], E=8, k=2, hierarchy=_h, chunks=_c)
_case("comm_node_glu_k3", tokens=[6, 11, 4, 8], E=8, k=3, glu=True, hierarchy="node", chunks=2)
# every token's experts on the last rank (node 1): one row per token crosses, not k
_case("comm_node_hot", tokens=[9, 6, 7, 3], E=8, k=2, hot_rank=3, hierarchy="node", chunks=1)
_case("comm_flat_hot", tokens=[9, 6, 7, 3], E=8, k=2, hot_rank=3, hierarchy="flat", chunks=1)
_case("comm_node_mesh", tokens=[7, 12, 3, 9], E=8, k=2, hierarchy="node", chunks=2, mesh=True)
# a rank with no tokens, a rank with no expert, E not a multiple of the chunks
_case("comm_node_sparse", tokens=[0, 10, 5, 8], E=6, k=2, placement=[0, 0, 0, 2, 3, 3], hierarchy="node", chunks=3)


# --------------------------------------------------------------------------- faults
@scenario
def comm_mismatch_hierarchy(rank, W):
    return _mismatch(rank, W, {"hierarchy": "node"}, "hierarchy=")


@scenario
def comm_mismatch_chunks(rank, W):
    return _mismatch(rank, W, {"chunks": 3}, "chunks=")


@scenario
def comm_mismatch_nodes(rank, W):
    return _mismatch(rank, W, {"hierarchy": "node", "ranks_per_node": 1}, "nodes=", base={"hierarchy": "node"})


def _mismatch(rank, W, other, field, base=None):
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    kw = other if rank == W - 1 else (base or {})
    t = time.monotonic()
    try:
        ExpertParallelDMoE(cfg, name="blocks.1.moe", **kw)
    except ConfigMismatchError as err:
        assert f"rank {W - 1}: {field}" in str(err) and "blocks.1.moe" in str(err), str(err)
        return {"message": str(err), "elapsed": time.monotonic() - t}
    raise AssertionError("no ConfigMismatchError")


@scenario
def comm_bad_options(rank, W):
    """Options rejected before any collective, naming the argument, the value and what was expected."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    msgs = []
    for kw in ({"chunks": 0}, {"hierarchy": "rack"}, {"capacity_per_peer": 4, "hierarchy": "node"},
               {"hierarchy": "node", "ranks_per_node": 3}):  # fmt: skip
        try:
            ExpertParallelDMoE(cfg, name="blocks.2.moe", **kw)
        except ValueError as err:
            msgs.append(str(err))
        else:
            raise AssertionError(f"no ValueError for {kw}")
    assert "chunks must be a positive int, got 0" in msgs[0], msgs[0]
    assert "'rack'" in msgs[1] and "('flat', 'node')" in msgs[1], msgs[1]
    assert "capacity_per_peer=4" in msgs[2] and "hierarchy='node'" in msgs[2], msgs[2]
    assert "ranks_per_node=3" in msgs[3] and "same number" in msgs[3], msgs[3]
    return {"messages": msgs}


@scenario
def comm_bad_input_node(rank, W):
    """Bad input on one rank under the hierarchical, chunked exchange: every rank leaves at once, group usable."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, PeerFailedError

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, hierarchy="node", chunks=2, name="blocks.3.moe")
    t = time.monotonic()
    try:
        ep(torch.randn(3, 12 if rank == W - 1 else 16))
    except PeerFailedError as err:
        assert rank != W - 1 and f"rank(s) [{W - 1}]" in str(err), str(err)
        msg = str(err)
    except ValueError as err:
        assert rank == W - 1, str(err)
        msg = str(err)
    else:
        raise AssertionError("no error")
    elapsed = time.monotonic() - t
    ep(torch.randn(2, 16)).sum().backward()  # the group still works
    return {"message": msg, "elapsed": elapsed}


@scenario
def comm_dead_peer(rank, W):
    """The last rank dies; the others' hierarchical, chunked forward + backward fails within the timeout."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, hierarchy="node", chunks=2, name="blocks.9.moe",
                            timeout=datetime.timedelta(seconds=5))  # fmt: skip
    if rank == W - 1:
        return {"exit_after": 17}
    time.sleep(0.5)
    t = time.monotonic()
    try:
        ep(torch.randn(6, 16)).sum().backward()
    except CollectiveError as err:
        assert "blocks.9.moe" in str(err), str(err)
        return {"message": str(err), "elapsed": time.monotonic() - t}
    raise AssertionError("no CollectiveError")


# --------------------------------------------------------------------------- overlap order, statistics
@scenario
def comm_trace_order(rank, W):
    """With chunks=2 the stage timestamps show the pipeline: the next chunk is in flight while one computes,
    in forward and in backward (orders, not durations: they hold on any machine). collect_load_stats adds up."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, collect_load_stats
    from blocksparse_moe.parallel.trace import StageTrace

    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4 * W, top_k=2, block_size=16, backend="torch")
    out = {}
    for hierarchy in ("flat", "node"):
        ep = ExpertParallelDMoE(cfg, hierarchy=hierarchy, chunks=2, name=f"trace-{hierarchy}")
        ep.trace = StageTrace()
        _, aux = ep(torch.randn(24, 32, requires_grad=True), return_aux=True)
        _.sum().backward()
        first = {}
        for s in ep.trace.spans:  # the first span of each (stage, chunk)
            first.setdefault((s.stage, s.chunk), s)
        st = lambda name, c: first[(name, c)]  # noqa: E731
        assert st("dispatch", 1).start < st("experts", 0).start  # chunk 1 issued before chunk 0 computes
        assert st("return", 0).start < st("experts", 1).start  # chunk 0 travels back while chunk 1 computes
        assert st("return (backward)", 0).start < st("experts (backward)", 1).start  # all return grads issued first
        assert st("dispatch (backward)", 1).start < st("experts (backward)", 0).start
        (stats,) = collect_load_stats(ep, reduce=False).values()
        a = aux.all_to_all
        assert (stats.cross_node_bytes_sent, stats.meta_bytes, stats.host_reads) == (
            a.cross_node_bytes_sent, a.meta_bytes, 1)
        out[hierarchy] = ep.trace.table()
    return {"trace": out}


@scenario
def comm_node_bf16(rank, W):
    """bf16 rows: the hierarchical, chunked exchange runs forward and backward and agrees with the flat one
    within bf16 rounding (its routing weights travel in bf16, the flat path's stay fp32)."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4 * W, top_k=2, block_size=16, backend="torch",
                    dtype=torch.bfloat16)  # fmt: skip
    full = make_full(MoEConfig(**{**cfg.__dict__, "dtype": torch.float32})).to(torch.bfloat16)
    outs, grads = [], []
    for hierarchy, chunks in (("flat", 1), ("node", 2)):
        ep = ExpertParallelDMoE(cfg, hierarchy=hierarchy, chunks=chunks, name=f"bf16-{hierarchy}",
                                sync_router_init=False)  # fmt: skip
        ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
        x = make_inputs([10 + rank], 32)[0].to(torch.bfloat16).requires_grad_()
        y = ep(x)
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append(x.grad.float())
    compare("bf16 out, node vs flat", outs[1], outs[0], dict(atol=3e-2, rtol=3e-2))
    compare("bf16 dx, node vs flat", grads[1], grads[0], dict(atol=6e-2, rtol=6e-2))
    return {}


@scenario
def comm_two_layers_node_c2(rank, W):
    """Two stacked hierarchical, chunked layers with residuals: backward interleaves both layers' transfers
    in the same order on every rank, and the result is the single process's."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, sync_router_grads

    tokens, H = [6, 11, 3, 8][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=4 * W, top_k=2, block_size=16, backend="torch")
    fulls = [make_full(cfg, seed=s) for s in (3, 4)]
    refs = torch.nn.ModuleList(fulls)
    eps = torch.nn.ModuleList(ExpertParallelDMoE.from_dmoe(f, name=f"layers.{i}", hierarchy="node", chunks=2)
                              for i, f in enumerate(fulls))  # fmt: skip
    xs, gs = make_inputs(tokens, H), make_inputs(tokens, H, seed=2)

    def run(layers, x):
        for layer in layers:
            x = x + layer(x)
        return x

    x_all = torch.cat(xs).requires_grad_()
    (run(refs, x_all) * torch.cat(gs)).sum().backward()
    x = xs[rank].clone().requires_grad_()
    out = run(eps, x)
    (out * gs[rank]).sum().backward()
    sync_router_grads(eps)
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("dx", x.grad, x_all.grad[rows])
    for i in range(2):
        compare(f"layers.{i} d router", eps[i].router.weight.grad, refs[i].router.weight.grad, ROUTER_TOL)
        compare(f"layers.{i} dw1", eps[i].w1.grad, refs[i].w1.grad[eps[i].expert_slice])
        compare(f"layers.{i} dw2", eps[i].w2.grad, refs[i].w2.grad[eps[i].expert_slice])

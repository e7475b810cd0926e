"""Correctness scenarios for the expert-parallel tests: the sharded layer against one process with every expert.

Each scenario runs on every rank of a launch (``parallel_harness.launch``, by name) and
returns a JSON-able dict of what the test checks beyond the comparisons it makes
itself: per-peer row counts and bytes, dropped tokens. ``check_against_single``
is the common case (see ``tests/test_parallel.py`` for what it compares).
"""

from __future__ import annotations

import os

from parallel_harness import Skip, scenario


# --------------------------------------------------------------------------- scenario helpers
TOL = dict(atol=2e-5, rtol=2e-5)
ROUTER_TOL = dict(atol=2e-4, rtol=2e-4)  # as tests/test_layers.py: softmax-gradient cancellation


def make_full(cfg, *, seed=0, hot_rank=None, world_size=1):
    """A single-process dMoE with O(1) signals; ``hot_rank`` routes every token to that rank's experts."""
    import torch

    from blocksparse_moe import dMoE

    E, H, ffn = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
    layer = dMoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        layer.w1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        layer.w2.copy_(torch.randn(E, ffn, H, generator=g) / ffn**0.5)
        if layer.v1 is not None:
            layer.v1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        if hot_rank is not None:
            El = E // world_size
            hot = torch.full((E,), -4.0)
            hot[hot_rank * El : (hot_rank + 1) * El] = 4.0
            layer.router.weight[:, 0] += hot  # inputs carry ~2 on axis 0 (make_inputs): logits +-8
    return layer


def make_inputs(tokens, H, *, seed=1, hot=False):
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(T, H, generator=g) for T in tokens]
    if hot:
        for x in xs:
            x[:, 0] = 2.0 + 0.1 * x[:, 0]
    return xs


def compare(name, actual, expected, tol=TOL):
    from helpers import assert_close

    assert_close(actual, expected, name=name, **tol)


def check_against_single(rank, W, *, tokens, E, k, H=32, ffn=48, bs=16, hot_rank=None, capacity=None,
                         backend="torch", group=None, x_needs_grad=True, ep_options=None, **options):  # fmt: skip
    """The expert-parallel layer against one dMoE holding every expert, fed every rank's tokens.

    Loss = sum over ranks of <out_r, g_r>. Compared: out_r, dx_r (this rank's rows
    of the single-process gradients), the router gradient after the sum all-reduce,
    and this rank's slices of dw1 / dw2 / dv1. ``ep_options``: more arguments of the layer.
    """
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    sizes = dict(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=bs, **options)
    cfg = MoEConfig(backend=backend, **sizes)
    ref_cfg = MoEConfig(backend="torch", **sizes)
    full = make_full(ref_cfg, hot_rank=hot_rank, world_size=W)
    xs = make_inputs(tokens, H, hot=hot_rank is not None)
    gs = make_inputs(tokens, H, seed=2)
    ref = dMoE(ref_cfg)
    ref.load_state_dict(full.state_dict())
    x_all = torch.cat(xs).requires_grad_()
    out_all = ref(x_all)
    (out_all * torch.cat(gs)).sum().backward()

    ep = ExpertParallelDMoE(cfg, group, capacity_per_peer=capacity, name="test-layer", sync_router_init=False,
                            **(ep_options or {}))  # fmt: skip
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    x = xs[rank].clone().requires_grad_(x_needs_grad)
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()

    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    if x_needs_grad:
        compare("dx", x.grad, x_all.grad[rows])
    compare("d router.weight", ep.router.weight.grad, ref.router.weight.grad, ROUTER_TOL)
    for pname in ("w1", "w2", "v1"):
        p = getattr(ep, pname)
        if p is not None:
            compare(f"d{pname}", p.grad, getattr(ref, pname).grad[ep.expert_slice])
    st = aux.all_to_all
    if st.recv_rows is not None:
        assert int(aux.tokens_per_local_expert.sum()) == sum(st.recv_rows)
    return {
        "send_rows": st.send_rows,
        "recv_rows": st.recv_rows,
        "bytes_sent": st.bytes_sent,
        "bytes_received": st.bytes_received,
        "tokens": tokens[rank],
        "dropped": int(aux.dropped_tokens),
        "tokens_per_local_expert": aux.tokens_per_local_expert.tolist(),
        "rounds": st.rounds,
        "peak_recv_rows": st.peak_recv_rows,
    }


# --------------------------------------------------------------------------- correctness scenarios
@scenario
def uneven(rank, W):
    return check_against_single(rank, W, tokens=[13, 5, 9, 2][:W], E=2 * W, k=2)


@scenario
def zero_tokens(rank, W):
    return check_against_single(rank, W, tokens=[0, 11, 4, 0][:W], E=2 * W, k=2)


@scenario
def hot_rank(rank, W):
    """Every token's k experts live on the last rank."""
    res = check_against_single(rank, W, tokens=[9, 6, 7, 3][:W], E=2 * W, k=2, hot_rank=W - 1)
    assert res["send_rows"][: W - 1] == [0] * (W - 1), res["send_rows"]  # the premise of the case
    return res


@scenario
def topk_gt_local(rank, W):
    """top_k larger than the experts per rank: every token visits several ranks."""
    E = W if W > 2 else 4  # W=4: 1 expert per rank, k=3; W=2: 2 experts per rank, k=3
    return check_against_single(rank, W, tokens=[7, 10, 3, 5][:W], E=E, k=3)


@scenario
def glu_recompute(rank, W):
    return check_against_single(
        rank, W, tokens=[8, 12, 5, 1][:W], E=2 * W, k=2, glu=True, activation="silu", recompute_activation=True
    )


@scenario
def x_without_grad(rank, W):
    """Rank 0's input needs no gradient: the other ranks' backward must not wait for it."""
    return check_against_single(rank, W, tokens=[6, 9, 4, 7][:W], E=2 * W, k=2, x_needs_grad=rank != 0)


@scenario
def capacity_exact(rank, W):
    """Fixed capacity with the bound that never overflows: identical to the dropless path."""
    tokens = [10, 3, 8, 6][:W]
    res = check_against_single(rank, W, tokens=tokens, E=2 * W, k=2, capacity=max(tokens) * 2)
    assert res["dropped"] == 0
    return res


@scenario
def triton_interpreter(rank, W):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("needs TRITON_INTERPRET=1 (set before triton is imported)")
    return check_against_single(rank, W, tokens=[5, 3, 4, 2][:W], E=2 * W, k=2, H=16, ffn=16, backend="triton")


@scenario
def world_size_one(rank, W):
    """A group of one rank per process (every rank calls new_group for every group)."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(W)]
    return check_against_single(0, 1, tokens=[7], E=4, k=2, group=groups[rank])


@scenario
def two_layers(rank, W):
    """Two stacked layers with residuals: backward runs both layers' all-to-alls in order."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, sync_router_grads

    tokens, H = [6, 11, 3, 8][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    fulls = [make_full(cfg, seed=s) for s in (3, 4)]
    refs = torch.nn.ModuleList(fulls)
    eps = torch.nn.ModuleList(ExpertParallelDMoE.from_dmoe(f, name=f"layers.{i}") for i, f in enumerate(fulls))
    xs, gs = make_inputs(tokens, H), make_inputs(tokens, H, seed=2)

    def run(layers, x):
        for layer in layers:
            x = x + layer(x)
        return x

    x_all = torch.cat(xs).requires_grad_()
    out_all = run(refs, x_all)
    (out_all * torch.cat(gs)).sum().backward()
    x = xs[rank].clone().requires_grad_()
    out = run(eps, x)
    (out * gs[rank]).sum().backward()
    sync_router_grads(eps)
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    compare("dx", x.grad, x_all.grad[rows])
    for i in range(2):
        compare(f"layers.{i} d router", eps[i].router.weight.grad, refs[i].router.weight.grad, ROUTER_TOL)
        compare(f"layers.{i} dw1", eps[i].w1.grad, refs[i].w1.grad[eps[i].expert_slice])
        compare(f"layers.{i} dw2", eps[i].w2.grad, refs[i].w2.grad[eps[i].expert_slice])


@scenario
def aux_and_stats(rank, W):
    """aux is the single-process aux of this rank's tokens; the traffic figures add up."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    tokens, H = [9, 4, 0, 6][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    full = make_full(cfg)
    ep = ExpertParallelDMoE.from_dmoe(full)
    x = make_inputs(tokens, H)[rank]
    _, aux = ep(x, return_aux=True)
    _, ref = full(x, return_aux=True)
    compare("load_balancing_loss", aux.load_balancing_loss, ref.load_balancing_loss)
    compare("z_loss", aux.z_loss, ref.z_loss)
    assert torch.equal(aux.tokens_per_expert, ref.tokens_per_expert)
    assert torch.equal(aux.expert_ids, ref.expert_ids)
    st = aux.all_to_all
    assert sum(st.send_rows) == tokens[rank] * 2
    remote = sum(st.send_rows) + sum(st.recv_rows) - st.send_rows[rank] - st.recv_rows[rank]
    assert st.bytes_sent == remote * H * 4
    return {"send_rows": st.send_rows, "recv_rows": st.recv_rows}


@scenario
def sharding(rank, W):
    """shard_state_dict / gather_state_dict round trip, with a module prefix; offline sharding."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, expert_range, gather_state_dict, shard_state_dict

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=2 * W, top_k=2, block_size=16, glu=True)
    full = torch.nn.ModuleDict({"moe": make_full(cfg), "proj": torch.nn.Linear(16, 16)})
    full_sd = full.state_dict()
    model = torch.nn.ModuleDict({"moe": ExpertParallelDMoE(cfg), "proj": torch.nn.Linear(16, 16)})
    model.load_state_dict(shard_state_dict(full_sd, model))
    own = expert_range(rank, W, 2 * W)
    assert list(model["moe"].expert_range) == list(own)
    assert torch.equal(model["moe"].w1, full_sd["moe.w1"][own.start : own.stop])
    assert torch.equal(model["moe"].v1, full_sd["moe.v1"][own.start : own.stop])
    offline = shard_state_dict(full_sd, rank=rank, world_size=W)
    assert all(torch.equal(offline[k], v) for k, v in model.state_dict().items())
    back = gather_state_dict(model)
    assert back.keys() == full_sd.keys() and all(torch.equal(back[k], full_sd[k]) for k in full_sd)
    at0 = gather_state_dict(model, dst=0)
    assert (at0 is None) == (rank != 0)
    if rank == 0:
        assert all(torch.equal(at0[k], full_sd[k]) for k in full_sd)


@scenario
def replicated_router(rank, W):
    """Different seeds per rank: the router is broadcast at init; the bias step uses the group's load."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    torch.manual_seed(100 + rank)
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=1, block_size=16, router_selection_bias=True
    )
    ep = ExpertParallelDMoE(cfg)
    _, aux = ep(torch.randn(5 + 3 * rank, 16), return_aux=True)
    ep.update_selection_bias(aux.tokens_per_expert, rate=0.5)
    mine = torch.cat([ep.router.weight.detach().flatten(), ep.router.selection_bias])
    everyone = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(t, everyone[0]) for t in everyone)
    assert ep.router.selection_bias.abs().sum() > 0


@scenario
def capacity_drop(rank, W):
    """A bound too small, policy "drop": rows past B per pair (in expert order) contribute nothing."""
    import torch

    from blocksparse_moe import MoEConfig, plan_routing
    from blocksparse_moe.parallel import ExpertParallelDMoE
    from blocksparse_moe.reference import moe_ffn_dense

    tokens, H, E, k, B = [12, 9, 14, 5][:W], 32, 2 * W, 2, 4
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=E, top_k=k, block_size=16, backend="torch")
    full = make_full(cfg)
    ep = ExpertParallelDMoE.from_dmoe(full, capacity_per_peer=B, capacity_overflow="drop")
    x = make_inputs(tokens, H)[rank]
    out, aux = ep(x, return_aux=True)
    out.sum().backward()  # runs; gradients of a dropping layer have no oracle here
    # The oracle: this rank's assignments, minus the ones past B rows per destination.
    route = full.router(x)
    plan = plan_routing(route.expert_ids, E)
    dest = plan.sorted_expert.long() // (E // W)
    first = plan.expert_offsets.long()[0 : E : E // W]
    kept_sorted = (torch.arange(plan.num_slots) - first[dest]) < B
    kept = kept_sorted[plan.slot_to_sorted.long()].view(-1, k)
    w = torch.where(kept, route.weights, torch.zeros(()))
    expected = moe_ffn_dense(x.double(), route.expert_ids, w.double(), full.w1.double(), full.w2.double())
    compare("out (dropping)", out, expected.float())
    assert int(aux.dropped_tokens) == int((~kept).sum())
    return {"dropped": int(aux.dropped_tokens)}


@scenario
def capacity_overflow_error(rank, W):
    """A bound too small, policy "error": every rank raises CapacityOverflowError (no hang)."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CapacityOverflowError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, capacity_per_peer=2, name="blocks.7.moe")
    x = torch.randn(3 if rank else 30, 16)  # only rank 0 overflows
    try:
        ep(x)
    except CapacityOverflowError as err:
        assert "blocks.7.moe" in str(err) and "capacity_per_peer=2" in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no CapacityOverflowError")


@scenario
def router_grad_mean(rank, W):
    """``sync_router_grads(model, op="mean")``: every rank's router gradient is the mean over ranks.

    The reference is the single-process gradient of the sum of the ranks' losses
    (what ``op="sum"`` gives) divided by the world size; ``op="mean"`` must not return the sum.
    """
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, sync_router_grads

    tokens, H = [7, 12, 5, 9][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    full = make_full(cfg, seed=5)
    ref = dMoE(cfg)
    ref.load_state_dict(full.state_dict())
    xs, gs = make_inputs(tokens, H), make_inputs(tokens, H, seed=2)
    (ref(torch.cat(xs)) * torch.cat(gs)).sum().backward()
    model = torch.nn.ModuleDict({"moe": ExpertParallelDMoE.from_dmoe(full, name="moe")})
    (model["moe"](xs[rank]) * gs[rank]).sum().backward()
    own = model["moe"].router.weight.grad.clone()  # this rank's tokens only
    sync_router_grads(model, op="mean")
    mean = model["moe"].router.weight.grad
    compare("router grad, op='mean'", mean, ref.router.weight.grad / W, ROUTER_TOL)
    everyone = [torch.empty_like(own) for _ in range(W)]
    torch.distributed.all_gather(everyone, own)
    compare("router grad, op='mean' vs the ranks' own mean", mean, torch.stack(everyone).mean(0), TOL)
    return {"mean_norm": float(mean.norm()), "sum_norm": float(ref.router.weight.grad.norm())}

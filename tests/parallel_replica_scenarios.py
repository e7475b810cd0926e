"""Replicated (hot) experts under expert parallelism, on gloo: scenarios for tests/test_parallel_replicas.py.

* ``replicas_vs_single``: a placement replicating some experts (one on every rank)
  against one process holding every expert, for the flat, fixed-capacity, chunked,
  bounded and (4 ranks) hierarchical exchanges, a rank with no tokens: outputs, input
  and router gradients, and every expert's ``w1``/``w2``/``v1`` gradient after
  ``sync_replica_grads``.
* ``replicas_training``: AdamW steps with ``reduce_gradients`` (ep alone, and a 2 x 2
  ``dp x ep`` mesh at 4 ranks) against one process on the whole batch; the replicas
  stay bitwise identical; ``grad_norm`` counts a replicated expert once.
* ``replicas_checkpoint``: ``save_sharded`` from a replicated placement stores each
  expert once; it loads into a single-replica placement and back; a single-replica
  checkpoint loads into a replicated one; ``gather_state_dict`` gives the full model.
* ``replicas_replace``: ``replace_experts`` into and out of a replicated placement
  changes no loss and no weight.
* ``replicas_traffic``: the rows each rank receives, the load statistics and the
  cross-rank rows equal what ``placement_traffic`` predicts from the same routing.
* ``replicas_bad_placements``: every bad replicated placement raises the same
  ``ValueError`` on every rank, before any collective; the group stays usable.
"""

from __future__ import annotations

import os

from parallel_harness import scenario
from parallel_models import batch, loss_fn, parallel, reference
from parallel_scenarios import ROUTER_TOL, compare, make_full, make_inputs

PARAM_TOL = dict(atol=1e-5, rtol=1e-5)


def holders(W: int) -> list:
    """``ranks[e]`` of the test placement: expert 0 on every rank, others on one or two ranks."""
    if W == 2:
        return [[0, 1], [0], [1], [0, 1], [1], [0]]
    return [[0, 1, 2, 3], [1, 3], [0], [2], [3], [1], [0, 2], [3]]


def _placement(W: int):
    from blocksparse_moe.parallel import ExpertPlacement

    return ExpertPlacement.from_ranks(holders(W), W)


def _run_single(rank, W, tokens, pl, ep_options, H=32, ffn=48, k=3):
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    E = pl.num_experts
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=16, glu=True,
                    activation="silu", backend="torch")  # fmt: skip
    full = make_full(cfg)
    xs, gs = make_inputs(tokens, H), make_inputs(tokens, H, seed=2)
    ref = dMoE(cfg)
    ref.load_state_dict(full.state_dict())
    x_all = torch.cat(xs).requires_grad_()
    out_all = ref(x_all)
    (out_all * torch.cat(gs)).sum().backward()

    ep = ExpertParallelDMoE(cfg, placement=pl, name="replicas", sync_router_init=False, **ep_options)
    assert ep.local_experts == pl.experts_of(rank) and ep.w1.shape[0] == len(ep.local_experts)
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    x = xs[rank].clone().requires_grad_()
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()
    moved = ep.sync_replica_grads()
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    compare("dx", x.grad, x_all.grad[rows])
    compare("d router.weight", ep.router.weight.grad, ref.router.weight.grad, ROUTER_TOL)
    ids = torch.tensor(ep.local_experts, dtype=torch.long)
    for name in ("w1", "w2", "v1"):
        compare(f"d{name}", getattr(ep, name).grad, getattr(ref, name).grad[ids])
    # the routing counts are the global ones: every replica's rows summed
    tpe = aux.tokens_per_expert.clone()
    torch.distributed.all_reduce(tpe, group=ep.group)
    want = torch.zeros(E, dtype=torch.int64).index_add_(
        0, ref.router(x_all.detach()).expert_ids.reshape(-1), torch.ones(sum(tokens) * k, dtype=torch.int64)
    )
    assert torch.equal(tpe.cpu(), want), (tpe, want)
    return {"local_rows": aux.tokens_per_local_expert.tolist(), "replica_bytes": moved,
            "recv_rows": aux.all_to_all.recv_rows}  # fmt: skip


@scenario
def replicas_vs_single(rank, W):
    tokens = [9, 0] if W == 2 else [5, 0, 7, 3]  # a rank without tokens
    pl = _placement(W)
    modes = {
        "flat": {},
        "capacity": {"capacity_per_peer": max(tokens) * 3},
        "chunks": {"chunks": 2},
        "bounded": {"max_recv_rows": 6},
        "flat_nodes": {"ranks_per_node": 1 if W == 2 else 2},
    }
    if W == 4:
        modes["hierarchical"] = {"hierarchy": "node", "ranks_per_node": 2}
    return {mode: _run_single(rank, W, tokens, pl, opts) for mode, opts in modes.items()}


def _replica_rows_identical(model, group) -> bool:
    """Every replica of every replicated expert holds the same bits as its lowest holder's."""
    import torch

    moe = model.moe
    pl = moe.placement
    ok = True
    for name in ("w1", "w2", "v1"):
        p = getattr(moe, name).detach()
        most = max(pl.counts)
        pad = p.new_zeros((most,) + tuple(p.shape[1:]))
        pad[: p.shape[0]] = p
        parts = [torch.empty_like(pad) for _ in range(pl.world_size)]
        torch.distributed.all_gather(parts, pad, group=group)
        for e, hs in enumerate(pl.ranks):
            rows = [parts[r][pl.experts_of(r).index(e)] for r in hs]
            ok = ok and all(torch.equal(rows[0], x) for x in rows[1:])
    return ok


def _train(model, group_rank, parts, steps, reduce):
    import torch

    from blocksparse_moe.parallel import grad_norm, reduce_gradients

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step, parts)[group_rank]
        loss = loss_fn(model, x, y)
        loss.backward()
        if reduce:
            reduce_gradients(model)
            norms.append(float(grad_norm(model)))
        else:
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, norms


@scenario
def replicas_training(rank, W):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from blocksparse_moe.parallel import ExpertPlacement, gather_state_dict

    out = {}
    layouts = [("ep", W, None)]
    if W == 4:
        layouts.append(("dp2_ep2", 2, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))))
    for label, P, mesh in layouts:
        E = 6 if P == 2 else 8
        pl = ExpertPlacement.from_ranks(holders(P), P)
        ref = reference(E, glu=True, seed=3)
        ref_losses, ref_norms = _train(ref, 0, 1, 3, reduce=False)
        model = parallel(reference(E, glu=True, seed=3), mesh, placement=pl)
        losses, norms = _train(model, rank, W, 3, reduce=True)
        mean = torch.tensor(losses)
        dist.all_reduce(mean)
        mean = (mean / W).tolist()
        for a, b in zip(mean, ref_losses):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (mean, ref_losses)
        for a, b in zip(norms, ref_norms):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (norms, ref_norms)
        ep_group = model.moe.group
        identical = _replica_rows_identical(model, ep_group)
        full = gather_state_dict(model)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(full[key], value, **PARAM_TOL, msg=key)
        out[label] = {"losses": mean, "identical": identical, "norms": norms}
    return out


def _dir(name: str) -> str:
    return os.path.join(os.environ["BSMOE_CKPT_DIR"], name)


@scenario
def replicas_checkpoint(rank, W):
    import torch

    from blocksparse_moe.parallel import ExpertPlacement, gather_state_dict, load_sharded, save_sharded

    E = 6 if W == 2 else 8
    rep = parallel(reference(E, glu=True, seed=5), placement=_placement(W))
    opt = torch.optim.AdamW(rep.parameters(), lr=1e-2)
    _step(rep, opt, rank, W)
    save_sharded(rep, _dir(f"rep{W}"), opt)
    want = gather_state_dict(rep)
    if rank == 0:  # what the plain single-process model must read back (tests/test_parallel_replicas.py)
        torch.save(want, _dir(f"rep{W}.full.pt"))
    # into a single-replica (permuted) placement
    owners = [(e * 3 + 1) % W for e in range(E)]
    single = parallel(reference(E, glu=True, seed=9), placement=ExpertPlacement.from_owners(owners, W))
    opt1 = torch.optim.AdamW(single.parameters(), lr=1e-2)
    load_sharded(single, _dir(f"rep{W}"), opt1)
    got = gather_state_dict(single)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    save_sharded(single, _dir(f"single{W}"), opt1)
    # and back into a replicated placement: every replica filled
    back = parallel(reference(E, glu=True, seed=11), placement=_placement(W))
    opt2 = torch.optim.AdamW(back.parameters(), lr=1e-2)
    load_sharded(back, _dir(f"single{W}"), opt2)
    got = gather_state_dict(back)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert _replica_rows_identical(back, back.moe.group)
    # the same next step from either copy (the Adam moments followed every replica)
    l1, l2 = _step(single, opt1, rank + 1, W), _step(back, opt2, rank + 1, W)
    assert abs(float(l1) - float(l2)) <= 1e-6, (float(l1), float(l2))
    return {"experts": E}


def _step(model, opt, step, parts):
    from blocksparse_moe.parallel import reduce_gradients

    x, y = batch(step % 4, parts)[model.moe.rank]
    loss = loss_fn(model, x, y)
    loss.backward()
    reduce_gradients(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@scenario
def replicas_replace(rank, W):
    import torch
    import torch.distributed as dist

    from blocksparse_moe.parallel import gather_state_dict

    E = 6 if W == 2 else 8
    rep = _placement(W)

    def run(moves):
        model = parallel(reference(E, glu=True, seed=13))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, info = [], []
        for step in range(4):
            if step in moves:
                m = model.moe.replace_experts(moves[step], opt)
                info.append((m.experts_moved, m.experts_sent, m.experts_received))
            loss = _step(model, opt, step, W)
            dist.all_reduce(loss)
            losses.append(float(loss))
        return losses, gather_state_dict(model), info

    base, full_base, _ = run({})
    contiguous = [e * W // E for e in range(E)]
    moved, full_moved, info = run({1: rep, 3: contiguous})
    for a, b in zip(base, moved):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (base, moved)
    for key in full_base:
        torch.testing.assert_close(full_moved[key], full_base[key], **PARAM_TOL, msg=key)
    return {"losses": moved, "moves": info}


@scenario
def replicas_traffic(rank, W):
    """The rows each rank's replicas receive are what ``placement_traffic`` predicts (one rule for both)."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, collect_load_stats, placement_traffic

    pl, R, T, k = _placement(W), (1 if W == 2 else 2), 12, 3
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=pl.num_experts, top_k=k, backend="torch")
    layer = ExpertParallelDMoE(cfg, placement=pl, ranks_per_node=R, name="traffic")
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        _, aux = layer(x, return_aux=True)
    ids = [torch.empty_like(aux.expert_ids) for _ in range(W)]
    dist.all_gather(ids, aux.expert_ids.contiguous())
    want = placement_traffic(torch.cat(ids), pl, R)
    (stats,) = collect_load_stats(layer).values()
    got = sum(aux.all_to_all.recv_rows)
    assert got == want["rows_per_rank"][rank], (got, want["rows_per_rank"])
    assert stats.rows_per_rank == want["rows_per_rank"], (stats.rows_per_rank, want["rows_per_rank"])
    assert abs(stats.balancedness - want["balancedness"]) < 1e-12
    sent_away = sum(aux.all_to_all.send_rows) - aux.all_to_all.send_rows[rank]
    total = torch.tensor(sent_away)
    dist.all_reduce(total)
    assert int(total) == want["cross_rank_rows"], (int(total), want["cross_rank_rows"])
    return {"rows_per_rank": want["rows_per_rank"], "cross_rank_rows": want["cross_rank_rows"]}


@scenario
def replicas_bad_placements(rank, W):
    """Each bad placement raises the same ValueError on every rank, before any collective."""
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, ExpertPlacement

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, backend="torch")
    bad = {
        "no_replica": lambda: ExpertPlacement.from_rank_experts([[0, 1], [1, 2]] + [[1]] * (W - 2), num_experts=4,
                                                                replicas=True),
        "rank_out_of_range": lambda: ExpertParallelDMoE(cfg, placement=ExpertPlacement.from_ranks(
            [[0, W], [0], [1], [1]], W)),
        "twice_on_a_rank": lambda: ExpertPlacement.from_ranks([[0, 0], [0], [1], [1]], W),
        "more_replicas_than_ranks": lambda: ExpertPlacement.from_ranks([list(range(W)) + [0], [0], [1], [1]], W),
        "wrong_expert_count": lambda: ExpertParallelDMoE(cfg, placement=ExpertPlacement.from_ranks(
            [[0, 1], [0], [1]], W)),
    }  # fmt: skip
    out = {}
    for name, build in bad.items():
        try:
            build()
        except ValueError as err:
            out[name] = str(err)
        else:
            raise AssertionError(f"{name}: no ValueError")
    dist.barrier()
    layer = ExpertParallelDMoE(cfg, placement=ExpertPlacement.from_ranks([[0, 1]] + [[1]] * 3, W))  # still usable
    out["ok"] = list(layer.local_experts)
    return out


def single_process_load(directory: str, W: int) -> dict:
    """A plain dMoE model (no process group) reads the replicated checkpoint: every expert once, all present."""
    import torch

    from blocksparse_moe.parallel import load_sharded

    E = 6 if W == 2 else 8
    model = reference(E, glu=True, seed=17)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(model, os.path.join(directory, f"rep{W}"), opt)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@scenario
def replicas_hf_mixtral(rank, W):
    """A Hugging Face Mixtral sharded with a replicated placement: logits, loss, every gradient, checkpoints."""
    from parallel_hf_scenarios import check_family

    from blocksparse_moe.parallel import ExpertPlacement

    pl = ExpertPlacement.from_ranks([[0, 1], [0], [1], [0, 1]] if W == 2 else [[0, 1, 2, 3], [1, 3], [0], [2]], W)
    res = check_family(rank, W, "mixtral", placement=pl)
    res["holders"] = [list(h) for h in pl.ranks]
    return res

"""Expert-choice routing and shared experts under expert parallelism (issue 14, items 5 and 6).

Each scenario builds the same full dMoE on every rank and compares the sharded layer
with it, in fp32, outputs and every gradient:

* shared experts with token choice: one process fed the concatenation of every
  rank's tokens (token choice is per token, so the batches' split does not matter);
* expert choice: each rank's experts choose among that rank's tokens, so the
  reference is the single-process dMoE applied to each rank's batch separately, the
  gradients summed over the batches (what the ranks' summed loss gives).

The shared experts' and the router's gradients are compared after
``sync_router_grad`` (their sum over ranks); the expert gradients are this rank's
experts' rows of the reference's.
"""

from __future__ import annotations

from parallel_harness import scenario
from parallel_scenarios import ROUTER_TOL, compare, make_full, make_inputs


def _full(cfg):
    """``make_full`` plus O(1) shared-expert weights, the same on every rank."""
    import torch

    full = make_full(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(full.named_parameters()):
            if name.startswith("shared_expert"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return full


def run_routing_case(rank, W, *, tokens, E, k, routing="token_choice", shared=0, gate=False, glu=False,
                     capacity_factor=1.0, ep_options=None, **cfg_extra):  # fmt: skip
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, gather_state_dict, shard_state_dict

    H, ffn = 32, 40
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=16, backend="torch",
                    routing=routing, num_shared_experts=shared, shared_expert_gate=gate, glu=glu,
                    capacity_factor=capacity_factor, **cfg_extra)  # fmt: skip
    full = _full(cfg)
    xs = make_inputs(tokens, H)
    gs = make_inputs(tokens, H, seed=2)
    ref = dMoE(cfg)
    ref.load_state_dict(full.state_dict())
    if routing == "expert_choice":  # each rank's batch on its own
        x_ref = [x.clone().requires_grad_() for x in xs]
        outs = [ref(x) for x in x_ref]
        sum((o * g).sum() for o, g in zip(outs, gs)).backward()
        ref_out, ref_dx = outs[rank], x_ref[rank].grad
    else:
        x_all = torch.cat(xs).requires_grad_()
        out_all = ref(x_all)
        (out_all * torch.cat(gs)).sum().backward()
        rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
        ref_out, ref_dx = out_all[rows], x_all.grad[rows]

    ep = ExpertParallelDMoE(cfg, name="routing-test", sync_router_init=False, **(ep_options or {}))
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    gathered = gather_state_dict(ep)  # the shared experts come back as they went in, once
    assert gathered.keys() == full.state_dict().keys(), (sorted(gathered), sorted(full.state_dict()))
    for key, value in full.state_dict().items():
        assert torch.equal(gathered[key], value), key
    x = xs[rank].clone().requires_grad_()
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()

    compare("out", out, ref_out)
    compare("dx", x.grad, ref_dx)
    compare("d router.weight", ep.router.weight.grad, ref.router.weight.grad, ROUTER_TOL)
    local = list(ep.local_experts)
    for pname in ("w1", "w2", "v1"):
        p = getattr(ep, pname)
        if p is not None:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a rank holding no expert
            compare(f"d{pname}", grad, getattr(ref, pname).grad[local])
    ref_params = dict(ref.named_parameters())
    shared_names = [n for n, _ in ep.named_parameters() if n.startswith("shared_expert")]
    assert len(shared_names) == (0 if not shared else (3 if glu else 2) + (1 if gate else 0)), shared_names
    for name, p in ep.named_parameters():
        if name.startswith("shared_expert"):
            compare(f"d {name}", p.grad, ref_params[name].grad, ROUTER_TOL)
    # send_rows is None in the fixed-capacity mode (it sends whole chunks)
    res = {"tokens": tokens[rank], "unrouted": int(aux.unrouted_tokens), "send_rows": aux.all_to_all.send_rows or []}
    groups, M = cfg_extra.get("router_groups"), cfg_extra.get("router_topk_groups")
    if groups is not None:  # group-limited: a token's experts lie in at most M groups, so on at most M * W / G ranks
        owner = torch.tensor(ep.placement.owners)
        most_groups = max((len(set((row // (E // groups)).tolist())) for row in aux.expert_ids), default=0)
        most_ranks = max((len(set(owner[row].tolist())) for row in aux.expert_ids), default=0)
        assert most_groups <= M and most_ranks <= M * max(1, W // groups), (most_groups, most_ranks, M, W, groups)
        res["most_ranks_per_token"] = most_ranks
    if routing == "expert_choice":
        with torch.no_grad():
            _, ref_aux = ref(xs[rank], return_aux=True)
        assert torch.equal(aux.chosen_tokens, ref_aux.chosen_tokens)
        assert int(aux.unrouted_tokens) == int(ref_aux.unrouted_tokens)
        C = aux.chosen_tokens.shape[1]
        if aux.all_to_all.send_rows is not None:  # variable mode: every pick is one row
            assert sum(aux.all_to_all.send_rows) == E * C, (aux.all_to_all.send_rows, E, C)
        res["capacity"] = C
    return res


def _case(name, **kw):
    def fn(rank, W):
        return run_routing_case(rank, W, **{**kw, "tokens": kw["tokens"][:W]})

    fn.__name__ = name
    scenario(fn)


# Prime expert counts, uneven batches, a rank with no tokens.
_case("shared_token_choice", tokens=[13, 0, 9, 5], E=5, k=2, shared=2, glu=True)
_case("shared_gated_mlp", tokens=[7, 11, 0, 6], E=7, k=3, shared=1, gate=True)
_case("choice_basic", tokens=[13, 0, 9, 5], E=5, k=2, routing="expert_choice")
_case("choice_glu_shared", tokens=[12, 7, 0, 9], E=7, k=2, routing="expert_choice", glu=True, shared=1, gate=True,
      capacity_factor=1.5)  # fmt: skip
# Group-limited routing (DeepSeek-V3: the groups as nodes): at most M groups, so M * W / G ranks, per token.
_case("limited_softmax", tokens=[13, 0, 9, 5], E=8, k=3, router_topk_groups=1, router_groups=2)
_case("limited_sigmoid_bias", tokens=[7, 11, 4, 0], E=8, k=2, router_topk_groups=1, router_groups=2,
      router_score="sigmoid", router_selection_bias=True, router_renormalize=True, shared=1, glu=True)  # fmt: skip
# k = E with capacity factor 1: every expert picks every token.
_case("choice_all_tokens", tokens=[6, 4, 5, 3], E=3, k=3, routing="expert_choice")
_case("choice_node", tokens=[10, 6, 0, 8], E=8, k=2, routing="expert_choice",
      ep_options={"hierarchy": "node", "ranks_per_node": 2, "chunks": 2})  # fmt: skip
_case("choice_fixed_capacity", tokens=[9, 5, 7, 2], E=6, k=2, routing="expert_choice",
      ep_options={"capacity_per_peer": 64})  # fmt: skip


@scenario
def shared_beside_counts(rank, W):
    """The shared experts run while the counts travel: on a rank waiting for a slow peer, before the host read.

    The last rank sleeps before its forward; every other rank's "local work" span (the
    shared experts) ends while it is still waiting for that peer's counts. Orders and a
    0.3 s sleep, not durations of compute: they hold on any machine.
    """
    import time

    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE
    from blocksparse_moe.parallel.trace import StageTrace

    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch",
                    num_shared_experts=1)  # fmt: skip
    out = {}
    for hierarchy in ("flat", "node"):
        ep = ExpertParallelDMoE(cfg, hierarchy=hierarchy, ranks_per_node=1 if W == 2 else 2, name=f"beside-{hierarchy}")
        ep.trace = StageTrace()
        if rank == W - 1:
            time.sleep(0.3)
        ep(torch.randn(12, 32, requires_grad=True)).sum().backward()
        first = {}
        for s in ep.trace.spans:
            first.setdefault(s.stage, s)
        local, read, counts = first["local work"], first["host read"], first["count exchange"]
        assert counts.start <= local.start and local.end <= read.start, ep.trace.table()
        if rank != W - 1:  # it waited for the sleeping peer after the shared experts were done
            assert read.start - local.end > 0.1, ep.trace.table()
        out[hierarchy] = round(read.start - local.end, 3)
    return {"idle_after_local_work_s": out}

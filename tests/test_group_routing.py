"""Node- and device-limited routing (router_groups / router_topk_groups) against a choice written out here.

A token's k experts must come from its best M groups, groups ranked by the sum of
their best ``router_group_topk`` selection scores (scores plus the selection bias),
for softmax and sigmoid scores; so the destinations per token (nodes, or ranks
under any placement) are at most M.
"""

from __future__ import annotations

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import MoEConfig, Router, dMoE
from blocksparse_moe.parallel import ExpertPlacement
from blocksparse_moe.router import group_limited_topk


def expected_choice(select: torch.Tensor, k: int, members: list[list[int]], M: int, g: int) -> list[set]:
    """Per token: rank the groups by their best-g sum, keep the best M, then the top-k of their experts."""
    out = []
    for row in select.double().tolist():
        rank = [sum(sorted((row[e] for e in grp), reverse=True)[:g]) for grp in members]
        kept = sorted(range(len(members)), key=lambda i: -rank[i])[:M]
        allowed = [e for i in kept for e in members[i]]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return out


@settings(max_examples=examples(40), deadline=None)
@given(
    G=st.sampled_from([1, 2, 4, 8]), per=st.integers(1, 4), k=st.integers(1, 6), data=st.data(),
    score=st.sampled_from(["softmax", "sigmoid"]), bias=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_router_picks_within_best_groups(G, per, k, data, score, bias, seed):
    E = G * per
    k = min(k, E)
    M = data.draw(st.integers(-(-k // per), G), label="M")  # ceil(k / per) groups at least
    g = data.draw(st.integers(1, per), label="group_topk")
    cfg = MoEConfig(16, 32, E, top_k=k, router_score=score, router_selection_bias=bias, router_groups=G,
                    router_topk_groups=M, router_group_topk=g, router_renormalize=True)  # fmt: skip
    router = Router(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 16, generator=gen))
        if bias:
            router.selection_bias.copy_(torch.randn(E, generator=gen) * 0.3)
    x = torch.randn(24, 16, generator=gen)
    r = router(x)
    select = r.scores + (router.selection_bias if bias else 0.0)
    members = [list(range(i * per, (i + 1) * per)) for i in range(G)]
    want = expected_choice(select, k, members, M, g)
    got = [set(row) for row in r.expert_ids.tolist()]
    assert got == want
    groups_per_token = [len({e // per for e in row}) for row in r.expert_ids.tolist()]
    assert max(groups_per_token) <= M
    assert all(len(s) == k for s in got)  # distinct
    # weights: the scores (never the bias) of the chosen experts, renormalised
    w = r.scores.gather(1, r.expert_ids)
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True))


def test_destinations_bounded_under_any_placement():
    """With groups = the ranks of a permuted placement, each token reaches at most M ranks."""
    E, W, M, k = 16, 4, 2, 6
    gen = torch.Generator().manual_seed(3)
    owners = torch.randperm(E, generator=gen).remainder(W).tolist()
    pl = ExpertPlacement.from_owners(owners, W)
    members = torch.tensor([pl.experts_of(r) for r in range(W)])
    scores = torch.rand(200, E, generator=gen)
    ids = group_limited_topk(scores, k, members, M, group_topk=2)
    dest = torch.tensor(pl.owners)[ids]
    per_token = [len(set(row)) for row in dest.tolist()]
    assert max(per_token) <= M and min(per_token) >= 2  # 6 experts cannot fit on one rank of 4
    want = expected_choice(scores, k, members.tolist(), M, 2)
    assert [set(row) for row in ids.tolist()] == want


def test_nan_token_stays_in_its_groups():
    cfg = MoEConfig(16, 32, 8, top_k=2, router_groups=4, router_topk_groups=1, block_size=16, backend="torch")
    layer = dMoE(cfg)
    x = torch.randn(6, 16)
    x[2, 3] = float("nan")
    out, aux = layer(x, return_aux=True)
    groups = aux.expert_ids // 2
    assert (groups[:, 0] == groups[:, 1]).all()  # one group each, the NaN token too
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_no_limit_is_plain_top_k():
    torch.manual_seed(0)
    base = MoEConfig(16, 32, 8, top_k=3, router_score="sigmoid")
    plain, grouped = Router(base), Router(MoEConfig(16, 32, 8, top_k=3, router_score="sigmoid", router_groups=4))
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(40, 16)
    assert torch.equal(plain(x).expert_ids, grouped(x).expert_ids)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(router_groups=3), r"router_groups must be a positive int dividing num_experts=8, got 3"),
        (dict(router_groups=4, router_topk_groups=5), r"router_topk_groups must be None or an int in \[1, router_groups=4\], got 5"),
        (dict(router_groups=8, router_topk_groups=1, top_k=2), r"router_topk_groups=1 leaves 1 experts .* expected at least top_k=2"),
        (dict(router_groups=4, router_group_topk=3), r"router_group_topk must be None or an int in \[1, experts per group=2\], got 3"),
        (dict(router_groups=4, router_topk_groups=2, router_uniform=True), r"router_uniform=True ignores the scores"),
        (dict(router_scale=0.0), r"router_scale must be a finite number > 0, got 0.0"),
        (dict(num_shared_experts=-1), r"num_shared_experts must be an int >= 0, got -1"),
        (dict(shared_expert_gate=True), r"need num_shared_experts >= 1"),
        (dict(routing="tokens"), r"routing must be one of \('token_choice', 'expert_choice'\), got 'tokens'"),
        (dict(routing="expert_choice", router_renormalize=True), r"router_renormalize=True does not apply"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(16, 32, 8, **{"top_k": 2, **kw})


def test_plain_state_dict_names_unchanged():
    sd = dMoE(MoEConfig(16, 32, 4, glu=True)).state_dict()
    assert set(sd) == {"router.weight", "w1", "w2", "v1"}
    shared = dMoE(MoEConfig(16, 32, 4, glu=True, num_shared_experts=2, shared_expert_gate=True, router_groups=2))
    shared.load_state_dict(sd, strict=False)  # the routed part of an old checkpoint loads as is
    assert set(shared.state_dict()) - set(sd) == {
        "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight",
        "shared_expert_gate.weight",
    }  # fmt: skip
    assert shared.shared_expert.up_proj.weight.shape == (64, 16)


def test_expert_parallel_layer_builds_shared_experts():
    """The expert-parallel layer computes shared experts (tests/test_parallel_routing.py); its share of the
    routed experts comes from add_expert_parameters, the shared ones from add_shared_experts, as in dMoE."""
    from blocksparse_moe.layers import add_expert_parameters
    from blocksparse_moe.shared_expert import add_shared_experts

    m = torch.nn.Module()
    cfg = MoEConfig(16, 32, 4, num_shared_experts=1)
    add_expert_parameters(m, cfg, 2)
    add_shared_experts(m, cfg)
    assert m.w1.shape == (2, 16, 32) and m.shared_expert.up_proj.weight.shape == (32, 16)

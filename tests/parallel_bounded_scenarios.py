"""``max_recv_rows`` scenarios: dropless expert parallelism within a receive bound, against one process.

Each runs on every rank of a launch (``parallel_harness.launch``, by name); see
``tests/test_parallel_bounded.py``.
"""

from __future__ import annotations

from parallel_harness import scenario
from parallel_scenarios import ROUTER_TOL, check_against_single, compare, make_full, make_inputs


def _hot(rank, W, tokens, *, quarter=True, **kw):
    """Every token on the last rank's experts; R a quarter of the rows that rank receives."""
    k = kw.pop("k", 2)
    rows = sum(tokens) * k
    R = max(1, rows // 4) if quarter else rows
    res = check_against_single(rank, W, tokens=tokens, E=2 * W, k=k, hot_rank=W - 1, ep_options={"max_recv_rows": R},
                               **kw)  # fmt: skip
    assert res["send_rows"][: W - 1] == [0] * (W - 1), res["send_rows"]  # the premise: all to the last rank
    assert res["peak_recv_rows"] <= R, (res["peak_recv_rows"], R)
    res.update(max_recv_rows=R, hot_rows=rows)
    return res


@scenario
def bounded_hot_rank(rank, W):
    """Every token to one rank, R = a quarter of its rows: at least 4 rounds, equal to one process."""
    res = _hot(rank, W, [9, 6, 7, 3][:W])
    assert res["rounds"] >= 4, res
    return res


@scenario
def bounded_glu_zero_tokens(rank, W):
    """GLU with recomputed activations, a rank with no tokens and one whose input needs no gradient."""
    res = _hot(rank, W, [0, 11, 5, 8][:W], glu=True, activation="silu", recompute_activation=True,
               x_needs_grad=rank != 1)  # fmt: skip
    assert res["rounds"] >= 4, res
    return res


@scenario
def bounded_fits(rank, W):
    """A bound that every rank's traffic fits in: one round, the ordinary exchange."""
    res = _hot(rank, W, [5, 7, 2, 4][:W], quarter=False)
    assert res["rounds"] == 1 and res["peak_recv_rows"] == res["hot_rows"] * (rank == W - 1), res
    return res


@scenario
def bounded_two_layers(rank, W):
    """Two stacked bounded layers (rounds in both), two steps: the backward rounds interleave identically."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, collect_load_stats, sync_router_grads

    tokens, H, R = [6, 11, 3, 8][:W], 32, 5
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    fulls = [make_full(cfg, seed=s, hot_rank=W - 1 - i, world_size=W) for i, s in enumerate((3, 4))]
    refs = torch.nn.ModuleList(fulls)
    eps = torch.nn.ModuleList(
        ExpertParallelDMoE.from_dmoe(f, name=f"layers.{i}", max_recv_rows=R) for i, f in enumerate(fulls)
    )
    xs, gs = make_inputs(tokens, H, hot=True), make_inputs(tokens, H, seed=2)

    def run(layers, x):
        for layer in layers:
            x = x + layer(x)
        return x

    x_all = torch.cat(xs).requires_grad_()
    (run(refs, x_all) * torch.cat(gs)).sum().backward()
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    for step in range(2):
        for p in eps.parameters():
            p.grad = None
        x = xs[rank].clone().requires_grad_()
        out = run(eps, x)
        (out * gs[rank]).sum().backward()
        sync_router_grads(eps)
        compare(f"step {step} out", out, run(refs, x_all)[rows])
        compare(f"step {step} dx", x.grad, x_all.grad[rows])
        for i in range(2):
            compare(f"layers.{i} d router", eps[i].router.weight.grad, refs[i].router.weight.grad, ROUTER_TOL)
            for n in ("w1", "w2"):
                compare(f"layers.{i} d{n}", getattr(eps[i], n).grad, getattr(refs[i], n).grad[eps[i].expert_slice])
    stats = collect_load_stats(eps)
    out = {}
    for name, st in stats.items():
        assert st.forwards == 2 and st.rounds >= 4, st  # at least 2 rounds per forward on layer 0 at W=2
        assert st.peak_recv_rows <= R and all(0 <= p <= R for p in st.peak_recv_rows_per_rank), st
        out[name] = {"rounds": st.rounds, "peak_recv_rows_per_rank": st.peak_recv_rows_per_rank}
    return {"layers": out, "max_recv_rows": R}


@scenario
def bounded_mismatch(rank, W):
    """Ranks that disagree on R: ConfigMismatchError on every rank, from the constructor's check."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    R = 8 if rank == W - 1 else 16
    try:
        ExpertParallelDMoE(cfg, max_recv_rows=R, name="blocks.2.moe")
    except ConfigMismatchError as err:
        msg = str(err)
        assert "blocks.2.moe" in msg and f"rank {W - 1}: max_recv_rows=8 (rank 0 has 16)" in msg, msg
        return {"message": msg}
    raise AssertionError("no ConfigMismatchError")

"""Two micro-batches interleaved through expert-parallel blocks (issue 13, item 3): scenarios.

A stack of two blocks, each a dense part (a stand-in for attention: ``a = h +
tanh(h W + b)``, ``u = a * gain``, returned as ``(u, a)``) and an
``ExpertParallelDMoE`` (block output ``a + moe(u)``), run by ``interleaved_forward``
over two micro-batches, in fp32:

* ``mb_*``: outputs and every gradient against one process holding every expert and
  fed every rank's tokens (the dense and replicated gradients after their sum over
  ranks), and against the same ranks running the micro-batches one after another
  (outputs bit-identical, gradients to 1e-6); every collective of the interleaved
  forward and backward is logged, gathered, and checked to be the same collective, with
  matching split sizes, on every rank.
* ``mb_overlap``: the last rank sleeps 0.3 s; on the others, micro-batch B's dense part
  of block 0 runs after block 0's count exchange for A is issued and ends more than
  0.1 s before A's host read (it filled the wait for the sleeping peer).
* ``mb_*_fails``: a dense part that raises, or returns the wrong hidden size, on one
  rank: that rank raises its error, every other rank ``PeerFailedError``, within a
  second, and the group is still usable (a clean forward follows).

Token counts: micro-batch A ``[7, 0, 5, 3]``, B ``[4, 0, 6, 0]`` (first ``W``): rank 1
holds no token at all, rank 3 (at 4 ranks) an empty micro-batch B.
"""

from __future__ import annotations

import datetime
import time

import torch
from torch import nn

from parallel_harness import scenario
from parallel_scenarios import ROUTER_TOL, compare, make_full, make_inputs

H, FFN, L = 16, 24, 2
TOKENS = ([7, 0, 5, 3], [4, 0, 6, 0])
SEQ_TOL = dict(atol=1e-6, rtol=1e-6)  # interleaved vs one after another: the same sums, added in another order


class Dense(nn.Module):
    """``h -> (u, a)``: ``a = h + tanh(h W + b)``, ``u = a * gain``; logs ``(call, start, end)`` of each call."""

    def __init__(self, seed: int, residual: bool = True):
        super().__init__()
        self.residual = residual  # False: return u alone (block output moe(u))
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(H, H)
        self.gain = nn.Parameter(torch.ones(H))
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(H, H, generator=g) / H**0.5)
            self.lin.bias.copy_(torch.randn(H, generator=g) * 0.1)
            self.gain.copy_(1 + 0.1 * torch.randn(H, generator=g))
        self.log = []
        self.fail_call = None  # (call index, "raise" | "width"): make that call fail

    def forward(self, h):
        call, t0 = len(self.log), time.perf_counter()
        if self.fail_call is not None and self.fail_call[0] == call:
            self.log.append((call, t0, t0))
            if self.fail_call[1] == "raise":
                raise RuntimeError(f"dense part failed on purpose (call {call})")
            return h[:, : H - 1], h  # a hidden size the MoE layer refuses
        a = h + torch.tanh(self.lin(h))
        out = (a * self.gain, a) if self.residual else a * self.gain
        self.log.append((call, t0, time.perf_counter()))
        return out


def _config(E, k, shared):
    from blocksparse_moe import MoEConfig

    return MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=k, block_size=16, backend="torch",
                     num_shared_experts=shared, glu=True)  # fmt: skip


def _fulls(cfg):
    """One full dMoE per block (O(1) weights, shared experts included), the same on every rank."""
    fulls = []
    for i in range(L):
        full = make_full(cfg, seed=10 + i)
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for name, p in sorted(full.named_parameters()):
                if name.startswith("shared_expert"):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        fulls.append(full)
    return fulls


def _build(W, *, E=6, k=2, shared=1, ep_options=None, timeout=None, name="mb", residual=True):
    from blocksparse_moe.parallel import ExpertParallelDMoE

    cfg = _config(E, k, shared)
    fulls = _fulls(cfg)
    opts = dict(ep_options or {})
    if opts.get("hierarchy") == "node":
        opts.setdefault("ranks_per_node", 1 if W == 2 else 2)  # 2 simulated nodes
    eps = [ExpertParallelDMoE.from_dmoe(f, name=f"{name}.{i}", timeout=timeout, **opts) for i, f in enumerate(fulls)]
    return cfg, fulls, [(Dense(20 + i, residual), ep) for i, ep in enumerate(eps)]


def _sequential(blocks, x):
    h = x
    for dense, moe in blocks:
        u = dense(h)
        h = u[1] + moe(u[0]) if isinstance(u, tuple) else moe(u)
    return h


def _inputs(W):
    xs = [make_inputs(t[:W], H, seed=1 + 2 * m) for m, t in enumerate(TOKENS)]  # xs[m][rank]
    gs = [make_inputs(t[:W], H, seed=2 + 2 * m) for m, t in enumerate(TOKENS)]
    return xs, gs


def _log_collectives(blocks, log):
    """Record every all-to-all the layers issue: (layer, what, output splits, input splits)."""
    for _, ep in blocks:
        start = ep.comm.start_all_to_all

        def logged(out, inp, what, output_splits=None, input_splits=None, _start=start, _name=ep.name):
            split = lambda s: None if s is None else [int(v) for v in s]  # noqa: E731
            log.append((_name, what, split(output_splits), split(input_splits)))
            return _start(out, inp, what, output_splits, input_splits)

        ep.comm.start_all_to_all = logged


def _check_same_collectives(rank, W, log):
    """Every rank ran the same collectives in the same order, and what each sent is what its peers expected."""
    import torch.distributed as dist

    logs = [None] * W
    dist.all_gather_object(logs, log)
    n = len(logs[0])
    assert all(len(lg) == n for lg in logs), [len(lg) for lg in logs]
    for j in range(n):
        calls = [lg[j] for lg in logs]
        assert len({(c[0], c[1]) for c in calls}) == 1, (j, calls)
        if calls[0][2] is None:
            continue
        for r in range(W):
            for q in range(W):  # r sends in_splits[q] rows to q, which expects out_splits[r] from r
                assert calls[r][3][q] == calls[q][2][r], (j, r, q, calls)
    backward = [c[0] for c in log if c[1].endswith("(backward)")]
    return n, backward


def _grads(blocks):
    """Every gradient, the replicated ones (dense parts, router, shared experts) summed over the ranks."""
    import torch.distributed as dist

    out = {}
    for i, (dense, ep) in enumerate(blocks):
        ep.sync_router_grad()
        for name, p in dense.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            out[f"{i}.dense.{name}"] = g
        for name, p in ep.named_parameters():
            out[f"{i}.moe.{name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return out


def _zero(blocks):
    for dense, ep in blocks:
        for p in [*dense.parameters(), *ep.parameters()]:
            p.grad = None


def run_case(rank, W, *, ep_options=None, shared=1, E=6, k=2, residual=True):
    from blocksparse_moe.parallel import interleaved_forward

    cfg, fulls, blocks = _build(W, E=E, k=k, shared=shared, ep_options=ep_options, residual=residual)
    xs, gs = _inputs(W)
    # One process, every expert, every rank's tokens (token choice: per token, the split does not matter).
    ref_blocks = [(Dense(20 + i, residual), f) for i, f in enumerate(fulls)]
    ref_x = [torch.cat(x).requires_grad_() for x in xs]
    ref_out = [_sequential(ref_blocks, x) for x in ref_x]
    sum((o * torch.cat(g)).sum() for o, g in zip(ref_out, gs)).backward()

    # The ranks, interleaved.
    log = []
    _log_collectives(blocks, log)
    x = [xs[m][rank].clone().requires_grad_() for m in range(2)]
    outs, aux = interleaved_forward(blocks, x, return_aux=True)
    sum((o * g[rank]).sum() for o, g in zip(outs, gs)).backward()
    n_collectives, backward = _check_same_collectives(rank, W, log)
    inter = _grads(blocks)
    inter_dx = [t.grad.clone() for t in x]

    # Against one process.
    for m in range(2):
        rows = slice(sum(TOKENS[m][:rank]), sum(TOKENS[m][: rank + 1]))
        compare(f"out[{m}]", outs[m], ref_out[m][rows])
        compare(f"dx[{m}]", inter_dx[m], ref_x[m].grad[rows])
    for i, (dense, full) in enumerate(ref_blocks):
        for name, p in dense.named_parameters():
            compare(f"d {i}.dense.{name}", inter[f"{i}.dense.{name}"], p.grad, ROUTER_TOL)
        ep = blocks[i][1]
        ref_params = dict(full.named_parameters())
        for name, p in ep.named_parameters():
            got, want = inter[f"{i}.moe.{name}"], ref_params[name].grad
            if name in ("w1", "w2", "v1"):
                compare(f"d {i}.moe.{name}", got, want[list(ep.local_experts)])
            else:
                compare(f"d {i}.moe.{name}", got, want, ROUTER_TOL)

    # Against the same ranks running the micro-batches one after another (one backward each).
    _zero(blocks)
    x_seq = [xs[m][rank].clone().requires_grad_() for m in range(2)]
    for m in range(2):
        out = _sequential(blocks, x_seq[m])
        assert torch.equal(out, outs[m]), f"micro-batch {m}: interleaved output differs from sequential"
        (out * gs[m][rank]).sum().backward()
    seq = _grads(blocks)
    worst = 0.0
    for key, g in seq.items():
        compare(f"d {key} (vs sequential)", inter[key], g, SEQ_TOL)
        worst = max(worst, float((inter[key] - g).abs().max()) if g.numel() else 0.0)
    for m in range(2):
        compare(f"dx[{m}] (vs sequential)", inter_dx[m], x_seq[m].grad, SEQ_TOL)
        for i in range(L):  # each call's statistics are its own micro-batch's
            assert int(aux[m][i].tokens_per_expert.sum()) == TOKENS[m][rank] * k, (m, i, aux[m][i].tokens_per_expert)
    host_reads = [aux[m][i].all_to_all.host_reads for m in range(2) for i in range(L)]
    return {"collectives": n_collectives, "backward_layers": backward, "max_grad_diff_vs_sequential": worst,
            "tokens": [TOKENS[m][rank] for m in range(2)], "host_reads": host_reads}  # fmt: skip


def _case(name, **kw):
    def fn(rank, W):
        return run_case(rank, W, **kw)

    fn.__name__ = name
    scenario(fn)


_case("mb_flat")  # shared experts and the other micro-batch's dense part, both in the gap
_case("mb_node", ep_options={"hierarchy": "node"})  # 2 simulated nodes
_case("mb_chunks", ep_options={"chunks": 2})
# fixed capacity (no host read on an accelerator); dense parts returning the MoE input alone (no residual)
_case("mb_capacity", ep_options={"capacity_per_peer": 64}, shared=0, residual=False)


@scenario
def mb_overlap(rank, W):
    """The last rank sleeps 0.3 s; elsewhere micro-batch B's dense part fills A's wait for the counts.

    Orders and a 0.3 s sleep, not compute durations: they hold on any machine.
    """
    from blocksparse_moe.parallel import interleaved_forward
    from blocksparse_moe.parallel.trace import StageTrace

    xs, _ = _inputs(W)
    res = {}
    for hierarchy in ("flat", "node"):
        _, _, blocks = _build(W, ep_options={"hierarchy": hierarchy}, name=f"overlap-{hierarchy}")
        for _, ep in blocks:
            ep.trace = StageTrace()
        if rank == W - 1:
            time.sleep(0.3)
        outs = interleaved_forward(blocks, [xs[0][rank].requires_grad_(), xs[1][rank]])
        sum(o.sum() for o in outs).backward()
        for i, (dense, ep) in enumerate(blocks):  # every call with a beside: it ended before its host read
            spans = ep.trace.spans
            besides = [s for s in spans if s.stage == "beside"]
            reads = [s for s in spans if s.stage == "host read"]
            counts = [s for s in spans if s.stage == "count exchange"]
            assert len(reads) == 2 and len(besides) == (2 if i < L - 1 else 1), ep.trace.table()
            for b, r, c in zip(besides, reads, counts):
                assert c.start <= b.start and b.end <= r.start, ep.trace.table()
        # Block 0's call for A: beside it, block 0's dense part for B (the dense part's 2nd call).
        ep0, dense0 = blocks[0][1], blocks[0][0]
        count_a = next(s for s in ep0.trace.spans if s.stage == "count exchange")
        read_a = next(s for s in ep0.trace.spans if s.stage == "host read")
        _, b_start, b_end = dense0.log[1]
        assert count_a.start <= b_start <= b_end <= read_a.start, (dense0.log, ep0.trace.table())
        if rank != W - 1:  # it then waited for the sleeping peer, its other micro-batch's dense part done
            assert read_a.start - b_end > 0.1, (dense0.log, ep0.trace.table())
        res[hierarchy] = round(read_a.start - b_end, 3)
    return {"idle_after_dense_b_s": res}


def _failure(rank, W, *, call, kind, ep_options=None):
    """Rank 1's block-0 dense part fails on its ``call``-th call; every rank must raise, fast; then a clean run."""
    from blocksparse_moe.parallel import PeerFailedError, interleaved_forward

    timeout = datetime.timedelta(seconds=5)  # a hang would end here, as a CollectiveError (and fail the check)
    _, _, blocks = _build(W, ep_options=ep_options, timeout=timeout, name=f"fail-{kind}-{call}")
    xs, _ = _inputs(W)
    if rank == 1:
        blocks[0][0].fail_call = (call, kind)
    t0 = time.monotonic()
    try:
        interleaved_forward(blocks, [xs[0][rank], xs[1][rank]])
    except PeerFailedError as err:
        assert rank != 1, err
        raised = "PeerFailedError"
    except (RuntimeError, ValueError) as err:
        assert rank == 1, err
        want = "failed on purpose" if kind == "raise" else "hidden_size"
        assert want in str(err), err
        raised = type(err).__name__
    else:
        raise AssertionError(f"rank {rank}: the forward did not raise")
    seconds = time.monotonic() - t0
    assert seconds < 3, seconds  # announced, not timed out (the layers' timeout is 5 s)
    blocks[0][0].fail_call = None
    outs = interleaved_forward(blocks, [xs[0][rank], xs[1][rank]])  # the group is still usable
    assert [o.shape[0] for o in outs] == [TOKENS[0][rank], TOKENS[1][rank]]
    return {"raised": raised, "seconds": round(seconds, 3)}


@scenario
def mb_beside_raises_fails(rank, W):
    # call 1 = micro-batch B of block 0: it runs beside block 0's layer call for A
    return _failure(rank, W, call=1, kind="raise")


@scenario
def mb_beside_width_fails(rank, W):
    # a wrong hidden size from B's dense part: block 0's layer refuses it in B's call (its own check)
    return _failure(rank, W, call=1, kind="width", ep_options={"hierarchy": "node"})


@scenario
def mb_first_dense_fails(rank, W):
    # call 0 = micro-batch A of block 0, before any layer call: announced in that first call
    return _failure(rank, W, call=0, kind="raise", ep_options={"capacity_per_peer": 64})


@scenario
def mb_layer_beside(rank, W):
    """``layer(x, beside=fn)`` directly: ``(out, fn())``; a raising ``fn`` surfaces after the exchange, on its rank.

    The other ranks' forward completes with the right output; a non-callable ``beside``
    is refused before the first collective (its peers raise ``PeerFailedError``).
    """
    from blocksparse_moe.parallel import PeerFailedError

    _, _, blocks = _build(W, name="layer-beside", timeout=datetime.timedelta(seconds=5))
    ep = blocks[0][1]
    x = make_inputs(TOKENS[0][:W], H)[rank]
    with torch.no_grad():
        plain = ep(x)
        (out, aux), got = ep(x, return_aux=True, beside=lambda: "done")
        assert got == "done" and torch.equal(out, plain)

        def bad():
            raise RuntimeError("beside failed on purpose")

        try:
            out = ep(x, beside=bad if rank == 1 else (lambda: 1))
        except RuntimeError as err:
            assert rank == 1 and "on purpose" in str(err), err
        else:
            assert rank != 1 and torch.equal(out[0], plain) and out[1] == 1
        try:
            ep(x, beside="not callable" if rank == 0 else None)
        except PeerFailedError:
            assert rank != 0
        except TypeError as err:
            assert rank == 0 and "beside must be None or a callable" in str(err), err
        else:
            raise AssertionError(f"rank {rank}: a non-callable beside on rank 0 did not raise")
        assert torch.equal(ep(x), plain)  # still usable
    return {}

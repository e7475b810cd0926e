"""The all-to-all that feeds the experts and brings their results back, in chunks that overlap the compute.

:func:`expert_exchange` takes rows sorted by (destination rank, destination's local
expert) and returns the experts' (unweighted) outputs in the same order. With
``chunks=C`` the destination's local experts are cut into ``C`` consecutive groups
and chunk ``c`` carries, to and from every rank, the rows of group ``c`` only::

    issue dispatch 0, 1, ..., C-1                 (async; all in flight at once)
    for c: wait dispatch c -> experts on chunk c -> issue return c
    wait return 0, ..., C-1 -> put the rows back in send order

so the experts start on chunk 0 while chunks 1.. travel, and chunk 0's results travel
back while chunk 1 computes. Backward mirrors it without any extra code: each
transfer is a pair of autograd nodes, ``_Start`` (issues) and ``_Wait`` (waits), and
the backward of a wait *issues* the gradient's transfer while the backward of a start
waits for it. Autograd runs ready nodes latest-created first, so backward issues
every return-gradient transfer, then per chunk (last first) waits for one, runs that
chunk's expert backward and issues its dispatch gradient, and waits for those last.
That order depends only on the graph's shape around these nodes, so every rank
issues the same collectives in the same order.

Every rank passes the same ``chunks`` (checked by the layer's configuration check);
the chunk boundaries come from the placement, which every rank shares, so sender and
receiver agree on which rows make chunk ``c`` without exchanging anything.
On NCCL the transfers run on the communicator's stream and ``Work.wait`` makes the
compute stream wait for them (an event, not a host sync).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .collectives import Communicator
from .trace import timed

__all__ = ["expert_exchange", "chunk_bounds"]


def chunk_bounds(num_local: int, chunks: int) -> list:
    """``[C + 1]`` boundaries cutting ``num_local`` experts into ``chunks`` consecutive groups (some may be empty)."""
    return [(c * num_local) // chunks for c in range(chunks + 1)]


class _Pending:
    """One chunk's transfer: the work handle and buffers of its forward and of its backward."""

    __slots__ = ("comm", "what", "out_splits", "in_splits", "work", "buf", "keep", "bwork", "bbuf", "bkeep",
                 "trace", "stage", "chunk", "mark")  # fmt: skip

    def __init__(self, comm, what, out_splits, in_splits, trace, stage, chunk, mark=None):
        self.comm, self.what, self.out_splits, self.in_splits = comm, what, list(out_splits), list(in_splits)
        self.trace, self.stage, self.chunk, self.mark = trace, stage, chunk, mark
        self.work = self.buf = self.keep = self.bwork = self.bbuf = self.bkeep = None

    def issue(self, x: torch.Tensor, out_splits, in_splits, what: str, stage: str):
        x = x.contiguous()
        buf = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        work = self.comm.start_all_to_all(buf, x, what, out_splits, in_splits)
        if self.trace is not None:
            self.trace.watch(work, stage, self.chunk)
        return work, buf, x  # x is kept alive until the transfer is waited for


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, p: _Pending):
        p.work, p.buf, p.keep = p.issue(x, p.out_splits, p.in_splits, p.what, p.stage)
        ctx.p = p
        return x.new_empty(0)  # a token: the wait depends on it, so backward runs this node after the wait's

    @staticmethod
    def backward(ctx, _token_grad):
        p = ctx.p
        p.comm.wait(p.bwork, f"{p.what} (backward)")
        grad, p.bbuf, p.bkeep, p.bwork = p.bbuf, None, None, None
        if p.mark is not None and p.trace is not None:  # a return's gradient arrived: the experts' backward starts
            p.mark["backward_start"] = p.trace.clock()
        return grad, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, p: _Pending):
        p.comm.wait(p.work, p.what)
        out, p.buf, p.keep, p.work = p.buf, None, None, None
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad):
        p = ctx.p
        if p.mark is not None and p.trace is not None and "backward_start" in p.mark:
            # a dispatch's gradient is ready: this chunk's expert backward has finished
            p.trace.add("experts (backward)", p.chunk, p.mark.pop("backward_start"), p.trace.clock())
        what, stage = f"{p.what} (backward)", f"{p.stage} (backward)"
        p.bwork, p.bbuf, p.bkeep = p.issue(grad, p.in_splits, p.out_splits, what, stage)
        return grad.new_zeros(0), None


def _ranges_index(ranges: list, device) -> torch.Tensor:
    parts = [torch.arange(a, b, device=device) for a, b in ranges if b > a]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def expert_exchange(
    x_send: torch.Tensor,
    comm: Communicator,
    send_counts: Sequence[Sequence[int]],
    recv_counts: Sequence[Sequence[int]],
    expert_fn,
    *,
    chunks: int = 1,
    anchor: Optional[torch.Tensor] = None,
    trace=None,
    what: str = "token dispatch",
    back: str = "result return",
) -> torch.Tensor:
    """Rows to the experts of the ranks of ``comm`` and their outputs back, ``chunks`` transfers each way.

    Args:
        x_send: ``[S, H]`` rows sorted by destination rank, then by the destination's local expert.
        send_counts: ``send_counts[p][i]`` rows of ``x_send`` for local expert ``i`` of rank ``p``.
        recv_counts: ``recv_counts[s][i]`` rows rank ``s`` sends for *my* local expert ``i``.
        expert_fn: ``(x_recv [N, H], local_ids [N]) -> y [N, H]``.
    Returns:
        ``[S, H]``: the expert outputs, row ``i`` for ``x_send[i]``.
    """
    W, dev = comm.world_size, x_send.device
    El = len(recv_counts[0]) if recv_counts else 0
    send_off, base = [], 0
    for p in range(W):  # per destination: the row offset of each of its experts
        offs = [base]
        for n in send_counts[p]:
            offs.append(offs[-1] + n)
        send_off.append(offs)
        base = offs[-1]
    my_bounds = chunk_bounds(El, chunks)
    starts, marks = [], []
    for c in range(chunks):
        ranges = []
        for p in range(W):
            b = chunk_bounds(len(send_counts[p]), chunks)
            ranges.append((send_off[p][b[c]], send_off[p][b[c + 1]]))
        in_splits = [hi - lo for lo, hi in ranges]
        out_splits = [sum(recv_counts[s][my_bounds[c] : my_bounds[c + 1]]) for s in range(W)]
        idx = None if chunks == 1 else _ranges_index(ranges, dev)
        part = x_send if idx is None else x_send.index_select(0, idx)
        mark = {} if trace is not None else None
        p = _Pending(comm, f"{what} (chunk {c} of {chunks}, all_to_all_single)", out_splits, in_splits, trace,
                     "dispatch", c, mark)  # fmt: skip
        starts.append((p, _Start.apply(part, anchor, p), idx, in_splits, out_splits))
        marks.append(mark)
    returns = []
    for c, (p, token, idx, in_splits, out_splits) in enumerate(starts):
        x_recv = _Wait.apply(token, p)
        lo, hi = my_bounds[c], my_bounds[c + 1]
        with timed(trace, "experts", c):
            if hi == lo:
                y = x_recv * 0  # no expert of mine in this chunk (nothing arrives); keeps the return in the graph
            else:
                per = torch.tensor([recv_counts[s][i] for s in range(W) for i in range(lo, hi)], device=dev)
                ids = torch.arange(lo, hi, device=dev).repeat(W)
                local_ids = torch.repeat_interleave(ids, per, output_size=sum(out_splits))
                y = expert_fn(x_recv, local_ids)
        r = _Pending(comm, f"{back} (chunk {c} of {chunks}, all_to_all_single)", in_splits, out_splits, trace,
                     "return", c, marks[c])  # fmt: skip
        returns.append((r, _Start.apply(y, None, r), idx))
    outs = [_Wait.apply(token, r) for r, token, _ in returns]
    if chunks == 1:
        return outs[0]
    order = torch.cat([idx for _, _, idx in returns])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=dev)
    return torch.cat(outs).index_select(0, inverse)

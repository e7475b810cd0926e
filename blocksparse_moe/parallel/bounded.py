"""Dropless exchange within a receive bound: the rows reach their experts in rounds of at most ``R`` per rank.

With ``max_recv_rows=R`` (flat variable-size exchange only) no rank receives more than
``R`` rows at once, however skewed the routing. Every rank knows the whole traffic
matrix ``M[s][p]`` (rows rank ``s`` sends to rank ``p``: each source adds its row of
``M`` to the count exchange), so every rank computes the same schedule without another
collective::

    rank p's incoming rows, in source order:  [from 0: M[0][p] rows][from 1: M[1][p]] ...
    round j carries positions [j*R, (j+1)*R) of that sequence, to every p at once
    rounds = max_p ceil(sum_s M[s][p] / R)          (the fewest any schedule can use)

Round ``j`` is one autograd node (:class:`_Round`): dispatch its rows, run the experts on
them without saving activations, return the results. Its backward dispatches the same
rows again beside their output gradients (one all-to-all of ``[x | dy]``, at most ``R``
rows), recomputes the experts on them, returns the input gradients, and hands back the
expert weights' gradients. So the rows a rank holds for its experts, in the forward
and in the backward, never exceed ``R`` (plus that round's activations), at the price of
one expert forward and one dispatch more per round in backward. Autograd runs the
rounds' backward nodes latest-created first; every rank has the same rounds, so every
rank issues the same collectives in the same order.

When everything fits in one round the layer takes the ordinary exchange instead
(:func:`~.chunked.expert_exchange`, nothing recomputed).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .collectives import Communicator

__all__ = ["RoundSchedule", "round_schedule", "bounded_exchange", "check_max_recv_rows"]


def check_max_recv_rows(where: str, max_recv_rows, capacity_per_peer, hierarchy: str, chunks) -> None:
    """Local checks (no collective): the same ``ValueError`` on every rank given the same values."""
    if max_recv_rows is None:
        return
    if not isinstance(max_recv_rows, int) or isinstance(max_recv_rows, bool) or max_recv_rows < 1:
        raise ValueError(f"{where}: max_recv_rows must be None or a positive int, got {max_recv_rows!r}")
    if capacity_per_peer is not None or hierarchy != "flat" or chunks != 1:
        raise ValueError(
            f"{where}: max_recv_rows={max_recv_rows} bounds the flat variable-size exchange only; got "
            f"capacity_per_peer={capacity_per_peer!r}, hierarchy={hierarchy!r}, chunks={chunks!r} (expected "
            "capacity_per_peer=None, hierarchy='flat', chunks=1, or max_recv_rows=None)"
        )


class RoundSchedule:
    """Which rows travel in which round, the same on every rank (computed from the traffic matrix).

    Attributes:
        rounds: the number of rounds (at least 1).
        parts: ``parts[j][s][p] = (lo, hi)``: round ``j`` carries rows ``lo..hi`` of those
            rank ``s`` sends to rank ``p`` (in the sender's order).
        peak: ``peak[p]``: the most rows rank ``p`` receives in one round.
    """

    def __init__(self, matrix: Sequence[Sequence[int]], max_recv_rows: int):
        W, R = len(matrix), max_recv_rows
        incoming = [sum(matrix[s][p] for s in range(W)) for p in range(W)]
        self.rounds = max(1, max((n + R - 1) // R for n in incoming))
        base = [[sum(matrix[q][p] for q in range(s)) for p in range(W)] for s in range(W)]

        def part(j, s, p):
            m, b = matrix[s][p], base[s][p]
            return (min(max(j * R - b, 0), m), min(max((j + 1) * R - b, 0), m))

        self.parts = [[[part(j, s, p) for p in range(W)] for s in range(W)] for j in range(self.rounds)]
        self.peak = [max(sum(hi - lo for lo, hi in (self.parts[j][s][p] for s in range(W)))
                         for j in range(self.rounds)) for p in range(W)]  # fmt: skip


def round_schedule(matrix, max_recv_rows: int) -> RoundSchedule:
    return RoundSchedule(matrix, max_recv_rows)


class _Spec:
    """One round seen from one rank: splits, the received rows' local expert ids, the expert function."""

    __slots__ = ("comm", "in_splits", "out_splits", "ids", "expert_fn", "params", "what", "back")

    def __init__(self, comm, in_splits, out_splits, ids, expert_fn, params, what, back):
        self.comm, self.in_splits, self.out_splits, self.ids = comm, in_splits, out_splits, ids
        self.expert_fn, self.params, self.what, self.back = expert_fn, params, what, back

    def experts(self, x_recv: torch.Tensor) -> torch.Tensor:
        if x_recv.shape[0] == 0 or self.ids is None:
            return x_recv * 0  # nothing arrived (or no expert here): keeps the graph's shape
        return self.expert_fn(x_recv, self.ids)


class _Round(torch.autograd.Function):
    """Dispatch, experts, return for one round; backward recomputes the experts (no activations kept)."""

    @staticmethod
    def forward(ctx, x_send, anchor, spec: _Spec, *params):
        comm = spec.comm
        x_recv = comm.all_to_all(x_send, spec.what, spec.out_splits, spec.in_splits)
        y_recv = spec.experts(x_recv)  # autograd is off inside forward: nothing saved
        del x_recv
        ctx.spec = spec
        ctx.save_for_backward(x_send)
        return comm.all_to_all(y_recv, spec.back, spec.in_splits, spec.out_splits)

    @staticmethod
    def backward(ctx, grad):
        spec, comm = ctx.spec, ctx.spec.comm
        (x_send,) = ctx.saved_tensors
        H = x_send.shape[1]
        both = torch.cat([x_send, grad.to(x_send.dtype)], 1)  # one transfer: the rows and their output gradients
        recv = comm.all_to_all(both, f"{spec.what} (backward: rows and output gradients)", spec.out_splits,
                               spec.in_splits)  # fmt: skip
        del both
        params = [p for p in spec.params if p is not None]
        with torch.enable_grad():
            x_recv = recv[:, :H].detach().requires_grad_()
            y = spec.experts(x_recv)
            wants = [x_recv] + [p for p in params if p.requires_grad]
            grads = list(torch.autograd.grad(y, wants, recv[:, H:], allow_unused=True)) if y.requires_grad \
                else [None] * len(wants)  # fmt: skip
        dx_recv = grads[0] if grads[0] is not None else torch.zeros_like(x_recv)
        del recv, y, x_recv
        dx_send = comm.all_to_all(dx_recv, f"{spec.what} (backward: input gradients)", spec.in_splits,
                                  spec.out_splits)  # fmt: skip
        it = iter(grads[1:])
        pgrads = [None if not p.requires_grad else _or_zeros(next(it), p) for p in params]
        return (dx_send, None, None, *pgrads)


def _or_zeros(grad, p):
    """A weight no row of this round reached gets a zero gradient, as in the one-round exchange."""
    return torch.zeros_like(p) if grad is None else grad


def _ids_for(recv_counts, ranges, device):
    """Local expert id of each received row of one round: ``ranges[s] = (lo, hi)`` of source ``s``'s rows."""
    El = len(recv_counts[0]) if recv_counts else 0
    per = []
    for s, (lo, hi) in enumerate(ranges):
        start = 0
        for i in range(El):
            n = recv_counts[s][i]
            per.append(max(0, min(hi, start + n) - max(lo, start)))
            start += n
    total = sum(per)
    ids = torch.arange(El, device=device).repeat(len(ranges))
    return torch.repeat_interleave(ids, torch.tensor(per, dtype=torch.int64, device=device), output_size=total)


def bounded_exchange(
    x_send: torch.Tensor,
    comm: Communicator,
    send_counts: Sequence[Sequence[int]],
    recv_counts: Sequence[Sequence[int]],
    schedule: RoundSchedule,
    expert_fn,
    params: Sequence,
    *,
    anchor=None,
    what: str = "token dispatch",
    back: str = "result return",
) -> torch.Tensor:
    """:func:`~.chunked.expert_exchange` in ``schedule.rounds`` rounds: ``[S, H]`` rows in, their outputs back.

    ``params``: the tensors ``expert_fn`` reads (their gradients come from the rounds' backward).
    """
    W, r, dev = comm.world_size, comm.rank, x_send.device
    El = len(recv_counts[0]) if recv_counts else 0
    send_off = [0]
    for p in range(W):
        send_off.append(send_off[-1] + sum(send_counts[p]))
    outs, order = [], []
    for j in range(schedule.rounds):
        part = schedule.parts[j]
        mine = [part[r][p] for p in range(W)]  # what I send to each p in this round
        got = [part[s][r] for s in range(W)]  # what each s sends me
        in_splits, out_splits = [hi - lo for lo, hi in mine], [hi - lo for lo, hi in got]
        idx = torch.cat([torch.arange(send_off[p] + lo, send_off[p] + hi, device=dev) for p, (lo, hi) in
                         enumerate(mine)])  # fmt: skip
        ids = _ids_for(recv_counts, got, dev) if El > 0 else None
        spec = _Spec(comm, in_splits, out_splits, ids, expert_fn, tuple(params),
                     f"{what} (round {j} of {schedule.rounds}, all_to_all_single)",
                     f"{back} (round {j} of {schedule.rounds}, all_to_all_single)")  # fmt: skip
        outs.append(_Round.apply(x_send.index_select(0, idx), anchor, spec, *[p for p in params if p is not None]))
        order.append(idx)
    order = torch.cat(order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=dev)
    return torch.cat(outs).index_select(0, inverse)

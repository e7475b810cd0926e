"""The collectives of the expert-parallel layer: counts exchange and the two data all-to-alls.

Everything goes through ``torch.distributed.all_to_all_single``, the one all-to-all
that every backend (gloo on CPU, NCCL on GPUs) implements with uneven split sizes;
the list form ``all_to_all`` does not accept uneven sizes on gloo.

:class:`Communicator` binds a process group to the name of the layer that uses it,
so that a failure (a timeout, a peer that died, a broken connection) surfaces as a
:class:`CollectiveError` that names the layer, the collective and the rank rather
than as a bare backend message.

:func:`all_to_all` is an autograd function: the backward of an all-to-all with
``(output_splits, input_splits)`` is the all-to-all of the gradient with the splits
swapped. Split sizes are host-side Python ints (``None`` means equal splits, the
fixed-capacity mode that needs no host read).
"""

from __future__ import annotations

import datetime
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Communicator", "PeerFailedError", "all_to_all"]


class CollectiveError(RuntimeError):
    """A collective of an expert-parallel layer failed: timed out, or a peer died or disconnected.

    The message names the layer, the collective and this rank. The process group is
    unusable afterwards (its peers may be stuck in the same collective): destroy it.
    """


class PeerFailedError(CollectiveError):
    """Another rank's forward failed before the token dispatch (e.g. it rejected its input).

    That rank still took part in the count exchange, with a sentinel in place of its
    counts, so every rank leaves the forward at the same point and the process group
    stays usable; the failing rank raises its own error.
    """


class Communicator:
    """A process group, the layer's name for error messages, and an optional wait timeout.

    Args:
        group: the expert-parallel process group (``None``: the default group).
        name: the layer's name, quoted in every error.
        timeout: how long one collective may take before it is reported. ``None``
            uses the group's own timeout (``init_process_group(timeout=...)``). A
            shorter timeout is enforced with ``Work.wait(timeout)``, which gloo honours;
            on NCCL the wait is asynchronous and timeouts are the watchdog's job.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], name: str, timeout: Optional[datetime.timedelta] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"expert-parallel layer {name!r} needs torch.distributed to be initialized: call "
                "torch.distributed.init_process_group('gloo' or 'nccl', ...) first (torchrun sets the "
                "environment for the default env:// rendezvous)"
            )
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta or None, got {timeout!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.name = name
        self.timeout = timeout
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"expert-parallel layer {name!r}: this process is not a member of the given group")
        self.backend = dist.get_backend(self.group)

    def __deepcopy__(self, memo):
        # A process group is a handle, not data: a deep copy of the model (an EMA
        # copy, say) shares it.
        return self

    # ------------------------------------------------------------------ errors
    def error(self, what: str, err: BaseException) -> CollectiveError:
        return CollectiveError(
            f"expert-parallel layer {self.name!r}: {what} failed on rank {self.rank} of {self.world_size} "
            f"({self.backend}): {type(err).__name__}: {err}. A peer may have timed out, died or run a "
            "different collective; the process group cannot be reused."
        )

    def wait(self, work, what: str) -> None:
        """Wait for an async collective; any failure becomes a :class:`CollectiveError`."""
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except Exception as err:  # noqa: BLE001 - backends raise RuntimeError, DistBackendError, ...
            raise self.error(what, err) from err

    # ------------------------------------------------------------------ collectives
    def start_all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        what: str,
        output_splits: Optional[Sequence[int]] = None,
        input_splits: Optional[Sequence[int]] = None,
    ):
        """``all_to_all_single(out, inp, ...)`` with ``async_op=True``; returns the work handle."""
        try:
            return dist.all_to_all_single(
                out,
                inp,
                output_split_sizes=None if output_splits is None else list(output_splits),
                input_split_sizes=None if input_splits is None else list(input_splits),
                group=self.group,
                async_op=True,
            )
        except Exception as err:  # noqa: BLE001
            raise self.error(what, err) from err

    def all_to_all(
        self,
        inp: torch.Tensor,
        what: str,
        output_splits: Optional[Sequence[int]] = None,
        input_splits: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Rows of ``inp`` (``input_splits[p]`` of them to rank ``p``) -> the received rows, in rank order."""
        inp = inp.contiguous()
        if input_splits is not None and sum(input_splits) != inp.shape[0]:
            raise ValueError(
                f"expert-parallel layer {self.name!r}: {what}: input splits {list(input_splits)} do not add "
                f"up to the {inp.shape[0]} rows to send"
            )
        if output_splits is None:
            rows = inp.shape[0]
            if rows % self.world_size:
                raise ValueError(
                    f"expert-parallel layer {self.name!r}: {what}: equal splits need rows ({rows}) divisible "
                    f"by the world size ({self.world_size})"
                )
        else:
            rows = sum(output_splits)
        out = inp.new_empty((rows,) + tuple(inp.shape[1:]))
        self.wait(self.start_all_to_all(out, inp, what, output_splits, input_splits), what)
        return out

    def all_gather_object(self, obj, what: str) -> list:
        gathered = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, obj, group=self.group)
        except Exception as err:  # noqa: BLE001
            raise self.error(what, err) from err
        return gathered

    def all_gather(self, tensor: torch.Tensor, what: str) -> list:
        """Every rank's ``tensor`` (same shape on every rank), in group-rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        try:
            work = dist.all_gather(parts, tensor.contiguous(), group=self.group, async_op=True)
        except Exception as err:  # noqa: BLE001
            raise self.error(what, err) from err
        self.wait(work, what)
        return parts

    def broadcast_(self, tensor: torch.Tensor, what: str, src_group_rank: int = 0) -> None:
        try:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src_group_rank), group=self.group)
        except Exception as err:  # noqa: BLE001
            raise self.error(what, err) from err

    def all_reduce_(self, tensor: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> None:
        try:
            work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        except Exception as err:  # noqa: BLE001
            raise self.error(what, err) from err
        self.wait(work, what)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` as an autograd node; backward swaps the split sizes."""

    @staticmethod
    def forward(ctx, x, anchor, comm: Communicator, what: str, output_splits, input_splits):
        ctx.comm, ctx.what = comm, what
        ctx.output_splits, ctx.input_splits = output_splits, input_splits
        return comm.all_to_all(x, what, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        # The same node type, so that double backward (rare) still works.
        dx = _AllToAll.apply(grad, None, ctx.comm, f"{ctx.what} (backward)", ctx.input_splits, ctx.output_splits)
        return dx, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    comm: Communicator,
    what: str,
    output_splits: Optional[Sequence[int]] = None,
    input_splits: Optional[Sequence[int]] = None,
    anchor: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable all-to-all of the rows of ``x`` (``None`` splits: equal chunks).

    ``anchor``, a zero-size tensor that requires grad, makes the output require grad
    even where ``x`` does not, so that every rank of the group takes part in the
    backward collective (a rank whose input needs no gradient would otherwise skip
    it and leave its peers waiting).
    """
    return _AllToAll.apply(x, anchor, comm, what, output_splits, input_splits)

"""Two micro-batches interleaved, so that one's dense compute hides the other's count exchange and host read.

The variable mode reads its counts on the host once per forward (see docs/parallel.md,
"Host reads per step"): a rank idles there until its slowest peer has routed. Compute
that the layer's input does not need can fill that time. Inside the layer that is the
shared experts; across layers it is another micro-batch's dense compute (DeepSeek-V3's
two-micro-batch overlap, "dual batch overlap" in vLLM / SGLang)::

    dense_0(A)
    moe_0(A)   while its counts travel: dense_0(B)
    moe_0(B)   while its counts travel: dense_1(A)     (A's block 0 is done)
    moe_1(A)   while its counts travel: dense_1(B)
    ...
    moe_L-1(B)

Two pieces:

* ``ExpertParallelDMoE.forward(x, beside=fn)`` runs ``fn()`` in the gap (after the
  count exchange is issued and the local gather is done, before this rank waits for
  the counts), after the shared experts, in every exchange mode, and returns
  ``(result, fn())``. :class:`Gap` is that piece of work.
* :func:`interleaved_forward` runs a stack of ``(dense, moe)`` blocks over several
  micro-batches in the order above.

Backward: every rank must issue the backward collectives in the same order, and the
micro-batches' graphs are independent of each other. Autograd's CPU engine runs the
ready node created last first, and the node created last among those not yet run is
always ready (its consumers were created after it), so backward already runs in reverse
creation order, the same on every rank whatever each rank's graph looks like (a rank
with no tokens builds fewer nodes). :func:`interleaved_forward` does not rely on that
scheduling policy (CUDA runs nodes on per-device threads, and the policy is not a
documented contract): each layer call's input is tied (:class:`_After`, an identity) to
the previous call's output, so the backward of call ``s`` (all its collectives) ends
before any collective of call ``s - 1``'s backward can start: the calls' backwards run
last call first, one after another, by the graph's structure. Within one call the order
is the layer's own (see :mod:`.chunked`); the dense parts' backward, which has no
collective, interleaves freely.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .trace import timed

__all__ = ["Gap", "interleaved_forward"]


class Gap:
    """The work a layer runs while its counts travel: the shared experts, then the caller's ``beside``.

    Called by the exchange (its ``local_work``); returns the shared experts' output (the
    exchange's ``local``). An error in ``beside`` is kept, not raised, so that this
    rank still takes part in the rest of the layer's exchange (its peers would otherwise
    wait in the dispatch until the timeout); :meth:`result` raises it once the
    exchange is done. An error in the shared experts is raised at once, as before.
    """

    __slots__ = ("shared", "beside", "trace", "value", "error")

    def __init__(self, shared: Optional[Callable], beside: Optional[Callable], trace=None):
        self.shared, self.beside, self.trace = shared, beside, trace
        self.value = self.error = None

    @classmethod
    def of(cls, layer_name: str, shared, beside, trace) -> Optional["Gap"]:
        """``None`` when there is nothing to run; checks ``beside`` (before any collective)."""
        if beside is not None and not callable(beside):
            raise TypeError(
                f"expert-parallel layer {layer_name!r}: beside must be None or a callable with no arguments, "
                f"got {type(beside).__name__}"
            )
        return None if shared is None and beside is None else cls(shared, beside, trace)

    def __call__(self):
        local = None if self.shared is None else self.shared()
        if self.beside is not None:
            try:
                with timed(self.trace, "beside"):
                    self.value = self.beside()
            except Exception as err:  # noqa: BLE001 - raised by result(), after the exchange
                self.error = err
        return local

    def result(self):
        """What ``beside`` returned; its error, if it raised."""
        if self.error is not None:
            raise self.error
        return self.value


class _After(torch.autograd.Function):
    """``x`` unchanged, with an edge to ``dep``: ``dep``'s producers' backward waits for ``x``'s consumers'.

    The gradient sent to ``dep`` is ``None`` (no tensor, no arithmetic); the engine still
    counts the edge, which is all the ordering needs.
    """

    @staticmethod
    def forward(ctx, x, dep):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _after(x: torch.Tensor, dep: Optional[torch.Tensor]) -> torch.Tensor:
    if dep is None or not torch.is_grad_enabled() or not (x.requires_grad or dep.requires_grad):
        return x
    return _After.apply(x, dep)


class _Failed:
    """A dense part's error, carried out of the layer's gap (see :func:`interleaved_forward`)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _check_blocks(blocks) -> list:
    from .layer import ExpertParallelDMoE

    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        what = (
            f"an empty {type(blocks).__name__}"
            if isinstance(blocks, Sequence) and not blocks
            else type(blocks).__name__
        )
        raise TypeError(f"blocks must be a non-empty sequence of (dense, moe) pairs, got {what}")
    out = []
    for i, block in enumerate(blocks):
        if not (isinstance(block, Sequence) and len(block) == 2):
            size = f" of length {len(block)}" if isinstance(block, Sequence) else ""
            raise TypeError(f"blocks[{i}] must be a (dense, moe) pair, got a {type(block).__name__}{size}")
        dense, moe = block
        if not callable(dense):
            raise TypeError(f"blocks[{i}][0] (the dense part) must be callable, got {type(dense).__name__}")
        if not isinstance(moe, ExpertParallelDMoE):
            raise TypeError(f"blocks[{i}][1] (the MoE part) must be an ExpertParallelDMoE, got {type(moe).__name__}")
        out.append((dense, moe))
    return out


def _split(i: int, value):
    """A dense part's result: ``u`` (block output ``moe(u)``) or ``(u, residual)`` (``residual + moe(u)``)."""
    if isinstance(value, torch.Tensor):
        return value, None
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return value
    raise TypeError(
        f"blocks[{i}][0] (the dense part) must return a tensor or a (moe_input, residual) pair of tensors, "
        f"got {type(value).__name__}"
    )


def interleaved_forward(blocks, microbatches, *, return_aux: bool = False):
    """Run ``blocks`` over ``microbatches`` interleaved: one micro-batch's dense part hides another's host read.

    Args:
        blocks: a sequence of ``(dense, moe)`` pairs, block ``i`` after block ``i - 1``.
            ``dense`` is any callable (a module: attention, norms, the residual) taking
            the block's input ``h`` and returning the MoE's input ``u``, or a pair
            ``(u, residual)``; the block's output is then ``moe(u)``, or ``residual +
            moe(u)``. ``moe`` is an :class:`~blocksparse_moe.parallel.ExpertParallelDMoE`.
            A dense part must not run collectives of its own whose order matters in
            backward (its backward is not ordered across ranks; see the module docstring).
        microbatches: this rank's micro-batches (tensors; two for the usual overlap; any
            may be empty on any rank). Every rank passes the same number, with the same
            ``blocks``: each layer call is a collective, and they run in the order
            (block 0: micro-batch 0, 1, ...), (block 1: 0, 1, ...), ... (not checked,
            that would be one more collective per forward).
        return_aux: also return ``aux[m][i]``, block ``i``'s
            :class:`~blocksparse_moe.parallel.ExpertParallelAux` for micro-batch ``m``.

    Returns:
        The list of the micro-batches' outputs (or ``(outputs, aux)``): the same values
        and gradients as running the micro-batches through the blocks one after another.

    The layer call for (block ``i``, micro-batch ``m``) runs the next call's dense part
    while its counts travel (``ExpertParallelDMoE.forward(..., beside=...)``). With one
    micro-batch there is nothing to overlap: the blocks run in order. A dense part that
    raises on one rank: the layer call it ran beside finishes its exchange, then this
    rank announces the failure in the next layer call's count exchange (the one that
    would have consumed that dense output), so every peer raises
    :class:`~blocksparse_moe.parallel.PeerFailedError` there instead of waiting, and
    this rank raises the dense part's error.
    """
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {return_aux!r}")
    if isinstance(microbatches, torch.Tensor) or not isinstance(microbatches, Sequence) or len(microbatches) == 0:
        what = (
            "an empty sequence"
            if isinstance(microbatches, Sequence) and not microbatches
            else type(microbatches).__name__
        )
        raise TypeError(f"microbatches must be a non-empty list of tensors (one per micro-batch), got {what}")
    blocks = _check_blocks(blocks)
    M = len(microbatches)
    stages = [(i, m) for i in range(len(blocks)) for m in range(M)]
    h = list(microbatches)
    aux = [[None] * len(blocks) for _ in range(M)]

    def dense(s):  # stage s's dense part; an error comes back as _Failed
        i, m = stages[s]
        try:
            return _split(i, blocks[i][0](h[m]))
        except Exception as err:  # noqa: BLE001 - announced to the peers by the caller
            return _Failed(err)

    def check(s, value):  # a failed dense part of stage s: the peers learn it in stage s's count exchange
        if isinstance(value, _Failed):
            moe = blocks[stages[s][0]][1]
            moe.exchange.announce_failure(moe.w1.device)
            raise value.error
        return value

    ready = check(0, dense(0))
    prev = None  # the previous layer call's output: this call's input is tied to it (backward order)
    for s, (i, m) in enumerate(stages):
        u, residual = ready
        moe = blocks[i][1]
        # Stage s + 1's input needs stage s + 1 - M's output: ready now when M >= 2.
        ahead = s + 1 < len(stages) and M >= 2
        call = moe(_after(u, prev), return_aux=return_aux, beside=(lambda: dense(s + 1)) if ahead else None)
        result, nxt = call if ahead else (call, None)
        out, aux[m][i] = result if return_aux else (result, None)
        prev = out
        h[m] = out if residual is None else residual + out
        if s + 1 < len(stages):
            ready = check(s + 1, nxt if ahead else dense(s + 1))
    return (h, aux) if return_aux else h

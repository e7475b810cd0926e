"""Resharding checkpoints: EP=4 -> EP=2 -> EP=1 (one plain process) -> EP=4, Adam state included.

The run, one Adam step per global batch (``parallel_models.batch``):

* ``ckpt_ep4_then_ep2`` (4 ranks): steps 0 and 1 at EP=4, ``save_sharded`` to ``ep4``;
  then ranks 0 and 1 alone (a group of 2) build a model from *other* weights,
  ``load_sharded`` ``ep4``, take step 2 at EP=2 and save ``ep2``;
* :func:`single_process_step` (the test process itself, no ``torch.distributed``): a
  plain ``dMoE`` model loads ``ep2``, takes step 3 on the whole batch, saves ``ep1``;
* ``ckpt_resume_ep4`` (4 ranks): EP=4 under a permuted placement with a rank holding
  no expert loads ``ep1`` and takes step 4; its loss and every parameter after the
  step must equal those of one process that ran steps 0 to 4 without interruption.

``ckpt_wrong_experts`` / ``ckpt_wrong_shape``: loading ``ep1`` into a model with 6
experts, or with another expert width, raises the same ValueError naming the
parameter on every rank, before any tensor is read.
"""

from __future__ import annotations

import os

from parallel_harness import scenario
from parallel_models import Tiny, batch, config, loss_fn, parallel, reference

E, GLU, LR = 8, True, 1e-2
TOL = dict(atol=2e-5, rtol=2e-5)
PARAM_TOL = dict(atol=1e-5, rtol=1e-5)


def _dir(name: str) -> str:
    return os.path.join(os.environ["BSMOE_CKPT_DIR"], name)


def _adam(model):
    import torch

    return torch.optim.Adam(model.parameters(), lr=LR)


def _step(model, opt, step: int, parts: int, rank: int, reduce: bool = True):
    """One training step on this rank's part of global batch ``step``; returns the loss."""
    from blocksparse_moe.parallel import reduce_gradients

    x, y = batch(step, parts)[rank]
    loss = loss_fn(model, x, y)
    loss.backward()
    if reduce:
        reduce_gradients(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@scenario
def ckpt_ep4_then_ep2(rank, W):
    import torch.distributed as dist

    from blocksparse_moe.parallel import load_sharded, save_sharded

    assert W == 4
    model = parallel(reference(E, GLU, seed=5))
    opt = _adam(model)
    for step in (0, 1):
        _step(model, opt, step, W, rank)
    save_sharded(model, _dir("ep4"), opt)
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    if rank < 2:
        model2 = parallel(reference(E, GLU, seed=99), pair)  # other weights: the load must replace them
        opt2 = _adam(model2)
        load_sharded(model2, _dir("ep4"), opt2)
        assert list(model2.moe.local_experts) == [[0, 1, 2, 3], [4, 5, 6, 7]][rank]
        _step(model2, opt2, 2, 2, rank)
        save_sharded(model2, _dir("ep2"), opt2)
    return {}


def single_process_step(directory: str) -> None:
    """EP=1: a plain single-process model (``dMoE``, no process group) resumes ``ep2``, saves ``ep1``."""
    from blocksparse_moe.parallel import load_sharded, save_sharded

    model = reference(E, GLU, seed=123)
    opt = _adam(model)
    load_sharded(model, os.path.join(directory, "ep2"), opt)
    _step(model, opt, 3, 1, 0, reduce=False)
    save_sharded(model, os.path.join(directory, "ep1"), opt)


@scenario
def ckpt_resume_ep4(rank, W):
    import torch

    from helpers import assert_close
    from blocksparse_moe.parallel import load_sharded

    owners = [3, 0, 0, 2, 2, 3, 0, 3]  # rank 1 holds no expert
    model = parallel(reference(E, GLU, seed=77), placement=owners)
    opt = _adam(model)
    load_sharded(model, _dir("ep1"), opt)
    loss = _step(model, opt, 4, W, rank)
    losses = loss.reshape(1).clone()
    torch.distributed.all_reduce(losses)
    # The uninterrupted run: one process, steps 0..4 on the whole batch.
    ref = reference(E, GLU, seed=5)
    ref_opt = _adam(ref)
    for step in range(5):
        ref_loss = _step(ref, ref_opt, step, 1, 0, reduce=False)
    assert_close(losses / W, ref_loss.reshape(1), name="loss of step 4", **TOL)
    experts = list(model.moe.local_experts)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].detach()
        if name.split(".")[-1] in ("w1", "w2", "v1"):
            expected = expected[experts]
        assert_close(p.detach(), expected, name=f"{name} after step 4", **PARAM_TOL)
        state = opt.state[p]
        assert int(state["step"]) == 5, (name, state["step"])
    return {"experts": experts, "loss": float(losses / W)}


def _expect_load_error(model, needle: str):
    from blocksparse_moe.parallel import load_sharded

    try:
        load_sharded(model, _dir("ep1"), _adam(model))
    except ValueError as err:
        assert needle in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no ValueError")


@scenario
def ckpt_wrong_experts(rank, W):
    """A model of 6 experts loading a checkpoint of 8: every rank raises, naming the parameter."""
    return _expect_load_error(parallel(reference(6, GLU)), "moe.w1: the checkpoint holds 8 experts")


@scenario
def ckpt_wrong_shape(rank, W):
    """Another expert width (ffn 32 instead of 24): every rank raises, naming the parameter and both shapes."""
    from dataclasses import replace

    from blocksparse_moe.parallel import ExpertParallelDMoE

    moe = ExpertParallelDMoE(replace(config(E, GLU), ffn_hidden_size=32), name="moe")
    return _expect_load_error(Tiny(moe), "moe.w1: expert 0 has shape (16, 24) in the checkpoint")

"""Checkpoints that outlive the parallel layout: ``save_sharded`` / ``load_sharded`` on ``torch.distributed.checkpoint``.

The format is a plain DCP checkpoint (a directory: ``.metadata`` plus one file per
writing rank) whose expert tensors are stored **one entry per global expert**::

    model.<param fqn>                      every non-expert tensor, as DCP writes it (DTensors resharded by DCP)
    model.<param fqn>.expert.<e>           expert e's slice of an expert tensor, e.g. model.blocks.0.moe.w1.expert.5 [H, ffn]
    optim.state.<fqn>.<key>                optimizer state of a non-expert parameter (Adam: step, exp_avg, exp_avg_sq)
    optim.state.<fqn>.expert.<e>.<key>     the per-expert rows of an expert parameter's state (exp_avg, exp_avg_sq)
    optim.state.<fqn>.<key>                and its shared entries (Adam's step)
    optim.param_groups.<i>.<key>           hyperparameters; ``params`` lists parameter names, not ids

Parameter names are those of ``torch.distributed.checkpoint.state_dict`` (no DDP
``module.`` prefix). Because an expert's key is its global id, a checkpoint written
with any placement, expert-parallel degree or data-parallel degree (or by a plain
single-process ``dMoE`` model, where every expert is local) loads into any other:
each rank reads exactly the experts it holds, and the Adam moments of each expert
follow it. ``dp`` replicas hold the same experts; DCP writes each entry once.

Before reading anything, ``load_sharded`` compares the checkpoint's metadata with the
model: an expert count, an expert's shape, a hidden size or a missing parameter
that disagree is a ``ValueError`` naming the parameter, raised on every rank (the
problems are gathered over the group first). Nothing is truncated or broadcast.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .units import expert_shards

__all__ = ["save_sharded", "load_sharded", "EXPERT_KEY"]

#: How an expert's slice of an expert tensor is keyed: ``EXPERT_KEY.format(fqn=..., expert=e)``.
EXPERT_KEY = "{fqn}.expert.{expert}"


def _index(model: nn.Module) -> dict:
    """fqn of every expert tensor (sharded or not) -> (shard, attribute)."""
    return {s.fqn(attr): (s, attr) for s in expert_shards(model, include_unsharded=True) for attr, _ in s.params()}


def _process_group(model, process_group):
    """The group that writes / reads together, and whether to run without one (a single process)."""
    if process_group is not None:
        return process_group, False
    sharded = [s for s in expert_shards(model) if s.sharded]
    if sharded:
        return sharded[0].groups.replicated, False
    if dist.is_available() and dist.is_initialized():
        return None, False
    return None, True


@contextlib.contextmanager
def _quiet(no_dist: bool):
    """Without a process group DCP warns that it assumes one process: that is what was asked for."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _split_model(msd: dict, index: dict) -> dict:
    out = {}
    for fqn, t in msd.items():
        entry = index.get(fqn)
        if entry is None:
            out[fqn] = t
            continue
        for i, e in enumerate(entry[0].local_experts):
            out[EXPERT_KEY.format(fqn=fqn, expert=e)] = t[i]
    return out


def _split_optim(osd: dict, index: dict) -> dict:
    state = {}
    for fqn, st in osd["state"].items():
        entry = index.get(fqn)
        if entry is None:
            state[fqn] = st
            continue
        shard, attr = entry
        local_shape = tuple(getattr(shard.module, attr).shape)
        per_expert = {k for k, v in st.items() if isinstance(v, torch.Tensor) and tuple(v.shape) == local_shape}
        for i, e in enumerate(shard.local_experts):
            state[EXPERT_KEY.format(fqn=fqn, expert=e)] = {k: st[k][i] for k in per_expert}
        shared = {k: v for k, v in st.items() if k not in per_expert}
        if shared:
            state[fqn] = shared
    return {"state": state, "param_groups": osd["param_groups"]}


def _optimizer_state(model, optimizer) -> dict:
    """``get_optimizer_state_dict`` with the state materialised even when gradients exist."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = None
    if not optimizer.state:  # DCP initialises the state only when no parameter has a gradient
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
    try:
        return get_optimizer_state_dict(model, optimizer)
    finally:
        if saved is not None:
            for p, g in zip(params, saved):
                p.grad = g


def _build(model, optimizer, index) -> tuple:
    msd = get_model_state_dict(model)
    sd = {"model": _split_model(msd, index)}
    osd = None
    if optimizer is not None:
        osd = _optimizer_state(model, optimizer)
        sd["optim"] = _split_optim(osd, index)
    return sd, msd, osd


def save_sharded(model: nn.Module, path, optimizer: Optional[torch.optim.Optimizer] = None, *, process_group=None):
    """Write ``model`` (and ``optimizer``'s state) to the directory ``path``, experts keyed by global id.

    A collective over ``process_group`` (default: the model's ``dp x ep`` group, else
    the default group, else none: a single process). Every rank passes the same
    ``path`` (a shared filesystem when the ranks are on several nodes).
    """
    pg, no_dist = _process_group(model, process_group)
    sd, _, _ = _build(model, optimizer, _index(model))
    with _quiet(no_dist):
        dcp.save(sd, checkpoint_id=os.fspath(path), process_group=pg, no_dist=no_dist)


def _flat(section: str, obj) -> dict:
    """The keys DCP stores ``{section: obj}`` under (its own flattening, so the names cannot drift)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return flatten_state_dict({section: obj})[0]


def _shape(t) -> tuple:
    return tuple(t.shape)  # a DTensor's shape is its global shape, as DCP stores it


def _problems(meta: dict, sd: dict, index: dict, optimizer) -> list:
    problems = []
    expert_keys = set()
    for fqn, (shard, attr) in index.items():
        E = shard.placement.num_experts
        want = _shape(getattr(shard.module, attr))[1:]
        pat = re.compile(re.escape(f"model.{fqn}.expert.") + r"(\d+)$")
        found = sorted(int(m.group(1)) for k in meta if (m := pat.match(k)))
        expert_keys.update(f"model.{EXPERT_KEY.format(fqn=fqn, expert=e)}" for e in found)
        if not found:
            whole = meta.get(f"model.{fqn}")
            size = getattr(whole, "size", None)
            problems.append(
                f"{fqn}: the checkpoint holds it as one tensor of shape {tuple(size)}, not per expert (was it "
                "written by save_sharded?)" if whole is not None else f"{fqn}: not in the checkpoint"
            )
        elif found != list(range(E)):
            problems.append(
                f"{fqn}: the checkpoint holds {len(found)} experts (ids {found[0]}..{found[-1]}), the model has "
                f"num_experts={E}; expert counts must match (nothing is truncated or broadcast)"
            )
        else:
            for e in found:
                size = tuple(meta[f"model.{EXPERT_KEY.format(fqn=fqn, expert=e)}"].size)
                if size != want:
                    problems.append(f"{fqn}: expert {e} has shape {size} in the checkpoint, the model expects {want}")
                    break
    flat = _flat("model", sd["model"])
    if optimizer is not None:
        if not any(k.startswith("optim.") for k in meta):
            problems.append("optimizer: the checkpoint holds no optimizer state (saved without optimizer=?)")
        else:
            flat.update(_flat("optim", sd["optim"]))
    for key, value in flat.items():
        if key in expert_keys:
            continue
        stored = meta.get(key)
        if stored is None:
            problems.append(f"{key[len('model.'):] if key.startswith('model.') else key}: not in the checkpoint")
        elif isinstance(value, torch.Tensor) and tuple(getattr(stored, "size", ())) != _shape(value):
            name = key[len("model.") :] if key.startswith("model.") else key
            problems.append(f"{name}: shape {tuple(stored.size)} in the checkpoint, the model expects {_shape(value)}")
    extra = [k for k in meta if k.startswith("model.") and k not in flat and k not in expert_keys]
    if extra:
        problems.append(f"the checkpoint holds parameters the model does not: {sorted(extra)[:8]}")
    return problems


def load_sharded(model: nn.Module, path, optimizer: Optional[torch.optim.Optimizer] = None, *, process_group=None):
    """Read a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), whatever layout wrote it.

    A collective over the same group as :func:`save_sharded`. Raises ``ValueError`` on
    every rank, before reading any tensor, when the checkpoint disagrees with the model
    (the message names each parameter, with both shapes or expert counts).
    """
    pg, no_dist = _process_group(model, process_group)
    path = os.fspath(path)
    index = _index(model)
    sd, msd, osd = _build(model, optimizer, index)
    try:
        meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        problems = _problems(meta, sd, index, optimizer)
    except (OSError, ValueError, RuntimeError) as err:  # no readable checkpoint here
        problems = [f"cannot read the checkpoint metadata in {path!r}: {type(err).__name__}: {err}"]
    if not no_dist:  # every rank learns every rank's problems, so all raise together
        everyone = [None] * dist.get_world_size(pg)
        dist.all_gather_object(everyone, problems, group=pg)
        problems = sorted({p for ps in everyone for p in ps})
    if problems:
        raise ValueError(f"load_sharded({path!r}): the checkpoint does not match the model: " + "; ".join(problems))
    with _quiet(no_dist):
        dcp.load(sd, checkpoint_id=path, process_group=pg, no_dist=no_dist)
    # The expert slices were views of msd's tensors: msd now holds the checkpoint.
    set_model_state_dict(model, msd)
    if optimizer is not None:
        for fqn, st in osd["state"].items():  # non-tensor entries were replaced, not filled
            loaded = sd["optim"]["state"].get(fqn, {})
            for k, v in loaded.items():
                if not isinstance(v, torch.Tensor):
                    st[k] = v
        set_optimizer_state_dict(model, optimizer, osd)

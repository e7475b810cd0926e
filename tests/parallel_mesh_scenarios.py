"""Data parallel x expert parallel, beside DDP and FSDP2, any placement, load statistics: scenarios on 4 gloo ranks.

Every scenario runs one training step of ``parallel_models.Tiny`` (forward,
backward, gradient reduction, an optimizer step) on the parallel layout and on one
process holding the whole global batch and every expert, and compares, in fp32:
the loss, every gradient (expert shards against the reference's rows of the experts
this rank holds), the global gradient norm, and every parameter after the step.
"""

from __future__ import annotations

from parallel_harness import scenario
from parallel_models import batch, full_batch, loss_fn, parallel, reference

TOL = dict(atol=2e-5, rtol=2e-5)
ROUTER_TOL = dict(atol=2e-4, rtol=2e-4)  # softmax-gradient cancellation, as tests/test_layers.py


def _compare(name, actual, expected, tol=TOL):
    from helpers import assert_close

    assert_close(actual, expected, name=name, **tol)


def _full(t):
    """A DTensor (FSDP2) as the whole tensor; anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _mesh(D, P):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (D, P), mesh_dim_names=("dp", "ep"))


def _check_step(rank, W, model, ref, *, wrapped=None, replicated=True, fsdp=False):
    """One step of ``model`` (this rank's part of the batch) against ``ref`` (all of it)."""
    import torch

    from blocksparse_moe.parallel import grad_norm, reduce_gradients

    x_all, y_all = full_batch(0)
    ref_loss = loss_fn(ref, x_all, y_all)
    ref_loss.backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    x, y = batch(0, W)[rank]
    loss = loss_fn(wrapped or model, x, y)
    loss.backward()
    reduce_gradients(model, replicated=replicated)
    losses = torch.stack([loss.detach()])
    torch.distributed.all_reduce(losses)
    _compare("loss (mean over ranks)", losses / W, ref_loss.detach().reshape(1))
    experts = list(model.moe.local_experts)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if name.split(".")[-1] in ("w1", "w2", "v1"):
            expected = expected[experts]
        _compare(f"d {name}", _full(p.grad), expected, ROUTER_TOL if "router" in name else TOL)
    _compare("gradient norm", grad_norm(model).float(), ref_norm.reshape(()))
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        opt.step()
    for name, p in model.named_parameters():
        expected = ref_params[name].detach()
        if name.split(".")[-1] in ("w1", "w2", "v1"):
            expected = expected[experts]
        _compare(f"{name} after the step", _full(p.detach()), expected, ROUTER_TOL)
    return {"experts": experts, "grad_norm": float(ref_norm)}


def _dp_ep(rank, W, D, P, glu):
    ref = reference(2 * P, glu)
    return _check_step(rank, W, parallel(ref, _mesh(D, P)), ref)


@scenario
def mesh_2x2(rank, W):
    return _dp_ep(rank, W, 2, 2, glu=False)


@scenario
def mesh_2x2_glu(rank, W):
    return _dp_ep(rank, W, 2, 2, glu=True)


@scenario
def mesh_1x4(rank, W):
    return _dp_ep(rank, W, 1, 4, glu=False)


@scenario
def mesh_1x4_glu(rank, W):
    return _dp_ep(rank, W, 1, 4, glu=True)


@scenario
def mesh_2x2_ddp(rank, W):
    """DDP over all ranks on the non-expert parameters (experts ignored); reduce_gradients for the experts."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from blocksparse_moe.parallel import expert_parameter_names

    ref = reference(4, glu=True)
    model = parallel(ref, _mesh(2, 2))
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return _check_step(rank, W, model, ref, wrapped=DDP(model), replicated=False)


@scenario
def mesh_2x2_fsdp2(rank, W):
    """FSDP2 (fully_shard) over all ranks on the non-expert parameters; the experts stay plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from blocksparse_moe.parallel import expert_parameters

    ref = reference(4, glu=False)
    model = parallel(ref, _mesh(2, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (W,)), ignored_params=set(expert_parameters(model)))
    assert hasattr(model.inp.weight, "full_tensor") and not hasattr(model.moe.w1, "full_tensor")
    return _check_step(rank, W, model, ref, replicated=False, fsdp=True)


@scenario
def mesh_2x2_clip(rank, W):
    """grad_norm (2 and inf) and clip_grad_norm_ at 2 x 2 against torch's on the single-process gradient."""
    import torch

    from blocksparse_moe.parallel import clip_grad_norm_, grad_norm, reduce_gradients

    ref = reference(4, glu=True)
    model = parallel(ref, _mesh(2, 2))
    x_all, y_all = full_batch(0)
    loss_fn(ref, x_all, y_all).backward()
    x, y = batch(0, W)[rank]
    loss_fn(model, x, y).backward()
    reduce_gradients(model)
    grads = [p.grad for p in ref.parameters()]
    _compare("inf norm", grad_norm(model, float("inf")).float(), torch.nn.utils.get_total_norm(grads, float("inf")))
    two = torch.nn.utils.get_total_norm(grads)
    before = clip_grad_norm_(model, float(two) / 2)
    _compare("norm before clipping", before.float(), two)
    _compare("norm after clipping", grad_norm(model).float(), two / 2, dict(atol=1e-5, rtol=1e-5))
    return {}


# --------------------------------------------------------------------------- placements
def _placed(rank, W, E, owners=None, **kw):
    from blocksparse_moe.parallel import ExpertPlacement, gather_state_dict

    ref = reference(E, glu=True, seed=3)
    placement = None if owners is None else ExpertPlacement.from_owners(owners, W)
    model = parallel(ref, None, placement=placement, **kw)
    back = gather_state_dict(model)  # the shards put back at their global ids
    for k, v in ref.state_dict().items():
        _compare(f"gathered {k}", back[k], v, dict(atol=0, rtol=0))
    return _check_step(rank, W, model, ref)


@scenario
def placement_e6(rank, W):
    """E=6 over 4 ranks, the default contiguous split: 2, 2, 1, 1 experts."""
    res = _placed(rank, W, 6)
    assert res["experts"] == [[0, 1], [2, 3], [4], [5]][rank], res
    return res


@scenario
def placement_permuted(rank, W):
    return _placed(rank, W, 8, owners=[3, 1, 0, 2, 1, 3, 0, 2])


@scenario
def placement_empty_rank(rank, W):
    """Rank 1 holds no expert; rank 0 two, rank 2 two, rank 3 two (E=6, permuted)."""
    res = _placed(rank, W, 6, owners=[3, 0, 0, 2, 2, 3])
    assert (res["experts"] == []) == (rank == 1), res
    return res


@scenario
def placement_capacity(rank, W):
    """The fixed-capacity mode under the same placement, with the bound that never overflows."""
    from parallel_models import GLOBAL

    return _placed(rank, W, 6, owners=[3, 0, 0, 2, 2, 3], capacity_per_peer=GLOBAL // W * 2)


# --------------------------------------------------------------------------- statistics
@scenario
def load_stats(rank, W):
    """collect_load_stats after two forwards: the group's load, the traffic matrix, balancedness, reset."""
    import torch

    from blocksparse_moe.parallel import collect_load_stats
    from parallel_models import H

    E = 6
    ref = reference(E, glu=False, seed=4)
    model = parallel(ref, None, placement=[3, 0, 0, 2, 2, 3])
    expected = torch.zeros(E, dtype=torch.int64)
    for step in (0, 1):
        x, _ = batch(step, W)[rank]
        model(x)
        x_all, _ = full_batch(step)
        _, aux = ref.moe(torch.tanh(ref.inp(x_all)), return_aux=True)
        expected += aux.tokens_per_expert.long()
    tracker = model.moe.load_tracker
    assert tracker.tokens_per_expert.dtype == torch.int64 and tracker.forwards == 2
    stats = collect_load_stats(model)["moe"]
    assert stats.forwards == 2 and stats.tokens_per_expert == expected.tolist(), (stats, expected)
    owners = [3, 0, 0, 2, 2, 3]
    loads = [sum(int(expected[e]) for e in range(E) if owners[e] == r) for r in range(W)]
    assert stats.rows_per_rank == loads and loads[1] == 0, (stats.rows_per_rank, loads)
    assert abs(stats.balancedness - (sum(loads) / W) / max(loads)) < 1e-12
    assert stats.traffic[rank] == stats.rows_sent
    assert [sum(row[p] for row in stats.traffic) for p in range(W)] == loads  # column sums: rows computed
    assert [stats.traffic[s][rank] for s in range(W)] == stats.rows_received
    remote = sum(stats.rows_sent) - stats.rows_sent[rank] + sum(stats.rows_received) - stats.rows_received[rank]
    assert stats.bytes_sent == remote * H * 4 and stats.bytes_sent_per_rank[rank] == stats.bytes_sent
    again = collect_load_stats(model, reduce=False)["moe"]
    assert again.forwards == 0 and sum(again.tokens_per_expert) == 0  # reset by the first collection
    return {"balancedness": stats.balancedness, "rows_per_rank": stats.rows_per_rank}


# --------------------------------------------------------------------------- DDP on the expert group itself
@scenario
def mesh_1x4_ddp(rank, W):
    """At 1 x 4 the ep group is the default group: DDP's all-reduces (one bucket per parameter) share it
    with the all-to-alls, issued in the same autograd order on every rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from blocksparse_moe.parallel import expert_parameter_names

    ref = reference(8, glu=True)
    model = parallel(ref, _mesh(1, 4))
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return _check_step(rank, W, model, ref, wrapped=DDP(model, bucket_cap_mb=0.0001), replicated=False)

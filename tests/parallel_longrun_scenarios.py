"""Long-run scenarios: the expert-parallel layer trained for many steps while routing shifts (issue 18).

``ep_long_run`` trains ``ExpertParallelDMoE`` with AdamW for ``STEPS`` steps on every rank
of a launch. Each rank's token count changes every step (0 to ``MAX_TOKENS``: a rank
sometimes has none) and the hot expert, the one every input points to, moves every
``MOVE_EVERY`` steps across the ranks' expert slices. It reports, per rank:

* the census after warm-up and after each half that follows (live tensors and their
  bytes, tracked Python objects and container items: ``tests/test_memory_flat.py``'s
  ``census``) and the peak resident memory of each half (``VmHWM``, reset between);
* a SHA-256 of every step's loss and of the final parameters and optimizer state, so
  that two launches at one world size can be compared bit for bit.

See ``tests/test_parallel_longrun.py`` for what is asserted.
"""

from __future__ import annotations

import hashlib

from parallel_harness import scenario

STEPS, WARMUP, MOVE_EVERY, MAX_TOKENS = 120, 30, 20, 192


@scenario
def ep_long_run(rank, W):
    import numpy as np
    import torch
    from test_memory_flat import measure_phases

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, sync_router_grads

    torch.manual_seed(0)  # the same full layer on every rank: each keeps its slice
    H, E = 16, 2 * W
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=24, num_experts=E, top_k=2, block_size=16, glu=True,
                    activation="silu", backend="grouped", init_std=0.2)  # fmt: skip
    layer = ExpertParallelDMoE(cfg, name="moe")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    rng = np.random.default_rng(100 + rank)
    tokens = rng.integers(0, MAX_TOKENS + 1, size=STEPS)
    tokens[0] = MAX_TOKENS  # the largest batch inside the warm-up
    tokens[rank % 7 :: 7] = 0  # this rank has no tokens on some steps
    g = torch.Generator().manual_seed(200 + rank)
    losses = np.zeros(STEPS)  # preallocated: the run keeps nothing per step

    def step(i: int) -> None:
        T = int(tokens[i])
        hot = (i // MOVE_EVERY) % E
        with torch.no_grad():
            direction = layer.router.weight[hot] / layer.router.weight[hot].norm()
        x = torch.randn(T, H, generator=g) + 3.0 * direction
        target = torch.randn(T, H, generator=g)
        out = layer(x)
        loss = (out - target).square().sum() / max(T, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_router_grads(layer)
        opt.step()
        losses[i] = loss.item()

    res = measure_phases(step, STEPS, WARMUP)
    h = hashlib.sha256(losses.tobytes())
    for t in list(layer.state_dict().values()) + [s for st in opt.state.values() for s in st.values()]:
        h.update(t.detach().contiguous().numpy().tobytes())
    return dict(res, digest=h.hexdigest(), tokens=int(tokens.sum()), empty_steps=int((tokens == 0).sum()))


def _replace_run(rank, W, move_at, new_owners, glu):
    """Train an expert-parallel layer 5 steps with AdamW; before step ``move_at``, move its experts."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, gather_state_dict, sync_router_grads

    torch.manual_seed(0)
    H, E = 16, 2 * W + 1  # not a multiple of W: ranks hold different numbers of experts
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=24, num_experts=E, top_k=3, block_size=16, glu=glu,
                    activation="silu", backend="grouped", init_std=0.2)  # fmt: skip
    layer = ExpertParallelDMoE(cfg, name="moe")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7 + rank)
    losses, move = [], None
    for step in range(5):
        if step == move_at:
            move = layer.replace_experts(new_owners, opt)
        T = 0 if (rank == 1 and step == 3) else 5 + 3 * rank + step  # a rank without tokens once
        x = torch.randn(T, H, generator=g)
        loss = (layer(x) - 1.0).square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_router_grads(layer)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    full = gather_state_dict(layer)
    return losses, full, move, layer


@scenario
def replace_experts_equal(rank, W):
    """A move before step 2 (to a scrambled placement, a rank holding none) changes no loss and no weight."""
    import torch

    E = 2 * W + 1
    owners = [(3 * e + 1) % W for e in range(E)]
    owners = [0 if o == W - 1 else o for o in owners]  # the last rank ends up with no expert
    out = {}
    for glu in (False, True):
        base, full_base, _, _ = _replace_run(rank, W, None, owners, glu)
        moved, full_moved, move, layer = _replace_run(rank, W, 2, owners, glu)
        assert layer.local_experts == tuple(e for e in range(E) if owners[e] == rank), layer.local_experts
        assert layer.num_local_experts == layer.w1.shape[0]
        for a, b in zip(base, moved):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (base, moved)
        for key in full_base:
            torch.testing.assert_close(full_moved[key], full_base[key], atol=1e-5, rtol=1e-5, msg=key)
        out["glu" if glu else "mlp"] = {"losses": moved, "moved": move.experts_moved, "sent": move.experts_sent,
                                        "received": move.experts_received, "bytes_sent": move.bytes_sent,
                                        "bytes_received": move.bytes_received}  # fmt: skip
    return out


@scenario
def replace_experts_mismatch(rank, W):
    """Ranks passing different new placements: ConfigMismatchError on every rank, before anything moves."""
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=W, top_k=1, backend="grouped")
    layer = ExpertParallelDMoE(cfg, name="moe")
    before = layer.w1.detach().clone()
    owners = list(range(W))[::-1] if rank == 0 else list(range(W))
    try:
        layer.replace_experts(owners)
    except ConfigMismatchError as err:
        assert layer.w1.shape == before.shape and bool((layer.w1 == before).all())
        return {"message": str(err)}
    raise AssertionError("no ConfigMismatchError")

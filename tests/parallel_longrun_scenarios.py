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
    from test_memory_flat import _peak_kib, _reset_peak, census

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

    reset = _reset_peak()
    for i in range(WARMUP):
        step(i)
    base = census()
    if reset:
        _reset_peak()
    later, peaks = [], []
    mid = WARMUP + (STEPS - WARMUP) // 2
    for lo, hi in ((WARMUP, mid), (mid, STEPS)):
        for i in range(lo, hi):
            step(i)
        peaks.append(_peak_kib())
        later.append(census())
        if reset:
            _reset_peak()
    h = hashlib.sha256(losses.tobytes())
    for t in list(layer.state_dict().values()) + [s for st in opt.state.values() for s in st.values()]:
        h.update(t.detach().contiguous().numpy().tobytes())
    return {"base": base, "later": later, "peaks": peaks, "reset": reset, "digest": h.hexdigest(),
            "tokens": int(tokens.sum()), "empty_steps": int((tokens == 0).sum())}  # fmt: skip

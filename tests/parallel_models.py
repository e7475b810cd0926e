"""A tiny model around one MoE layer, its data, and one training step: shared by the mesh and checkpoint scenarios.

``Tiny`` is ``out(h + moe(h))`` with ``h = tanh(inp(x))``: replicated parameters on
both sides of the expert layer, so the all-to-alls carry gradients both ways. The
same constructor builds the single-process reference (``moe`` a ``dMoE``) and the
parallel model (``moe`` an ``ExpertParallelDMoE``); their state-dict keys agree.

The data is a function of the step only, so that every layout sees the same global
batch: ``batch(step, n)`` splits it into ``n`` equal parts (rank ``i`` of the
data-parallel x expert-parallel job takes part ``i``). Equal parts make the mean of
the ranks' mean losses the single-process mean loss.
"""

from __future__ import annotations

import torch
from torch import nn

H, FFN, BLOCK = 16, 24, 16
GLOBAL = 32  # tokens of a global batch, split into 1, 2 or 4 equal parts


class Tiny(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        torch.manual_seed(7)  # the same replicated weights in every process
        self.inp = nn.Linear(H, H)
        self.moe = moe
        self.out = nn.Linear(H, H)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.moe(h))


def config(E: int, glu: bool = False, **kw):
    from blocksparse_moe import MoEConfig

    return MoEConfig(
        hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, block_size=BLOCK, glu=glu,
        activation="silu" if glu else "gelu", backend="auto", **kw,
    )  # fmt: skip


def reference(E: int, glu: bool = False, seed: int = 0) -> Tiny:
    """The single-process model with O(1) signals (router and experts drawn from ``seed``)."""
    from blocksparse_moe import dMoE

    cfg = config(E, glu)
    moe = dMoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        moe.w1.copy_(torch.randn(E, H, FFN, generator=g) / H**0.5)
        moe.w2.copy_(torch.randn(E, FFN, H, generator=g) / FFN**0.5)
        if moe.v1 is not None:
            moe.v1.copy_(torch.randn(E, H, FFN, generator=g) / H**0.5)
    return Tiny(moe)


def parallel(ref: Tiny, group=None, **kw) -> Tiny:
    """The same model with its experts sharded (``kw``: placement, capacity_per_peer, ...)."""
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    moe = ExpertParallelDMoE(ref.moe.config, group, name="moe", sync_router_init=False, **kw)
    model = Tiny(moe)
    model.load_state_dict(shard_state_dict(ref.state_dict(), model))
    return model


def batch(step: int, parts: int) -> list:
    """The global batch of ``step``, as ``parts`` equal ``(x, target)`` pairs."""
    assert GLOBAL % parts == 0, parts
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL, H, generator=g)
    y = torch.randn(GLOBAL, H, generator=g)
    n = GLOBAL // parts
    return list(zip(x.split(n), y.split(n)))


def loss_fn(model, x, y):
    return (model(x) - y).square().mean()


def full_batch(step: int):
    return batch(step, 1)[0]

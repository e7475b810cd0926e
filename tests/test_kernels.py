"""Each launcher against the pure-torch reference, on NaN-poisoned outputs.

The references run in float64 on the same (rounded) inputs, so the tolerances only
cover the kernels' own rounding: fp32 accumulation, one rounding of the output.
"""

import pytest
import torch
from helpers import TOLERANCES, assert_close, make_expert_ids, padding_poisoned

import blocksparse_moe.kernels as K
from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(device, T=37, E=5, k=2, H=40, ffn=72, bs=16, mode="skewed", dtype=torch.float32, seed=0):
    ids = make_expert_ids(T, E, k, mode, seed=seed).to(device)
    plan = plan_routing(ids, E)
    topo = build_topology(plan, ffn, bs)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return plan, topo, rnd


def _nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _poisoned_blocks(topo, dtype, device):
    return _nan(topo.capacity, topo.block_size, topo.block_size, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_sdd_matches_reference(device, dtype, bs):
    plan, topo, rnd = _case(device, bs=bs, dtype=dtype)
    a, w = rnd(plan.num_slots, 40), rnd(5, 40, 72)
    out = K.sdd(a, w, topo, out=_poisoned_blocks(topo, dtype, device))
    expect = ref.sdd_torch(a.double(), w.double(), topo)
    assert_close(out, expect, **TOLERANCES[dtype], name=f"sdd {dtype} bs={bs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdd_two_block_tile_matches_reference(device, dtype, monkeypatch):
    """The two-block tile (``BLOCKS_N=2``, an autotune choice on GPUs), forced for one launch.

    ffn 72 at block 16 is F = 5 column blocks: every row's last tile holds one block
    (the second is not stored) and that block is half past N (masked columns).
    """
    import sys

    import triton

    kernel = sys.modules["blocksparse_moe.kernels.sdd"]._sdd_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_K": 32, "BLOCKS_N": 2}, num_warps=4, num_stages=2)])
    monkeypatch.setattr(kernel, "cache", {})
    plan, topo, rnd = _case(device, bs=16, dtype=dtype)
    assert topo.ffn_blocks % 2 == 1
    a, w = rnd(plan.num_slots, 40), rnd(5, 40, 72)
    out = K.sdd(a, w, topo, out=_poisoned_blocks(topo, dtype, device))
    assert_close(out, ref.sdd_torch(a.double(), w.double(), topo), **TOLERANCES[dtype], name=f"sdd two-block {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_dsd_matches_reference(device, dtype, bs):
    plan, topo, rnd = _case(device, bs=bs, dtype=dtype)
    data = padding_poisoned(ref.sdd_torch(rnd(plan.num_slots, 40), rnd(5, 40, 72), topo), topo)
    assert torch.isnan(data).any() and topo.ffn_size % bs and (plan.tokens_per_expert % bs).any()  # padding exists
    w2 = rnd(5, 72, 40)
    # The output is a window of a wider, taller buffer: the guard row above and below it and the
    # guard columns right of it hold a sentinel that a store past the row or column edge would overwrite.
    S, N, sentinel = plan.num_slots, 40, 1234.0
    buf = torch.full((S + 2, N + 8), sentinel, dtype=dtype, device=device)
    out = buf[1 : S + 1, :N]
    out.fill_(float("nan"))
    K.dsd(data, w2, topo, out=out)
    assert_close(out, ref.dsd_torch(data.double(), w2.double(), topo), **TOLERANCES[dtype], name="dsd")
    guard = torch.ones_like(buf, dtype=torch.bool)
    guard[1 : S + 1, :N] = False
    assert torch.all(buf[guard] == sentinel), "dsd stored outside its output (past a row or column edge)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_dsd_t_matches_reference(device, dtype, bs):
    plan, topo, rnd = _case(device, bs=bs, dtype=dtype)
    data = ref.sdd_torch(rnd(plan.num_slots, 40), rnd(5, 40, 72), topo)
    d = rnd(plan.num_slots, 40)
    out = K.dsd_t(data, d, topo, out=_nan(5, 72, 40, dtype=dtype, device=device))
    assert_close(out, ref.dsd_t_torch(data.double(), d.double(), topo), **TOLERANCES[dtype], name="dsd_t")


def test_block_128_and_prime_experts(device):
    plan, topo, rnd = _case(device, T=150, E=7, k=3, H=33, ffn=130, bs=128, mode="uniform")
    a, w1, w2 = rnd(plan.num_slots, 33), rnd(7, 33, 130), rnd(7, 130, 33)
    h = K.sdd(a, w1, topo, out=_poisoned_blocks(topo, torch.float32, device))
    assert_close(h, ref.sdd_torch(a.double(), w1.double(), topo), **TOLERANCES[torch.float32], name="sdd bs=128")
    y = K.dsd(h, w2, topo)
    assert_close(y, ref.dsd_torch(h.double(), w2.double(), topo), **TOLERANCES[torch.float32], name="dsd bs=128")


def test_strided_weights_are_read_in_place(device):
    """Weights as views: transposed, and gate/up halves of fused tensors (concatenated or interleaved)."""
    plan, topo, rnd = _case(device, H=24, ffn=40)
    a = rnd(plan.num_slots, 24)
    fused_t = rnd(5, 2 * 40, 24)  # [E, 2*ffn, H], as transformers stores gate_up_proj
    views = {
        "transposed": fused_t[:, :40, :].transpose(1, 2),
        "concatenated-up": fused_t[:, 40:, :].transpose(1, 2),
        "interleaved": fused_t[:, 1::2, :].transpose(1, 2),
        "row-major-slice": rnd(5, 24, 2 * 40)[:, :, 40:],
    }
    for name, w in views.items():
        assert not w.is_contiguous()
        out = K.sdd(a, w, topo)
        assert_close(out, ref.sdd_torch(a.double(), w.double(), topo), **TOLERANCES[torch.float32], name=name)
    down = rnd(5, 24, 40).transpose(1, 2)  # [E, ffn, H] as a view of [E, H, ffn]
    y = K.dsd(out, down, topo)
    assert_close(y, ref.dsd_torch(out.double(), down.double(), topo), **TOLERANCES[torch.float32], name="dsd view")
    dw = torch.full((5, 24, 40), float("nan"), device=device)
    K.dsd_t(out, a, topo, out=dw.transpose(1, 2))  # written through a transposed view
    assert_close(dw.transpose(1, 2), ref.dsd_t_torch(out.double(), a.double(), topo), **TOLERANCES[torch.float32], name="dsd_t view")


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_kernels(device, dtype):
    plan, topo, rnd = _case(device, T=45, E=7, k=3, H=50, dtype=dtype, mode="uniform")
    x = rnd(45, 50)
    w = torch.rand(45, 3, device=device)
    xs = K.gather(x, plan.sorted_to_slot, 3)
    assert torch.equal(xs, ref.gather_torch(x, plan))
    scaled = K.gather(x, plan.sorted_to_slot, 3, scale=w)
    expect = x.double()[(plan.sorted_to_slot // 3).long()] * w.reshape(-1)[plan.sorted_to_slot.long()].double()[:, None]
    assert_close(scaled, expect, **TOLERANCES[dtype], name="gather scaled")
    y = K.combine(xs, plan.slot_to_sorted, 3, w)
    assert_close(y, ref.combine_torch(xs.double(), plan, w.double()), **TOLERANCES[dtype], name="combine")
    dy = rnd(45, 50)
    dw = K.combine_weight_grad(dy, xs, plan.slot_to_sorted, 3, dtype=torch.float32)
    expect = (dy.double()[:, None, :] * xs.double()[plan.slot_to_sorted.long()].reshape(45, 3, 50)).sum(-1)
    assert_close(dw, expect, **TOLERANCES[dtype], name="combine_weight_grad")


def test_empty_batch_kernels(device):
    plan, topo, rnd = _case(device, T=0)
    assert topo.capacity == 0
    h = K.sdd(rnd(0, 40), rnd(5, 40, 72), topo)
    assert h.shape == (0, 16, 16)
    assert K.dsd(h, rnd(5, 72, 40), topo).shape == (0, 40)
    dw = K.dsd_t(h, rnd(0, 40), topo)
    assert torch.equal(dw, torch.zeros_like(dw))  # no rows: the gradient is exactly zero
    assert K.combine(rnd(0, 40), plan.slot_to_sorted, 2).shape == (0, 40)


def test_empty_expert_weight_grad_is_zero(device):
    plan, topo, rnd = _case(device, E=6, mode="skewed")
    assert int((plan.tokens_per_expert == 0).sum()) > 0
    data = ref.sdd_torch(rnd(plan.num_slots, 40), rnd(6, 40, 72), topo)
    dw = K.dsd_t(data, rnd(plan.num_slots, 40), topo, out=_nan(6, 72, 40, dtype=torch.float32, device=device))
    empty = (plan.tokens_per_expert == 0).nonzero().flatten()
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty]))

"""The torch block-layout backend's backward is O(E): one split of each operand, not a slice per expert.

Indexing ``w[e]`` (or slicing ``x[start:end]``) per expert inside autograd makes every
piece's gradient a zero tensor of the whole operand, summed afterwards: O(E^2 K N) work
and memory. ``reference.py`` splits once; this test fails on the per-expert slicing.
"""

import torch
from helpers import make_expert_ids

from blocksparse_moe import moe_ffn


def _bytes_allocated_in_backward(E: int) -> tuple[int, int]:
    T, k, H, F = 64, 2, 64, 64
    g = torch.Generator().manual_seed(0)
    ids = make_expert_ids(T, E, k, "uniform")
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ws = [(torch.randn(E, *shape, generator=g) / 8).requires_grad_() for shape in ((H, F), (F, H), (H, F))]
    y = moe_ffn(x, ids, w, ws[0], ws[1], ws[2], activation="silu", block_size=16, backend="torch")
    with torch.profiler.profile(profile_memory=True) as prof:
        y.square().sum().backward()
    allocated = sum(ev.cpu_memory_usage for ev in prof.key_averages() if ev.cpu_memory_usage > 0)
    return allocated, sum(t.numel() * t.element_size() for t in ws)


def test_torch_backend_backward_allocates_a_few_times_the_weights_at_e64():
    allocated, weight_bytes = _bytes_allocated_in_backward(64)
    # Measured 8x: the gradients are 1x, the block layout's padded copies of the
    # activations the rest. Per-expert slicing allocated 283x here (E^2 growth).
    assert allocated < 16 * weight_bytes, f"backward allocated {allocated / weight_bytes:.1f}x the weight bytes"

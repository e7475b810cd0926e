"""No hidden host syncs: the Triton path traces whole under torch.compile(fullgraph=True).

A ``.item()``, ``.tolist()`` or data-dependent shape in forward or backward would be a
graph break, which ``fullgraph=True`` turns into an error. On a GPU the same forward
and backward also run under CUDA's sync-debug mode and inside a CUDA graph.
"""

import pytest
import torch
from helpers import TOLERANCES, assert_close, make_expert_ids

from blocksparse_moe import moe_ffn
from blocksparse_moe.reference import moe_ffn_dense


def _inputs(device, T=21, E=5, k=2, H=24, ffn=40):
    g = torch.Generator().manual_seed(0)
    ids = make_expert_ids(T, E, k, "skewed").to(device)
    tensors = [
        torch.randn(T, H, generator=g),
        torch.rand(T, k, generator=g),
        torch.randn(E, H, ffn, generator=g) / H**0.5,
        torch.randn(E, ffn, H, generator=g) / ffn**0.5,
        torch.randn(E, H, ffn, generator=g) / H**0.5,
    ]
    return ids, [t.to(device).requires_grad_() for t in tensors]


def _forward(ids, x, w, w1, w2, v1):
    return moe_ffn(x, ids, w, w1, w2, v1, activation="silu", block_size=16, backend="triton")


def _step(ids, x, w, w1, w2, v1, forward=_forward):
    y = forward(ids, x, w, w1, w2, v1)
    return y, torch.autograd.grad(y.square().sum(), [x, w, w1, w2, v1])


def test_fullgraph_compile_forward_backward(device):
    """Dynamo traces the forward whole; AOT autograd traces the backward graph too."""
    ids, leaves = _inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(_forward, fullgraph=True, backend="aot_eager")
    y, grads = _step(ids, *leaves, forward=compiled)
    y_eager, grads_eager = _step(ids, *leaves)
    tol = TOLERANCES[torch.float32]
    assert_close(y, y_eager, **tol, name="compiled output")
    for name, a, b in zip(["x", "weights", "w1", "w2", "v1"], grads, grads_eager):
        assert_close(a, b, **tol, name=f"compiled grad {name}")
    ref = moe_ffn_dense(*[t.detach().double().cpu() for t in leaves[:1]], ids.cpu(),
                        *[t.detach().double().cpu() for t in leaves[1:]], activation="silu")  # fmt: skip
    assert_close(y, ref, **tol, name="compiled vs dense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_sync_and_cuda_graph(device):
    if device.type != "cuda":
        pytest.skip("suite running on the CPU interpreter")
    ids, leaves = _inputs(device)
    _step(ids, *leaves)  # warm-up: autotuning and compilation happen here, outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(ids, *leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x, w, w1, w2, v1 = [t.detach() for t in leaves]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe_ffn(x, ids, w, w1, w2, v1, activation="silu", block_size=16, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe_ffn(x, ids, w, w1, w2, v1, activation="silu", block_size=16, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    ref = moe_ffn(x, ids, w, w1, w2, v1, activation="silu", block_size=16, backend="triton")
    assert_close(y, ref, **TOLERANCES[torch.float32], name="graph replay")


def test_fullgraph_compile_triton_topology(device):
    """The two-launch topology is one opaque custom op: it traces whole, with the eager arrays."""
    from blocksparse_moe import build_topology, plan_routing

    ids = make_expert_ids(37, 7, 3, "skewed").to(device)

    def arrays(ids):
        return build_topology(plan_routing(ids, 7), 50, 16, backend="triton").tensors()

    torch._dynamo.reset()
    got = torch.compile(arrays, fullgraph=True, backend="aot_eager")(ids)
    for a, e in zip(got, arrays(ids)):
        assert torch.equal(a, e)

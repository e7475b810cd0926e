"""Bad input fails early with a clear error naming the argument, and writes nothing."""

import pytest
import torch

import blocksparse_moe.kernels as K
from blocksparse_moe import build_topology, moe_ffn, plan_routing
from blocksparse_moe.ops import resolve_backend

T, H, FFN, E, KK = 6, 8, 12, 3, 2


def args(**over):
    a = dict(
        x=torch.randn(T, H),
        expert_ids=torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]]),
        weights=torch.rand(T, KK),
        w1=torch.randn(E, H, FFN),
        w2=torch.randn(E, FFN, H),
        v1=None,
    )
    a.update(over)
    return a


def call(device=None, **over):
    block_size = over.pop("block_size", 16)
    backend = over.pop("backend", "torch")
    activation = over.pop("activation", "gelu")
    a = args(**over)
    if device is not None:  # the triton backend on a GPU: CPU tensors moved there, meta ones kept
        a = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in a.items()}
    return moe_ffn(**a, block_size=block_size, backend=backend, activation=activation)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(expert_ids=torch.tensor([[0, 3]] * T)), ValueError, r"expert_ids must lie in \[0, num_experts=3\), found 3"),
        (dict(expert_ids=torch.tensor([[0, -1]] * T)), ValueError, r"found -1"),
        (dict(expert_ids=torch.zeros(T, KK)), TypeError, r"expert_ids must be an integer tensor, got dtype torch.float32"),
        (dict(expert_ids=torch.zeros(T, 4, dtype=torch.long), weights=torch.rand(T, 4)), ValueError, r"top_k .* must be in \[1, num_experts=3\], got 4"),
        (dict(expert_ids=torch.zeros(T, 0, dtype=torch.long), weights=torch.rand(T, 0)), ValueError, r"top_k .* got 0"),
        (dict(x=torch.randn(T, H + 1)), ValueError, r"x has hidden size 9 but w1 expects 8"),
        (dict(w2=torch.randn(E, FFN, H + 1)), ValueError, r"w2 must have shape \(3, 12, 8\)"),
        (dict(v1=torch.randn(E, H, FFN + 1)), ValueError, r"v1 must have the shape of w1"),
        (dict(x=torch.ones(T, H, dtype=torch.long)), TypeError, r"x must be float32, float16 or bfloat16, got torch.int64"),
        (dict(w1=torch.randn(E, H, FFN, dtype=torch.float16)), TypeError, r"w1 has dtype torch.float16 but x has torch.float32"),
        (dict(w1=torch.randn(E, H, FFN, device="meta")), ValueError, r"w1 is on meta but x is on (cpu|cuda)"),
        (dict(weights=torch.rand(T, KK + 1)), ValueError, r"weights must have the shape of expert_ids"),
        (dict(expert_ids=torch.zeros(T + 1, KK, dtype=torch.long)), ValueError, r"expert_ids must be \[tokens=6, top_k\]"),
        (dict(block_size=48), ValueError, r"block_size must be one of \(16, 32, 64, 128\), got 48"),
        (dict(block_size=256), ValueError, r"got 256"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'grouped', 'triton', 'persistent', 'torch'\), got 'cuda'"),
        (dict(activation="swish"), ValueError, r"activation must be one of .* got 'swish'"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_ffn_rejects(over, exc, match, backend, device):
    over = dict(over)
    over.setdefault("backend", backend)
    if backend == "triton" and device.type == "cuda":
        if "found" in match:
            pytest.skip("on CUDA the expert-id range check is a device-side assert: raising here would need a host sync")
        over["device"] = device
    with pytest.raises(exc, match=match):
        call(**over)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "grouped"


def _topo():
    plan = plan_routing(args()["expert_ids"], E)
    return plan, build_topology(plan, FFN, 16)


def test_launchers_validate_before_writing():
    plan, topo = _topo()
    out = torch.full((topo.capacity, 16, 16), float("nan"))
    a = torch.randn(T * KK, H)
    with pytest.raises(ValueError, match=r"sdd: b.shape\[1\] must equal a.shape\[1\]=8, got 9"):
        K.sdd(a, torch.randn(E, H + 1, FFN), topo, out=out)
    with pytest.raises(TypeError, match=r"sdd: b has dtype torch.float16 but a has torch.float32"):
        K.sdd(a, torch.randn(E, H, FFN, dtype=torch.float16), topo, out=out)
    with pytest.raises(ValueError, match=r"sdd: a must have 12 rows \(tokens \* top_k\), got 11"):
        K.sdd(a[:11], torch.randn(E, H, FFN), topo, out=out)
    assert torch.isnan(out).all(), "a rejected call must leave its output untouched"
    with pytest.raises(ValueError, match=r"dsd: data must have shape"):
        K.dsd(torch.randn(1, 16, 16), torch.randn(E, FFN, H), topo)
    with pytest.raises(ValueError, match=r"dsd: b must have shape \[3, 12, N\]"):
        K.dsd(torch.randn(topo.capacity, 16, 16), torch.randn(E, FFN + 1, H), topo)
    with pytest.raises(ValueError, match=r"dsd_t: b must have 12 rows"):
        K.dsd_t(torch.randn(topo.capacity, 16, 16), torch.randn(5, H), topo)
    with pytest.raises(TypeError, match=r"gather: x must have dtype float32, float16 or bfloat16, got torch.int32"):
        K.gather(torch.ones(T, H, dtype=torch.int32), plan.sorted_to_slot, KK)
    with pytest.raises(ValueError, match=r"combine: weights must have shape \(6, 2\)"):
        K.combine(torch.randn(T * KK, H), plan.slot_to_sorted, KK, torch.rand(T, 3))
    with pytest.raises(TypeError, match=r"gather: sorted_to_slot must be a 1-D int32 tensor"):
        K.gather(torch.randn(T, H), plan.sorted_to_slot.long(), KK)


def test_topology_rejects_bad_sizes():
    plan, _ = _topo()
    with pytest.raises(ValueError, match=r"block_size must be one of .* got 8"):
        build_topology(plan, FFN, 8)
    with pytest.raises(ValueError, match=r"ffn_size must be a positive int, got 0"):
        build_topology(plan, 0, 16)
    with pytest.raises(TypeError, match=r"plan must be a RoutingPlan, got Tensor"):
        build_topology(torch.zeros(3), FFN, 16)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        plan_routing(torch.zeros(2, 1, dtype=torch.long), 0)

"""The same bits run to run (issue 18, item 3), on every backend that runs on this machine.

For the same inputs and seed, ``moe_ffn`` and ``dMoE`` give bitwise identical forward
outputs, losses and gradients of every input and parameter, across two runs in one
process and across two processes (different hash seeds), by default and under
``torch.use_deterministic_algorithms(True)`` (the flag is restored afterwards).
The backends are ``blocksparse_moe.ops.BACKENDS`` minus ``"auto"``; ``"triton"`` and
``"persistent"`` run under the interpreter on the CPU (``"persistent"`` in the SwiGLU cases
only: it computes nothing else). A backend that cannot run here is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_expert_ids

from blocksparse_moe import MoEConfig, dMoE, moe_ffn, ops

BACKENDS = [b for b in ops.BACKENDS if b != "auto"]
ROOT = Path(__file__).resolve().parents[1]


def _runs_here(backend: str, device: torch.device) -> bool:
    try:
        ops.resolve_backend(backend, device)
    except ValueError:
        return False
    return True


@pytest.fixture(params=[False, True], ids=["default", "deterministic"])
def deterministic(request):
    """Runs the test with ``torch.use_deterministic_algorithms`` off, then on; restores the flags."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def ffn_run(backend: str, device, *, glu: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """One forward + backward of moe_ffn from inputs rebuilt from ``seed``: output and every gradient."""
    T, E, k, H, ffn = 21, 4, 2, 16, 24
    g = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(T, E, k, "skewed", seed=seed).to(device)
    leaves = {
        "x": torch.randn(T, H, generator=g),
        "weights": torch.rand(T, k, generator=g),
        "w1": torch.randn(E, H, ffn, generator=g) / H**0.5,
        "w2": torch.randn(E, ffn, H, generator=g) / ffn**0.5,
    }
    if glu:
        leaves["v1"] = torch.randn(E, H, ffn, generator=g) / H**0.5
    leaves = {n: t.to(device).requires_grad_() for n, t in leaves.items()}
    y = moe_ffn(
        leaves["x"], ids, leaves["weights"], leaves["w1"], leaves["w2"], leaves.get("v1"),
        activation="silu" if glu else "gelu", block_size=16, backend=backend,
    )  # fmt: skip
    dy = torch.randn(T, H, generator=g).to(device)
    (y * dy).sum().backward()
    return {"out": y.detach(), **{f"grad {n}": t.grad for n, t in leaves.items()}}


def layer_run(backend: str, device, *, seed: int = 0, **options) -> dict[str, torch.Tensor]:
    """One training step's forward + backward of dMoE, the layer built and jittered from ``seed``."""
    torch.manual_seed(seed)  # the initialisation and the router jitter both draw from it
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, block_size=16, backend=backend,
        router_jitter=0.1, init_std=0.2, device=device, **options,
    )  # fmt: skip
    layer = dMoE(cfg).train()
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    out, aux = layer(x, return_aux=True)
    dy = torch.randn(out.shape, device=device)
    loss = (out * dy).sum() + aux.loss
    loss.backward()
    res = {
        "out": out.detach(),
        "load_balancing_loss": aux.load_balancing_loss.detach(),
        "z_loss": aux.z_loss.detach(),
        "loss": loss.detach(),
        "expert_ids": aux.expert_ids,
        "tokens_per_expert": aux.tokens_per_expert,
        "grad x": x.grad,
    }
    res.update({f"grad {n}": p.grad for n, p in layer.named_parameters()})
    return res


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] is not None, f"{what}: no {name}"
        # Bit patterns, not values: equal NaNs and the sign of zero count too.
        x, y = a[name].detach().cpu().reshape(-1), b[name].detach().cpu().reshape(-1)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name} differs in dtype or shape"
        same = torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.numel() else True
        assert same, f"{what}: {name} differs between two runs (max diff {float((x.double() - y.double()).abs().max()):.3g})"


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_same_bits(device, backend, glu, deterministic):
    if not _runs_here(backend, device):
        pytest.skip(f"backend {backend!r} does not run on {device}")
    if backend == "triton" and not glu and device.type == "cpu":
        pytest.skip("under the interpreter the GLU case is enough (it runs every kernel the MLP case runs)")
    if backend == "persistent" and not glu:
        pytest.skip("the persistent backend is SwiGLU only (its refusal is tested in test_persistent_ffn.py)")
    first = ffn_run(backend, device, glu=glu)
    second = ffn_run(backend, device, glu=glu)
    assert_bitwise(first, second, f"moe_ffn backend={backend} deterministic={deterministic}")


LAYER_OPTIONS = {
    "mlp": dict(),
    "glu-recompute": dict(glu=True, activation="silu", recompute_activation=True),
    "sigmoid-renorm": dict(router_score="sigmoid", router_renormalize=True, router_selection_bias=True),
}


@pytest.mark.parametrize("options", list(LAYER_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dmoe_same_bits(device, backend, options, deterministic):
    if not _runs_here(backend, device):
        pytest.skip(f"backend {backend!r} does not run on {device}")
    if backend == "triton" and options != "glu-recompute" and device.type == "cpu":
        pytest.skip("under the interpreter one Triton layer case is enough (it runs every kernel)")
    if backend == "persistent" and options != "glu-recompute":
        pytest.skip("the persistent backend is SwiGLU only")
    first = layer_run(backend, device, **LAYER_OPTIONS[options])
    second = layer_run(backend, device, **LAYER_OPTIONS[options])
    assert_bitwise(first, second, f"dMoE backend={backend} {options} deterministic={deterministic}")


def test_runs_differ_with_the_seed(device):
    """The check can fail: a different seed changes the bits (the runs are not constant)."""
    backend = BACKENDS[0]
    a = layer_run(backend, device, seed=0)
    b = layer_run(backend, device, seed=1)
    with pytest.raises(AssertionError, match="differs between two runs"):
        assert_bitwise(a, b, "seed 0 vs 1")


# --------------------------------------------------------------------------- across processes
def digest() -> dict[str, str]:
    """Hashes of the bits of one moe_ffn and one dMoE run on every CPU backend but the interpreted Triton ones
    (their numbers come from numpy and are covered in process above), one per tensor."""
    out = {}
    for backend in BACKENDS:
        if backend in ("triton", "persistent") or not _runs_here(backend, torch.device("cpu")):
            continue
        for kind, res in (("moe_ffn", ffn_run(backend, "cpu", glu=True)),
                          ("dMoE", layer_run(backend, "cpu", glu=True, activation="silu"))):  # fmt: skip
            for name in sorted(res):
                bits = res[name].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                out[f"{backend} {kind} {name}"] = hashlib.sha256(bits).hexdigest()[:16]
    return out


_DIGEST_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_determinism import digest
print(json.dumps(digest()))
"""


def test_same_bits_across_processes(device):
    """A fresh interpreter (another hash seed, nothing cached) gives the bits this process gives."""
    if device.type != "cpu":
        pytest.skip("the subprocess runs on the CPU")
    env = dict(os.environ, PYTHONHASHSEED="12345", TRITON_INTERPRET="1")
    code = _DIGEST_SCRIPT.format(tests=str(ROOT / "tests"))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    there, here = json.loads(r.stdout), digest()
    assert {k.split()[0] for k in here} >= {"torch"}, "the torch backend did not run"
    differ = [k for k in here if here[k] != there.get(k)]
    assert not differ, f"bits differ between this process and a fresh one: {differ}"

"""Dropless vs capacity-based MoE on skewed routing: ``python -m blocksparse_moe.demo``.

Builds a dMoE and a capacity-based MoE with the same weights, routes a batch whose
router favours a few experts (Zipf-like), and prints for each layer the dropped
(token, expert) assignments, the max error against the float64 dense reference, and
the forward+backward time on the chosen device. Runs on a CPU in seconds by default.

``--backend triton`` on a machine without CUDA runs the Triton kernels on the CPU
interpreter. The interpreter must be switched on (``TRITON_INTERPRET=1``) before
triton is first imported, and ``python -m blocksparse_moe.demo`` has already imported
the package (and so triton) before this module runs; the demo therefore re-executes
itself once with the variable set, and picks small default sizes for it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager

import torch

from . import MoE, MoEConfig, dMoE
from .backends.select import BACKENDS, resolve_backend
from .reference import moe_ffn_dense

# Sizes per setting: (tokens, hidden, ffn, experts, block size, timed iterations).
_DEFAULTS = {
    "cpu": (1024, 128, 256, 8, 64, 3),
    "cuda": (16384, 1024, 2048, 8, 128, 10),
    # ~0.3 s per kernel launch under the interpreter: tiny, and one timed iteration
    "interpreter": (64, 32, 64, 8, 16, 1),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blocksparse-moe-demo",
        description="Dropless dMoE vs capacity-based MoE (same weights) on skewed routing: "
        "dropped tokens, max error against the float64 dense reference, forward+backward time.",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="dMoE backend: auto = grouped on CPU, triton or grouped on CUDA by measured shape "
                        "(default: auto)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=None, help="tokens in the batch (default: 1024 on CPU)")
    p.add_argument("--experts", type=int, default=None, help="number of experts (default: 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 128 on CPU)")
    p.add_argument("--ffn", type=int, default=None, help="expert ffn size (default: 256 on CPU)")
    p.add_argument("--block-size", type=int, default=None, help="dMoE block size (default: 64 on CPU, 128 on CUDA)")
    p.add_argument("--activation", default="silu", help="gelu, gelu_tanh, silu or relu (default: silu)")
    p.add_argument("--no-glu", dest="glu", action="store_false", help="plain MLP experts instead of GLU (SwiGLU)")
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="capacity factor of the MoE baseline (default: 1.0)")  # fmt: skip
    p.add_argument("--skew", type=float, default=1.5, help="Zipf exponent of the routing skew, 0 = none (default: 1.5)")
    p.add_argument("--iters", type=int, default=None, help="timed forward+backward iterations (default: 3 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def _needs_interpreter(device: torch.device, backend: str) -> bool:
    return backend == "triton" and device.type != "cuda"


def _reexec_with_interpreter(argv: list[str]) -> None:
    """Start this demo again with TRITON_INTERPRET=1 (it must precede the import of triton)."""
    print("[demo] --backend triton without CUDA: restarting under the Triton CPU interpreter "
          "(TRITON_INTERPRET=1); expect seconds per step", file=sys.stderr, flush=True)  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "blocksparse_moe.demo", *argv], env)


@contextmanager
def _progress(step: str, after: float = 3.0, every: float = 5.0):
    """Print a line to stderr when ``step`` runs longer than ``after`` seconds, then every ``every``."""
    start = time.perf_counter()
    done = threading.Event()
    spoke = []

    def ticker():
        wait = after
        while not done.wait(wait):
            spoke.append(True)
            print(f"[demo] {step}: still running ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            wait = every

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if spoke:
            print(f"[demo] {step}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd_bwd(layer, x: torch.Tensor, iters: int) -> float:
    """Median seconds of forward + backward (output loss plus the auxiliary losses), after one warm-up."""
    times = []
    for i in range(iters + 1):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        _sync(x.device)
        t0 = time.perf_counter()
        out, aux = layer(xi, return_aux=True)
        (out.float().square().mean() + aux.loss).backward()
        _sync(x.device)
        if i:  # the first one pays for autotuning / allocator warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dense_reference(layer, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """float64 dense output with the layer's expert choices (routing weights recomputed in float64)."""
    cfg = layer.config
    x64 = x.detach().double().cpu()
    logits = x64 @ layer.router.weight.detach().double().cpu().T
    scores = torch.softmax(logits, -1)
    weights = scores.gather(1, expert_ids.cpu())
    params = [p.detach().double().cpu() if p is not None else None for p in (layer.w1, layer.w2, layer.v1)]
    return moe_ffn_dense(x64, expert_ids.cpu(), weights, *params, activation=cfg.activation)


def _build(args, cfg: MoEConfig, T: int) -> tuple[dMoE, MoE, torch.Tensor]:
    H, ffn, E, device = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.device
    g = torch.Generator().manual_seed(args.seed)
    dmoe = dMoE(cfg)
    with torch.no_grad():
        # O(1) activations: weights ~ N(0, 1/fan_in), so errors are read against values near 1.
        for p, fan_in in ((dmoe.w1, H), (dmoe.v1, H), (dmoe.w2, ffn), (dmoe.router.weight, H)):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        # Skew: every token carries a constant feature x[:, 0] = 2, and the router turns
        # it into a logit offset of -skew * log(e + 1): Zipf-like preferences.
        offsets = -args.skew * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
        dmoe.router.weight[:, 0] = (offsets / 2).to(device)
    moe = MoE(cfg)
    moe.load_state_dict(dmoe.state_dict())
    x = torch.randn(T, H, generator=g)
    x[:, 0] = 2.0
    return dmoe, moe, x.to(device)


def run(args) -> None:
    device = torch.device(args.device)
    interp = _needs_interpreter(device, args.backend)
    d = _DEFAULTS["interpreter" if interp else ("cuda" if device.type == "cuda" else "cpu")]
    T = args.tokens if args.tokens is not None else d[0]
    H = args.hidden if args.hidden is not None else d[1]
    ffn = args.ffn if args.ffn is not None else d[2]
    E = args.experts if args.experts is not None else d[3]
    bs = args.block_size if args.block_size is not None else d[4]
    iters = args.iters if args.iters is not None else d[5]
    backend = "triton" if interp else resolve_backend(args.backend, device, torch.float32, E, ffn)
    torch.manual_seed(args.seed)
    # Built before anything is printed: a bad size fails here, as a usage error.
    cfg = MoEConfig(
        hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=args.top_k, block_size=bs,
        activation=args.activation, glu=args.glu, capacity_factor=args.capacity_factor,
        backend=args.backend, device=device,
    )  # fmt: skip

    kind = ("GLU" if args.glu else "MLP") + f" ({args.activation})"
    where = f"{device}" + (" (Triton CPU interpreter)" if interp else "")
    print(f"blocksparse-moe demo: {T} tokens, hidden {H}, ffn {ffn}, {E} experts, top-{args.top_k}, "
          f"{kind} experts, device {where}, dMoE backend {backend}")  # fmt: skip
    with _progress("building layers"):
        dmoe, moe, x = _build(args, cfg, T)

    rows = []
    for name, layer in (("dMoE", dmoe), ("MoE", moe)):
        with _progress(f"{name} forward + dense fp64 reference"):
            with torch.no_grad():
                out, aux = layer(x, return_aux=True)
            ref = _dense_reference(layer, x, aux.expert_ids)
            err = float((out.double().cpu() - ref).abs().max())
            scale = float(ref.abs().max())
        with _progress(f"{name} forward+backward timing ({iters} iteration{'s' * (iters != 1)} + 1 warm-up)"):
            seconds = _time_fwd_bwd(layer, x, iters)
        rows.append((name, int(aux.dropped_tokens), err, err / max(scale, 1e-30), seconds))
        if name == "dMoE":
            counts = aux.tokens_per_expert.tolist()

    capacity = dmoe.config.capacity(T)
    print(f"routing: rows per expert {counts} (T*k = {T * args.top_k}); "
          f"MoE capacity {capacity} rows per expert (factor {args.capacity_factor})")  # fmt: skip
    print()
    header = ("layer", "dropped (token, expert)", "max |err| vs fp64 dense", "relative", "fwd+bwd")
    print(f"{header[0]:<6} {header[1]:>24} {header[2]:>24} {header[3]:>9} {header[4]:>10}")
    for name, dropped, err, rel, seconds in rows:
        frac = f"{dropped} of {T * args.top_k}"
        print(f"{name:<6} {frac:>24} {err:>24.3e} {rel:>9.1e} {seconds * 1e3:>7.1f} ms")
    print()
    print("dMoE drops nothing and matches the dense reference to float rounding; the capacity-based MoE "
          "drops what overflows its crowded experts, and those tokens' outputs are wrong (missing) by design.")
    if interp:
        print("Timing note: the Triton kernels ran on the CPU interpreter (numpy, per program); "
              "the times say nothing about GPU speed.")
    elif backend == "torch":
        print("Timing note: dMoE's torch backend is the readable CPU reference of the block-sparse kernels "
              "(a host loop over experts plus block copies), not a fast path; the default (auto) is.")
    elif backend == "grouped":
        print(f"Timing note: both layers ran their fast path here. dMoE computes exactly the {T * args.top_k} routed "
              f"rows (one GEMM per expert over the sorted rows); MoE computes {E} x {capacity} capacity rows, "
              "padding and all, and drops the rest.")


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``blocksparse-moe-demo``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must name a torch device, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but CUDA is not available here")
    for flag, v in (("--tokens", args.tokens), ("--experts", args.experts), ("--top-k", args.top_k),
                    ("--hidden", args.hidden), ("--ffn", args.ffn), ("--iters", args.iters)):  # fmt: skip
        if v is not None and v < 1:
            parser.error(f"{flag} must be a positive integer, got {v}")
    if _needs_interpreter(device, args.backend) and os.environ.get("TRITON_INTERPRET") != "1":
        _reexec_with_interpreter(argv)
    try:
        run(args)
    except (ValueError, TypeError) as err:
        # MoEConfig rejects bad sizes before any work (run builds it first): a usage
        # error, not a traceback. Anything raised later is a bug and keeps its traceback.
        if "MoEConfig." not in str(err):
            raise
        parser.error(str(err))


if __name__ == "__main__":
    main()

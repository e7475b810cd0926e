"""Expert parallelism with torchrun: forward and backward of a sharded dMoE, its traffic, its cost.

    torchrun --nproc-per-node 2 examples/expert_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 4 examples/expert_parallel.py --bench 20 # + time per forward
    torchrun --nproc-per-node 8 examples/expert_parallel.py --device cuda   # GPUs, NCCL

Every rank builds the same full dMoE from one seed (a real model would load its
shard of a checkpoint with ``shard_state_dict``), keeps its ``E / world_size``
experts, and runs forward and backward on its own, deliberately uneven, batch of
tokens. Each rank prints its token count, the rows it sent to and received from
every rank, the rows its experts computed, and the all-to-all bytes; rank 0 checks
the outputs and gradients against the single-process layer fed every rank's tokens.
``--bench N`` times N forwards (and forward+backward) of the sharded layer against
the single-process layer on all the tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

try:
    import blocksparse_moe  # noqa: F401
except ImportError:  # a fresh clone run without installing: use the checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blocksparse_moe import MoEConfig, dMoE  # noqa: E402
from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict, sync_router_grads  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens on rank 0 (rank r holds fewer: uneven batches)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--glu", action="store_true", help="SwiGLU experts")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--capacity-per-peer", type=int, default=None, help="fixed-capacity all-to-all (no host read)")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time N forwards (after 3 warm-up ones)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the single-process layer")
    return p.parse_args()


def log(msg: str) -> None:
    """Print rank by rank, in order."""
    for r in range(dist.get_world_size()):
        if r == dist.get_rank():
            print(msg, flush=True)
        dist.barrier()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n, device, aligned=True):
    """Median wall time of ``fn`` in ms over n runs (3 warm-up runs first); barrier-aligned starts."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        if aligned:
            dist.barrier()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    try:
        cfg = MoEConfig(
            hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
            block_size=args.block_size, glu=args.glu, activation="silu" if args.glu else "gelu",
            backend=args.backend, device=device, init_std=0.02,
        )  # fmt: skip
        torch.manual_seed(0)  # the same full layer on every rank
        full = dMoE(cfg)
        with torch.no_grad():  # O(1) signals
            full.w1.normal_(std=args.hidden**-0.5)
            full.w2.normal_(std=args.ffn**-0.5)
            if full.v1 is not None:
                full.v1.normal_(std=args.hidden**-0.5)
            full.router.weight.normal_(std=args.hidden**-0.5)
        layer = ExpertParallelDMoE(
            cfg, capacity_per_peer=args.capacity_per_peer, name="example.moe", sync_router_init=False
        )
        layer.load_state_dict(shard_state_dict(full.state_dict(), layer))

        # Uneven batches: rank r holds tokens * (2W - r) / 2W.
        counts = [args.tokens * (2 * W - r) // (2 * W) for r in range(W)]
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(T, args.hidden, generator=gen).to(device) for T in counts]
        x = xs[rank].clone().requires_grad_()

        out, aux = layer(x, return_aux=True)
        out.square().mean().mul(x.shape[0]).backward()  # loss_r; the global loss is their sum
        sync_router_grads(layer)
        st = aux.all_to_all
        experts = f"{layer.expert_range.start}..{layer.expert_range.stop - 1}"
        if st.send_rows is not None:
            traffic = f"sent rows {st.send_rows}  received rows {st.recv_rows}"
        else:
            traffic = f"fixed chunks of {args.capacity_per_peer} rows per peer"
        log(
            f"[rank {rank}/{W}] tokens {x.shape[0]:5d}  experts {experts}  {traffic}  "
            f"rows per local expert {aux.tokens_per_local_expert.tolist()}  "
            f"all-to-all bytes sent {st.bytes_sent:,} received {st.bytes_received:,} "
            f"(+{st.count_bytes} B counts)  dropped {int(aux.dropped_tokens)}"
        )
        vol = torch.tensor([st.bytes_sent], dtype=torch.int64, device=device)
        dist.all_reduce(vol)
        if rank == 0:
            print(f"all-to-all volume per forward, all ranks: {int(vol):,} bytes (the backward moves as much)")

        if not args.no_check:
            x_all = torch.cat(xs).requires_grad_()
            ref = full(x_all)
            ref.square().mean().mul(x_all.shape[0]).backward()  # the same sum of per-rank losses
            # (mean * T over all tokens == sum over ranks of mean_r * T_r)
            lo = sum(counts[:rank])
            errs = {
                "out": (out - ref[lo : lo + counts[rank]]).abs().max(),
                "dx": (x.grad - x_all.grad[lo : lo + counts[rank]]).abs().max(),
                "d router": (layer.router.weight.grad - full.router.weight.grad).abs().max(),
                "dw1": (layer.w1.grad - full.w1.grad[layer.expert_slice]).abs().max(),
                "dw2": (layer.w2.grad - full.w2.grad[layer.expert_slice]).abs().max(),
            }
            worst = torch.stack(list(errs.values())).max().detach().reshape(1)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if rank == 0:
                ok = float(worst) < 1e-4 if cfg.dtype == torch.float32 else True
                print(f"max |difference| against the single-process layer (output, all gradients): {float(worst):.2e} "
                      f"{'OK' if ok else 'MISMATCH'}")  # fmt: skip

        if args.bench:
            torch.set_grad_enabled(False)
            t_ep = timed(lambda: layer(xs[rank]), args.bench, device)
            torch.set_grad_enabled(True)
            xg = xs[rank].clone().requires_grad_()
            t_ep_bwd = timed(lambda: layer(xg).sum().backward(), args.bench, device)
            # The two data all-to-alls of one forward alone, with this forward's split sizes.
            buf = xs[rank].new_empty(sum(st.send_rows) if st.send_rows else W * args.capacity_per_peer, args.hidden)

            def exchange():
                y = layer.comm.all_to_all(buf, "bench", st.recv_rows, st.send_rows)
                layer.comm.all_to_all(y, "bench", st.send_rows, st.recv_rows)

            t_a2a = timed(exchange, args.bench, device)
            slowest = torch.tensor([t_ep, t_ep_bwd, t_a2a], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rank == 0:  # the single-process layer on every rank's tokens, alone on rank 0
                x_all = torch.cat(xs)
                with torch.no_grad():
                    t_sp = timed(lambda: full(x_all), args.bench, device, aligned=False)
                xa = x_all.clone().requires_grad_()
                t_sp_bwd = timed(lambda: full(xa).sum().backward(), args.bench, device, aligned=False)
                print(
                    f"time per forward: expert-parallel {slowest[0]:.2f} ms (slowest rank, {W} ranks x "
                    f"{torch.get_num_threads()} threads) vs single process {t_sp:.2f} ms on all {sum(counts)} tokens; "
                    f"forward+backward {slowest[1]:.2f} ms vs {t_sp_bwd:.2f} ms; "
                    f"the forward's two data all-to-alls alone {slowest[2]:.2f} ms"
                )
            dist.barrier()
    finally:
        dist.destroy_process_group()  # before exit: avoids gloo's teardown abort


if __name__ == "__main__":
    main()

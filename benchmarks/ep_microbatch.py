"""``python -m benchmarks.ep_microbatch``: two micro-batches through expert-parallel blocks, one after another or interleaved.

Starts ``--ranks`` gloo processes on this machine (``LOCAL_WORLD_SIZE`` = ``--per-node``)
and builds ``--blocks`` transformer-like blocks, each a dense part (a residual MLP
standing in for attention: ``h + W2 gelu(W1 norm(h))``, width ``--dense-ffn``) and an
``ExpertParallelDMoE``. One step is forward + backward of two micro-batches of
``--tokens`` tokens per rank each:

* ``sequential``: micro-batch A through every block, then B;
* ``block-major``: the control: block 0 for A then B, block 1 for A then B, ... (the
  order ``interleaved`` runs in) with nothing run beside a layer call;
* ``interleaved``: :func:`~blocksparse_moe.parallel.interleaved_forward`, where B's dense
  part of block ``i`` runs while A's block-``i`` counts travel, and so on (DeepSeek-V3's
  two-micro-batch overlap).

The same modules and inputs serve both; the step time is the slowest rank's, median
over ``--steps`` rounds, both modes once per round (interleaved, so load drift hits
both alike). What interleaving can win here: a rank that has routed waits for its
slowest peer in the count exchange; with another micro-batch's dense part to run it
computes instead of waiting. The results file also holds one traced step of
``block-major`` and ``interleaved`` per rank (``trace_per_rank``: each layer call's
count exchange, host read, ``beside`` work, transfers and experts, in ms from the step's
start), so the filled gap can be seen.

    OMP_NUM_THREADS=1 python -m benchmarks.ep_microbatch --json out.json
    python -m benchmarks.ep_microbatch --device cuda --ranks 8 --json out.json      # NCCL, one GPU per rank

On CUDA the stage traces record kernel launches, not their execution (use the profiler).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

from benchmarks.gloo_ranks import add_rank_arguments, finish, run_ranks


def _worker(rank, W, port, args, path):
    os.environ["LOCAL_WORLD_SIZE"] = str(args.per_node)
    import torch
    import torch.distributed as dist
    from torch import nn

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, interleaved_forward
    from blocksparse_moe.parallel.trace import StageTrace

    torch.set_num_threads(args.threads)
    if args.device == "cuda":  # one GPU per rank, NCCL (not run yet: no multi-GPU machine was lent)
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev, pg = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        dev, pg = torch.device("cpu"), "gloo"
    dist.init_process_group(pg, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    cfg = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
                    glu=True, activation="silu", backend=args.backend)  # fmt: skip

    class Dense(nn.Module):  # the block's non-MoE part: returns (moe input, residual)
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(args.hidden)
            self.up, self.down = nn.Linear(args.hidden, args.dense_ffn), nn.Linear(args.dense_ffn, args.hidden)

        def forward(self, h):
            h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
            return h, h

    torch.manual_seed(0)  # the same dense weights on every rank; the EP layers broadcast their router
    blocks = [(Dense().to(dev), ExpertParallelDMoE(cfg, name=f"moe{i}", hierarchy=args.hierarchy,
                                                    chunks=args.chunks).to(dev))
              for i in range(args.blocks)]  # fmt: skip
    for _, moe in blocks:
        moe.broadcast_router()
    torch.manual_seed(1 + rank)
    xs = [torch.randn(args.tokens, args.hidden, device=dev, requires_grad=True) for _ in range(2)]

    def sequential():
        outs = []
        for x in xs:
            h = x
            for dense, moe in blocks:
                u, residual = dense(h)
                h = residual + moe(u)
            outs.append(h)
        return outs

    def block_major():  # interleaved's order without the overlap: the control
        hs = list(xs)
        for dense, moe in blocks:
            for m in range(len(hs)):
                u, residual = dense(hs[m])
                hs[m] = residual + moe(u)
        return hs

    def interleaved():
        return interleaved_forward(blocks, xs)

    modes = {"sequential": sequential, "block-major": block_major, "interleaved": interleaved}
    times = {m: [] for m in modes}

    def step(fn):
        dist.barrier()
        t = time.perf_counter()
        sum(o.square().mean() for o in fn()).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the host clock must see the kernels finish, not their launch
        dt = torch.tensor([time.perf_counter() - t], device=dev)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's step
        return float(dt)

    for rnd in range(args.warmup + args.steps):
        for name, fn in modes.items():
            dt = step(fn)
            if rnd >= args.warmup:
                times[name].append(dt)
    results = {m: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "all_ms": [v * 1e3 for v in t]}
               for m, t in times.items()}  # fmt: skip
    # One more step of the control and of interleaved with every layer's stage trace on, every
    # rank's: [layer, stage, chunk, start ms, end ms] from the step's start, sorted by start.
    for name in ("block-major", "interleaved"):
        traces = [StageTrace() for _ in blocks]
        for (_, moe), tr in zip(blocks, traces):
            moe.trace = tr
        dist.barrier()
        t0 = time.perf_counter()
        sum(o.square().mean() for o in modes[name]()).backward()
        mine = sorted(([f"moe{i}", *row] for i, tr in enumerate(traces) for row in tr.table(origin=t0)),
                      key=lambda r: r[3])  # fmt: skip
        for _, moe in blocks:
            moe.trace = None
        gathered = [None] * W
        dist.all_gather_object(gathered, mine)
        results[name]["trace_per_rank"] = gathered
    for m in ("sequential", "block-major"):
        per_round = [a / b for a, b in zip(times[m], times["interleaved"])]
        results[f"{m}_over_interleaved"] = {"median": statistics.median(per_round), "per_round": per_round}
    finish(rank, path, args, results)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep_microbatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_rank_arguments(p, steps=9)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank and micro-batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--dense-ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: one GPU per rank over NCCL (--ranks = GPUs)")
    p.add_argument("--hierarchy", default="flat")
    p.add_argument("--chunks", type=int, default=1)
    args = p.parse_args(argv)
    out = run_ranks(_worker, args.ranks, args)
    import torch

    from benchmarks.common import environment

    out["env"] = environment(torch.device(args.device), torch.float32)
    res = out["results"]
    for m in ("sequential", "block-major", "interleaved"):
        print(f"{m:12s} fwd+bwd median {res[m]['median_ms']:8.1f} ms, min {res[m]['min_ms']:8.1f} ms "
              f"(of {len(res[m]['all_ms'])} interleaved rounds; slowest rank)")
    for m in ("sequential", "block-major"):
        print(f"{m} / interleaved per round, median: {res[f'{m}_over_interleaved']['median']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

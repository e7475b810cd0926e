"""``python -m benchmarks.ep_overlap``: an expert-parallel fwd+bwd step on CPU gloo ranks, with and without overlap.

Starts ``--ranks`` gloo processes on this machine (``LOCAL_WORLD_SIZE`` = ``--per-node``,
so 4 ranks are 2 simulated nodes of 2), builds one ``ExpertParallelDMoE`` per
exchange (flat / hierarchical) and chunk count, and times forward + backward (the
slowest rank's time per step, median over ``--steps``), then records one step's
per-stage timestamps (:class:`~blocksparse_moe.parallel.trace.StageTrace`) on rank 0:
the transfers from issue to completion (on gloo's thread) beside the expert compute
(on the caller's), so the overlap can be seen rather than assumed.

    OMP_NUM_THREADS=1 python -m benchmarks.ep_overlap                       # the docs' default shape
    python -m benchmarks.ep_overlap --chunks 1,2,4 --hidden 1024 --json out.json
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

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE
    from blocksparse_moe.parallel.trace import StageTrace

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    cfg = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
                    block_size=64, glu=True, activation="silu", backend=args.backend)  # fmt: skip
    torch.manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    configs = [(h, int(c)) for h in args.hierarchy.split(",") for c in args.chunks.split(",")]
    layers = {f"{h} c={c}": ExpertParallelDMoE(cfg, hierarchy=h, chunks=c, name=f"{h}-c{c}") for h, c in configs}
    times = {name: [] for name in layers}

    def step(ep):
        dist.barrier()
        t = time.perf_counter()
        ep(x).square().mean().backward()
        dt = torch.tensor([time.perf_counter() - t])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's step
        return float(dt)

    # Interleaved (every configuration once per round): the machine's load drifts, and a
    # configuration timed in a quiet minute would otherwise look faster than it is.
    for rnd in range(args.warmup + args.steps):
        for name, ep in layers.items():
            dt = step(ep)
            if rnd >= args.warmup:
                times[name].append(dt)
    results = {}
    for name, ep in layers.items():
        ep.trace = StageTrace()
        dist.barrier()
        t0 = time.perf_counter()
        ep(x).square().mean().backward()
        results[name] = {
            "median_ms": statistics.median(times[name]) * 1e3, "min_ms": min(times[name]) * 1e3,
            "all_ms": [t * 1e3 for t in times[name]], "trace": ep.trace.table(origin=t0),
        }  # fmt: skip
    finish(rank, path, args, results)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep_overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_rank_arguments(p, steps=5)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="torch")
    p.add_argument("--hierarchy", default="flat,node")
    p.add_argument("--chunks", default="1,2,4")
    args = p.parse_args(argv)
    out = run_ranks(_worker, args.ranks, args)
    for name, r in out["results"].items():
        print(f"{name:10s} fwd+bwd median {r['median_ms']:8.1f} ms, min {r['min_ms']:8.1f} ms "
              f"(of {len(r['all_ms'])} interleaved rounds; slowest rank)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Run a benchmark's worker on ``ranks`` local gloo processes and return what rank 0 wrote.

The CPU expert-parallel benchmarks (``ep_overlap``, ``ep_microbatch``) share this: a free
loopback port, ``spawn`` processes (a fresh interpreter each: no state from the parent),
and one JSON file that rank 0 writes to the path it is given.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile


def run_ranks(worker, ranks: int, args) -> dict:
    """``worker(rank, ranks, port, args, path)`` on every rank; returns the JSON rank 0 wrote to ``path``."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        mp.start_processes(worker, args=(ranks, port, args, path), nprocs=ranks, start_method="spawn")
        with open(path) as f:
            return json.load(f)


def add_rank_arguments(parser, steps: int) -> None:
    """The options every such benchmark takes: ranks, simulated node size, rounds, threads, output."""
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--per-node", type=int, default=2, help="ranks per simulated node (LOCAL_WORLD_SIZE)")
    parser.add_argument("--steps", type=int, default=steps, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--json", default=None, help="write the results here")


def finish(rank: int, path: str, args, results: dict) -> None:
    """Rank 0 writes ``{"args", "results"}`` for :func:`run_ranks`; every rank leaves the group."""
    import torch.distributed as dist

    if rank == 0:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    dist.destroy_process_group()

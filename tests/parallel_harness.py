"""Multi-process harness for the expert-parallel tests (gloo on CPU): launch, worker loop, results.

``launch(world_size, scenarios)`` starts ``world_size`` processes (``torch.multiprocessing``,
start method ``forkserver`` by default: the server imports torch once and forks every
worker from it, so a launch costs ~0.2 s instead of one torch import per rank; set
``BSMOE_MP_START=spawn`` for fresh interpreters). Each worker joins a gloo group on
a free loopback port with a short timeout, runs the named scenarios in order (a
monitored barrier between them), writes its results to a JSON file after each one
(so a worker that dies or hangs still leaves what it finished) and destroys the
process group in a ``finally`` block. The parent joins every worker with a deadline
and kills the ones still alive: nothing hangs.

A worker that reported all its scenarios and then exits non-zero (gloo's teardown
sometimes aborts with ``terminate called without an active exception``) counts as a
pass with a warning.

Scenarios are registered by name with ``@scenario`` in the modules listed in
``SCENARIO_MODULES`` (``parallel_scenarios``: the layer against a single process;
``parallel_fault_scenarios``: mismatches, bad input, timeouts, a dead rank;
``parallel_mesh_scenarios``: dp x ep, DDP, FSDP2, placements, statistics;
``parallel_ckpt_scenarios``: resharding checkpoints; ``parallel_hf_scenarios``:
Hugging Face models; ``parallel_bounded_scenarios``: ``max_recv_rows``;
``parallel_longrun_scenarios``: many training steps while routing shifts;
``parallel_microbatch_scenarios``: two micro-batches interleaved). A test
passes scenario names, not functions: a worker imports those modules and looks each
name up in ``SCENARIOS``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

START_METHOD = os.environ.get("BSMOE_MP_START", "forkserver" if sys.platform.startswith("linux") else "spawn")
SCENARIOS: dict = {}
# A worker process starts from this module alone (the forkserver's preload, or spawn
# unpickling ``_worker_main``): it imports these so that their scenarios are registered.
SCENARIO_MODULES = (
    "parallel_scenarios", "parallel_fault_scenarios", "parallel_mesh_scenarios", "parallel_ckpt_scenarios",
    "parallel_hf_scenarios", "parallel_comm_scenarios", "parallel_bounded_scenarios", "parallel_longrun_scenarios",
    "parallel_routing_scenarios", "parallel_replica_scenarios", "parallel_microbatch_scenarios",
)  # fmt: skip


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


class Skip(Exception):
    """Raised by a scenario that cannot run here (reported as skipped)."""


# --------------------------------------------------------------------------- parent side
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_preload() -> list:
    """transformers and the model modules the HF scenarios build, when installed.

    Importing them takes ~6 s of CPU per process here; in the server it is paid once
    per session instead of once per worker (the HF launches start 6 workers).
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return []
    models = [f"transformers.models.{m}.modeling_{m}" for m in ("mixtral", "qwen3_moe", "deepseek_v3")]
    # the integration first: it keeps our kernels/ folder from standing in for the Hub's kernels package
    return ["blocksparse_moe.integrations.transformers", "transformers", *models]


def _context():
    import torch.multiprocessing as mp

    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Imported once in the server (sys.path and the environment, TRITON_INTERPRET
        # included, are the parent's when the server starts).
        preload = ["torch", "torch.distributed", "blocksparse_moe", "blocksparse_moe.parallel", "parallel_harness"]
        ctx.set_forkserver_preload([*preload, *SCENARIO_MODULES, *_hf_preload()])
    return ctx


@dataclass
class Launch:
    world_size: int
    results: list  # per rank: {"scenarios": {name: {...}}, "finished": bool, ...}
    exitcodes: list
    killed: list
    seconds: float

    def get(self, name: str) -> list:
        return [r.get("scenarios", {}).get(name) for r in self.results]

    def summary(self) -> str:
        lines = [f"world_size={self.world_size} seconds={self.seconds:.1f}"]
        for rank, (res, code, killed) in enumerate(zip(self.results, self.exitcodes, self.killed)):
            done = {k: v.get("status") for k, v in res.get("scenarios", {}).items()}
            lines.append(f"  rank {rank}: exit={code} killed={killed} finished={res.get('finished')} {done}")
            if res.get("error"):
                lines.append("    worker error: " + res["error"][-2000:])
        return "\n".join(lines)

    def check(self, name: str) -> list:
        """Assert that every rank ran ``name`` successfully; return the per-rank details.

        A rank that reported every scenario and still exited non-zero (gloo's
        occasional teardown abort) is a pass with a warning; a rank that exited or
        hung in a later scenario fails that scenario's test, not this one.
        """
        import pytest

        per_rank = self.get(name)
        for rank, res in enumerate(per_rank):
            if res is None:
                raise AssertionError(f"rank {rank} did not report scenario {name!r}\n{self.summary()}")
            if res["status"] == "skip":
                pytest.skip(res.get("reason", "skipped"))
            if res["status"] != "ok":
                raise AssertionError(f"rank {rank}, scenario {name!r}:\n{res.get('error')}\n{self.summary()}")
        for rank, code in enumerate(self.exitcodes):
            if code != 0 and self.results[rank].get("finished") and not self.killed[rank]:
                warnings.warn(
                    f"rank {rank} exited with code {code} after reporting every scenario "
                    "(teardown abort); counted as a pass",
                    RuntimeWarning,
                )
        return per_rank


def launch(
    world_size: int, scenarios: list, *, timeout: float = 90.0, pg_timeout: float = 20.0, env: dict | None = None
) -> Launch:
    """Run ``scenarios`` on ``world_size`` gloo ranks; never blocks longer than ``timeout`` seconds."""
    ctx = _context()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bsmoe-ep-") as tmp:
        port = free_port()
        procs = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.json")
            args = (rank, world_size, port, list(scenarios), path, pg_timeout, env or {})
            p = ctx.Process(target=_worker_main, args=args, daemon=True)
            p.start()
            procs.append(p)
        deadline = t0 + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        killed = []
        for p in procs:
            killed.append(p.is_alive())
            if p.is_alive():
                p.kill()
                p.join(10)
        results = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.json")
            try:
                with open(path) as f:
                    results.append(json.load(f))
            except (OSError, ValueError):
                results.append({})
    return Launch(world_size, results, [p.exitcode for p in procs], killed, time.monotonic() - t0)


# --------------------------------------------------------------------------- worker side
def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _worker_main(rank, world_size, port, names, path, pg_timeout, env):
    os.environ.update(env)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = {"rank": rank, "scenarios": {}, "finished": False}
    _write(path, out)
    try:
        for module in SCENARIO_MODULES:  # registers their scenarios (already done under forkserver)
            importlib.import_module(module)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )  # fmt: skip
        for name in names:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=pg_timeout), wait_all_ranks=True)
            t = time.monotonic()
            try:
                detail = SCENARIOS[name](rank, world_size) or {}
                res = {"status": "ok", **detail}
            except Skip as s:
                res = {"status": "skip", "reason": str(s)}
            except BaseException:  # noqa: BLE001 - report everything, keep going
                res = {"status": "fail", "error": traceback.format_exc()}
            res["seconds"] = round(time.monotonic() - t, 3)
            out["scenarios"][name] = res
            _write(path, out)
            if "exit_after" in res:  # a scenario that kills this rank on purpose (no teardown)
                sys.stdout.flush()
                os._exit(res["exit_after"])
        out["finished"] = True
    except BaseException:  # noqa: BLE001
        out["error"] = traceback.format_exc()
    finally:
        _write(path, out)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()

"""Multi-process harness and worker scenarios for the expert-parallel tests (gloo on CPU).

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
"""

from __future__ import annotations

import datetime
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


def _context():
    import torch.multiprocessing as mp

    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Imported once in the server (sys.path and the environment, TRITON_INTERPRET
        # included, are the parent's when the server starts).
        ctx.set_forkserver_preload(
            ["torch", "torch.distributed", "blocksparse_moe", "blocksparse_moe.parallel", "parallel_workers"]
        )
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


# --------------------------------------------------------------------------- scenario helpers
TOL = dict(atol=2e-5, rtol=2e-5)
ROUTER_TOL = dict(atol=2e-4, rtol=2e-4)  # as tests/test_layers.py: softmax-gradient cancellation


def make_full(cfg, *, seed=0, hot_rank=None, world_size=1):
    """A single-process dMoE with O(1) signals; ``hot_rank`` routes every token to that rank's experts."""
    import torch

    from blocksparse_moe import dMoE

    E, H, ffn = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
    layer = dMoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        layer.w1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        layer.w2.copy_(torch.randn(E, ffn, H, generator=g) / ffn**0.5)
        if layer.v1 is not None:
            layer.v1.copy_(torch.randn(E, H, ffn, generator=g) / H**0.5)
        if hot_rank is not None:
            El = E // world_size
            hot = torch.full((E,), -4.0)
            hot[hot_rank * El : (hot_rank + 1) * El] = 4.0
            layer.router.weight[:, 0] += hot  # inputs carry ~2 on axis 0 (make_inputs): logits +-8
    return layer


def make_inputs(tokens, H, *, seed=1, hot=False):
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(T, H, generator=g) for T in tokens]
    if hot:
        for x in xs:
            x[:, 0] = 2.0 + 0.1 * x[:, 0]
    return xs


def compare(name, actual, expected, tol=TOL):
    from helpers import assert_close

    assert_close(actual, expected, name=name, **tol)


def check_against_single(rank, W, *, tokens, E, k, H=32, ffn=48, bs=16, hot_rank=None, capacity=None,
                         backend="torch", group=None, x_needs_grad=True, **options):  # fmt: skip
    """The expert-parallel layer against one dMoE holding every expert, fed every rank's tokens.

    Loss = sum over ranks of <out_r, g_r>. Compared: out_r, dx_r (this rank's rows
    of the single-process gradients), the router gradient after the sum all-reduce,
    and this rank's slices of dw1 / dw2 / dv1.
    """
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, shard_state_dict

    sizes = dict(hidden_size=H, ffn_hidden_size=ffn, num_experts=E, top_k=k, block_size=bs, **options)
    cfg = MoEConfig(backend=backend, **sizes)
    ref_cfg = MoEConfig(backend="torch", **sizes)
    full = make_full(ref_cfg, hot_rank=hot_rank, world_size=W)
    xs = make_inputs(tokens, H, hot=hot_rank is not None)
    gs = make_inputs(tokens, H, seed=2)
    ref = dMoE(ref_cfg)
    ref.load_state_dict(full.state_dict())
    x_all = torch.cat(xs).requires_grad_()
    out_all = ref(x_all)
    (out_all * torch.cat(gs)).sum().backward()

    ep = ExpertParallelDMoE(cfg, group, capacity_per_peer=capacity, name="test-layer", sync_router_init=False)
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    x = xs[rank].clone().requires_grad_(x_needs_grad)
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()

    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    if x_needs_grad:
        compare("dx", x.grad, x_all.grad[rows])
    compare("d router.weight", ep.router.weight.grad, ref.router.weight.grad, ROUTER_TOL)
    for pname in ("w1", "w2", "v1"):
        p = getattr(ep, pname)
        if p is not None:
            compare(f"d{pname}", p.grad, getattr(ref, pname).grad[ep.expert_slice])
    st = aux.all_to_all
    if st.recv_rows is not None:
        assert int(aux.tokens_per_local_expert.sum()) == sum(st.recv_rows)
    return {
        "send_rows": st.send_rows,
        "recv_rows": st.recv_rows,
        "bytes_sent": st.bytes_sent,
        "bytes_received": st.bytes_received,
        "tokens": tokens[rank],
        "dropped": int(aux.dropped_tokens),
        "tokens_per_local_expert": aux.tokens_per_local_expert.tolist(),
    }


# --------------------------------------------------------------------------- correctness scenarios
@scenario
def uneven(rank, W):
    return check_against_single(rank, W, tokens=[13, 5, 9, 2][:W], E=2 * W, k=2)


@scenario
def zero_tokens(rank, W):
    return check_against_single(rank, W, tokens=[0, 11, 4, 0][:W], E=2 * W, k=2)


@scenario
def hot_rank(rank, W):
    """Every token's k experts live on the last rank."""
    res = check_against_single(rank, W, tokens=[9, 6, 7, 3][:W], E=2 * W, k=2, hot_rank=W - 1)
    assert res["send_rows"][: W - 1] == [0] * (W - 1), res["send_rows"]  # the premise of the case
    return res


@scenario
def topk_gt_local(rank, W):
    """top_k larger than the experts per rank: every token visits several ranks."""
    E = W if W > 2 else 4  # W=4: 1 expert per rank, k=3; W=2: 2 experts per rank, k=3
    return check_against_single(rank, W, tokens=[7, 10, 3, 5][:W], E=E, k=3)


@scenario
def glu_recompute(rank, W):
    return check_against_single(
        rank, W, tokens=[8, 12, 5, 1][:W], E=2 * W, k=2, glu=True, activation="silu", recompute_activation=True
    )


@scenario
def x_without_grad(rank, W):
    """Rank 0's input needs no gradient: the other ranks' backward must not wait for it."""
    return check_against_single(rank, W, tokens=[6, 9, 4, 7][:W], E=2 * W, k=2, x_needs_grad=rank != 0)


@scenario
def capacity_exact(rank, W):
    """Fixed capacity with the bound that never overflows: identical to the dropless path."""
    tokens = [10, 3, 8, 6][:W]
    res = check_against_single(rank, W, tokens=tokens, E=2 * W, k=2, capacity=max(tokens) * 2)
    assert res["dropped"] == 0
    return res


@scenario
def triton_interpreter(rank, W):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("needs TRITON_INTERPRET=1 (set before triton is imported)")
    return check_against_single(rank, W, tokens=[5, 3, 4, 2][:W], E=2 * W, k=2, H=16, ffn=16, backend="triton")


@scenario
def world_size_one(rank, W):
    """A group of one rank per process (every rank calls new_group for every group)."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(W)]
    return check_against_single(0, 1, tokens=[7], E=4, k=2, group=groups[rank])


@scenario
def two_layers(rank, W):
    """Two stacked layers with residuals: backward runs both layers' all-to-alls in order."""
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, sync_router_grads

    tokens, H = [6, 11, 3, 8][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    fulls = [make_full(cfg, seed=s) for s in (3, 4)]
    refs = torch.nn.ModuleList(fulls)
    eps = torch.nn.ModuleList(ExpertParallelDMoE.from_dmoe(f, name=f"layers.{i}") for i, f in enumerate(fulls))
    xs, gs = make_inputs(tokens, H), make_inputs(tokens, H, seed=2)

    def run(layers, x):
        for layer in layers:
            x = x + layer(x)
        return x

    x_all = torch.cat(xs).requires_grad_()
    out_all = run(refs, x_all)
    (out_all * torch.cat(gs)).sum().backward()
    x = xs[rank].clone().requires_grad_()
    out = run(eps, x)
    (out * gs[rank]).sum().backward()
    sync_router_grads(eps)
    rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
    compare("out", out, out_all[rows])
    compare("dx", x.grad, x_all.grad[rows])
    for i in range(2):
        compare(f"layers.{i} d router", eps[i].router.weight.grad, refs[i].router.weight.grad, ROUTER_TOL)
        compare(f"layers.{i} dw1", eps[i].w1.grad, refs[i].w1.grad[eps[i].expert_slice])
        compare(f"layers.{i} dw2", eps[i].w2.grad, refs[i].w2.grad[eps[i].expert_slice])


@scenario
def aux_and_stats(rank, W):
    """aux is the single-process aux of this rank's tokens; the traffic figures add up."""
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE

    tokens, H = [9, 4, 0, 6][:W], 32
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=2 * W, top_k=2, block_size=16, backend="torch")
    full = make_full(cfg)
    ep = ExpertParallelDMoE.from_dmoe(full)
    x = make_inputs(tokens, H)[rank]
    _, aux = ep(x, return_aux=True)
    _, ref = full(x, return_aux=True)
    compare("load_balancing_loss", aux.load_balancing_loss, ref.load_balancing_loss)
    compare("z_loss", aux.z_loss, ref.z_loss)
    assert torch.equal(aux.tokens_per_expert, ref.tokens_per_expert)
    assert torch.equal(aux.expert_ids, ref.expert_ids)
    st = aux.all_to_all
    assert sum(st.send_rows) == tokens[rank] * 2
    remote = sum(st.send_rows) + sum(st.recv_rows) - st.send_rows[rank] - st.recv_rows[rank]
    assert st.bytes_sent == remote * H * 4
    return {"send_rows": st.send_rows, "recv_rows": st.recv_rows}


@scenario
def sharding(rank, W):
    """shard_state_dict / gather_state_dict round trip, with a module prefix; offline sharding."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, expert_range, gather_state_dict, shard_state_dict

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=2 * W, top_k=2, block_size=16, glu=True)
    full = torch.nn.ModuleDict({"moe": make_full(cfg), "proj": torch.nn.Linear(16, 16)})
    full_sd = full.state_dict()
    model = torch.nn.ModuleDict({"moe": ExpertParallelDMoE(cfg), "proj": torch.nn.Linear(16, 16)})
    model.load_state_dict(shard_state_dict(full_sd, model))
    own = expert_range(rank, W, 2 * W)
    assert list(model["moe"].expert_range) == list(own)
    assert torch.equal(model["moe"].w1, full_sd["moe.w1"][own.start : own.stop])
    assert torch.equal(model["moe"].v1, full_sd["moe.v1"][own.start : own.stop])
    offline = shard_state_dict(full_sd, rank=rank, world_size=W)
    assert all(torch.equal(offline[k], v) for k, v in model.state_dict().items())
    back = gather_state_dict(model)
    assert back.keys() == full_sd.keys() and all(torch.equal(back[k], full_sd[k]) for k in full_sd)
    at0 = gather_state_dict(model, dst=0)
    assert (at0 is None) == (rank != 0)
    if rank == 0:
        assert all(torch.equal(at0[k], full_sd[k]) for k in full_sd)


@scenario
def replicated_router(rank, W):
    """Different seeds per rank: the router is broadcast at init; the bias step uses the group's load."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    torch.manual_seed(100 + rank)
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=1, block_size=16, router_selection_bias=True
    )
    ep = ExpertParallelDMoE(cfg)
    _, aux = ep(torch.randn(5 + 3 * rank, 16), return_aux=True)
    ep.update_selection_bias(aux.tokens_per_expert, rate=0.5)
    mine = torch.cat([ep.router.weight.detach().flatten(), ep.router.selection_bias])
    everyone = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(t, everyone[0]) for t in everyone)
    assert ep.router.selection_bias.abs().sum() > 0


@scenario
def capacity_drop(rank, W):
    """A bound too small, policy "drop": rows past B per pair (in expert order) contribute nothing."""
    import torch

    from blocksparse_moe import MoEConfig, plan_routing
    from blocksparse_moe.parallel import ExpertParallelDMoE
    from blocksparse_moe.reference import moe_ffn_dense

    tokens, H, E, k, B = [12, 9, 14, 5][:W], 32, 2 * W, 2, 4
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=E, top_k=k, block_size=16, backend="torch")
    full = make_full(cfg)
    ep = ExpertParallelDMoE.from_dmoe(full, capacity_per_peer=B, capacity_overflow="drop")
    x = make_inputs(tokens, H)[rank]
    out, aux = ep(x, return_aux=True)
    out.sum().backward()  # runs; gradients of a dropping layer have no oracle here
    # The oracle: this rank's assignments, minus the ones past B rows per destination.
    route = full.router(x)
    plan = plan_routing(route.expert_ids, E)
    dest = plan.sorted_expert.long() // (E // W)
    first = plan.expert_offsets.long()[0 : E : E // W]
    kept_sorted = (torch.arange(plan.num_slots) - first[dest]) < B
    kept = kept_sorted[plan.slot_to_sorted.long()].view(-1, k)
    w = torch.where(kept, route.weights, torch.zeros(()))
    expected = moe_ffn_dense(x.double(), route.expert_ids, w.double(), full.w1.double(), full.w2.double())
    compare("out (dropping)", out, expected.float())
    assert int(aux.dropped_tokens) == int((~kept).sum())
    return {"dropped": int(aux.dropped_tokens)}


@scenario
def capacity_overflow_error(rank, W):
    """A bound too small, policy "error": every rank raises CapacityOverflowError (no hang)."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CapacityOverflowError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, capacity_per_peer=2, name="blocks.7.moe")
    x = torch.randn(3 if rank else 30, 16)  # only rank 0 overflows
    try:
        ep(x)
    except CapacityOverflowError as err:
        assert "blocks.7.moe" in str(err) and "capacity_per_peer=2" in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no CapacityOverflowError")


# --------------------------------------------------------------------------- fault scenarios
def _mismatch(rank, W, field):
    """The last rank builds the layer with another ``field``: every rank raises, naming rank and field."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ConfigMismatchError, ExpertParallelDMoE

    base = dict(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    other = {"num_experts": 4 * W, "hidden_size": 24, "top_k": 1, "dtype": torch.bfloat16}[field]
    cfg = MoEConfig(**{**base, field: other} if rank == W - 1 else base)
    try:
        ExpertParallelDMoE(cfg, name="blocks.2.moe")
    except ConfigMismatchError as err:
        msg = str(err)
        assert f"rank {W - 1}: {field}=" in msg and "blocks.2.moe" in msg, msg
        return {"message": msg}
    raise AssertionError("no ConfigMismatchError")


@scenario
def mismatch_num_experts(rank, W):
    return _mismatch(rank, W, "num_experts")


@scenario
def mismatch_hidden_size(rank, W):
    return _mismatch(rank, W, "hidden_size")


@scenario
def mismatch_top_k(rank, W):
    return _mismatch(rank, W, "top_k")


@scenario
def mismatch_dtype(rank, W):
    return _mismatch(rank, W, "dtype")


@scenario
def not_divisible(rank, W):
    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=W + 1, top_k=1, block_size=16)
    try:
        ExpertParallelDMoE(cfg)
    except ValueError as err:
        assert f"num_experts={W + 1} is not divisible by the expert-parallel world size {W}" in str(err), str(err)
        return {"message": str(err)}
    raise AssertionError("no ValueError")


@scenario
def bad_input_one_rank(rank, W):
    """The last rank passes a wrong hidden size: it raises its ValueError, the others a PeerFailedError
    naming it, at once (both all-to-all modes); the group stays usable."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import ExpertParallelDMoE, PeerFailedError

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    messages = []
    for capacity in (None, 8):
        ep = ExpertParallelDMoE(cfg, capacity_per_peer=capacity, name="blocks.4.moe")
        x = torch.randn(3, 12 if rank == W - 1 else 16)
        t = time.monotonic()
        try:
            ep(x)
        except PeerFailedError as err:
            assert rank != W - 1 and f"rank(s) [{W - 1}]" in str(err) and "blocks.4.moe" in str(err), str(err)
            messages.append(str(err))
        except ValueError as err:
            assert rank == W - 1 and "hidden_size=16" in str(err), str(err)
            messages.append(str(err))
        else:
            raise AssertionError("no error")
        assert time.monotonic() - t < 5.0
        ep(torch.randn(2, 16)).sum().backward()  # the group still works
    return {"messages": messages}


@scenario
def group_timeout(rank, W):
    """Only rank 0 runs the forward: its collective times out after the group's timeout, naming the layer."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    limit = 2.0
    group = dist.new_group(timeout=datetime.timedelta(seconds=limit))
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, group, name="blocks.5.moe")
    if rank != 0:
        time.sleep(limit + 2.0)
        return {}
    t = time.monotonic()
    try:
        ep(torch.randn(4, 16))
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.5.moe" in str(err) and "rank 0" in str(err), str(err)
        assert elapsed < limit + 3.0, elapsed
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")


@scenario
def layer_timeout(rank, W):
    """The layer's own ``timeout`` (shorter than the group's) bounds each wait, naming the layer."""
    import torch
    import torch.distributed as dist

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    limit = 1.0
    group = dist.new_group()
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=2 * W, top_k=2, block_size=16)
    ep = ExpertParallelDMoE(cfg, group, name="blocks.6.moe", timeout=datetime.timedelta(seconds=limit))
    if rank != 0:
        time.sleep(limit + 1.5)
        # Complete rank 0's abandoned count exchange, so that its group can be torn down.
        counts = torch.zeros(2 * W, dtype=torch.int64)
        dist.all_to_all_single(torch.empty_like(counts), counts, group=group)
        return {}
    t = time.monotonic()
    try:
        ep(torch.randn(4, 16))
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.6.moe" in str(err) and "count exchange" in str(err), str(err)
        assert elapsed < limit + 2.0, elapsed
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")


@scenario
def dead_rank(rank, W):
    """The last rank dies after building the layer; the others' forward fails within the group timeout."""
    import torch

    from blocksparse_moe import MoEConfig
    from blocksparse_moe.parallel import CollectiveError, ExpertParallelDMoE

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=W, top_k=1, block_size=16)
    ep = ExpertParallelDMoE(cfg, name="blocks.9.moe")
    if rank == W - 1:
        return {"exit_after": 17}  # the worker exits right after reporting, without teardown
    time.sleep(0.5)
    t = time.monotonic()
    try:
        out = ep(torch.randn(6, 16))
        out.sum().backward()
    except CollectiveError as err:
        elapsed = time.monotonic() - t
        assert "blocks.9.moe" in str(err), str(err)
        return {"message": str(err), "elapsed": elapsed}
    raise AssertionError("no CollectiveError")

"""The expert-parallel soak: hundreds of generated cases of ``ExpertParallelDMoE`` on gloo against one process.

    python -m benchmarks.soak_ep --cases 240 [--seed S] [--worlds 2,4] [--minutes M] [--out benchmarks/results]

The cases are drawn from the recorded seed (``random.Random``) in the parent, split
evenly over the world sizes; each world size is one launch of worker processes (gloo on
loopback, a short process-group timeout, joined with a deadline: nothing hangs) that
loops over its cases. A case: a random expert count (primes included), ``top_k`` up to
``E`` (``k = E`` included), tokens per rank (a rank with 0 included), MLP or GLU (with
recomputed activations or not), the ``torch`` or ``grouped`` backend, a contiguous or
random placement (a rank holding no expert included), uniform routing or every token on
one rank's experts, and an exchange: flat (1 to 3 chunks), hierarchical (``hierarchy=
"node"``, 1 or 2 ranks per node, 1 to 3 chunks), fixed capacity (the bound that never
overflows) or bounded (``max_recv_rows`` small enough to force rounds); and, drawn
after those (so that the earlier fields of a seed's cases do not change), shared
experts, replicated experts (one or two experts on extra ranks) and expert-choice
routing (each rank's experts choose among its tokens, so its reference is the
single-process layer on each rank's batch separately). Every rank
compares its output, input gradient, router gradient (summed over ranks) and expert
gradients with a single-process dMoE run on every rank's tokens, as error ratios
(error over the fp32 bound of ``blocksparse_moe.testing``; the router gradient's bound
scaled by the size of its terms, a sum over tokens that can cancel). A mismatch is a
ratio above 1. The results file holds the cases per mode and world size, the worst
ratio per quantity, any mismatch with its case, the minutes, versions and git SHA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

MODES = ("flat", "hierarchical", "capacity", "bounded")
PRIMES_AND_MORE = [1, 2, 3, 4, 5, 6, 7, 8, 11, 13]


# --------------------------------------------------------------------------- cases
def draw_case(rng: random.Random, W: int, index: int) -> dict:
    """One case for ``W`` ranks (JSON-able); everything a rank needs to build it identically."""
    E = rng.choice(PRIMES_AND_MORE)
    k = E if rng.random() < 0.15 else rng.randint(1, min(E, 4))
    tokens = [rng.choice([0, 1, rng.randint(2, 24)]) if rng.random() < 0.25 else rng.randint(1, 24) for _ in range(W)]
    if rng.random() < 0.3:
        tokens[rng.randrange(W)] = 0
    placement = rng.choice(["contiguous", "random", "empty_rank"])
    if placement == "contiguous":
        owners = None
    else:
        empty = rng.randrange(W) if placement == "empty_rank" and W > 1 else None
        ranks = [r for r in range(W) if r != empty]
        owners = [rng.choice(ranks) for _ in range(E)]
    mode = rng.choice(MODES)
    glu = rng.random() < 0.5
    case = dict(
        index=index, world_size=W, E=E, k=k, tokens=tokens, H=rng.choice([8, 16, 24]), F=rng.choice([8, 12, 16, 20]),
        glu=glu, activation=rng.choice(["silu", "gelu"]) if glu else rng.choice(["gelu", "relu"]),
        recompute=rng.random() < 0.3, backend=rng.choice(["torch", "grouped"]), owners=owners,
        hot=rng.random() < (0.6 if mode == "bounded" else 0.25), hot_rank=rng.randrange(W), mode=mode, chunks=1,
        ranks_per_node=None, capacity=None, max_recv_rows=None, x_grad=[rng.random() > 0.1 for _ in range(W)],
        seed=rng.randrange(2**31),
    )  # fmt: skip
    if mode in ("flat", "hierarchical"):
        case["chunks"] = rng.choice([1, 1, 2, 3])
    if mode == "hierarchical":
        case["ranks_per_node"] = rng.choice([1, max(1, W // 2)])
    if mode == "capacity":
        case["capacity"] = max(1, max(tokens) * min(k, E))  # the bound that never overflows (E_max <= E)
    if mode == "bounded":
        rows = sum(tokens) * k
        case["max_recv_rows"] = max(1, rng.randint(max(1, rows // 8), max(1, rows // 2)))
    # drawn last, so that the fields above stay what they were for a seed
    case["shared"] = rng.random() < 0.25
    case["ranks"] = None
    if W > 1 and rng.random() < 0.25:  # replicas: one or two experts held on more ranks
        holders = [[r] for r in (owners if owners is not None else _contiguous_owners(E, W))]
        for e in rng.sample(range(E), min(E, rng.randint(1, 2))):
            others = [r for r in range(W) if r not in holders[e]]
            holders[e] = sorted(holders[e] + rng.sample(others, rng.randint(1, len(others))))
        case["ranks"] = holders
    case["routing"] = "expert_choice" if rng.random() < 0.2 else "token_choice"
    if case["routing"] == "expert_choice" and mode == "capacity":
        case["capacity"] = max(tokens) * k + E  # E_dest * ceil(T k / E) <= T k + E_dest
    return case


def _contiguous_owners(E: int, W: int) -> list:
    """``ExpertPlacement.contiguous(E, W).owners`` without importing torch in the parent."""
    base, extra = divmod(E, W)
    return [r for r in range(W) for _ in range(base + (r < extra))]


def draw_cases(seed: int, n: int, worlds) -> dict:
    """``{world size: [case, ...]}``: ``n`` cases in all, split evenly (the first sizes take the remainder)."""
    rng = random.Random(seed)
    out = {}
    for i, W in enumerate(worlds):
        m = n // len(worlds) + (i < n % len(worlds))
        out[W] = [draw_case(rng, W, j) for j in range(m)]
    return out


# --------------------------------------------------------------------------- one case, on one rank
def run_case(c: dict, rank: int) -> dict:
    """Error ratios of this rank's output and gradients against the single-process layer (a collective)."""
    import torch

    from blocksparse_moe import MoEConfig, dMoE
    from blocksparse_moe.parallel import ExpertParallelDMoE, ExpertPlacement, shard_state_dict
    from blocksparse_moe.testing import TOLERANCES, error_ratio

    W, E, k, H, F = c["world_size"], c["E"], c["k"], c["H"], c["F"]
    tol = TOLERANCES[torch.float32]
    act = dict(glu=c["glu"], activation=c["activation"], recompute_activation=c["recompute"])
    choice = c.get("routing") == "expert_choice"
    extra = dict(num_shared_experts=int(c.get("shared", False)), routing=c.get("routing", "token_choice"))
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, block_size=16, backend=c["backend"],
                    **act, **extra)  # fmt: skip
    if c.get("ranks") is not None:
        placement = ExpertPlacement.from_ranks(c["ranks"], W)
    elif c["owners"] is not None:
        placement = ExpertPlacement.from_owners(c["owners"], W)
    else:
        placement = ExpertPlacement.contiguous(E, W)
    g = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])  # the shared experts' initialisation: the same on every rank
    full = dMoE(cfg)
    with torch.no_grad():
        full.router.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        full.w1.copy_(torch.randn(E, H, F, generator=g) / H**0.5)
        full.w2.copy_(torch.randn(E, F, H, generator=g) / F**0.5)
        if full.v1 is not None:
            full.v1.copy_(torch.randn(E, H, F, generator=g) / H**0.5)
        if c["hot"] and placement.experts_of(c["hot_rank"]):
            bias = torch.full((E,), -4.0)
            bias[list(placement.experts_of(c["hot_rank"]))] = 4.0
            full.router.weight[:, 0] += bias  # inputs carry ~2 on axis 0: every token to that rank's experts
    xs = [torch.randn(T, H, generator=g) for T in c["tokens"]]
    if c["hot"]:
        for x in xs:
            x[:, 0] = 2.0 + 0.1 * x[:, 0]
    gs = [torch.randn(T, H, generator=g) for T in c["tokens"]]

    ref = dMoE(cfg)
    ref.load_state_dict(full.state_dict())
    seen = {"logits": [], "x": []}
    scores = ref.router.scores  # both routing modes take their logits from here: kept for the router's bound

    def keep_logits(x_in):
        logits, sc = scores(x_in)
        if logits.requires_grad:
            logits.retain_grad()
        seen["logits"].append(logits)
        seen["x"].append(x_in)
        return logits, sc

    ref.router.scores = keep_logits
    x_all = torch.cat(xs).requires_grad_()
    if choice:  # each rank's batch on its own, as each rank's experts choose among its tokens
        out_all = torch.cat([ref(x_r) for x_r in x_all.split(c["tokens"])])
    else:
        seen_route = {}
        ref.router.register_forward_hook(lambda m, i, o: seen_route.update(route=o))
        out_all = ref(x_all)
    (out_all * torch.cat(gs)).sum().backward()

    kw = dict(placement=placement, capacity_per_peer=c["capacity"], hierarchy="node" if c["mode"] == "hierarchical"
              else "flat", ranks_per_node=c["ranks_per_node"], chunks=c["chunks"], max_recv_rows=c["max_recv_rows"])  # fmt: skip
    ep = ExpertParallelDMoE(cfg, name=f"soak-case-{c['index']}", sync_router_init=False, **kw)
    ep.load_state_dict(shard_state_dict(full.state_dict(), ep))
    x = xs[rank].clone().requires_grad_(c["x_grad"][rank])
    out, aux = ep(x, return_aux=True)
    (out * gs[rank]).sum().backward()
    ep.sync_router_grad()
    ep.sync_replica_grads()  # a replicated expert's gradient is partial on each holder until summed

    rows = slice(sum(c["tokens"][:rank]), sum(c["tokens"][: rank + 1]))
    r = {"output": error_ratio(out, out_all[rows], **tol)}
    if c["x_grad"][rank]:
        r["grad_x"] = error_ratio(x.grad, x_all.grad[rows], **tol)
    dlogits = torch.cat([lg.grad if lg.grad is not None else torch.zeros_like(lg) for lg in seen["logits"]])
    terms = 0.0 if not x_all.numel() else float((dlogits.abs().T @ torch.cat(seen["x"]).detach().abs()).max())
    r["grad_router"] = error_ratio(ep.router.weight.grad, ref.router.weight.grad, **tol, scale=terms)
    local = list(ep.local_experts)
    for n in ("w1", "w2", "v1"):
        p = getattr(ep, n)
        if p is not None and local:
            r[f"grad_{n}"] = error_ratio(p.grad if p.grad is not None else torch.zeros_like(p),
                                         getattr(ref, n).grad[local], **tol)  # fmt: skip
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():  # after sync_router_grad: their sum over ranks
        if name.startswith("shared_expert"):
            r["grad_shared"] = max(r.get("grad_shared", 0.0), error_ratio(p.grad, ref_params[name].grad, **tol))
    st = aux.all_to_all
    info = {"ratios": r, "rounds": st.rounds, "peak_recv_rows": st.peak_recv_rows, "dropped": int(aux.dropped_tokens)}
    if not choice:  # expert choice: the rank's router runs on the same rows as the reference's, bit for bit
        route = seen_route["route"]
        mine = route.expert_ids[rows].sort(1).values
        if not torch.equal(mine, aux.expert_ids.sort(1).values):  # a top-k flip between the two runs of the router
            sc = route.scores[rows].detach().sort(1, descending=True).values
            info["near_tie"] = float((sc[:, k - 1] - sc[:, k]).abs().min()) if k < E else 0.0
    if c["max_recv_rows"] is not None and st.peak_recv_rows is not None and st.peak_recv_rows > c["max_recv_rows"]:
        info["ratios"]["peak_over_bound"] = float("inf")
    return info


# --------------------------------------------------------------------------- workers
def _worker(rank, W, port, cases, path, pg_timeout, deadline):
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = {"rank": rank, "cases": {}, "finished": False}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                                timeout=datetime.timedelta(seconds=pg_timeout))  # fmt: skip
        for c in cases:
            # every rank decides together whether to go on (the deadline is wall-clock, ranks drift)
            go = torch.tensor([int(time.time() < deadline)])
            dist.all_reduce(go, op=dist.ReduceOp.MIN)
            if not int(go):
                break
            t = time.monotonic()
            try:
                res = run_case(c, rank)
            except Exception as err:  # noqa: BLE001 - a crash is a finding; later collectives may fail too
                res = {"error": f"{type(err).__name__}: {err}"[:2000], "ratios": {}}
            res["seconds"] = round(time.monotonic() - t, 3)
            out["cases"][c["index"]] = res
            if "error" in res:
                break
        out["finished"] = True
    except BaseException as err:  # noqa: BLE001
        out["error"] = f"{type(err).__name__}: {err}"[:2000]
    finally:
        with open(path, "w") as f:
            json.dump(out, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(W: int, cases: list, *, minutes: float = 30.0, pg_timeout: float = 60.0, mp_context=None) -> dict:
    """One launch of ``W`` gloo ranks over ``cases``; per case the worst ratio over the ranks.

    ``mp_context``: a ``multiprocessing`` context (default: spawn; the tests pass their
    forkserver, which has torch imported already).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp_context if mp_context is not None else mp.get_context("spawn")
    t0 = time.monotonic()
    deadline = time.time() + 60 * minutes
    with tempfile.TemporaryDirectory(prefix="bsmoe-soak-ep-") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.json") for r in range(W)]
        procs = [ctx.Process(target=_worker, args=(r, W, port, cases, paths[r], pg_timeout, deadline), daemon=True)
                 for r in range(W)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:  # the deadline, plus time for the case in flight and the teardown
            p.join(max(1.0, deadline + 2 * pg_timeout + 30 - time.time()))
        killed = [p.is_alive() for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        ranks = []
        for path in paths:
            try:
                with open(path) as f:
                    ranks.append(json.load(f))
            except (OSError, ValueError):
                ranks.append({"cases": {}, "error": "no results (killed or crashed)"})
    merged = []
    for c in cases:
        per = [rk["cases"].get(str(c["index"])) for rk in ranks]
        if any(p is None for p in per):
            if all(p is None for p in per):
                break  # the deadline: not run
            per = [p or {"error": "not reported", "ratios": {}} for p in per]
        ratios = defaultdict(float)
        for p in per:
            for q, v in p["ratios"].items():
                ratios[q] = max(ratios[q], v)
        errors = [p["error"] for p in per if "error" in p]
        ties = [p["near_tie"] for p in per if "near_tie" in p]
        merged.append(dict(case=c, ratios=dict(ratios), errors=errors, near_tie=min(ties) if ties else None,
                           rounds=per[0].get("rounds"), peak_recv_rows=[p.get("peak_recv_rows") for p in per],
                           seconds=max(p.get("seconds", 0.0) for p in per)))  # fmt: skip
    return dict(world_size=W, results=merged, seconds=time.monotonic() - t0, killed=killed,
                worker_errors=[rk.get("error") for rk in ranks])  # fmt: skip


def is_mismatch(m: dict) -> bool:
    """A crash, a routing that differs from one process away from a tie, or a ratio above 1 (NaN counts).

    A top-k flip at a near tie (the k-th and next scores within 1e-5: the router's matmul
    on a rank's rows and on all rows may round differently) is reported, not a mismatch.
    """
    if m["errors"]:
        return True
    if m["near_tie"] is not None:
        return m["near_tie"] >= 1e-5
    return any(not v <= 1.0 for v in m["ratios"].values())


def _edges(m: dict) -> dict:
    """Which edges a case hit (counted per mode in the results)."""
    c = m["case"]
    held = set(range(c["E"])) if c["owners"] is None else set(c["owners"])
    n_held = min(c["E"], c["world_size"]) if c["owners"] is None else len(held)
    return {"rounds_gt_1": (m["rounds"] or 0) > 1, "rank_without_expert": n_held < c["world_size"],
            "rank_with_0_tokens": 0 in c["tokens"], "k_eq_E": c["k"] == c["E"], "prime_E": c["E"] in (2, 3, 5, 7, 11, 13),
            "glu": c["glu"], "every_token_on_one_rank": c["hot"], "chunks_gt_1": c["chunks"] > 1,
            "shared_experts": bool(c.get("shared")), "replicated": c.get("ranks") is not None,
            "expert_choice": c.get("routing") == "expert_choice"}  # fmt: skip


def summarize(worlds: list) -> dict:
    per = defaultdict(lambda: {"cases": 0, "worst_ratio": defaultdict(float), "rounds_max": 0,
                               "edges": defaultdict(int)})  # fmt: skip
    mismatches, ties = [], 0
    for w in worlds:
        for m in w["results"]:
            key = f"W={w['world_size']}/{m['case']['mode']}"
            per[key]["cases"] += 1
            per[key]["rounds_max"] = max(per[key]["rounds_max"], m["rounds"] or 0)
            for edge, hit in _edges(m).items():
                per[key]["edges"][edge] += hit
            ties += m["near_tie"] is not None
            if m["near_tie"] is None:
                for q, v in m["ratios"].items():
                    per[key]["worst_ratio"][q] = max(per[key]["worst_ratio"][q], v)
            if is_mismatch(m):
                mismatches.append(m)
    worst = max((v for p in per.values() for v in p["worst_ratio"].values()), default=0.0)
    return dict(cases=sum(p["cases"] for p in per.values()), mismatches=len(mismatches), worst_ratio=worst,
                near_ties=ties, per_mode={k: {**v, "worst_ratio": dict(v["worst_ratio"]), "edges": dict(v["edges"])}
                                          for k, v in sorted(per.items())},
                mismatch_cases=mismatches[:10])  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak_ep", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=240, help="cases in all, split evenly over --worlds")
    p.add_argument("--seed", type=int, default=int(time.time()) % 2**31)
    p.add_argument("--worlds", default="2,4", help="world sizes, one launch each")
    p.add_argument("--minutes", type=float, default=30.0, help="per world size: stop starting cases after this long")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    worlds = [int(w) for w in a.worlds.split(",")]
    t0 = time.monotonic()
    drawn = draw_cases(a.seed, a.cases, worlds)
    runs = []
    for W in worlds:
        run = run_world(W, drawn[W], minutes=a.minutes)
        runs.append(run)
        print(f"W={W}: {len(run['results'])} of {len(drawn[W])} cases in {run['seconds'] / 60:.1f} min")
    summary = summarize(runs)
    minutes = (time.monotonic() - t0) / 60
    print(f"expert-parallel soak: {summary['cases']} cases in {minutes:.1f} min, seed {a.seed}, "
          f"{summary['mismatches']} mismatches, worst ratio {summary['worst_ratio']:.3f}")  # fmt: skip
    for k, v in summary["per_mode"].items():
        print(f"  {k:<18} {v['cases']:>4} cases, worst ratio {max(v['worst_ratio'].values(), default=0):.3f}, "
              f"most rounds {v['rounds_max']}")  # fmt: skip
    for m in summary["mismatch_cases"]:
        print(f"  MISMATCH {m['ratios']} {m['errors']} near_tie={m['near_tie']} case={m['case']}")
    if a.out is not None:
        import torch

        from .common import SCHEMA, environment, now, write_results

        created = now()
        env = environment(torch.device("cpu"), torch.float32)
        path = Path(a.out) / f"soak-ep-{env['device_slug']}-{created.strftime('%Y-%m-%d')}.json"
        write_results(path, dict(schema=SCHEMA, kind="soak-ep", created=created.isoformat(), argv=sys.argv, env=env,
                                 seed=a.seed, minutes=minutes, world_sizes=worlds, **summary,
                                 launches=[{k: v for k, v in r.items() if k != "results"} for r in runs]))  # fmt: skip
        print(f"wrote {path}")
    return 0 if summary["mismatches"] == 0 and summary["cases"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

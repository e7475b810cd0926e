"""Times the SwiGLU dMoE expert layer fwd+bwd on the persistent kernels against the other backends (issue 15).

``python -m benchmarks.persistent_layer --out DIR`` on a CUDA GPU (bf16): for the
Mixtral (h4096/f14336/E8/k2) and fine-grained (h2048/f768/E128/k8) shapes at 16K
tokens (``benchmarks/shapes.py``), uniform and skewed routing, it times one training
step of the expert FFN from the router's choices (``expert_ids``, ``weights``) to the
gradients of ``x``, ``weights``, ``w1``, ``v1`` and ``w2``, for:

* ``persistent``: ``backends.persistent_ffn.persistent_glu_ffn`` (plan + topology +
  the persistent kernels only: fused-gather GLU SDD, DSD with the routing weights in
  its epilogue, gather-sum combine; the fused GLU backward, DSD^T, DSD on ``w^T`` views);
* ``triton``: ``routed_ffn(..., backend="triton")`` (today's block-sparse layer: gather,
  two SDDs, torch SwiGLU, DSD, weighted combine, and their autograd backward);
* ``grouped``: ``routed_ffn(..., backend="grouped")`` (``torch.nn.functional.grouped_mm``
  over the sorted rows: the built-in a user would pick instead).

Each gets the same inputs (a softmax-normalised ``weights``, block 128). Recorded per
implementation: the median (and 20th/80th percentile) of ``triton.testing.do_bench``
over the forward + backward step and over the forward alone (with autograd recording,
as in training), the peak memory of one step (``torch.cuda.max_memory_allocated``, and
``step_peak_bytes``, net of what was allocated before the step: the figure to compare, as
the inputs, weights and the reference's saved gradients are held alike for all), and the relative Frobenius error of the
output and of every gradient against the ``grouped`` backend's (an independent
implementation; above 2e-2 counts as a mismatch). Results go to
``DIR/persistent-layer.json`` after every measurement, with the device, torch, Triton
and git SHA, so a run cut short keeps what it measured; ``--budget-s`` stops starting
new measurements (every shape's uniform run comes before any skewed one).

``--smoke`` (alias ``--dry-run``): a tiny shape through every implementation on the CPU
under ``TRITON_INTERPRET=1`` in fp32, each step run once (checked, not a timing), to
catch errors in this script before device time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe.backends.persistent_ffn import persistent_glu_ffn
from blocksparse_moe.functional import routed_ffn

from .common import environment, short_error
from .shapes import FINE_GRAINED, MIXTRAL, ROUTINGS, KernelShape, load_stats, make_expert_ids

SHAPES = {"mixtral": MIXTRAL, "fine": FINE_GRAINED}
SMOKE = KernelShape("smoke-h32-f40-e5-k2-t24", "smoke", 24, 32, 40, 5, 2, 16)
# grouped first: it is the reference of the others' checks, and the number to beat.
IMPLS = ("grouped", "persistent", "triton")
REFERENCE = "grouped"
MISMATCH = 2e-2  # relative Frobenius error in bf16 (unit roundoff 3.9e-3, rounded at every stage)
LEAVES = ("x", "weights", "w1", "v1", "w2")


def make_inputs(shape: KernelShape, routing: str, device, dtype, seed: int = 0) -> dict:
    """The router's outputs and the layer's tensors, seeded; ``dy`` is the step's output gradient."""
    gen = torch.Generator().manual_seed(seed)
    T, H, N, E, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    ids = make_expert_ids(T, E, k, routing, gen)
    # Drawn on the CPU in fp32 then moved: the same values on any device (a CPU generator is portable).
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa: E731
    weights = torch.rand(T, k, generator=gen).softmax(-1).to(device=device, dtype=dtype)
    t = dict(x=rnd(T, H), weights=weights, w1=rnd(E, H, N, scale=H**-0.5), v1=rnd(E, H, N, scale=H**-0.5),
             w2=rnd(E, N, H, scale=N**-0.5))  # fmt: skip
    for name in LEAVES:
        t[name].requires_grad_()
    t["dy"] = rnd(T, H)
    t["ids"] = ids.to(device)
    return t


def layer_fn(impl: str, block: int, experts: int):
    """``fn(t) -> y``: routing plan, topology (built where the backend builds it) and the expert FFN."""

    def run(t):
        plan = plan_routing(t["ids"], experts)
        if impl == "persistent":
            topo = build_topology(plan, t["w1"].shape[2], block)
            return persistent_glu_ffn(t["x"], t["w1"], t["v1"], t["w2"], plan, topo, t["weights"])
        return routed_ffn(t["x"], plan, t["weights"], t["w1"], t["w2"], t["v1"], "silu", backend=impl,
                          block_size=block)  # fmt: skip

    return run


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.detach().float(), ref.detach().float()
    return float((g - r).norm() / r.norm().clamp_min(1e-30))


class Runner:
    """One results file, rewritten after every measurement; no new measurement after the budget."""

    def __init__(self, out_dir: str, budget_s: float, device, dtype, smoke: bool):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "persistent-layer.json")
        self.t_end = time.monotonic() + budget_s
        self.device, self.dtype, self.smoke = device, dtype, smoke
        self.records: list[dict] = []
        self.env = dict(environment(device, dtype), argv=sys.argv, triton_version=triton.__version__,
                        smoke=smoke, budget_s=budget_s)  # fmt: skip

    def out_of_time(self) -> bool:
        return time.monotonic() > self.t_end

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, grads) -> dict:
        if self.smoke:  # CPU, interpreter: one run to exercise the code; not a measurement
            t0 = time.perf_counter()
            fn()
            return dict(median_ms=(time.perf_counter() - t0) * 1e3, p20_ms=None, p80_ms=None)
        # rep 1 s: a Mixtral step is ~60-80 ms, and do_bench's default 100 ms would time one or two calls.
        q = triton.testing.do_bench(fn, warmup=200, rep=1000, grad_to_none=grads, quantiles=[0.2, 0.5, 0.8])
        return dict(p20_ms=float(q[0]), median_ms=float(q[1]), p80_ms=float(q[2]))

    def peak(self, step, grads) -> dict:
        """Peak bytes of one step, and net of what was allocated before it (inputs, weights, caches)."""
        if self.device.type != "cuda":
            return dict(peak_bytes=None, step_peak_bytes=None)
        for g in grads:
            g.grad = None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        step()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        return dict(peak_bytes=int(peak), step_peak_bytes=int(peak - before))

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        with open(self.path + ".tmp", "w") as f:
            json.dump(dict(env=self.env, results=self.records), f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        t = rec.get("fwd_bwd", {}).get("median_ms")
        msg = f"{t:9.3f} ms fwd+bwd, peak {rec.get('memory', {}).get('step_peak_bytes')}" if t else rec.get("error", "")
        print(f"{rec['shape']:<34} {rec['routing']:<8} {rec['impl']:<11} {msg[:110]}", flush=True)


def measure(run: Runner, base: dict, impl: str, t: dict, ref: dict | None) -> dict | None:
    """Check, then time, one implementation; returns its output and gradients (the reference's, for grouped)."""
    if run.out_of_time():
        return None
    rec = dict(base, impl=impl)
    leaves = [t[n] for n in LEAVES]
    fn = layer_fn(impl, base["block_size"], base["experts"])

    def step():
        fn(t).backward(t["dy"])

    try:
        for g in leaves:
            g.grad = None
        y = fn(t)  # the first call compiles (and autotunes the triton backend): outside the timings
        y.backward(t["dy"])
        run.sync()
        got = dict(y=y.detach(), **{f"d{n}": t[n].grad.detach().clone() for n in LEAVES})
        del y
        if ref is not None:
            rec["rel_err_vs_grouped"] = {n: _rel_err(got[n], ref[n]) for n in got}
            rec["mismatch"] = any(e > MISMATCH for e in rec["rel_err_vs_grouped"].values())
            got = None  # only the reference's copy stays alive: every peak below starts from one such set
        rec["memory"] = run.peak(step, leaves)
        rec["fwd_bwd"] = run.time(step, leaves)
        # The forward as in training (autograd records and saves what backward needs); its graph is freed each call.
        rec["fwd"] = run.time(lambda: fn(t), leaves)
    except Exception as err:  # noqa: BLE001 - record it and measure the rest
        rec["error"] = short_error(err, 600)
        got = None
    for g in leaves:
        g.grad = None
    run.write(rec)
    return got


def run_shape(run: Runner, shape: KernelShape, routing: str, impls) -> None:
    t = make_inputs(shape, routing, run.device, run.dtype)
    base = dict(shape=shape.name, routing=routing, dtype=str(run.dtype).replace("torch.", ""), **shape.asdict())
    base["routing_stats"] = load_stats(t["ids"].cpu(), shape.experts)
    ref = None
    for impl in impls:
        got = measure(run, base, impl, t, ref if impl != REFERENCE else None)
        if impl == REFERENCE:
            ref = got
        del got
        if run.device.type == "cuda":
            torch.cuda.empty_cache()  # each implementation's peak starts from the same pool state


def summarize(records: list[dict]) -> list[dict]:
    """Per shape and routing: each implementation's fwd+bwd median and peak over ``grouped``'s."""
    out = []
    for key in sorted({(r["shape"], r["routing"]) for r in records}):
        rows = {r["impl"]: r for r in records if (r["shape"], r["routing"]) == key and "fwd_bwd" in r}
        g = rows.get(REFERENCE)
        for impl, r in rows.items():
            s = dict(shape=key[0], routing=key[1], impl=impl, fwd_bwd_ms=r["fwd_bwd"]["median_ms"],
                     step_peak_bytes=r["memory"]["step_peak_bytes"])  # fmt: skip
            if g is not None and impl != REFERENCE:
                s["time_over_grouped"] = s["fwd_bwd_ms"] / g["fwd_bwd"]["median_ms"]
                if s["step_peak_bytes"] and g["memory"]["step_peak_bytes"]:
                    s["peak_over_grouped"] = s["step_peak_bytes"] / g["memory"]["step_peak_bytes"]
            out.append(s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bsmoe-out"))
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new measurement after this many seconds")
    ap.add_argument("--routing", default=",".join(ROUTINGS))
    ap.add_argument("--shapes", default="mixtral,fine", help="comma list of: mixtral, fine")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of: {', '.join(IMPLS)}")
    ap.add_argument("--smoke", "--dry-run", dest="smoke", action="store_true",
                    help="a tiny shape through every implementation on the CPU (TRITON_INTERPRET=1), fp32")  # fmt: skip
    args = ap.parse_args(argv)
    routings, impls = args.routing.split(","), args.impls.split(",")
    if not set(routings) <= set(ROUTINGS):
        ap.error(f"--routing must be a comma list of {', '.join(ROUTINGS)}; got {args.routing!r}")
    if not set(impls) <= set(IMPLS):
        ap.error(f"--impls must be a comma list of {', '.join(IMPLS)}; got {args.impls!r}")
    if not set(args.shapes.split(",")) <= set(SHAPES):
        ap.error(f"--shapes must be a comma list of {', '.join(SHAPES)}; got {args.shapes!r}")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs under the interpreter: set TRITON_INTERPRET=1")
        run = Runner(args.out, args.budget_s, torch.device("cpu"), torch.float32, smoke=True)
        for r in routings:
            run_shape(run, SMOKE, r, impls)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --smoke on a CPU")
        run = Runner(args.out, args.budget_s, torch.device("cuda"), torch.bfloat16, smoke=False)
        for r in routings:  # every shape's uniform run before any skewed one, should the budget end
            for s in args.shapes.split(","):
                run_shape(run, SHAPES[s], r, impls)
    run.env["summary"] = summarize(run.records)
    with open(run.path + ".tmp", "w") as f:
        json.dump(dict(env=run.env, results=run.records), f, indent=1)
    os.replace(run.path + ".tmp", run.path)
    for s in run.env["summary"]:
        print(json.dumps(s))
    bad = [r for r in run.records if "error" in r or r.get("mismatch")]
    print(f"{len(run.records)} records in {run.path}; {len(bad)} errors or mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

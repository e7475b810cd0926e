"""The property soak: thousands of generated cases of ``moe_ffn`` and ``dMoE`` against the float64 oracle.

    python -m benchmarks.soak --cases 10000 --minutes 30 [--seed S] [--fuzz] [--out benchmarks/results]

Each case is drawn by hypothesis (the seed is recorded; a failure is shrunk by
hypothesis to a minimal case and printed with its ``@reproduce_failure`` blob, to be
added to the regular suite): a backend available here (``grouped`` with both product
strategies, ``torch``; ``triton`` and ``persistent`` (SwiGLU cases only) under the
interpreter for a small share each, they are slow), a dtype (fp32 and fp16 everywhere, bf16 on the backends that compute it
natively: grouped and torch), block size, sizes off the block grid, empty experts,
``k = E``, ``T = 0`` and ``1``, all tokens on one expert, a prime ``E``, MLP or GLU,
weights as given, transposed views, or one fused gate/up tensor (concatenated or
interleaved halves), and ``moe_ffn`` or a whole ``dMoE`` (router included). Output
and every gradient are held to the suite's tolerances (``blocksparse_moe.testing``);
every quantity to the size of its terms (the oracle on absolute values: a sum errs by
``u * sum|terms|``, which ``max|expected|`` understates when the terms cancel).

``--fuzz`` also runs the fuzzed bad-input tests (``tests/test_fuzz_inputs.py``,
``tests/test_fuzz_layers.py``) at ten
times their CI examples (over 10^3 cases). The results file holds the cases per
backend and dtype, the worst error ratio (error over bound; a mismatch is > 1) per
quantity, the minutes, versions and git SHA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the Triton backend on CPU

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocksparse_moe import MoEConfig, dMoE, moe_ffn, plan_routing  # noqa: E402
from blocksparse_moe.functional import routed_ffn  # noqa: E402
from blocksparse_moe.reference import moe_ffn_dense  # noqa: E402
from blocksparse_moe.testing import TOLERANCES, error_ratio  # noqa: E402

from .common import SCHEMA, REPO_ROOT, environment, now, write_results  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_BF16 = ("grouped", "grouped_mm", "torch")  # the Triton interpreter's bf16 dot is upcast, not native
PRIMES_AND_MORE = [1, 2, 3, 4, 5, 7, 8, 11, 13, 16]


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(["grouped"] * 12 + ["grouped_mm"] * 6 + ["torch"] * 6 + ["triton", "persistent"]))
    layer = draw(st.sampled_from(["moe_ffn"] * 3 + ["dmoe"]))
    # A dMoE in half precision rounds its router's logits in that precision (the router
    # is the model's, not the FFN's): its router gradient is not an FFN accuracy question.
    dtypes = ["float32"] if layer == "dmoe" else ["float32", "float16"] + (["bfloat16"] if backend in NATIVE_BF16 else [])
    E = draw(st.sampled_from(PRIMES_AND_MORE))
    c = dict(
        backend=backend, dtype=draw(st.sampled_from(dtypes)), E=E, k=draw(st.integers(1, min(E, 4))),
        T=draw(st.sampled_from([0, 1]) | st.integers(2, 48)), H=draw(st.sampled_from([8, 16, 24, 32, 40])),
        F=draw(st.sampled_from([4, 8, 12, 16, 20, 36, 48]) | st.integers(1, 50)),
        bs=draw(st.sampled_from([16, 32, 64, 128])), mode=draw(st.sampled_from(["uniform", "one", "skewed"])),
        glu=draw(st.booleans()), activation=draw(st.sampled_from(["gelu", "gelu_tanh", "silu", "relu"])),
        weights=draw(st.sampled_from(["plain", "transposed", "concat", "interleave"])),
        layer=layer, seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip
    if backend == "persistent":  # the SwiGLU layer only; its refusals of anything else are tested
        c.update(glu=True, activation="silu")
    return c


def _ids(T, E, k, mode, g):
    if T == 0:
        return torch.empty(0, k, dtype=torch.long)
    scores = torch.rand(T, E, generator=g)
    if mode == "one":
        scores[:, 0] += 2.0
    elif mode == "skewed":
        scores[:, E // 2 :] -= 2.0
    return scores.topk(k, dim=1).indices


def _first_layer(c, g, dtype):
    """``w1``, ``v1`` (views of what is stored) and the stored leaves."""
    E, H, F = c["E"], c["H"], c["F"]
    if c["glu"] and c["weights"] in ("concat", "interleave"):
        w13 = (torch.randn(E, 2 * F, H, generator=g) / H**0.5).to(dtype).requires_grad_()  # [E, 2F, H]
        up = w13.transpose(1, 2)
        halves = (up[..., :F], up[..., F:]) if c["weights"] == "concat" else (up[..., 0::2], up[..., 1::2])
        return halves[0], halves[1], {"w13": w13}, (up, c["weights"])
    if c["weights"] == "transposed":
        leaves = {n: (torch.randn(E, F, H, generator=g) / H**0.5).to(dtype).requires_grad_() for n in ("w1t", "v1t")}
        return leaves["w1t"].transpose(1, 2), leaves["v1t"].transpose(1, 2) if c["glu"] else None, \
            leaves if c["glu"] else {"w1t": leaves["w1t"]}, None  # fmt: skip
    leaves = {n: (torch.randn(E, H, F, generator=g) / H**0.5).to(dtype).requires_grad_() for n in ("w1", "v1")}
    return leaves["w1"], leaves["v1"] if c["glu"] else None, leaves if c["glu"] else {"w1": leaves["w1"]}, None


def run_case(c: dict) -> dict[str, float]:
    """One case: error ratios (error over bound) of the output and every gradient."""
    g = torch.Generator().manual_seed(c["seed"])
    dtype, (T, E, k, H, F) = DTYPES[c["dtype"]], (c["T"], c["E"], c["k"], c["H"], c["F"])
    backend = "grouped" if c["backend"] == "grouped_mm" else c["backend"]
    tol = TOLERANCES[dtype]
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    if c["layer"] == "dmoe":
        cfg = MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, glu=c["glu"], dtype=dtype,
                        activation=c["activation"], block_size=c["bs"], backend=backend)  # fmt: skip
        torch.manual_seed(c["seed"])  # the layer's initialisation from the case alone: a failure reproduces
        layer = dMoE(cfg)
        y, aux = layer(x, return_aux=True)
        ids, w = aux.expert_ids, aux.expert_weights
        leaves = dict(x=x, **{n: p for n, p in layer.named_parameters() if n in ("router.weight", "w1", "w2", "v1")})
        w1, w2, v1 = layer.w1, layer.w2, layer.v1
    else:
        ids = _ids(T, E, k, c["mode"], g)
        w = torch.rand(T, k, generator=g).to(dtype).requires_grad_()
        w1, v1, first, fused = _first_layer(c, g, dtype)
        w2 = (torch.randn(E, F, H, generator=g) / F**0.5).to(dtype).requires_grad_()
        leaves = dict(x=x, weights=w, w2=w2, **first)
        if c["backend"] == "grouped_mm":  # the CUDA path's products, on the CPU
            from blocksparse_moe.backends import grouped_ffn

            kw = dict(layout=fused[1]) if fused else {}
            y = grouped_ffn(x, plan_routing(ids, E), w, fused[0] if fused else w1, w2, None if fused else v1,
                            activation=c["activation"], products="grouped_mm", **kw)  # fmt: skip
        elif fused and backend == "grouped":
            y = routed_ffn(x, plan_routing(ids, E), w, w1, w2, v1, c["activation"], backend=backend,
                           block_size=c["bs"], fused_gate_up=fused)  # fmt: skip
        else:
            y = moe_ffn(x, ids, w, w1, w2, v1, activation=c["activation"], block_size=c["bs"], backend=backend)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref = _reference(c, ids, w, ref_leaves, layer if c["layer"] == "dmoe" else None)
    dy = torch.randn(T, H, generator=g).to(dtype)  # rounded once: the oracle sees the same incoming gradient
    y.backward(dy)
    ref.backward(dy.double())
    terms = _term_sizes(c, ids, w, leaves, dy)
    out = {"output": error_ratio(y, ref, **tol, scale=terms["output"])}
    for n, t in leaves.items():
        got = t.grad if t.grad is not None else torch.zeros_like(t)
        if n == "weights":
            scale = float(_weights_grad_terms(c, ids, ref_leaves, dy).max()) if ids.numel() else 0.0
        elif n == "router.weight":
            scale = _router_grad_terms(c, ids, w, ref_leaves, dy)
        else:
            scale = terms.get(n)
        out[f"grad_{n}"] = error_ratio(got, ref_leaves[n].grad if ref_leaves[n].grad is not None
                                       else torch.zeros_like(ref_leaves[n]), **tol, scale=scale)  # fmt: skip
    return out


#: max |act'|: gelu 1.13, gelu_tanh 1.13, silu 1.10, relu 1 (the abs run below uses slope 1)
_ACT_SLOPE = 1.13


def _term_sizes(c, ids, w, leaves, dy) -> dict[str, float]:
    """Per quantity, the largest sum of |terms| behind one element: the oracle run on absolute values.

    A rounded sum errs by about ``u * sum|terms|``; where the terms cancel, ``max|expected|``
    understates that (a gradient that is one dot product of 16 terms can be 1000x smaller
    than its terms). So each quantity is held to ``max(|expected|, act_slope^2 * terms)``,
    standard forward error analysis with ``|act'| <= 1.13``.
    """
    a = {n: t.detach().double().abs().requires_grad_() for n, t in leaves.items()}
    if "weights" not in a:  # a dMoE: its routing weights as they came out (the router is not an FFN question)
        a["weights"] = w.detach().double().abs()
    y = _reference(dict(c, activation="relu"), ids, None, a, None)  # relu on |inputs|: slope 1 everywhere
    y.backward(dy.double().abs())
    k = _ACT_SLOPE**2
    out = {"output": k * float(y.detach().abs().max()) if y.numel() else 0.0}
    for n, t in a.items():
        if n in leaves and t.grad is not None:
            out[n] = k * float(t.grad.abs().max()) if t.numel() else 0.0
    return out


def _weights_grad_terms(c, ids, d, dy) -> torch.Tensor:
    """``[T, k]``: the terms of the routing-weight gradient ``<dy[t], FFN_{ids[t, j]}(x[t])>``, a dot that can cancel.

    Its terms are those of the whole chain (``dy``, then both products), as ``_term_sizes``
    counts them: the FFN on absolute values with a slope-1 activation, times
    ``act_slope^2``. A backend may form the dot after the down product (``<dy, ys>``) or
    before it (``<dy @ w2^T, act(g) * u>``, the grouped backend); both err within these terms.
    """
    T, k = ids.shape
    if T == 0:
        return torch.zeros(T, k, dtype=torch.float64)
    with torch.no_grad():
        nd = {n: t.detach().abs() for n, t in d.items() if n not in ("weights", "router.weight")}
        x = nd["x"].repeat_interleave(k, 0)
        rows = _reference(dict(c, activation="relu"), ids.reshape(-1, 1), None,
                          dict(nd, x=x, weights=torch.ones(T * k, 1, dtype=x.dtype)), None)  # fmt: skip
        return _ACT_SLOPE**2 * (dy.double().repeat_interleave(k, 0).abs() * rows).sum(1).reshape(T, k)


def _router_grad_terms(c, ids, w, d, dy) -> float:
    """The router weight's gradient, ``x^T @ (p * (g - <p, g>))`` with ``g`` the routing-weight gradient: each
    ``g[t, j]`` errs by ``u`` times its terms, and the softmax Jacobian's entries are at most ``2 p``, so the
    gradient is held to ``2 * max_h sum_t |x[t, h]| sum_j terms[t, j] * p[t, j]``."""
    if ids.numel() == 0:
        return 0.0
    per_token = (_weights_grad_terms(c, ids, d, dy) * w.detach().double().abs()).sum(1)  # [T]
    return 2.0 * float((d["x"].detach().abs().T @ per_token).max())


def _reference(c, ids, w, d, layer):
    """The float64 oracle on the same (rounded) inputs; a dMoE's router (softmax, then its top-k) in float64 too."""
    F = c["F"]
    if "w13" in d:
        up = d["w13"].transpose(1, 2)
        w1, v1 = (up[..., :F], up[..., F:]) if c["weights"] == "concat" else (up[..., 0::2], up[..., 1::2])
    elif "w1t" in d:
        w1, v1 = d["w1t"].transpose(1, 2), d["v1t"].transpose(1, 2) if "v1t" in d else None
    else:
        w1, v1 = d["w1"], d.get("v1")
    if "weights" in d:
        weights = d["weights"]
    else:  # the layer's own choice of experts, its weights recomputed differentiably in float64
        weights = (d["x"] @ d["router.weight"].T).softmax(-1).gather(1, ids)
    y = moe_ffn_dense(d["x"], ids, weights, w1, d["w2"], v1, activation=c["activation"])
    return y + sum(0.0 * t.sum() for t in d.values())  # every leaf in the graph: unused ones get zeros


def run_layer_soak(n: int, minutes: float, seed_value: int) -> dict:
    stats = defaultdict(lambda: {"cases": 0, "worst": defaultdict(float)})
    mismatches: list[dict] = []
    deadline = time.monotonic() + 60 * minutes
    count = [0]

    @seed(seed_value)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(cases())
    def soak(c):
        if time.monotonic() > deadline:
            return
        ratios = run_case(c)
        key = f"{c['backend']}/{c['dtype']}"
        stats[key]["cases"] += 1
        for q, r in ratios.items():
            stats[key]["worst"][q] = max(stats[key]["worst"][q], r)
        count[0] += 1
        bad = {q: r for q, r in ratios.items() if not r <= 1.0}
        if bad:
            mismatches.append(dict(case=c, ratios=bad))
            raise AssertionError(f"mismatch {bad} in {c}")  # hypothesis shrinks it

    t0 = time.monotonic()
    failure = None
    try:
        soak()
    except AssertionError as err:  # the shrunk case is in err (and printed by hypothesis)
        failure = str(err)[:2000]
    return dict(seed=seed_value, cases=count[0], minutes=(time.monotonic() - t0) / 60, failure=failure,
                mismatches=mismatches[-5:], per_backend_dtype={k: {"cases": v["cases"], "worst_ratio": dict(v["worst"])}
                                                              for k, v in sorted(stats.items())})  # fmt: skip


def run_fuzz() -> dict:
    env = dict(os.environ, HYPOTHESIS_PROFILE="long", TRITON_INTERPRET="1")
    t0 = time.monotonic()
    files = ["tests/test_fuzz_inputs.py", "tests/test_fuzz_layers.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    return dict(command="HYPOTHESIS_PROFILE=long pytest " + " ".join(files), returncode=out.returncode,
                summary=tail, minutes=(time.monotonic() - t0) / 60)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--minutes", type=float, default=60.0, help="stop drawing new cases after this long")
    p.add_argument("--seed", type=int, default=int(time.time()) % 2**31)
    p.add_argument("--fuzz", action="store_true", help="also the fuzzed bad-input tests at 10x their examples")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny cases: a thread pool costs more than it gives
    res = dict(layer=run_layer_soak(a.cases, a.minutes, a.seed))
    lay = res["layer"]
    print(f"layer soak: {lay['cases']} cases in {lay['minutes']:.1f} min, seed {lay['seed']}, "
          f"{'no mismatch' if lay['failure'] is None else 'MISMATCH: ' + lay['failure'][:300]}")  # fmt: skip
    for k, v in lay["per_backend_dtype"].items():
        print(f"  {k:<22} {v['cases']:>6} cases, worst ratio {max(v['worst_ratio'].values(), default=0):.3f}")
    if a.fuzz:
        res["fuzz"] = run_fuzz()
        print(f"fuzz: {res['fuzz']['summary']}")
    if a.out is not None:
        created = now()
        env = environment(torch.device("cpu"), torch.float32)
        path = Path(a.out) / f"soak-{env['device_slug']}-{created.strftime('%Y-%m-%d')}.json"
        write_results(path, dict(schema=SCHEMA, kind="soak", created=created.isoformat(), argv=sys.argv, env=env, **res))
        print(f"wrote {path}")
    return 0 if lay["failure"] is None and res.get("fuzz", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

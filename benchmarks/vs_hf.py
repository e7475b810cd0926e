"""dMoE and the ``"blocksparse"`` experts against transformers' own ``grouped_mm`` experts, side by side.

What a CPU user compares (issue 11's targets), in one process, interleaved A B A B so
that the machine's drift hits both alike; medians and the per-pair ratio
``theirs / ours`` (> 1: we are faster):

* ``layer``: one SwiGLU MoE layer, forward + backward: transformers'
  ``MixtralSparseMoeBlock`` with ``experts_implementation="grouped_mm"``, against
  (a) ``dMoE`` on the same weights and (b) the same block with ``"blocksparse"``;
* ``generate``: a small random Qwen3-MoE causal LM, prefill of a prompt and greedy
  decode per token, ``"blocksparse"`` against ``"grouped_mm"``, tokens compared; the two
  models read the same weight tensors (``load_state_dict(assign=True)``: no grad here),
  so the 768 MB of expert weights they stream lie in the same memory for both;
* ``generate-alone``: the same, each implementation in its own fresh process, alternating
  (``--pairs`` rounds of 10 prefills and generates each): in one process the two share the C
  allocator, and one's frees decide whether the other's next buffers are fresh pages;
* ``memory``: the step's peak resident memory above the state before it, in a fresh
  process per implementation (``VmHWM`` reset just before the step; torch's CPU
  allocator is not visible to tracemalloc), gradients allocated by the step.

    python -m benchmarks.vs_hf layer [--shapes e8,e64] [--pairs 5]
    python -m benchmarks.vs_hf generate [--prompt 256] [--new 32] [--quiet 0.05]   # on a shared machine
    python -m benchmarks.vs_hf generate-alone [--pairs 5]  # each impl alone in a fresh process, alternating
    python -m benchmarks.vs_hf memory                 # every impl x shape, subprocesses
    python -m benchmarks.vs_hf all --out benchmarks/results   # all three, one results file
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import blocksparse_moe.integrations.transformers  # noqa: F401 - registers "blocksparse"
from blocksparse_moe import MoEConfig, dMoE

from .common import SCHEMA, QuietGate, environment, now, results_path, write_results

#: The issue's two layer shapes (SwiGLU, fp32).
LAYER_SHAPES = {
    "e8": dict(tokens=2048, hidden=512, ffn=1024, experts=8, top_k=2),
    "e64": dict(tokens=4096, hidden=1024, ffn=768, experts=64, top_k=8),
}
LAYER_IMPLS = ("hf_grouped_mm", "dmoe", "hf_blocksparse")


def _mixtral_block(s: dict, impl: str, seed: int = 0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_local_experts=s["experts"],
                        num_experts_per_tok=s["top_k"], hidden_act="silu")  # fmt: skip
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block


def _dmoe_like(block, s: dict) -> dMoE:
    """A dMoE holding the block's weights (router, gate/up halves, down), so both compute one function."""
    cfg = MoEConfig(hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_experts=s["experts"], top_k=s["top_k"],
                    glu=True, activation="silu", router_renormalize=True, load_balancing_loss_weight=0.0,
                    z_loss_weight=0.0)  # fmt: skip
    layer = dMoE(cfg)
    F = s["ffn"]
    gate_up = block.experts.gate_up_proj.detach()  # [E, 2F, H]
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.w1.copy_(gate_up[:, :F].transpose(1, 2))
        layer.v1.copy_(gate_up[:, F:].transpose(1, 2))
        layer.w2.copy_(block.experts.down_proj.detach().transpose(1, 2))
    return layer


def _layer_step(module, x, grad):
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class _Clock:
    """Plain wall-clock timing, or (``quiet`` set) only while no other process uses the CPU."""

    def __init__(self, quiet: float | None):
        self.gate = QuietGate(max_other=quiet) if quiet is not None else None
        self.loads: list = []

    def __call__(self, fn) -> float:
        if self.gate is None:
            return _timed(fn)
        ms, load = self.gate.timed(fn)
        self.loads.append(load)
        return ms

    def describe(self) -> dict:
        if self.gate is None:
            return {"quiet_gate": None}
        loads = [x for x in self.loads if x is not None]
        return {"quiet_gate": {"max_other_cores": self.gate.max_other, "discarded_calls": self.gate.discarded,
                               "max_other_seen": max(loads, default=None)}}  # fmt: skip


def run_layer(shapes, pairs: int, seed: int = 0, clock=_timed) -> list[dict]:
    rows = []
    for name in shapes:
        s = LAYER_SHAPES[name]
        ref = _mixtral_block(s, "grouped_mm", seed)
        mods = {"hf_grouped_mm": ref, "dmoe": _dmoe_like(ref, s), "hf_blocksparse": _mixtral_block(s, "blocksparse", seed)}
        mods["hf_blocksparse"].load_state_dict(ref.state_dict())
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, s["tokens"], s["hidden"], generator=g)
        grad = torch.randn(1, s["tokens"], s["hidden"], generator=g)
        outs = {}
        for impl, m in mods.items():  # warm-up, and every output checked against grouped_mm's
            o = m(x)
            outs[impl] = (o[0] if isinstance(o, tuple) else o).detach()
            _layer_step(m, x, grad)
        err = {k: float((v - outs["hf_grouped_mm"]).abs().max()) for k, v in outs.items()}
        times = {k: [] for k in mods}
        for _ in range(pairs):
            for impl, m in mods.items():
                m.zero_grad(set_to_none=True)
                times[impl].append(clock(lambda: _layer_step(m, x, grad)))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median(a / b for a, b in zip(times["hf_grouped_mm"], times[k])) for k in mods}
        rows.append(dict(shape=name, **s, threads=torch.get_num_threads(), pairs=pairs, median_ms=med,
                         times_ms=times, ratio_theirs_over_ours=ratios, max_abs_diff_vs_grouped_mm=err))  # fmt: skip
        print(f"layer {name}: " + ", ".join(f"{k} {med[k]:.1f} ms (x{ratios[k]:.2f})" for k in mods), flush=True)
        del mods, ref
        gc.collect()
    return rows


def _qwen3(impl: str, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         num_experts=64, num_experts_per_tok=8, decoder_sparse_step=1, max_position_embeddings=2048,
                         norm_topk_prob=True)  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.set_experts_implementation(impl)
    return model


def run_generate(prompt: int, new: int, pairs: int, seed: int = 0, clock=_timed) -> dict:
    base = _qwen3("grouped_mm", seed)
    ours = _qwen3("blocksparse", seed)
    ours.load_state_dict(base.state_dict(), assign=True)  # the same weight tensors: see the docstring
    models = {"grouped_mm": base, "blocksparse": ours}
    ids = torch.randint(0, 1024, (1, prompt), generator=torch.Generator().manual_seed(seed))
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    tokens, prefill, total = {}, {k: [] for k in models}, {k: [] for k in models}
    with torch.no_grad():
        for k, m in models.items():  # warm-up
            tokens[k] = m.generate(ids, **kw)[0, prompt:].tolist()
        for _ in range(pairs):
            for k, m in models.items():
                prefill[k].append(clock(lambda: m(ids)))
                total[k].append(clock(lambda: m.generate(ids, **kw)))
    decode = {k: [(t - p) / (new - 1) for t, p in zip(total[k], prefill[k])] for k in models}
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    ratio = lambda d: statistics.median(a / b for a, b in zip(d["grouped_mm"], d["blocksparse"]))  # noqa: E731
    row = dict(prompt=prompt, new_tokens=new, pairs=pairs, threads=torch.get_num_threads(),
               prefill_ms=med(prefill), decode_ms_per_token=med(decode), prefill_ratio=ratio(prefill),
               decode_ratio=ratio(decode), same_tokens=tokens["grouped_mm"] == tokens["blocksparse"])  # fmt: skip
    print(f"generate: prefill {row['prefill_ms']} (x{row['prefill_ratio']:.2f}), decode/token "
          f"{row['decode_ms_per_token']} (x{row['decode_ratio']:.2f}), same tokens {row['same_tokens']}", flush=True)  # fmt: skip
    return row


def generate_child(impl: str, prompt: int, new: int, reps: int, seed: int = 0) -> None:
    """One implementation alone in this process: median prefill and decode/token of ``reps`` rounds, as JSON."""
    import json

    model = _qwen3(impl, seed)
    ids = torch.randint(0, 1024, (1, prompt), generator=torch.Generator().manual_seed(seed))
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    prefill, total = [], []
    with torch.no_grad():
        tokens = model.generate(ids, **kw)[0, prompt:].tolist()  # warm-up
        for _ in range(reps):
            prefill.append(_timed(lambda: model(ids)))
            total.append(_timed(lambda: model.generate(ids, **kw)))
    decode = [(t - p) / (new - 1) for t, p in zip(total, prefill)]
    print(json.dumps(dict(impl=impl, prefill_ms=statistics.median(prefill), decode_ms_per_token=statistics.median(decode),
                          tokens=tokens)))  # fmt: skip


def run_generate_alone(prompt: int, new: int, rounds: int, reps: int = 10, quiet: float | None = None) -> dict:
    """Each implementation in its own fresh process, alternating, ``rounds`` times: what a user running one sees.

    In one process the two implementations share the C allocator: one's frees decide whether
    the other's next buffers are fresh pages (page faults) or reused ones, so an interleaved
    ratio also measures that interplay. Here each process holds one model only. ``quiet``: each child starts on an idle
    machine and is run again if other processes used more than ``quiet`` cores meanwhile.
    """
    import json

    per = {"grouped_mm": [], "blocksparse": []}
    tokens, gate, loads = {}, QuietGate(max_other=quiet, children=True) if quiet is not None else None, []
    for _ in range(rounds):
        for impl in per:
            cmd = [sys.executable, "-m", "benchmarks.vs_hf", "generate-child", impl, str(prompt), str(new), str(reps)]
            done = []
            child = lambda: done.append(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600))  # noqa: E731
            if gate is None:
                child()
            else:
                loads.append(gate.timed(child)[1])
            r = json.loads(done[-1].stdout.strip().splitlines()[-1])
            per[impl].append(r)
            tokens[impl] = r["tokens"]
    pf = {k: [r["prefill_ms"] for r in v] for k, v in per.items()}
    dc = {k: [r["decode_ms_per_token"] for r in v] for k, v in per.items()}
    ratio = lambda d: statistics.median(a / b for a, b in zip(d["grouped_mm"], d["blocksparse"]))  # noqa: E731
    row = dict(mode="alone", prompt=prompt, new_tokens=new, rounds=rounds, reps_per_process=reps,
               threads=torch.get_num_threads(), prefill_ms=pf, decode_ms_per_token=dc, prefill_ratio=ratio(pf),
               decode_ratio=ratio(dc), same_tokens=tokens["grouped_mm"] == tokens["blocksparse"],
               other_load_per_child=loads or None, discarded_children=gate.discarded if gate else None)  # fmt: skip
    print(f"generate (alone): prefill ratios {[round(a / b, 3) for a, b in zip(pf['grouped_mm'], pf['blocksparse'])]} "
          f"(median x{row['prefill_ratio']:.2f}), decode ratios "
          f"{[round(a / b, 3) for a, b in zip(dc['grouped_mm'], dc['blocksparse'])]} (median x{row['decode_ratio']:.2f}), "
          f"same tokens {row['same_tokens']}", flush=True)  # fmt: skip
    return row


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(impl: str, shape: str) -> None:
    """In a fresh process: set up one impl, then print the step's peak resident memory above the set-up.

    The peak is reset just before the step (``echo 5 > /proc/self/clear_refs`` sets
    ``VmHWM`` to the current RSS), so whatever the set-up touched does not hide it.
    """
    s = LAYER_SHAPES[shape]
    if impl == "dmoe":  # built directly: the values do not matter for memory, the shapes do
        cfg = MoEConfig(hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_experts=s["experts"],
                        top_k=s["top_k"], glu=True, activation="silu", router_renormalize=True)  # fmt: skip
        module = dMoE(cfg)
    else:
        module = _mixtral_block(s, "grouped_mm" if impl == "hf_grouped_mm" else "blocksparse")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, s["tokens"], s["hidden"], generator=g)
    grad = torch.randn(1, s["tokens"], s["hidden"], generator=g)
    # As after optimizer.zero_grad() (set_to_none, torch's default): the step allocates the
    # gradients, so they are part of the peak for every implementation alike.
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    _layer_step(module, x, grad)
    print(f"{_status_mb('VmHWM') - before:.1f}")


def run_memory(shapes) -> list[dict]:
    rows = []
    for shape in shapes:
        peak = {}
        for impl in LAYER_IMPLS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.vs_hf", "memory-child", impl, shape],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            peak[impl] = float(out.stdout.strip().splitlines()[-1])
        ratio = {k: v / peak["hf_grouped_mm"] for k, v in peak.items()}
        rows.append(dict(shape=shape, step_peak_rss_mb=peak, ratio_vs_grouped_mm=ratio))
        print(f"memory {shape}: " + ", ".join(f"{k} {v:.0f} MB (x{ratio[k]:.2f})" for k, v in peak.items()), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_hf", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["layer", "generate", "generate-alone", "memory", "all", "memory-child",
                                    "generate-child"])  # fmt: skip
    p.add_argument("args", nargs="*")
    p.add_argument("--shapes", default="e8,e64")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="write a results JSON here (a folder)")
    p.add_argument("--quiet", type=float, default=None, metavar="CORES",
                   help="time a call only while other processes use at most CORES of CPU (re-run it otherwise); "
                        "for a shared machine, e.g. 0.05")  # fmt: skip
    a = p.parse_args(argv)
    if a.what == "memory-child":
        memory_child(*a.args)
        return 0
    if a.what == "generate-child":
        impl, prompt, new, reps = a.args
        generate_child(impl, int(prompt), int(new), int(reps))
        return 0
    shapes = a.shapes.split(",")
    res, clock = {}, _Clock(a.quiet)
    if a.what in ("layer", "all"):
        res["layer"] = run_layer(shapes, a.pairs, clock=clock)
    if a.what in ("generate", "all"):
        res["generate"] = run_generate(a.prompt, a.new, a.pairs, clock=clock)
    if a.what in ("generate-alone", "all"):
        res["generate_alone"] = run_generate_alone(a.prompt, a.new, a.pairs, quiet=a.quiet)
    res.update(clock.describe())
    print(clock.describe(), flush=True)
    if a.what in ("memory", "all"):
        res["memory"] = run_memory(shapes)
    if a.out is not None:
        created = now()
        env = environment(torch.device("cpu"), torch.float32)
        path = results_path(a.out, env, "vs-hf", created)
        write_results(path, dict(schema=SCHEMA, kind="vs-hf", suite="vs-hf", created=created.isoformat(),
                                 argv=sys.argv, env=env, **res))  # fmt: skip
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

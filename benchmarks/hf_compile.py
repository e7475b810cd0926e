"""Compile time of a transformers MoE model with ``"blocksparse"`` experts against ``grouped_mm`` (CPU).

Each measurement is a fresh process with an empty Inductor cache directory and the
FX/AOT caches off, so every compile is a cold one; the two implementations alternate
(A B A B) so that the machine's drift hits both. Per family (tiny random models, the
decorated families of issue 17) it records, for a static-cache greedy ``generate``
with the forward compiled ``fullgraph=True`` (default backend):

* ``compile_s``: the first compiled ``generate`` (compile plus 4 tokens);
* ``graphs``, ``breaks``, ``recompiles``: Dynamo's counters after it and after a
  shorter prompt (which must not recompile);
* ``same_tokens``: compiled tokens equal to the uncompiled ones.

    python -m benchmarks.hf_compile [--families mixtral,qwen3_moe] [--reps 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1)),
}  # fmt: skip
COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
IMPLS = ("grouped_mm", "blocksparse")


def child(family: str, impl: str) -> dict:
    import transformers

    import blocksparse_moe.integrations.transformers  # noqa: F401 - registers "blocksparse"

    cfg_name, model_name, overrides = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**{**COMMON, **overrides})).eval()
    model.set_experts_implementation(impl)
    prompt = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        eager = model.generate(prompt, **kw)
        cc = transformers.CompileConfig(fullgraph=True)
        cc._compile_all_devices = True
        model.generation_config.compile_config = cc
        t0 = time.perf_counter()
        out = model.generate(prompt, **kw, cache_implementation="static")
        compile_s = time.perf_counter() - t0
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        model.generate(prompt[:, :5], **kw, cache_implementation="static")
        shorter_s = time.perf_counter() - t0
    return dict(compile_s=compile_s, shorter_prompt_s=shorter_s, graphs=graphs,
                graphs_after_shorter=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
                recompiles=sum(counters["recompiles"].values()), same_tokens=bool(torch.equal(out, eager)))  # fmt: skip


def _run_child(family: str, impl: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "benchmarks.hf_compile", "child", family, impl],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_compile", description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="*", default=[])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.what[:1] == ["child"]:
        print(json.dumps(child(*a.what[1:3])))
        return 0
    rows = []
    for family in a.families.split(","):
        runs = {impl: [] for impl in IMPLS}
        for _ in range(a.reps):
            for impl in IMPLS:
                runs[impl].append(_run_child(family, impl))
        med = {impl: statistics.median(r["compile_s"] for r in runs[impl]) for impl in IMPLS}
        ratio = statistics.median(b["compile_s"] / g["compile_s"] for g, b in zip(runs["grouped_mm"], runs["blocksparse"]))
        row = dict(family=family, reps=a.reps, median_compile_s=med, ratio_blocksparse_over_grouped_mm=ratio, runs=runs)
        rows.append(row)
        last = {impl: runs[impl][-1] for impl in IMPLS}
        print(f"{family}: compile {med['grouped_mm']:.1f} s (grouped_mm) vs {med['blocksparse']:.1f} s (blocksparse), "
              f"x{ratio:.2f}; graphs {[last[i]['graphs'] for i in IMPLS]}, recompiles "
              f"{[last[i]['recompiles'] for i in IMPLS]}, same tokens {[last[i]['same_tokens'] for i in IMPLS]}",
              flush=True)  # fmt: skip
    if a.out is not None:
        from .common import SCHEMA, environment, now, results_path, write_results

        created = now()
        env = environment(torch.device("cpu"), torch.float32)
        path = write_results(results_path(a.out, env, "hf-compile", created),
                             dict(schema=SCHEMA, kind="hf-compile", suite="hf-compile", created=created.isoformat(),
                                  argv=sys.argv, env=env, families=rows))  # fmt: skip
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

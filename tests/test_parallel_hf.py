"""Hugging Face models under expert parallelism (gloo): ``expert_parallel`` equals the unsharded model.

Tiny random Mixtral and Qwen3-MoE models at 2 and 4 ranks, DeepSeek-V3 (shared
experts replicated) and Mixtral in the fixed-capacity mode under a permuted placement
at 2: logits, loss and every gradient against the unsharded
model running transformers' own eager experts on the whole batch, then
``save_sharded`` / ``load_sharded`` into an unsharded model and into another
placement (scenarios in tests/parallel_hf_scenarios.py).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

pytest.importorskip("transformers", minversion="5.23", reason="needs the [hf] extra (transformers>=5.23)")

import parallel_harness as harness  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

TWO = ["hf_mixtral", "hf_qwen3_moe", "hf_deepseek_v3", "hf_mixtral_capacity"]
FOUR = ["hf_mixtral", "hf_qwen3_moe"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    env = {"BSMOE_CKPT_DIR": str(tmp_path_factory.mktemp("bsmoe-hf"))}
    return {W: harness.launch(W, names, timeout=150, pg_timeout=40, env=env) for W, names in ((2, TWO), (4, FOUR))}


@pytest.mark.parametrize("W,name", [(2, n) for n in TWO] + [(4, n) for n in FOUR])
def test_sharded_model_equals_unsharded(launches, W, name):
    per_rank = launches[W].check(name)
    down = [r["experts"] for r in per_rank]
    E = 8 if name == "hf_deepseek_v3" else 4
    for key in down[0]:  # every expert sits on exactly one rank
        assert sorted(e for r in down for e in r[key]) == list(range(E)), down

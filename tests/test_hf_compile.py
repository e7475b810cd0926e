"""transformers models with ``"blocksparse"`` experts under ``torch.compile`` (default backend, CPU).

What transformers' own ``test_generate_compile_model_forward_fullgraph`` and
``test_static_cache_no_recompile_with_smaller_length`` do, without their code: a tiny
random model of each decorated family generates greedily with a static cache while
its forward is compiled with ``fullgraph=True``, gives the uncompiled tokens, compiles
to one graph, and does not recompile for a shorter prompt. Compile *time* against
``grouped_mm`` is measured in ``benchmarks/hf_compile.py``, not here.
"""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.23", reason="needs the [hf] extra")

import blocksparse_moe.integrations.transformers  # noqa: E402,F401  (registers "blocksparse")
from test_hf_experts import COMMON, FAMILIES  # noqa: E402

COMPILED_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"]


def _model(family: str, impl: str = "blocksparse", **more):
    cfg_name, model_name, overrides, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **overrides, "max_position_embeddings": 64, **more})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    model.set_experts_implementation(impl)
    return model


def _counters() -> tuple[int, int, int]:
    c = torch._dynamo.utils.counters
    return c["stats"]["unique_graphs"], sum(c["graph_break"].values()), sum(c["recompiles"].values())


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_compiled_static_cache_generate(family):
    model = _model(family)
    prompt = torch.randint(3, COMMON["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, **kw)
        cfg = transformers.CompileConfig(fullgraph=True)
        cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told
        model.generation_config.compile_config = cfg
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = model.generate(prompt, **kw, cache_implementation="static")
        graphs, breaks, _ = _counters()
        shorter = model.generate(prompt[:, :5], **kw, cache_implementation="static")
        graphs_after, _, recompiles = _counters()
        eager_shorter = None
    assert torch.equal(compiled, eager), f"{family}: compiled greedy tokens differ"
    assert (graphs, breaks) == (1, 0), f"{family}: {graphs} graphs, {breaks} breaks (want 1, 0)"
    assert (graphs_after, recompiles) == (1, 0), f"{family}: a shorter prompt recompiled ({graphs_after} graphs)"
    model.generation_config.compile_config = None
    with torch.no_grad():
        eager_shorter = model.generate(prompt[:, :5], **kw)
    assert torch.equal(shorter, eager_shorter)


def test_compiled_forward_backward_fullgraph():
    """torch.compile(model, fullgraph=True) of a Qwen3-MoE with "blocksparse": loss and every gradient as eager."""
    model = _model("qwen3_moe", num_hidden_layers=1).train()  # one layer: the compile is the cost here
    ids = torch.randint(3, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    loss = model(ids, labels=ids).loss
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(ids, labels=ids).loss
    loss_c.backward()
    assert _counters()[:2] == (1, 0)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for n, g in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_module_import_is_side_effect_free_to_reload():
    importlib.reload(blocksparse_moe.integrations.transformers)

"""Hugging Face MoE models sharded by ``expert_parallel``: scenarios on 2 and 4 gloo ranks.

Each rank builds the same tiny random model (no download), keeps an unsharded copy
running transformers' own ``"eager"`` experts as the reference, shards the original,
and feeds it its part of a global batch of sequences. Compared in fp32: the logits
of its sequences, the loss (mean over ranks), and every parameter's gradient after
``reduce_gradients`` (expert tensors against the reference's rows of this rank's
experts). Then ``save_sharded`` writes the sharded model, which loads back into an
unsharded model (every rank reads every expert) and into a model sharded under
another placement.

The router's auxiliary loss is left out (``output_router_logits=False``): it is a
per-batch statistic, not a sum over tokens, so per-rank losses cannot add up to it.
"""

from __future__ import annotations

import copy
import os

from parallel_harness import Skip, scenario

TOL = dict(atol=2e-5, rtol=2e-5)
ROUTER_TOL = dict(atol=2e-4, rtol=2e-4)
SEQUENCES, LENGTH = 4, 6

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, output_router_logits=False,
)  # fmt: skip
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                       head_dim=8, norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         n_shared_experts=1)),
}  # fmt: skip


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise Skip(f"needs transformers: {err}") from err
    return transformers


def build(family: str, seed: int):
    import torch

    transformers = _transformers()
    cfg_name, model_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    return model


def _compare(name, actual, expected, tol=TOL):
    from helpers import assert_close

    assert_close(actual, expected, name=name, **tol)


def _expert_names(model) -> dict:
    """Parameter name -> global expert ids of its rows on this rank."""
    from blocksparse_moe.parallel import expert_shards

    return {s.fqn(a): list(s.local_experts) for s in expert_shards(model) for a, _ in s.params()}


def check_family(rank, W, family, checkpoint=True, **shard_kw):
    import torch

    import blocksparse_moe.integrations.transformers as bst
    from blocksparse_moe.parallel import load_sharded, reduce_gradients, save_sharded

    model = build(family, seed=0)
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    ids = torch.randint(3, COMMON["vocab_size"], (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))
    out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    rows = slice(rank * SEQUENCES // W, (rank + 1) * SEQUENCES // W)

    bst.expert_parallel(model, **shard_kw)  # the default group: every rank is an expert-parallel rank
    mine = model(input_ids=ids[rows], labels=ids[rows])
    mine.loss.backward()
    reduce_gradients(model)  # experts over dp (here none), the rest over all ranks; DDP's mean
    _compare("logits", mine.logits, out.logits[rows])
    losses = mine.loss.detach().reshape(1).clone()
    torch.distributed.all_reduce(losses)
    _compare("loss (mean over ranks)", losses / W, out.loss.detach().reshape(1))
    experts = _expert_names(model)
    assert experts, "no expert tensor was sharded"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if name in experts:
            expected = expected[experts[name]]
        tol = ROUTER_TOL if ".gate." in name or name.endswith(".gate.weight") else TOL
        _compare(f"d {name}", p.grad, expected, tol)
    result = {"experts": {n: e for n, e in experts.items() if n.endswith("down_proj")}}
    if not checkpoint:
        return result

    # Checkpoints: sharded -> unsharded (every rank reads all) and -> another placement.
    path = os.path.join(os.environ["BSMOE_CKPT_DIR"], f"{family}-{W}")
    save_sharded(model, path)
    full = build(family, seed=1)
    load_sharded(full, path)
    for name, v in ref.state_dict().items():
        _compare(f"loaded {name}", full.state_dict()[name], v, dict(atol=0, rtol=0))
    other = bst.expert_parallel(build(family, seed=2), placement=list(reversed(_owners(ref, W))))
    load_sharded(other, path)
    other_experts = _expert_names(other)
    for name, p in other.named_parameters():
        expected = ref_params[name].detach()
        if name in other_experts:
            expected = expected[other_experts[name]]
        _compare(f"reloaded {name}", p.detach(), expected, dict(atol=0, rtol=0))
    return result


def _owners(model, W):
    """The contiguous owner list of the model's expert count (reversed by the caller: another placement)."""
    from blocksparse_moe.parallel import ExpertPlacement, expert_shards

    E = expert_shards(model, include_unsharded=True)[0].placement.num_experts
    return list(ExpertPlacement.contiguous(E, W).owners)


@scenario
def hf_mixtral(rank, W):
    return check_family(rank, W, "mixtral")


@scenario
def hf_qwen3_moe(rank, W):
    return check_family(rank, W, "qwen3_moe")


@scenario
def hf_deepseek_v3(rank, W):
    """Shared experts stay replicated (they are a plain MLP beside the routed experts)."""
    res = check_family(rank, W, "deepseek_v3")
    assert not any("shared_experts" in n for n in res["experts"]), res
    return res


@scenario
def hf_mixtral_capacity(rank, W):
    """The fixed-capacity exchange (no host read) under a permuted placement, with the bound that never overflows."""
    tokens = SEQUENCES // W * LENGTH
    owners = [(e + 1) % W for e in range(4)]
    return check_family(rank, W, "mixtral", checkpoint=False, placement=owners, capacity_per_peer=tokens * 2)

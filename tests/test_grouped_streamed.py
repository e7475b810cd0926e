"""The grouped backend's row-chunked inference path (``backends/grouped_streamed.py``) against the float64 oracle.

Eager CPU inference of more sorted rows than one chunk runs the FFN a chunk of rows at a
time. These tests shrink the chunk (``STREAM_BYTES``) so that small cases cross many
chunk edges, an expert's rows among them, and check the result in every weight layout,
activation and dtype, with an empty expert, all tokens on one expert, k = E and a
padded plan; that the path is taken exactly in eager inference; and that it agrees with
the whole-buffer path it replaces.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close

from blocksparse_moe import moe_ffn, plan_routing
from blocksparse_moe.integrations._ffn import dropless_ffn
from blocksparse_moe.backends import grouped, grouped_streamed
from blocksparse_moe.reference import moe_ffn_dense

E, H, F = 7, 24, 20  # a prime expert count; sizes off any block grid


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows (the 64-row floor lowered too): every case below crosses several chunk edges."""
    monkeypatch.setattr(grouped_streamed, "STREAM_BYTES", 1)
    monkeypatch.setattr(grouped_streamed, "_MIN_ROWS", 16)
    calls = []
    real = grouped_streamed.streamed_rows

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped, "streamed_rows", spy)
    return calls


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * F, H, generator=g) / 4  # transformers' fused [E, 2F, H]
    w2t = torch.randn(E, H, F, generator=g) / 4  # transformers' down [E, H, F]
    return w13.to(dtype), w2t.to(dtype)


def _layout(w13, layout):
    up = w13.transpose(1, 2)  # [E, H, 2F] strided view, read in place
    if layout == "concat":
        return up[..., :F], up[..., F:], (up, "concat")
    if layout == "interleave":
        return up[..., 0::2], up[..., 1::2], (up, "interleave")
    if layout == "separate":
        return up[..., :F], up[..., F:], None
    return up[..., :F], None, None


def _ids(kind, T, k, g):
    if kind == "one-expert":  # every token's first choice is expert 2; k = 1
        return torch.full((T, 1), 2)
    if kind == "k=E":
        return torch.stack([torch.randperm(E, generator=g) for _ in range(T)])
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    return torch.where(ids >= 4, ids + 1, ids)  # expert 4 empty


# fp32: the oracle's fp64 products against fp32 rounding; half: the products round their inputs
# to 8 or 11 mantissa bits, the suite's per-dtype tolerances say how far that goes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["concat", "interleave", "separate", "mlp"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("kind", ["empty-expert", "one-expert", "k=E"])
def test_chunked_rows_match_the_oracle(dtype, layout, activation, kind, small_chunks):
    g = torch.Generator().manual_seed(1)
    T, k = 37, 3
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = _ids(kind, T, k, g)
    w = torch.rand(T, ids.shape[1], generator=g).to(dtype)
    w13, w2t = _weights(dtype)
    w1, v1, fused = _layout(w13, layout)
    w2 = w2t.transpose(1, 2)
    with torch.no_grad():
        y = dropless_ffn(x, ids, w, w1, w2, v1, activation=activation, fused_gate_up=fused)
    assert small_chunks, "the chunked path was not taken"
    ref = moe_ffn_dense(x.double(), ids, w.double(), w1.double(), w2.double(),
                        None if v1 is None else v1.double(), activation=activation)  # fmt: skip
    assert y.shape == (T, H) and y.dtype == dtype
    assert_close(y, ref, **TOLERANCES[dtype], name=f"{layout} {activation} {kind}")


def test_equals_the_whole_buffer_path_and_a_padded_plan_adds_nothing(small_chunks):
    g = torch.Generator().manual_seed(2)
    T, k = 41, 2
    x = torch.randn(T, H, generator=g)
    ids = _ids("empty-expert", T, k, g)
    w = torch.rand(T, k, generator=g)
    w13, w2t = _weights(torch.float32)
    w1, v1, _ = _layout(w13, "separate")
    w2 = w2t.transpose(1, 2)
    plan = plan_routing(ids, E)
    with torch.no_grad():
        chunked = grouped.grouped_ffn(x, plan, w, w1, w2, v1, activation="silu")
    assert len(small_chunks) == 1
    whole = grouped.grouped_ffn(x, plan, w, w1.clone().requires_grad_(), w2, v1, activation="silu")  # autograd ops
    assert len(small_chunks) == 1  # with a weight to differentiate the chunked path is not taken
    assert_close(chunked, whole.detach(), **TOLERANCES[torch.float32], name="chunked vs whole")
    # a padded plan: rows past expert_offsets[-1] that no expert owns (their slot: token 0's) add nothing
    pad = 5
    padded = type(plan)(num_tokens=T, top_k=k, num_experts=E,
                        sorted_to_slot=torch.cat([plan.sorted_to_slot, torch.zeros(pad, dtype=plan.sorted_to_slot.dtype)]),
                        slot_to_sorted=plan.slot_to_sorted, sorted_expert=plan.sorted_expert,
                        tokens_per_expert=plan.tokens_per_expert, expert_offsets=plan.expert_offsets)  # fmt: skip
    with torch.no_grad():
        yp = grouped.grouped_ffn(x, padded, None, w1, w2, v1, activation="silu", padded=True)
        y = grouped.grouped_ffn(x, plan, None, w1, w2, v1, activation="silu")
    assert len(small_chunks) == 3
    assert torch.equal(yp, y)


def test_taken_only_in_eager_inference_over_more_than_one_chunk(small_chunks):
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(E, H, F, generator=g), torch.randn(E, F, H, generator=g)
    x = torch.randn(12, H, generator=g)  # 24 rows: more than one 16-row chunk
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(12)])
    w = torch.rand(12, 2, generator=g)
    with torch.no_grad():
        moe_ffn(x[:4], ids[:4], w[:4], w1, w2, activation="gelu")  # 8 rows: one chunk, the whole-buffer path
    assert small_chunks == []
    with torch.no_grad():
        moe_ffn(x, ids, w, w1, w2, activation="gelu")
    assert small_chunks == [16]
    y = moe_ffn(x, ids, w, w1.requires_grad_(), w2, activation="gelu")
    assert small_chunks == [16] and y.requires_grad

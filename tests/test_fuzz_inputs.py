"""Bad input, fuzzed (issue 18, item 5): ``moe_ffn`` on generated wrong or odd input (the layers:
``test_fuzz_layers.py``; shared pieces: ``fuzz_common.py``).

A case starts from a valid call and applies what hypothesis draws:

* at most one *error*: a wrong dtype, shape or device (``meta``), something that is not
  a tensor, expert ids out of range (negative or ``>= E``), ``k > E``, a bad
  ``block_size``. The call must raise ``ValueError``/``TypeError`` and the message
  must name the argument (as a word) and say what it got;
* any number of *valid oddities*: non-contiguous layouts (transposed storage, every
  other element, a storage offset), overlapping tensors (stride-0 expansions), NaN
  and Inf in the inputs and the weights, repeated ids, zero-size dimensions. The
  result must equal the float64 reference, forward and every gradient, with every
  NaN/Inf where the reference has one (so a NaN token poisons its own row and the
  weights it touched, nothing else).

Anything else (another exception, a crash, a silently wrong number) fails. The
examples are derandomized in CI (conftest's ``ci`` profile) and ten times as many
under ``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from fuzz_common import (  # noqa: F401 (one_thread: an autouse fixture, active where imported)
    BAD_DTYPES, CPU_BACKENDS, FAST_BACKENDS, LAYOUTS, assert_same_values, assert_token_grads, check_message, event,
    lay_out, one_thread,
)
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import MoEConfig, dMoE, moe_ffn
from blocksparse_moe.reference import moe_ffn_dense

# The interpreter's numpy matmul warns on the NaN/Inf the cases put in on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# --------------------------------------------------------------------------- moe_ffn cases
ERRORS_FFN = (
    "dtype", "ids_dtype", "shape", "device", "not_tensor", "ids_range", "k_gt_E", "block_size",
)  # fmt: skip

@dataclass
class FfnCase:
    T: int
    E: int
    k: int
    H: int
    ffn: int
    glu: bool
    activation: str
    backend: str
    block_size: object = 16
    seed: int = 0
    layouts: dict = field(default_factory=dict)  # argument -> layout
    poison: list = field(default_factory=list)  # (argument, index tuple, value)
    repeat_ids: bool = False
    error: tuple | None = None  # (kind, argument, detail)


@st.composite
def ffn_cases(draw, backends):
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, E))
    case = FfnCase(
        T=draw(st.sampled_from([0, 1, 2, 7, 19])),
        E=E,
        k=k,
        H=draw(st.sampled_from([0, 1, 5, 16])) if draw(st.booleans()) else 16,
        ffn=draw(st.sampled_from([1, 7, 24])),
        glu=draw(st.booleans()),
        activation=draw(st.sampled_from(["gelu", "silu", "relu", "gelu_tanh"])),
        backend=draw(st.sampled_from(backends)),
        seed=draw(st.integers(0, 2**16)),
    )
    names = ["x", "expert_ids", "weights", "w1", "w2"] + (["v1"] if case.glu else [])
    for n in names:
        case.layouts[n] = draw(st.sampled_from(LAYOUTS))
    case.repeat_ids = draw(st.booleans()) and case.k > 1
    shapes = ffn_shapes(case)
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.sampled_from([n for n in names if n != "expert_ids"]))
        if 0 in shapes[n]:
            continue
        idx = tuple(draw(st.integers(0, s - 1)) for s in shapes[n])
        case.poison.append((n, idx, draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(ERRORS_FFN))
        arg = draw(st.sampled_from(names if kind in ("dtype", "shape", "device", "not_tensor") else ["expert_ids"]))
        if kind == "dtype" and arg == "expert_ids":
            kind = "ids_dtype"
        if kind == "ids_dtype":
            detail = draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))
        elif kind == "dtype":
            detail = draw(st.sampled_from(BAD_DTYPES + ((torch.float16,) if arg != "weights" else ())))
        elif kind == "shape":
            detail = draw(st.sampled_from(["more", "less", "fewer_dims", "more_dims"]))
        elif kind == "device":
            detail = "meta"
        elif kind == "not_tensor":
            detail = draw(st.sampled_from(["list", "none", "numpy"]))
        elif kind == "ids_range":
            detail = draw(st.sampled_from([-1, -(2**40), case.E, case.E + 7]))
            if case.T == 0:
                kind = None  # no id to put out of range
        elif kind == "k_gt_E":
            detail = case.E + draw(st.integers(1, 3))
        else:  # block_size
            detail = draw(st.sampled_from([0, 8, 48, 256, True, "16", None]))
            arg = "block_size"
        if kind is not None:
            case.error = (kind, arg, detail)
    return case


def ffn_shapes(case: FfnCase) -> dict:
    T, E, k, H, F = case.T, case.E, case.k, case.H, case.ffn
    return {"x": (T, H), "expert_ids": (T, k), "weights": (T, k), "w1": (E, H, F), "w2": (E, F, H), "v1": (E, H, F)}


def ffn_values(case: FfnCase) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    T, E, k, H, F = case.T, case.E, case.k, case.H, case.ffn
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices if T else torch.empty(0, k, dtype=torch.long)
    if case.repeat_ids:
        ids[:, 1] = ids[:, 0]  # a token that picks one expert twice counts twice
    vals = {
        "x": torch.randn(T, H, generator=g),
        "expert_ids": ids,
        "weights": torch.rand(T, k, generator=g),
        "w1": torch.randn(E, H, F, generator=g) / max(H, 1) ** 0.5,
        "w2": torch.randn(E, F, H, generator=g) / F**0.5,
    }
    if case.glu:
        vals["v1"] = torch.randn(E, H, F, generator=g) / max(H, 1) ** 0.5
    return vals


def _wrong_shape(t: torch.Tensor, detail: str) -> torch.Tensor:
    if detail == "more":
        return torch.cat([t, t[..., :1] if t.shape[-1] else torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)], dim=-1)
    if detail == "less":
        if t.shape[-1] == 0:
            return torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)
        return t[..., :-1]
    if detail == "fewer_dims":
        return t.reshape(-1) if t.dim() > 1 else t.reshape(())
    return t.unsqueeze(0)


def apply_error(case: FfnCase, args: dict, kwargs: dict) -> tuple[str, ...]:
    """Break the call as ``case.error`` says; returns the names an error message may name."""
    kind, arg, detail = case.error
    if kind == "dtype":
        args[arg] = args[arg].detach().to(detail)
        # a float16 weight against float32 x is reported as the pair
        return (arg,) if detail != torch.float16 else (arg, "x")
    if kind == "ids_dtype":
        args[arg] = args[arg].to(detail)
        return (arg,)
    if kind == "shape":
        args[arg] = _wrong_shape(args[arg].detach(), detail)
        # A size that no longer matches another argument's is that pair's mismatch.
        partners = {"x": ("w1", "expert_ids"), "expert_ids": ("x", "weights"), "weights": ("expert_ids",),
                    "w1": ("x", "w2", "v1"), "w2": ("w1",), "v1": ("w1",)}  # fmt: skip
        return (arg, *partners[arg])
    if kind == "device":
        args[arg] = args[arg].detach().to("meta")
        return (arg, "x")
    if kind == "not_tensor":
        t = args[arg].detach()
        args[arg] = {"list": t.tolist(), "none": None, "numpy": t.numpy()}[detail]
        if detail == "none" and arg == "v1":
            case.error = None  # v1=None is the MLP: valid
            return ()
        return (arg,)
    if kind == "ids_range":
        ids = args["expert_ids"].detach().clone()
        ids[0, 0] = detail
        args["expert_ids"] = ids
        return ("expert_ids",)
    if kind == "k_gt_E":
        T = args["x"].shape[0]
        args["expert_ids"] = torch.zeros(T, detail, dtype=torch.long)
        args["weights"] = torch.rand(T, detail)
        return ("expert_ids", "top_k")
    if kind == "block_size":
        kwargs["block_size"] = detail
        return ("block_size",)
    raise ValueError(kind)


def run_ffn_case(case: FfnCase) -> None:
    event(f"backend {case.backend}")
    event(f"error {case.error[0] if case.error else None}")
    event(f"poisoned {bool(case.poison)}")
    vals = ffn_values(case)
    for name, idx, v in case.poison:
        vals[name][idx] = v
    storages, views = {}, {}
    for name, t in vals.items():
        storages[name], views[name] = lay_out(t, case.layouts[name])
    ours = {n: s.clone().requires_grad_(s.is_floating_point()) for n, s in storages.items()}
    args = {n: views[n](s) for n, s in ours.items()}
    kwargs = dict(activation=case.activation, block_size=case.block_size, backend=case.backend)
    if case.error is not None:
        names = apply_error(case, args, kwargs)
        if case.error is not None:
            with pytest.raises((ValueError, TypeError)) as info:
                moe_ffn(args["x"], args["expert_ids"], args["weights"], args["w1"], args["w2"], args.get("v1"), **kwargs)
            check_message(info.value, names)
            return
    for t in args.values():
        if t is not None and t.requires_grad:
            t.retain_grad()  # the gradient of each argument as passed (a view of its storage)
    y = moe_ffn(args["x"], args["expert_ids"], args["weights"], args["w1"], args["w2"], args.get("v1"), **kwargs)
    # The oracle gets what the call got: an argument the case set to None (v1: the MLP) is None there too.
    oracle = {n: s.detach().double().requires_grad_(s.is_floating_point()) for n, s in ours.items()
              if args.get(n) is not None}  # fmt: skip
    o = {n: views[n](s) for n, s in oracle.items()}
    for t in o.values():
        if t.requires_grad:
            t.retain_grad()
    y_ref = moe_ffn_dense(o["x"], o["expert_ids"], o["weights"], o["w1"], o["w2"], o.get("v1"), case.activation)
    y_ref = y_ref + sum(0.0 * torch.nan_to_num(t, 0.0, 0.0, 0.0).sum() for t in o.values() if t.requires_grad)
    assert_same_values(y, y_ref, "output")
    if case.poison and all(n in ("x", "weights") for n, _, _ in case.poison) and case.layouts["x"] != "expanded" and (
        case.layouts["weights"] != "expanded"
    ):
        poisoned_tokens = {idx[0] for _, idx, _ in case.poison}
        bad_rows = set((~torch.isfinite(y.detach())).any(-1).nonzero().flatten().tolist())
        assert bad_rows <= poisoned_tokens, f"NaN/Inf left its token: rows {bad_rows}, poisoned {poisoned_tokens}"
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    bad_tokens = ~torch.isfinite(y_ref.detach()).all(-1) if y_ref.shape[1] else torch.zeros(y_ref.shape[0], dtype=torch.bool)
    for n, t in args.items():
        if t is None or not t.requires_grad:
            continue
        if n in ("x", "weights"):
            assert_token_grads(t.grad, o[n].grad, bad_tokens, f"grad {n}")
        else:  # an expert's weights are touched by its tokens: NaN/Inf ones make it lenient
            touched = torch.zeros(case.E, dtype=torch.bool)
            touched[vals["expert_ids"][bad_tokens].reshape(-1)] = True
            assert_token_grads(t.grad, o[n].grad, touched, f"grad {n}")

@settings(max_examples=examples(100))
@given(case=ffn_cases(FAST_BACKENDS))
def test_fuzz_moe_ffn(case):
    run_ffn_case(case)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton needs TRITON_INTERPRET=1 on a CPU")
@settings(max_examples=examples(12))
@given(case=ffn_cases(["triton"]))
def test_fuzz_moe_ffn_triton(case):
    run_ffn_case(case)


def _every_error() -> list[tuple]:
    """Every (kind, argument, detail) the strategy can draw, for one systematic pass."""
    out = []
    names = ["x", "expert_ids", "weights", "w1", "w2", "v1"]
    for arg in names:
        if arg != "expert_ids":
            out += [("dtype", arg, d) for d in BAD_DTYPES + ((torch.float16,) if arg != "weights" else ())]
        out += [("shape", arg, d) for d in ("more", "less", "fewer_dims", "more_dims")]
        out += [("device", arg, "meta")]
        out += [("not_tensor", arg, d) for d in ("list", "none", "numpy") if (arg, d) != ("v1", "none")]
    out += [("ids_dtype", "expert_ids", d) for d in (torch.float32, torch.bool, torch.complex64)]
    out += [("ids_range", "expert_ids", d) for d in (-1, -(2**40), 3, 10)]
    out += [("k_gt_E", "expert_ids", d) for d in (4, 6)]
    out += [("block_size", "block_size", d) for d in (0, 8, 48, 256, True, "16", None, 16.5)]
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error", _every_error(), ids=lambda e: f"{e[0]}-{e[1]}-{e[2]}")
def test_each_error(backend, error):
    """The strategy's errors one by one on one valid call (T=7, E=3, k=2, GLU): each is raised, and named."""
    run_ffn_case(FfnCase(T=7, E=3, k=2, H=16, ffn=24, glu=True, activation="silu", backend=backend,
                         layouts=dict.fromkeys(["x", "expert_ids", "weights", "w1", "w2", "v1"], "contiguous"),
                         error=error))  # fmt: skip


# --------------------------------------------------------------------------- regressions and known gaps
def _small_args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(
        x=torch.randn(6, 8, generator=g), expert_ids=torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]]),
        weights=torch.rand(6, 2, generator=g), w1=torch.randn(3, 8, 12, generator=g), w2=torch.randn(3, 12, 8, generator=g),
    )  # fmt: skip
    a.update(over)
    return a


@pytest.mark.parametrize("backend", ["torch", "triton", "grouped"])
def test_float_block_size_is_rejected(backend):
    """block_size=16.0 equals 16, so `in SUPPORTED_BLOCK_SIZES` let it through to the index arithmetic:
    a TypeError from F.pad (torch) or a RuntimeError from the custom op's schema (triton). Found by the fuzz."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} does not run here")
    with pytest.raises(ValueError, match=r"block_size must be one of \(16, 32, 64, 128\), got 16.0"):
        moe_ffn(**_small_args(), block_size=16.0, backend=backend)
    assert moe_ffn(**_small_args(), block_size=np.int64(16), backend=backend).shape == (6, 8)  # an integer type


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_everything_on_meta(backend):
    """All arguments on the meta device: a meta result of the right shape, or (torch backend, which
    reads the counts back) a ValueError naming the backend; it crashed with NotImplementedError."""
    args = {n: t.to("meta") for n, t in _small_args().items()}
    if backend == "torch":
        with pytest.raises(ValueError, match=r"backend='torch' .* meta"):
            moe_ffn(**args, block_size=16, backend=backend)
        layer = dMoE(MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=3, block_size=16, backend=backend, device="meta"))
        with pytest.raises(ValueError, match=r"backend='torch' .* meta"):
            layer(torch.randn(4, 8, device="meta"))
        return
    y = moe_ffn(**args, block_size=16, backend=backend)
    assert y.device.type == "meta" and y.shape == (6, 8)


# Gaps the fuzz found, fixed in check_ffn_args and the layer's _check_input.
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_sparse_weight_is_rejected(backend):
    with pytest.raises(TypeError, match=r"\bw1\b.*(strided|dense|layout)"):
        moe_ffn(**_small_args(w1=torch.randn(3, 8, 12).to_sparse()), block_size=16, backend=backend)


def test_sparse_x_is_rejected():
    layer = dMoE(MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=3, block_size=16))
    with pytest.raises(TypeError, match=r"\bx\b.*(strided|dense|layout)"):
        layer(torch.randn(4, 8).to_sparse())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", ["ffn=0", "E=0"])
def test_empty_expert_dims_name_w1(backend, shape):
    E, F = (3, 0) if shape == "ffn=0" else (0, 12)
    args = _small_args(w1=torch.randn(E, 8, F), w2=torch.randn(E, F, 8))
    with pytest.raises(ValueError, match=r"\bw1\b"):
        moe_ffn(**args, block_size=16, backend=backend)

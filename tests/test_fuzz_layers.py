"""Bad input, fuzzed (issue 18, item 5): ``dMoE`` and ``MoE`` on generated wrong or odd input.

The layer half of ``test_fuzz_inputs.py`` (whose docstring says what a case is and what
must hold): a case builds a small layer, feeds it input in a drawn layout with drawn
NaN/Inf poison (in the input or in a parameter) and at most one drawn error, and holds
the output and every gradient to the float64 reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from fuzz_common import (  # noqa: F401 (one_thread: an autouse fixture, active where imported)
    BAD_DTYPES, CPU_BACKENDS, FAST_BACKENDS, LAYOUTS, ROUTER_TOL, TOL, assert_same_values, assert_token_grads,
    check_message, event, lay_out, one_thread,
)
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layers import kept_by_position, make_layer, reference

from blocksparse_moe import MoE, dMoE

# The interpreter's numpy matmul warns on the NaN/Inf the cases put in on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# --------------------------------------------------------------------------- layers
ERRORS_LAYER = ("dtype", "shape", "device", "not_tensor", "return_aux")


@dataclass
class LayerCase:
    cls: type
    backend: str
    glu: bool
    k: int
    batch: tuple
    layout: str
    seed: int
    poison_x: list = field(default_factory=list)  # (flat token, hidden index, value)
    poison_param: tuple | None = None  # (parameter, index, value)
    error: tuple | None = None


@st.composite
def layer_cases(draw, backends):
    cls = draw(st.sampled_from([dMoE, MoE]))
    case = LayerCase(
        cls=cls,
        backend=draw(st.sampled_from(backends)) if cls is dMoE else "torch",
        glu=draw(st.booleans()),
        k=draw(st.integers(1, 4)),
        batch=draw(st.sampled_from([(0,), (1,), (13,), (2, 0), (2, 5), (3, 1, 4)])),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )
    T = int(np.prod(case.batch))
    if T:
        for _ in range(draw(st.integers(0, 2))):
            case.poison_x.append((draw(st.integers(0, T - 1)), draw(st.integers(0, 15)),
                                  draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))))  # fmt: skip
    if draw(st.integers(0, 4)) == 0:
        p = draw(st.sampled_from(["w1", "w2", "router.weight"] + (["v1"] if case.glu else [])))
        case.poison_param = (p, draw(st.integers(0, 3)), float("nan"))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(ERRORS_LAYER))
        if kind == "dtype":
            detail = draw(st.sampled_from(BAD_DTYPES + (torch.float16, torch.bfloat16)))
        elif kind == "shape":
            detail = draw(st.sampled_from(["more", "less", "scalar"]))
        elif kind == "device":
            detail = "meta"
        elif kind == "not_tensor":
            detail = draw(st.sampled_from(["list", "none", "numpy"]))
        else:
            detail = draw(st.sampled_from(["yes", 1, None]))
        case.error = (kind, detail)
    return case


def make_fuzz_layer(case: LayerCase):
    layer = make_layer(case.cls, H=16, ffn=24, E=4, k=case.k, bs=16, glu=case.glu, activation="silu" if case.glu else "gelu",
                       seed=case.seed, **({"backend": case.backend} if case.cls is dMoE else {}))  # fmt: skip
    if case.poison_param is not None:
        name, e, v = case.poison_param
        with torch.no_grad():
            p = layer.get_parameter(name)
            p[e].view(-1)[case.seed % p[e].numel()] = v
    return layer


def run_layer_case(case: LayerCase) -> None:
    event(f"{case.cls.__name__} {case.backend}")
    event(f"error {case.error[0] if case.error else None}")
    event(f"poisoned x {bool(case.poison_x)}, param {case.poison_param is not None}")
    layer = make_fuzz_layer(case)
    g = torch.Generator().manual_seed(case.seed + 2)
    values = torch.randn(*case.batch, 16, generator=g)
    flat = values.view(-1, 16)
    for t, h, v in case.poison_x:
        flat[t, h] = v
    storage, view = lay_out(values, case.layout)
    storage.requires_grad_()
    x = view(storage)
    x.retain_grad()  # the gradient of the view itself, what the oracle's x leaf gets
    if case.error is not None:
        kind, detail = case.error
        kwargs = {}
        if kind == "dtype":
            x = x.detach().to(detail)
        elif kind == "shape":
            x = {"more": torch.randn(*case.batch, 17), "less": torch.randn(*case.batch, 15), "scalar": torch.tensor(1.0)}[detail]
        elif kind == "device":
            x = x.detach().to("meta")
        elif kind == "not_tensor":
            x = {"list": x.tolist(), "none": None, "numpy": x.detach().numpy()}[detail]
        else:
            kwargs["return_aux"] = detail
        with pytest.raises((ValueError, TypeError)) as info:
            layer(x, **kwargs)
        check_message(info.value, ("return_aux",) if kind == "return_aux" else ("x",))
        return
    out, aux = layer(x, return_aux=True)
    T = flat.shape[0]
    assert out.shape == x.shape
    keep = kept_by_position(aux.expert_ids, layer.config.capacity(T)) if case.cls is MoE else None
    ref, lb, z, leaves = reference(layer, x, aux.expert_ids, keep)
    assert_same_values(out, ref, "output")
    if T == 0:
        assert float(aux.load_balancing_loss.detach()) == 0.0 and float(aux.z_loss.detach()) == 0.0
        loss_ref = (ref * 0).sum()
    else:
        assert_same_values(aux.load_balancing_loss, lb, "load_balancing_loss")
        assert_same_values(aux.z_loss, z, "z_loss")
        loss_ref = lb + z
    if case.poison_x and case.poison_param is None and case.layout != "expanded":
        bad_rows = set((~torch.isfinite(out.detach().reshape(T, 16))).any(-1).nonzero().flatten().tolist())
        assert bad_rows <= {t for t, _, _ in case.poison_x}, "NaN/Inf left its token"
    dy = torch.randn(out.shape, generator=g)
    ((out * dy).sum() + aux.loss).backward()
    # The oracle's x leaf is a float64 copy of the view: its gradient goes back through the same view.
    tie = sum(0.0 * torch.nan_to_num(leaf, 0.0, 0.0, 0.0).sum() for leaf in leaves.values())  # zero grads, not None
    ((ref * dy.double()).sum() + loss_ref + tie).backward()
    bad = ~torch.isfinite(ref.detach().reshape(T, 16)).all(-1)
    assert_token_grads(x.grad.reshape(T, 16), leaves["x"].grad.reshape(T, 16), bad, "grad x")
    # MoE runs every expert over its whole capacity buffer, empty rows included: a NaN weight of
    # expert e times those zero rows is NaN, so the gradients of e's own w1/w2/v1 may be NaN where the
    # (dropless) reference, for which an expert without tokens computes nothing, has zeros. Only e's.
    nan_expert = case.poison_param[1] if case.cls is MoE and case.poison_param and case.poison_param[0] != "router.weight" else None
    touched = torch.zeros(4, dtype=torch.bool)
    touched[aux.expert_ids.cpu()[bad].reshape(-1)] = True
    for name, p in layer.named_parameters():
        if name in leaves:
            tol = ROUTER_TOL if name == "router.weight" else TOL
            if name == "router.weight":  # every token's gradient meets in it
                assert_token_grads(p.grad[None], leaves[name].grad[None], bad.any()[None], f"grad {name}", tol)
            elif nan_expert is not None:
                others = [e for e in range(p.shape[0]) if e != nan_expert]
                assert_token_grads(p.grad[others], leaves[name].grad[others], touched[others], f"grad {name}", tol)
                assert_same_values(p.grad[nan_expert], leaves[name].grad[nan_expert], f"grad {name}[{nan_expert}]", tol,
                                   extra_nan_ok=True)  # fmt: skip
            else:
                assert_token_grads(p.grad, leaves[name].grad, touched, f"grad {name}", tol)


@settings(max_examples=examples(60))
@given(case=layer_cases(FAST_BACKENDS))
def test_fuzz_layers(case):
    run_layer_case(case)


def _every_layer_error() -> list[tuple]:
    out = [("dtype", d) for d in BAD_DTYPES + (torch.float16, torch.bfloat16)]
    out += [("shape", d) for d in ("more", "less", "scalar")] + [("device", "meta")]
    out += [("not_tensor", d) for d in ("list", "none", "numpy")] + [("return_aux", d) for d in ("yes", 1, None)]
    return out


@pytest.mark.parametrize("cls_backend", [(dMoE, b) for b in CPU_BACKENDS] + [(MoE, "torch")], ids=lambda c: f"{c[0].__name__}-{c[1]}")
@pytest.mark.parametrize("error", _every_layer_error(), ids=lambda e: f"{e[0]}-{e[1]}")
def test_each_layer_error(cls_backend, error):
    cls, backend = cls_backend
    run_layer_case(LayerCase(cls=cls, backend=backend, glu=True, k=2, batch=(2, 5), layout="contiguous", seed=0, error=error))

"""``backend="auto"`` on CUDA follows the measured table (``backends/measured_layers.json``), and the table follows the results files.

No GPU is needed: the CUDA device's capability is monkeypatched, and ``resolve_backend``
reads nothing else from it. Checked: the committed table is exactly what
``benchmarks.auto_table`` builds from the committed results files (a hand edit or a
results file added without regenerating fails here); the committed H100 choices per
shape; the nearest-shape rule; the rule where nothing is measured (another architecture,
another dtype, no shape); that a backend is picked only where it can run (``grouped`` only
for bf16 on sm_90+, ``persistent`` only for a SwiGLU call); and the generator's handling
of routings, repeated files, CPU and smoke files, failed records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import auto_table
from blocksparse_moe.backends import measured, select
from blocksparse_moe.backends.measured import LayerTiming, nearest_timing

CUDA = torch.device("cuda")
BF16 = torch.bfloat16
# (experts, ffn, hidden, top_k, glu) of the committed H100 layer shapes
MIXTRAL = (8, 14336, 4096, 2, True)
FINE = (128, 768, 2048, 8, True)
MB_MEDIUM = (64, 4096, 1024, 1, False)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of a given capability, as far as ``select`` can tell; returns the setter."""

    def set_capability(major: int, minor: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    set_capability(9, 0)
    return set_capability


def auto(shape, dtype=BF16, persistent_ok=False):
    E, F, H, k, glu = shape
    return select.resolve_backend("auto", CUDA, dtype, E, F, hidden=H, top_k=k, glu=glu, persistent_ok=persistent_ok)


def test_committed_table_is_regenerated_from_the_results_files(tmp_path):
    out = tmp_path / "measured.json"
    auto_table.main(["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(measured.MEASURED_PATH.read_text()), (
        "blocksparse_moe/backends/measured_layers.json is stale: run python -m benchmarks.auto_table"
    )


def test_h100_choices_per_shape(gpu):
    # benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-22-layers*.json: grouped_mm wins but at E=128 fine-grained
    assert auto(MIXTRAL) == "grouped"
    assert auto(MB_MEDIUM) == "grouped"
    assert auto(FINE) == "triton"
    assert auto(FINE, persistent_ok=True) == "triton"  # no GPU has timed persistent: never picked on a guess
    gpu(9, 0)  # H200 is sm_90 too: the same table
    assert auto((128, 1024, 2048, 8, True)) == "triton"  # nearest the fine-grained shape
    assert auto((96, 768, 2048, 6, True)) == "triton"
    assert auto((16, 6144, 4096, 2, True)) == "grouped"  # nearest Mixtral / the E=16 shape


def test_rule_where_nothing_is_measured(gpu):
    assert auto(FINE, dtype=torch.float16) == "triton"  # fp16: grouped_mm's fallback loop syncs
    assert select.resolve_backend("auto", CUDA, BF16) == "grouped"  # no shape given
    gpu(10, 0)  # sm_100 has no timing: the bf16 rule
    assert auto(FINE) == "grouped"
    gpu(8, 0)  # A100: grouped_mm is the host-sync fallback there
    assert auto(MIXTRAL) == "triton"
    assert select.resolve_backend("auto", torch.device("cpu"), BF16, 8, 64) == "grouped"


def _table(*timings):
    return lambda: tuple(LayerTiming(90, "bfloat16", *t, source="test") for t in timings)


def test_only_backends_that_can_run_are_picked(gpu, monkeypatch):
    monkeypatch.setattr(select, "load_timings", _table((8, 1024, 1024, 2, True, (("grouped", 1.0),
                                                         ("persistent", 0.5), ("triton", 2.0)))))  # fmt: skip
    shape = (8, 1024, 1024, 2, True)
    assert auto(shape, persistent_ok=True) == "persistent"
    assert auto(shape, persistent_ok=False) == "grouped"  # not SwiGLU, or padded: the next fastest
    gpu(9, 0)
    assert auto(shape, dtype=torch.float16) == "triton"  # no fp16 timing: the rule
    monkeypatch.setattr(select, "load_timings", _table((8, 1024, 1024, 2, True, (("grouped", 1.0),))))
    gpu(9, 0)
    assert auto(shape) == "grouped"


def test_nearest_shape_and_glu_tie_break():
    a = LayerTiming(90, "bfloat16", 8, 4096, 14336, 2, True, (("grouped", 1.0),), "a")
    b = LayerTiming(90, "bfloat16", 128, 2048, 768, 8, True, (("triton", 1.0),), "b")
    c = LayerTiming(90, "bfloat16", 128, 2048, 768, 8, False, (("grouped", 1.0),), "c")
    other = LayerTiming(80, "bfloat16", 64, 2048, 768, 8, True, (("triton", 1.0),), "d")
    ts = (a, c, b, other)
    assert nearest_timing(ts, 90, "bfloat16", 64, 1024, 2048, 8, glu=True) is b
    assert nearest_timing(ts, 90, "bfloat16", 64, 1024, 2048, 8, glu=False) is c
    assert nearest_timing(ts, 90, "bfloat16", 16, 8192, None, None) is a  # unknown sizes add nothing
    assert nearest_timing(ts, 90, "float16", 8, 14336) is None
    assert nearest_timing(ts, 100, "bfloat16", 8, 14336) is None


# --------------------------------------------------------------------------- the generator
def _env(**kw):
    return dict(device="cuda", compute_capability="9.0", dtype="bfloat16", triton_interpret=False, **kw)


def _layer_suite(ms: dict, routings=("uniform", "skewed"), env=None):
    shape = dict(name="s", experts=8, hidden=64, ffn=128, top_k=2, glu=True)
    recs = [dict(shape=shape, routing=r, backend="triton",
                 impls={"dmoe": dict(status="ok", median_ms=ms["triton"][i]),
                        "grouped_mm": dict(status="ok", median_ms=ms["grouped"][i]),
                        "moe_cf1.25": dict(status="ok", median_ms=0.1),  # not a backend: never a candidate
                        "dmoe_torch": dict(status="unsupported")})
            for i, r in enumerate(routings)]  # fmt: skip
    return dict(env=env or _env(), layers=recs)


def _persistent_layer(ms: dict, env=None, error_impl=None):
    recs = []
    for impl, t in ms.items():
        rec = dict(routing="uniform", impl=impl, dtype="bfloat16", experts=8, hidden=64, ffn=128, top_k=2,
                   fwd_bwd=dict(median_ms=t))  # fmt: skip
        if impl == error_impl:
            rec["mismatch"] = True
        recs.append(rec)
    return dict(env=env or _env(smoke=False), results=recs)


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_generator_routings_files_and_candidates(tmp_path):
    suite = _write(tmp_path, "a.json", _layer_suite(dict(triton=[4.0, 6.0], grouped=[3.0, 9.0])))
    (t,) = auto_table.build_table(auto_table.timings_from(suite))
    assert dict(t.ms) == {"triton": 5.0, "grouped": 6.0}  # means over both routings: triton wins on the mean
    assert (t.arch, t.experts, t.hidden, t.ffn, t.top_k, t.glu) == (90, 8, 64, 128, 2, True)
    # a later persistent-layer file at the same shape: uniform only is comparable now, and its grouped replaces
    pers = _write(tmp_path, "b.json", _persistent_layer(dict(grouped=2.0, persistent=1.5, triton=8.0)))
    (t,) = auto_table.build_table(auto_table.timings_from(suite) + auto_table.timings_from(pers))
    assert dict(t.ms) == {"triton": 8.0, "grouped": 2.0, "persistent": 1.5}
    assert t.fastest({"triton", "grouped", "persistent"}) == "persistent"
    bad = _write(tmp_path, "c.json", _persistent_layer(dict(grouped=2.0, persistent=0.1), error_impl="persistent"))
    (t,) = auto_table.build_table(auto_table.timings_from(bad))
    assert dict(t.ms) == {"grouped": 2.0}  # a wrong answer is no candidate, however fast


def test_generator_skips_cpu_and_smoke_runs(tmp_path):
    cpu = _write(tmp_path, "cpu.json", _layer_suite(dict(triton=[1, 1], grouped=[2, 2]), env=dict(device="cpu")))
    smoke = _write(tmp_path, "smoke.json", _persistent_layer(dict(grouped=1.0), env=_env(smoke=True)))
    interp = _write(tmp_path, "i.json", _layer_suite(dict(triton=[1, 1], grouped=[2, 2]),
                                                     env=dict(_env(), triton_interpret=True)))  # fmt: skip
    assert auto_table.timings_from(cpu) == auto_table.timings_from(smoke) == auto_table.timings_from(interp) == []
    out = tmp_path / "t.json"
    auto_table.main([str(cpu), str(smoke), "--out", str(out)])
    assert json.loads(out.read_text())["timings"] == []


def test_schema_is_checked(tmp_path):
    p = _write(tmp_path, "m.json", dict(schema="other/0", timings=[]))
    with pytest.raises(ValueError, match="schema must be 'blocksparse-moe-auto/1'"):
        measured.load_timings(p)

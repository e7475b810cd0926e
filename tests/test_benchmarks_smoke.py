"""CI smoke test of the benchmark suite: ``python -m benchmarks --smoke`` in a temporary directory.

It runs the smallest shapes end to end (about 20 s on a CPU: the Triton kernels
through the interpreter, checked but not timed), then checks that the results file
has the documented keys and that no implementation of this library failed its
correctness check, and that the report renders the tables (and plots when
matplotlib is installed) without touching the repository's own results or docs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

PRODUCTS = {"fwd_sdd", "fwd_dsd", "bwd_sdd", "bwd_dsd", "bwd_dsd_t_w2", "bwd_dsd_t_w1"}
LAYER_VARIANTS = {
    "dmoe", "dmoe_grouped", "dmoe_triton", "dmoe_torch", "moe_cf1.0", "moe_cf1.25", "moe_cf2.0", "expert_loop", "grouped_mm",
}  # fmt: skip
STATUSES = {"ok", "checked", "failed", "error", "unsupported", "skipped"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--no-report", "--quiet", "--strict"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"benchmarks --smoke failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one results file in {out}, got {files}\n{proc.stderr}"
    assert files[0].name.endswith("-smoke.json")
    return out, files[0], json.loads(files[0].read_text())


def test_results_file_has_the_documented_keys(smoke_run):
    _, _, data = smoke_run
    assert data["schema"] == "blocksparse-moe-bench/1"
    assert data["suite"] == "smoke"
    for key in ("created", "argv", "wall_s", "env", "timer", "settings", "kernels", "layers", "summary"):
        assert key in data, key
    for key in ("device", "device_name", "torch", "triton", "stk", "git_sha", "dtype", "timer", "grouped_mm"):
        assert key in data["env"], key
    assert data["wall_s"] < 120


def test_kernel_records_cover_every_product_and_pass_their_checks(smoke_run):
    _, _, data = smoke_run
    recs = data["kernels"]
    assert {r["product"] for r in recs} == PRODUCTS
    assert {r["routing"] for r in recs} == {"uniform", "skewed"}
    for r in recs:
        for key in ("shape", "useful_flops", "computed_flops", "padding", "load", "impls"):
            assert key in r, key
        assert r["useful_flops"] == 2 * r["rows"] * r["shape"]["hidden"] * r["shape"]["ffn"]
        assert r["padding"] >= 1.0
        for impl, v in r["impls"].items():
            assert v["status"] in STATUSES, (impl, v)
            assert v["status"] != "failed", f"{r['shape']['name']} {r['product']} {impl}: {v.get('error')}"
            if v["status"] == "ok":
                assert v["median_ms"] > 0 and v["q20_ms"] <= v["median_ms"] <= v["q80_ms"]
                assert v["repeat_median_ms"] > 0 and v["check"]["ok"]
        assert r["impls"]["bsmoe_triton"]["status"] in ("ok", "checked"), r["impls"]["bsmoe_triton"]
        assert r["impls"]["dense"]["status"] == "ok"
        assert r["impls"]["dense"]["ratio_to_dense"] == pytest.approx(1.0)


def test_layer_records_pass_their_checks(smoke_run):
    _, _, data = smoke_run
    recs = data["layers"]
    assert recs
    for r in recs:
        assert set(r["impls"]) == LAYER_VARIANTS
        for name, v in r["impls"].items():
            assert v["status"] != "failed", f"{name}: {v.get('error')}"
        # on the CPU: auto is grouped, the torch block reference is timed beside it, Triton is not
        assert r["impls"]["dmoe"]["backend"] == "grouped" and r["impls"]["dmoe_grouped"]["status"] == "unsupported"
        for name in ("dmoe", "dmoe_torch", "moe_cf1.0", "moe_cf1.25", "moe_cf2.0", "expert_loop"):
            v = r["impls"][name]
            assert v["status"] == "ok", (name, v)
            assert v["tokens_per_s"] > 0 and v["padding_rows"] > 0
        assert r["impls"]["dmoe"]["dropped_assignments"] == 0
        assert r["impls"]["dmoe"]["padding_rows"] >= 1.0
        drops = [r["impls"][f"moe_cf{f}"]["dropped_assignments"] for f in ("1.0", "1.25", "2.0")]
        assert drops == sorted(drops, reverse=True)  # more capacity never drops more
        ov = r["overheads"]
        assert ov["status"] == "ok" and 0 < ov["routing_topology_share"]
    assert data["summary"]["ours_failed"] == 0


def test_report_renders_tables_and_keeps_the_preamble(smoke_run, tmp_path):
    from benchmarks import report

    out, path, _ = smoke_run
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Hand-written preamble\n\nNo GPU figures exist yet.\n\n" + report.BEGIN + "\nold\n" + report.END + "\n")
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    text = report.render(out, doc=doc, plots_dir=tmp_path, with_plots=has_mpl)
    written = doc.read_text()
    assert written.startswith("# Hand-written preamble\n\nNo GPU figures exist yet.")
    assert "\nold\n" not in written and written.count(report.BEGIN) == 1 and written.count(report.END) == 1
    assert text in written
    assert "#### Kernels" in text and "#### Layers" in text
    if not data_is_gpu(path):
        assert "CPU smoke run" in text
    if has_mpl:
        assert (tmp_path / f"{path.stem}-kernels.png").stat().st_size > 0
        assert (tmp_path / f"{path.stem}-layers.png").stat().st_size > 0


def data_is_gpu(path: Path) -> bool:
    return json.loads(path.read_text())["env"]["device"] == "cuda"


def test_ep_microbatch_benchmark_runs_at_two_ranks(tmp_path):
    """``python -m benchmarks.ep_microbatch`` end to end at the smallest size (a subprocess with a deadline)."""
    out = tmp_path / "mb.json"
    cmd = [sys.executable, "-m", "benchmarks.ep_microbatch", "--ranks", "2", "--tokens", "8", "--hidden", "16",
           "--ffn", "8", "--dense-ffn", "16", "--experts", "4", "--steps", "1", "--warmup", "0", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=170, capture_output=True)
    res = json.loads(out.read_text())["results"]
    assert {"sequential", "block-major", "interleaved"} <= set(res)
    assert res["sequential_over_interleaved"]["median"] > 0


def test_persistent_layer_benchmark_smoke(tmp_path):
    """``python -m benchmarks.persistent_layer --smoke``: every implementation and routing once on the CPU
    (interpreter, fp32), checked against the grouped backend; the results file has what a GPU run reports."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "benchmarks.persistent_layer", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "persistent-layer.json").read_text())
    assert {"device", "torch", "triton", "git_sha"} <= set(data["env"])
    recs = data["results"]
    assert {(r["impl"], r["routing"]) for r in recs} == {
        (i, r) for i in ("grouped", "persistent", "triton") for r in ("uniform", "skewed")
    }
    for r in recs:
        assert "error" not in r, r
        assert r["fwd_bwd"]["median_ms"] > 0 and r["fwd"]["median_ms"] > 0
        assert set(r["memory"]) == {"peak_bytes", "step_peak_bytes"}  # None on the CPU
        if r["impl"] != "grouped":  # fp32: the two implementations agree to rounding
            errs = r["rel_err_vs_grouped"]
            assert set(errs) == {"y", "dx", "dweights", "dw1", "dv1", "dw2"} and max(errs.values()) < 1e-4, errs
    assert {s["impl"] for s in data["env"]["summary"]} == {"grouped", "persistent", "triton"}

"""The cost model (benchmarks/ep_sim.py) in one process: its expected volumes match exact counts of sampled routings.

The exact counter is held to the layer's own statistics in tests/test_parallel_comm.py;
here the expected-value model (which scales to thousands of ranks) is held to the exact
counter on a routing drawn from the same distribution, and the CLI runs end to end.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from benchmarks import ep_sim


@pytest.mark.parametrize("routing", ["uniform", "zipf:1.0"])
def test_expected_volumes_match_an_exact_count(routing):
    shape = ep_sim.Shape("t", experts=16, top_k=3, hidden=8, ffn=8, tokens=3000, elem_bytes=4)
    W, G = 8, 2
    probs = ep_sim.routing_probs(routing, shape.experts)
    model = ep_sim.expected_traffic(shape, W, G, probs, samples=20000)
    ids = [ep_sim.sample_routing(probs, shape.top_k, shape.tokens, seed=1 + r) for r in range(W)]
    owners = [e // (shape.experts // W) for e in range(shape.experts)]
    node_of = [r // G for r in range(W)]
    flat = ep_sim.exact_traffic(ids, owners, 8, 4, node_of=node_of)
    hier = ep_sim.exact_traffic(ids, owners, 8, 4, node_of=node_of, hierarchy="node")
    row = 8 * 4
    got_flat = np.array([r["phase_bytes"]["dispatch"] for r in flat]) / row
    got_cross = np.array([r["cross_node_bytes_sent"] for r in flat]) / row
    got_a = np.array([r["phase_bytes"]["inter_dispatch"] for r in hier]) / row
    got_b = np.array([r["phase_bytes"]["intra_dispatch"] for r in hier]) / row
    f, h = model["flat"], model["hier"]
    np.testing.assert_allclose(got_flat, f["send_remote"], rtol=0.03)
    np.testing.assert_allclose(got_cross, f["send_cross"] + f["recv_cross"], rtol=0.03)
    np.testing.assert_allclose(got_a, h["a_send"], rtol=0.03)
    np.testing.assert_allclose(got_b, h["b_send"], rtol=0.05)
    assert (got_a <= np.array([r["cross_node_bytes_sent"] for r in flat]) / row).all()


def test_cli_table_json_and_plot(tmp_path, capsys):
    # matplotlib is in the [bench] extra, not [test]: the plot is checked only where it is installed.
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    plot = ["--plot", str(tmp_path / "sim.png")] if has_mpl else []
    rows = ep_sim.main(["--shapes", "deepseek-v3", "--gpus", "64,256", "--routing", "uniform", "--samples", "512",
                        "--json", str(tmp_path / "sim.json"), *plot])  # fmt: skip
    assert len(rows) == 2 and json.loads((tmp_path / "sim.json").read_text())
    if has_mpl:
        assert (tmp_path / "sim.png").stat().st_size > 0
    r64 = rows[0]
    assert r64["cross_node_bytes_hier"] < r64["cross_node_bytes_flat"]  # 32 experts per node, k=8: tokens share nodes
    assert "| DeepSeek-V3-like (uniform) | 64 |" in capsys.readouterr().out

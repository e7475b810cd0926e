"""``benchmarks/tile_balance.py``: the DSD^T schedule model behind perf-notes' split-K decision (counts, not timings)."""

from __future__ import annotations

from benchmarks.tile_balance import balance


def test_orders_are_bounded_by_the_ideal_and_snake_helps_under_skew():
    r = balance(4096, 256, 256, 16, 2, "skewed", sms=8)
    assert r["tiles"] == 16 * 2 * 1 and r["tiles_per_sm"] == 4.0
    for order in ("round_robin", "snake", "greedy"):
        assert r[order] >= 1.0, (order, r)
    assert r["greedy"] <= r["snake"] <= r["round_robin"], r
    assert r["max_rows_over_mean"] > 2  # the routing is skewed


def test_equal_tiles_balance_perfectly():
    r = balance(64, 256, 256, 1, 1, "uniform", sms=2)  # one expert, two equal tiles, two programs
    assert r["round_robin"] == r["snake"] == r["greedy"] == 1.0

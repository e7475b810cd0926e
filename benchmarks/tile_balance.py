"""Counts, not timings: how well the persistent DSD^T's schedule balances its tiles, and what split-K could add.

    python -m benchmarks.tile_balance [--sms 132] [--out benchmarks/results/tile-balance.json]

The persistent DSD^T (``kernels/dsd_t_persistent.py``) gives each output tile
(expert ``e`` x a ``bs``-row column block of ffn x ``BLOCK_N`` hidden columns) one
program, whose K loop runs over all of ``e``'s rows. Its schedule puts the heaviest
experts first and hands tiles round-robin to ``min(SMs, tiles)`` programs. With skewed
routing one expert's tiles are long; if they were few and long, the programs holding them
would finish last and split-K (cutting an expert's rows into chunks, summed afterwards)
would pay. This script says whether that happens at the benchmark shapes
(``benchmarks/shapes.py``: the MegaBlocks grid, Mixtral, fine-grained; uniform and
skewed routing from the benchmarks' own ``make_expert_ids``).

Model (stated, so it can be checked against a GPU run later): a tile costs its expert's
rows rounded up to ``BLOCK_K`` plus a fixed ``STORE_ROWS`` (the epilogue's store of a
``bs x BLOCK_N`` tile, counted as that many K rows; an empty expert's tiles cost only
that). Program ``p`` runs tiles ``p, p + P, ...`` of the schedule back to back. Recorded:
``tiles``, ``tiles_per_sm``, and the makespan over the ideal ``total / P`` (1.0 is
perfect; a perfect split-K reaches it, so the ratio is also the most split-K could speed
the product up under this model) for three orders of the same heaviest-first tile list:

``round_robin``  entry ``i * P + p`` to program ``p``;
``snake``        every odd round of ``P`` entries reversed (what program ``p`` got heaviest
                 in one round, it gets lightest in the next): static, deterministic;
``greedy``       each tile to the program that frees first (a dynamic tile counter: needs
                 an atomic, and which program computes a tile then varies run to run).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch

from .common import SCHEMA, _git, now
from .shapes import FINE_GRAINED, MIXTRAL, ROUTINGS, _megablocks_grid, make_expert_ids

BLOCK, BLOCK_N, BLOCK_K = 128, 256, 64  # dsd_t_persistent.default_config at block 128 in bf16
STORE_ROWS = 64  # a 128 x 256 bf16 store ~ the time of one 64-row K step (both ~64 KB through the SM)


def balance(tokens: int, hidden: int, ffn: int, experts: int, top_k: int, routing: str, sms: int, seed: int = 0):
    """The model's figures for one shape and routing (see the module docstring)."""
    ids = make_expert_ids(tokens, experts, top_k, routing, torch.Generator().manual_seed(seed))
    rows = torch.bincount(ids.reshape(-1), minlength=experts)
    per_expert_tiles = -(-ffn // BLOCK) * -(-hidden // BLOCK_N)
    order = torch.argsort(rows, descending=True, stable=True)  # the schedule's expert order
    k_rows = (-(-rows[order] // BLOCK_K) * BLOCK_K).double()
    cost = (k_rows + STORE_ROWS).repeat_interleave(per_expert_tiles)  # schedule order, expert by expert
    tiles = cost.numel()
    programs = min(sms, tiles)
    rounds = torch.cat([cost, cost.new_zeros((-tiles) % programs)]).reshape(-1, programs)  # row i: tiles i*P ..
    snake = rounds.clone()
    snake[1::2] = snake[1::2].flip(1)  # the zero padding of a last odd round moves to its front: costs nothing
    free = [(0.0, p) for p in range(programs)]
    for c in cost.tolist():
        t, p = heapq.heappop(free)
        heapq.heappush(free, (t + c, p))
    ideal = float(cost.sum()) / programs
    ratio = lambda makespan: round(float(makespan) / ideal, 4)  # noqa: E731
    return dict(tiles=tiles, tiles_per_sm=round(tiles / sms, 1),
                max_rows_over_mean=round(float(rows.max()) / float(rows.double().mean()), 3),
                round_robin=ratio(rounds.sum(0).max()), snake=ratio(snake.sum(0).max()),
                greedy=ratio(max(t for t, _ in free)))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="programs of the persistent grid (H100 / H200 SXM: 132)")
    ap.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = ap.parse_args(argv)
    shapes = [MIXTRAL, FINE_GRAINED] + _megablocks_grid()
    recs = []
    for s in shapes:
        for routing in ROUTINGS:
            r = dict(shape=s.name, routing=routing, **balance(s.tokens, s.hidden, s.ffn, s.experts, s.top_k, routing,
                                                             args.sms))  # fmt: skip
            recs.append(r)
            print(f"{s.name:<36} {routing:<8} tiles {r['tiles']:>6} ({r['tiles_per_sm']:>6}/SM)  "
                  f"max/mean rows {r['max_rows_over_mean']:>6}  makespan/ideal: round-robin {r['round_robin']}, "
                  f"snake {r['snake']}, greedy {r['greedy']}")  # fmt: skip
    for order in ("round_robin", "snake", "greedy"):
        worst = max(recs, key=lambda r: r[order])
        print(f"worst {order}: {worst['shape']} {worst['routing']} {worst[order]}")
    if args.out:
        args.out.write_text(json.dumps(dict(schema=SCHEMA, kind="tile-balance", created=now().isoformat(),
                                            git_sha=_git("rev-parse", "HEAD"), argv=sys.argv, model=dict(block=BLOCK, block_n=BLOCK_N, block_k=BLOCK_K,
                                                       store_rows=STORE_ROWS, sms=args.sms), records=recs), indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Exact per-rank traffic of the expert-parallel exchange, counted from the routing alone (no process group).

Given every rank's ``expert_ids`` (the router's top-k choices), the placement and
the node layout, :func:`exact_traffic` counts what each rank's
``ExpertParallelDMoE`` forward moves, by the same definitions as
``AllToAllStats`` (docs/parallel.md, "Traffic"): rows to and from each rank, data
bytes to and from *other* ranks in both data all-to-alls, the part of them that
crosses a node boundary, the routing metadata of the hierarchical path and the
count exchange. It is written independently of the layer (from the routing, not
from the layer's counts), so that ``tests/test_parallel_comm.py`` can hold the
layer's reported figures to it byte for byte; :mod:`benchmarks.ep_sim` extends
the same definitions to sizes no test can run.

Definitions (rank ``me`` on node ``n``, local index ``l``; ``b`` = bytes per element):

* flat: one all-to-all of ``(token, expert)`` rows each way; ``rows_to[p]`` = my
  rows for rank ``p``'s experts.
* hierarchical: stage A sends each token once to the rail peer ``(n', l)`` of every
  node ``n'`` holding one of its experts (with its ``k`` routing weights, ``b``
  bytes each, and ``k`` int32 expert ids: the metadata); stage B spreads the
  ``(token, expert)`` rows inside the node; the return runs B then A backwards,
  with a token's experts on one node already summed, so A's return carries one
  row per ``(token, node)``.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["exact_traffic", "ID_BYTES", "COUNT_BYTES"]

ID_BYTES = 4  # the hierarchical path's expert ids travel as int32
COUNT_BYTES = 8  # counts travel as int64


def _owner_lists(owners, W):
    by_rank = [[] for _ in range(W)]
    for e, r in enumerate(owners):
        by_rank[r].append(e)
    return by_rank


def exact_traffic(expert_ids, owners, hidden, elem_bytes, *, node_of=None, hierarchy="flat") -> list:
    """Per rank, a dict with the ``AllToAllStats`` fields the layer reports (``send_rows`` ... ``phase_bytes``).

    ``expert_ids[r]``: rank ``r``'s ``[T_r][k]`` global expert ids (lists or tensors);
    ``owners[e]``: the rank holding expert ``e``; ``node_of[r]``: the node of rank
    ``r`` (``None``: one node, no cross-node figures); ``hierarchy``: ``"flat"`` or ``"node"``.
    """
    W = len(expert_ids)
    ids = [[[int(e) for e in row] for row in (r.tolist() if hasattr(r, "tolist") else r)] for r in expert_ids]
    k = max((len(row) for r in ids for row in r), default=0)
    by_rank = _owner_lists(owners, W)
    counts = [Counter(e for row in r for e in row) for r in ids]  # counts[s][e]: rank s's rows for expert e
    row_b = hidden * elem_bytes
    rows_to = [[sum(counts[s][e] for e in by_rank[p]) for p in range(W)] for s in range(W)]
    if hierarchy == "node" and node_of is None:
        raise ValueError("hierarchy='node' needs node_of")
    nodes = node_of if node_of is not None else [0] * W
    members = {}
    for r, n in enumerate(nodes):
        members.setdefault(n, []).append(r)
    local = {r: m.index(r) for m in members.values() for r in m}
    out = []
    for me in range(W):
        send = rows_to[me]
        recv = [rows_to[s][me] for s in range(W)]
        res = dict(send_rows=send, recv_rows=recv, hierarchy=hierarchy)
        if hierarchy == "flat":
            others = [p for p in range(W) if p != me]
            off = [p for p in others if nodes[p] != nodes[me]]
            disp = sum(send[p] for p in others) * row_b
            ret = sum(recv[p] for p in others) * row_b
            res.update(
                bytes_sent=disp + ret, bytes_received=disp + ret, meta_bytes=0,
                phase_bytes={"dispatch": disp, "return": ret},
                count_bytes=sum(len(by_rank[p]) + 1 for p in others) * COUNT_BYTES,
            )  # fmt: skip
            cross = sum(send[p] + recv[p] for p in off) * row_b
        else:
            res.update(_hierarchical(me, ids, counts, by_rank, nodes, members, local, row_b, elem_bytes, k))
            cross = res["phase_bytes"]["inter_dispatch"] + res["phase_bytes"]["inter_return"]
        if node_of is None:
            res.update(cross_node_bytes_sent=None, cross_node_bytes_received=None)
        else:
            res.update(cross_node_bytes_sent=cross, cross_node_bytes_received=cross)
        out.append(res)
    return out


def _hierarchical(me, ids, counts, by_rank, nodes, members, local, row_b, elem_bytes, k) -> dict:
    W = len(ids)
    n, loc = nodes[me], local[me]
    node_of_expert = {e: nodes[r] for r in range(W) for e in by_rank[r]}

    def tokens_for(s, node):  # rank s's tokens with at least one expert on `node`
        return sum(1 for row in ids[s] if any(node_of_expert[e] == node for e in row))

    rail = [r for r in range(W) if local[r] == loc]  # my rail: one rank per node
    # Stage A: my tokens to each other node's rail peer; theirs to me (the same number comes back).
    a_sent = sum(tokens_for(me, nodes[p]) for p in rail if p != me)
    a_recv = sum(tokens_for(s, n) for s in rail if s != me)
    # Stage B: as the forwarder of my rail, (token, expert) rows to my node's ranks; and what I receive.
    node_ranks = members[n]
    b_sent = sum(counts[s][e] for s in rail for p in node_ranks if p != me for e in by_rank[p])
    b_recv = sum(counts[s][e] for f in node_ranks if f != me for s in _rail(f, local, W) for e in by_rank[me])
    phase = {
        "inter_dispatch": a_sent * row_b, "intra_dispatch": b_sent * row_b,
        "intra_return": b_recv * row_b, "inter_return": a_recv * row_b,
    }  # fmt: skip
    total = sum(phase.values())
    count_words = 0
    for p in range(W):
        if p != me:
            count_words += len(by_rank[p]) + 1
            if local[p] == loc:  # a rail peer also gets the counts of its node's experts and my token count
                count_words += sum(len(by_rank[r]) for r in members[nodes[p]]) + 1
    return dict(
        bytes_sent=total, bytes_received=total, meta_bytes=a_sent * k * (elem_bytes + ID_BYTES),
        phase_bytes=phase, count_bytes=count_words * COUNT_BYTES,
    )  # fmt: skip


def _rail(f, local, W):
    """The ranks with ``f``'s local index: the sources whose rows ``f`` forwards."""
    return [r for r in range(W) if local[r] == local[f]]

"""The hierarchical token exchange: each row crosses a node boundary once per (source node, destination node).

Rank ``me = (n, l)`` (node ``n``, local index ``l``; :mod:`.nodes`) with tokens ``x [T, H]``::

    count exchange   to every rank p: [counts of p's experts, status word]; to the rail peers
                     (same l, one per node) also [counts of every expert on p's node, tokens for p's node]
    host read        once: every split size below comes from it
    A  dispatch      to the rail peer (n', l) of each node n' holding one of a token's experts: the token
                     once, with its k routing weights (0 for experts elsewhere) and k int32 expert ids
                     (-1 elsewhere); n' = n is a local copy
    B  spread        the forwarder (n', l) sorts the (token, expert) pairs of its node by expert and sends
                     each row to the rank of its node holding that expert (chunked, see .chunked)
       experts       on the received rows (unweighted)
    B' return        the outputs back to the forwarder, which sums a token's experts on its node,
                     weighted: one row per (token, node)
    A' return        those sums back to the token's rank, which adds its nodes' rows

Every collective runs on the expert-parallel group itself, with zero-size splits for
the ranks a stage does not talk to (stage A: only the rail; stage B: only the node),
so no subgroup has to be created (a collective over the whole job when the group is
part of a larger mesh) and every failure is seen on the group the layer already
watches. The weights travel in the rows' dtype (bf16 weights for bf16 rows), so in
half precision the combine differs from the flat path's (fp32 weights) by the
rounding of the weights.

The backward is autograd's: the transfers are the differentiable all-to-alls of
:mod:`.collectives` and :mod:`.chunked`, the gather and combine are ``index_select``
and ``index_add``, so the routing weights get their gradient at the forwarder and
it travels home in A's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked import expert_exchange
from .collectives import all_to_all
from .nodes import NodeLayout
from .placement import ExpertPlacement

__all__ = ["HierarchicalPlan", "ID_DTYPE"]

ID_DTYPE = torch.int32  # expert ids of stage A (4 bytes each; -1 for an expert on another node)


@dataclass(frozen=True)
class _Tables:
    node_of_expert: torch.Tensor  # [E] global expert -> node
    position: torch.Tensor  # [E] global expert -> placement order
    payload_src: torch.Tensor  # [L] payload slot -> index into [send counts (E), status, tokens per node (N)]
    mine: torch.Tensor  # [W * E_l] index into the received payload: source s's counts for my experts
    rail_nodes: torch.Tensor  # [N] nodes in the order of their rail peer's rank


class HierarchicalPlan:
    """The static part of the hierarchical exchange for one rank: payload layouts and who talks to whom."""

    def __init__(self, placement: ExpertPlacement, layout: NodeLayout, rank: int):
        self.placement, self.layout, self.rank = placement, layout, rank
        W, E = placement.world_size, placement.num_experts
        if len(layout.node_of) != W:
            raise ValueError(
                f"node layout for {len(layout.node_of)} ranks ({layout.describe()}); expected one for the group's {W}"
            )
        self.node, self.local = layout.node_of[rank], layout.local_of[rank]
        self.num_nodes = layout.num_nodes
        self.rail = layout.rail(self.local)  # one rank per node, node order
        self.node_ranks = layout.members[self.node]
        offs = placement.rank_offsets
        # placement-order indices of each node's experts (node ranks ascending, each's experts ascending)
        self.node_order = [[i for r in m for i in range(offs[r], offs[r + 1])] for m in layout.members]
        status, tok = E, E + 1  # indices into the payload source vector
        src, self.payload_splits = [], []
        for p in range(W):
            part = list(range(offs[p], offs[p + 1])) + [status]
            if layout.local_of[p] == self.local:  # p is my forwarder for its node
                part += self.node_order[layout.node_of[p]] + [tok + layout.node_of[p]]
            src += part
            self.payload_splits.append(len(part))
        self._src = src
        self.num_local = placement.counts[rank]
        self.recv_splits = []
        for s in range(W):
            n = self.num_local + 1
            if layout.local_of[s] == self.local:
                n += len(self.node_order[self.node]) + 1
            self.recv_splits.append(n)
        self._tables: dict = {}

    def tables(self, device) -> _Tables:
        t = self._tables.get(device)
        if t is None:
            pl, lay = self.placement, self.layout
            as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
            starts = [sum(self.recv_splits[:s]) for s in range(pl.world_size)]
            mine = [starts[s] + i for s in range(pl.world_size) for i in range(self.num_local)]
            rail_nodes = [lay.node_of[p] for p in sorted(self.rail)]
            t = _Tables(
                node_of_expert=as_t([lay.node_of[r] for r in pl.owners]), position=as_t(pl.position),
                payload_src=as_t(self._src), mine=as_t(mine), rail_nodes=as_t(rail_nodes),
            )  # fmt: skip
            self._tables[device] = t
        return t

    # ------------------------------------------------------------------ before the host read
    def start(self, comm, expert_ids: torch.Tensor, send_counts: torch.Tensor, status: torch.Tensor):
        """Tokens per node, and the count exchange started (async). ``send_counts``: [E] in placement order."""
        t = self.tables(send_counts.device)
        node_e = t.node_of_expert[expert_ids.long()]  # [T, k]
        on = node_e.unsqueeze(-1) == torch.arange(self.num_nodes, device=node_e.device)  # [T, k, N]
        mask = on.any(1)  # [T, N] token t has an expert on node n
        per_node = mask.sum(0).to(torch.int64)
        src = torch.cat([send_counts, status.reshape(1).to(torch.int64), per_node])
        payload = src[t.payload_src]
        recv = send_counts.new_empty(sum(self.recv_splits))
        what = "count exchange (hierarchical, all_to_all_single)"
        work = comm.start_all_to_all(recv, payload, what, self.recv_splits, self.payload_splits)
        return per_node, node_e, mask, recv, work

    # ------------------------------------------------------------------ after it
    def split_sizes(self, host_send: list, host_per_node: list, got: list) -> dict:
        """Every split size, from the one host read. ``got``: the received payload as a list."""
        pl, lay, W, El = self.placement, self.layout, self.placement.world_size, self.num_local
        offs, starts = pl.rank_offsets, [sum(self.recv_splits[:s]) for s in range(W)]
        failed = [s for s in range(W) if got[starts[s] + El] < 0]
        mine = [got[starts[s] : starts[s] + El] for s in range(W)]  # [W][E_l]
        a_send = [host_per_node[lay.node_of[p]] if p in self.rail else 0 for p in range(W)]
        a_recv = [got[starts[s] + self.recv_splits[s] - 1] if s in self.rail else 0 for s in range(W)]
        # Stage B, as my rail's forwarder: every rail source's counts for my node's experts.
        node_idx = self.node_order[self.node]
        totals = {i: 0 for i in node_idx}
        for s in self.rail:
            block = got[starts[s] + El + 1 : starts[s] + El + 1 + len(node_idx)]
            for i, v in zip(node_idx, block):
                totals[i] += v
        b_send = [[totals[i] for i in range(offs[p], offs[p + 1])] if p in self.node_ranks
                  else [0] * pl.counts[p] for p in range(W)]  # fmt: skip
        # What each rank f of my node forwards to me: its rail's counts for my experts.
        b_recv = []
        for f in range(W):
            if f in self.node_ranks:
                srcs = [s for s in range(W) if lay.local_of[s] == lay.local_of[f]]
                b_recv.append([sum(mine[s][i] for s in srcs) for i in range(El)])
            else:
                b_recv.append([0] * El)
        send_rows = [sum(host_send[offs[p] : offs[p + 1]]) for p in range(W)]
        recv_rows = [sum(m) for m in mine]
        return dict(failed=failed, a_send=a_send, a_recv=a_recv, b_send=b_send, b_recv=b_recv,
                    send_rows=send_rows, recv_rows=recv_rows)  # fmt: skip

    def exchange(self, comm, x, expert_ids, weights, node_e, mask, sizes, expert_fn, chunks, anchor, trace):
        """Stages A, B, the experts, B' and A'; returns ``out [T, H]``."""
        t = self.tables(x.device)
        T, k = expert_ids.shape
        H = x.shape[1]
        # A: one row per (token, node), in the order of the rail peers' ranks.
        pairs = mask.index_select(1, t.rail_nodes).t().nonzero()  # [(rail position, token)]
        tok = pairs[:, 1]
        dest_node = t.rail_nodes[pairs[:, 0]]
        here = node_e.index_select(0, tok) == dest_node.unsqueeze(1)  # [rows, k] expert j is on the row's node
        w_rows = torch.where(here, weights.index_select(0, tok), weights.new_zeros(()))
        none = torch.full_like(here, -1, dtype=ID_DTYPE)
        ids_rows = torch.where(here, expert_ids.index_select(0, tok).to(ID_DTYPE), none)
        xw = torch.cat([x.index_select(0, tok), w_rows.to(x.dtype)], 1)
        a_send, a_recv = sizes["a_send"], sizes["a_recv"]
        xw_f = all_to_all(xw, comm, "token dispatch (hierarchical A: across nodes, all_to_all_single)", a_recv,
                          a_send, anchor)  # fmt: skip
        ids_f = comm.all_to_all(ids_rows, "expert ids (hierarchical A, all_to_all_single)", a_recv, a_send)
        # B: the forwarded tokens' (token, expert) pairs on this node, sorted by expert = by destination.
        F = xw_f.shape[0]
        x_f, w_f = xw_f[:, :H], xw_f[:, H:]
        valid = ids_f >= 0
        E = self.placement.num_experts
        key = torch.where(valid, t.position[ids_f.long().clamp(min=0)], torch.full_like(ids_f, E, dtype=torch.int64))
        P = sum(sum(c) for c in sizes["b_send"])
        pair = torch.argsort(key.reshape(-1), stable=True)[:P]
        f_of = torch.div(pair, k, rounding_mode="floor")
        y_b = expert_exchange(
            x_f.index_select(0, f_of), comm, sizes["b_send"], sizes["b_recv"], expert_fn, chunks=chunks,
            anchor=anchor, trace=trace, what="token dispatch (hierarchical B: inside the node)",
            back="result return (hierarchical B: inside the node)",
        )  # fmt: skip
        # B' done: the weighted sum of each forwarded token's experts on this node, before it travels back.
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        contrib = y_b.to(acc) * w_f.reshape(-1).index_select(0, pair).to(acc).unsqueeze(1)
        partial = torch.zeros(F, H, dtype=acc, device=x.device).index_add(0, f_of, contrib).to(x.dtype)
        back = all_to_all(partial, comm, "result return (hierarchical A: across nodes, all_to_all_single)", a_send,
                          a_recv)  # fmt: skip
        out = torch.zeros(T, H, dtype=acc, device=x.device).index_add(0, tok, back.to(acc))
        return out.to(x.dtype)

    def stats(self, sizes: dict, row_bytes: int, elem_bytes: int, k: int) -> dict:
        """Bytes per phase, by the definitions of benchmarks/ep_traffic.py."""
        me = self.rank
        a_sent = sum(v for p, v in enumerate(sizes["a_send"]) if p != me)
        a_recv = sum(v for p, v in enumerate(sizes["a_recv"]) if p != me)
        b_sent = sum(sum(c) for p, c in enumerate(sizes["b_send"]) if p != me)
        b_recv = sum(sum(c) for p, c in enumerate(sizes["b_recv"]) if p != me)
        phase = {
            "inter_dispatch": a_sent * row_bytes, "intra_dispatch": b_sent * row_bytes,
            "intra_return": b_recv * row_bytes, "inter_return": a_recv * row_bytes,
        }  # fmt: skip
        total = sum(phase.values())
        cross = phase["inter_dispatch"] + phase["inter_return"]
        return dict(
            bytes_sent=total, bytes_received=total, cross_node_bytes_sent=cross, cross_node_bytes_received=cross,
            meta_bytes=a_sent * k * (elem_bytes + 4), phase_bytes=phase,
        )  # fmt: skip

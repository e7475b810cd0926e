"""Block-sparse topology of the expert intermediate ``h = x_sorted @ w1``.

The intermediate is a ``[rows, E * F * b]`` matrix (``b`` = block size, ``F`` =
``ceil(ffn / b)`` column blocks per expert). Each expert's sorted rows are cut into
*block rows* of ``b`` rows; a block row of expert ``e`` holds exactly the ``F``
column blocks of expert ``e`` and nothing else. Only those blocks are stored, as
``data [capacity, b, b]``.

Padding is done in index space, not in memory: a block row is the sorted-row range
``[block_row_start, block_row_end)`` of at most ``b`` rows, and kernels mask the
rows past ``block_row_end`` (the last block row of an expert is usually partial).
``x_sorted`` therefore keeps exactly ``T * k`` rows and no token is copied into a
padded buffer. See docs/design.md for the picture.

Glossary (``R`` = ``max_block_rows``, the host-side bound used for allocation;
``R_act`` = the block rows actually used, known only on the device):

block row ``r``
    ``b`` consecutive rows of one expert in the sorted buffer. Block rows
    ``0 .. R_act-1`` are active, ``R_act .. R-1`` are spare (empty ranges).
block ``i``
    One ``b x b`` tile of ``data``; blocks are numbered row-major
    (block row ``i // F``, the expert's column block ``i % F``). Blocks
    ``0 .. R_act*F-1`` are active, the rest are spare capacity.

Arrays (int32 on the routing device; direction in brackets):

``expert_offsets [E+1]``        [expert -> first sorted position] (the routing plan's).
``expert_block_offsets [E+1]``  [expert -> first block row]; ``[E]`` is ``R_act``.
``block_row_expert [R]``        [block row -> expert]; ``E`` for spare rows.
``block_row_start [R]``         [block row -> first sorted position].
``block_row_end [R]``           [block row -> end of its expert's sorted rows]
                                 (exclusive); rows ``>= end`` are padding.
                                 Spare rows have ``start == end == T*k``.
``row_indices [R*F]``           [block -> block row] (COO, for one program per block).
``column_indices [R*F]``        [block -> global column block ``e*F + f``];
                                 ``E*F`` for spare blocks.
``offsets [R+1]``               [block row -> first block] (BCSR); spare rows are
                                 empty, so ``offsets[R]`` is the active block count.
``offsets_t [E*F+1]``           [column block -> first entry of the transposed order].
``column_indices_t [R*F]``      [transposed entry -> block row].
``block_offsets_t [R*F]``       [transposed entry -> block], the secondary index:
                                 transposed products read ``data`` in place through it.
                                 It is a permutation of ``range(R*F)``; spare
                                 blocks map to themselves.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .routing import RoutingPlan

__all__ = ["SUPPORTED_BLOCK_SIZES", "Topology", "build_topology", "max_block_rows"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def max_block_rows(num_slots: int, num_experts: int, block_size: int) -> int:
    """Host-side upper bound on block rows, known without reading the counts.

    ``sum_e ceil(c_e / b) <= (S + n * (b - 1)) // b`` where ``n <= min(E, S)`` is the
    number of non-empty experts: each non-empty expert wastes at most ``b - 1`` rows.
    """
    return (num_slots + min(num_experts, num_slots) * (block_size - 1)) // block_size


@dataclass(frozen=True)
class Topology:
    """Where the nonzero blocks of the expert intermediate are (see module glossary)."""

    block_size: int
    num_experts: int
    ffn_size: int
    num_slots: int
    expert_offsets: torch.Tensor
    expert_block_offsets: torch.Tensor
    block_row_expert: torch.Tensor
    block_row_start: torch.Tensor
    block_row_end: torch.Tensor
    row_indices: torch.Tensor
    column_indices: torch.Tensor
    offsets: torch.Tensor
    offsets_t: torch.Tensor
    column_indices_t: torch.Tensor
    block_offsets_t: torch.Tensor

    _TENSOR_FIELDS = (
        "expert_offsets", "expert_block_offsets", "block_row_expert", "block_row_start", "block_row_end",
        "row_indices", "column_indices", "offsets", "offsets_t", "column_indices_t", "block_offsets_t",
    )  # fmt: skip

    def tensors(self) -> list[torch.Tensor]:
        """The index arrays in a fixed order (what a ``torch.library`` op can take)."""
        return [getattr(self, name) for name in self._TENSOR_FIELDS]

    def sizes(self) -> list[int]:
        """``[block_size, num_experts, ffn_size, num_slots]``, the host-side fields."""
        return [self.block_size, self.num_experts, self.ffn_size, self.num_slots]

    @classmethod
    def from_parts(cls, sizes: list[int], tensors: list[torch.Tensor]) -> "Topology":
        """Inverse of ``(sizes(), tensors())``."""
        return cls(*sizes, **dict(zip(cls._TENSOR_FIELDS, tensors)))

    @property
    def ffn_blocks(self) -> int:
        """``F``: column blocks per expert, ``ceil(ffn_size / block_size)``."""
        return -(-self.ffn_size // self.block_size)

    @property
    def max_block_rows(self) -> int:
        """``R``: block rows allocated (an upper bound on the active ones)."""
        return self.block_row_start.numel()

    @property
    def capacity(self) -> int:
        """Blocks allocated in ``data``: ``R * F``."""
        return self.row_indices.numel()

    @property
    def num_block_rows(self) -> torch.Tensor:
        """Active block rows, a one-element device tensor (no host read)."""
        return self.expert_block_offsets[-1:]

    @property
    def num_blocks(self) -> torch.Tensor:
        """Active blocks, a one-element device tensor (no host read)."""
        return self.offsets[-1:]

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def dense_shape(self) -> tuple[int, int]:
        """Shape of the padded dense view: ``[R * b, E * F * b]``."""
        return (self.max_block_rows * self.block_size, self.num_experts * self.ffn_blocks * self.block_size)

    def padded_row_to_sorted(self) -> torch.Tensor:
        """``[R * b] int64`` [padded row -> sorted position], ``-1`` for padding rows.

        Padded row ``r * b + i`` is row ``i`` of block row ``r``.
        """
        b = self.block_size
        pos = self.block_row_start.long()[:, None] + torch.arange(b, device=self.device)
        valid = pos < self.block_row_end.long()[:, None]
        return torch.where(valid, pos, torch.full_like(pos, -1)).reshape(-1)

    def to_dense(self, data: torch.Tensor) -> torch.Tensor:
        """Scatter block ``data [capacity, b, b]`` into the ``dense_shape`` view.

        Spare blocks are left out; the result is zero outside active blocks.
        """
        b, F, R = self.block_size, self.ffn_blocks, self.max_block_rows
        if data.shape != (self.capacity, b, b):
            raise ValueError(f"data must have shape {(self.capacity, b, b)}, got {tuple(data.shape)}")
        active = torch.arange(self.capacity, device=data.device) < self.offsets[-1].to(data.device)
        out = torch.zeros(R, b, self.num_experts * F + 1, b, dtype=data.dtype, device=data.device)
        cols = torch.where(active, self.column_indices.long(), self.num_experts * F)
        masked = torch.where(active[:, None, None], data, torch.zeros((), dtype=data.dtype, device=data.device))
        out[self.row_indices.long(), :, cols, :] = masked
        return out[:, :, :-1, :].reshape(R * b, self.num_experts * F * b)

    def to_stk(self, data: torch.Tensor | None = None):
        """An equivalent ``stk.Matrix`` over the active blocks.

        Reads the active block count back to the host (a sync): stk's Matrix has a
        host-side shape. ``data`` defaults to zeros; stk stores indices as int16, so
        int32 is used where a dimension would overflow int16 (stk's own kernels
        cannot run that matrix, but ``stk.ops.to_dense`` can).
        """
        try:
            import stk
        except ImportError as err:  # pragma: no cover - exercised only without stk
            raise ImportError("to_stk() needs stanford-stk: pip install stanford-stk") from err
        b, F = self.block_size, self.ffn_blocks
        n_rows = int(self.expert_block_offsets[-1])  # host read: stk shapes live on the host
        n_blocks = n_rows * F
        if data is None:
            data = torch.zeros(self.capacity, b, b, device=self.device)
        if data.shape != (self.capacity, b, b):
            raise ValueError(f"data must have shape {(self.capacity, b, b)}, got {tuple(data.shape)}")
        shape = (n_rows * b, self.num_experts * F * b)
        fits16 = max(shape) // b <= torch.iinfo(torch.int16).max
        idx = torch.int16 if fits16 else torch.int32
        # The column-major order restricted to active blocks: entries 0 .. n_blocks-1.
        return stk.Matrix(
            shape,
            data[:n_blocks],
            self.row_indices[:n_blocks].to(idx),
            self.column_indices[:n_blocks].to(idx),
            self.offsets[: n_rows + 1].to(torch.int32),
            self.column_indices_t[:n_blocks].to(idx),
            self.offsets_t.to(torch.int32),
            self.block_offsets_t[:n_blocks].to(torch.int32),
        )


def build_topology(plan: RoutingPlan, ffn_size: int, block_size: int, backend: str = "auto") -> Topology:
    """Build the topology for ``plan`` on its device, without any host read.

    Args:
        plan: the routing plan of this forward.
        ffn_size: columns of one expert's intermediate (need not be a multiple of
            ``block_size``; the last column block is masked).
        block_size: one of ``SUPPORTED_BLOCK_SIZES``.
        backend: ``"triton"`` builds every array in two kernel launches
            (``kernels/topology.py``); ``"torch"`` with the ops below (the reference,
            about 70 small ops); ``"auto"`` picks triton on CUDA, torch elsewhere.
    """
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    # An integer, not just equal to one: 16.0 == 16 would pass `in` and break the index arithmetic.
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(ffn_size, int) or isinstance(ffn_size, bool) or ffn_size < 1:
        raise ValueError(f"ffn_size must be a positive int, got {ffn_size!r}")
    b, E, S = int(block_size), plan.num_experts, plan.num_slots
    F = -(-ffn_size // b)
    R = max_block_rows(S, E, b)
    if (R + 1) * F >= 2**31 or E * F >= 2**31:
        raise ValueError(f"topology of {R} block rows x {F} column blocks exceeds int32 block indices")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'torch'), got {backend!r}")
    if backend == "triton" and plan.device.type != "cuda":
        from .kernels.config import interpreting

        if not interpreting():
            raise ValueError(f"backend='triton' needs the plan on a CUDA device, got {plan.device}; set "
                             "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")  # fmt: skip
    if backend == "triton" or (backend == "auto" and plan.device.type == "cuda"):
        arrays = dict(zip(_ARRAYS, _topology_op(plan.expert_offsets, S, F, R, b)))
    else:
        arrays = _topology_arrays_torch(plan, F, R, b)
    return Topology(block_size=b, num_experts=E, ffn_size=ffn_size, num_slots=S, expert_offsets=plan.expert_offsets,
                    **arrays)  # fmt: skip


# The arrays a topology derives from the expert offsets, in the custom op's output order.
_ARRAYS = ("expert_block_offsets", "block_row_expert", "block_row_start", "block_row_end", "offsets",
           "row_indices", "column_indices", "offsets_t", "column_indices_t", "block_offsets_t")  # fmt: skip


@torch.library.custom_op("blocksparse_moe::topology_arrays", mutates_args=())
def _topology_op(expert_offsets: torch.Tensor, num_slots: int, ffn_blocks: int, max_rows: int,
                 block_size: int) -> list[torch.Tensor]:  # fmt: skip
    from . import kernels as K

    out = K.topology_arrays(expert_offsets, num_slots, ffn_blocks, max_rows, block_size)
    return [out[name] for name in _ARRAYS]


@_topology_op.register_fake
def _(expert_offsets, num_slots, ffn_blocks, max_rows, block_size):
    E, R, F = expert_offsets.shape[0] - 1, max_rows, ffn_blocks
    sizes = (E + 1, R, R, R, R + 1, R * F, R * F, E * F + 1, R * F, R * F)
    return [expert_offsets.new_empty(n, dtype=torch.int32) for n in sizes]


def _topology_arrays_torch(plan: RoutingPlan, F: int, R: int, b: int) -> dict[str, torch.Tensor]:
    """The reference construction with torch ops (the CPU path); returns the arrays by name."""
    E, S = plan.num_experts, plan.num_slots
    dev = plan.device
    i32 = dict(device=dev, dtype=torch.int32)

    counts = plan.tokens_per_expert
    blocks_per_expert = (counts + (b - 1)) // b
    expert_block_offsets = torch.cat([torch.zeros(1, **i32), torch.cumsum(blocks_per_expert, 0, dtype=torch.int32)])
    n_rows = expert_block_offsets[-1]

    r = torch.arange(R, **i32)
    expert = torch.searchsorted(expert_block_offsets[1:], r, right=True, out_int32=True)
    active = expert < E
    e = expert.clamp(max=E - 1).long()
    start = plan.expert_offsets[e] + (r - expert_block_offsets[e]) * b
    end = plan.expert_offsets[e + 1]
    spare = torch.full_like(r, S)
    block_row_start = torch.where(active, start, spare)
    block_row_end = torch.where(active, end, spare)

    blk = torch.arange(R * F, **i32)
    row_indices = blk // F
    column_indices = expert[row_indices.long()] * F + blk % F  # spare rows give E*F + f
    column_indices = torch.where(column_indices < E * F, column_indices, torch.full_like(column_indices, E * F))
    offsets = torch.minimum(torch.arange(R + 1, **i32), n_rows) * F

    # Transposed (column-major) order: column c = (e, f) holds expert e's blocks_per_expert
    # entries, so offsets_t[c] = F * expert_block_offsets[e] + f * blocks_per_expert[e].
    c = torch.arange(E * F, **i32)
    ce, cf = (c // F).long(), c % F
    offsets_t = torch.cat([expert_block_offsets[ce] * F + cf * blocks_per_expert[ce], (n_rows * F).reshape(1)])
    col = torch.searchsorted(offsets_t[1:], blk, right=True, out_int32=True)
    active_t = col < E * F
    col = col.clamp(max=E * F - 1)
    te, tf = (col // F).long(), col % F
    t_row = expert_block_offsets[te] + (blk - offsets_t[col.long()])
    column_indices_t = torch.where(active_t, t_row, row_indices)
    block_offsets_t = torch.where(active_t, t_row * F + tf, blk)

    return {
        "expert_block_offsets": expert_block_offsets,
        "block_row_expert": expert,
        "block_row_start": block_row_start.to(torch.int32),
        "block_row_end": block_row_end.to(torch.int32),
        "offsets": offsets.to(torch.int32),
        "row_indices": row_indices,
        "column_indices": column_indices,
        "offsets_t": offsets_t.to(torch.int32),
        "column_indices_t": column_indices_t.to(torch.int32),
        "block_offsets_t": block_offsets_t.to(torch.int32),
    }

"""The SwiGLU backward's front half in one persistent SDD: ``dh = dy @ w2^T`` with the activation gradient in the epilogue.

The forward (``sdd_glu(..., store_pre=True)``) saves the pre-activations ``g = x @ w1``
and ``u = x @ v1`` in the block layout. The backward needs, at the same blocks,

* ``dg = dh * u * silu'(g)``, ``silu'(g) = s * (1 + g * (1 - s))``, ``s = sigmoid(g)``,
* ``du = dh * silu(g)``,
* and, for ``dw2 = h^T dy``, ``h = silu(g) * u`` (``store_h``: the forward need not keep it),

where ``dh = dy_sorted @ w2[e]^T`` is the persistent SDD's product with A = ``dy_sorted
[S, H]`` and B = ``w2[e]^T`` (a K-major view of ``w2 [E, ffn, H]``, read through the
``[E, N, K]`` descriptor when TMA is on). Without this kernel that is an SDD writing
``dh`` and a separate elementwise pass reading ``dh``, ``g``, ``u`` and writing ``dg``,
``du`` (and ``h``); here ``dh`` lives only in registers. Each tile's epilogue loads the
``g`` and ``u`` tiles at its own block indices (the output tile's), masked to the
elements that hold data (rows before the expert's end, columns before ``ffn``, active
blocks), so NaN or garbage in the saved blocks' padding is never read and every spare
block and padding element of the outputs is written as zero (``kernels/sdd.py``'s contract).

With routing weights (``row_weights``: the forward scaled each output row by ``w[r]``, as
``dsd_persistent(..., row_weights=)`` does) the outputs are scaled by ``w[r]`` in fp32 and the
same pass returns ``d w[r] = sum_f (dy @ w2[e]^T)[r, f] * h[r, f]`` (deterministic, no atomics);
``weighted_h`` stores ``w[r] * h[r]`` instead of ``h`` (then ``dw2[e] = (w h)^T dy`` needs no
scaled copy of ``dy``). The epilogue runs over ``EPI_SPLIT`` column chunks of the tile: four on the
pointer path, which spills at one, two on the TMA path with routing weights, which spills at one
(``backward_default_config``; ``docs/perf-notes.md``, GLU backward). Each chunk reads its ``g`` and
``u`` elements before it stores ``dg`` and ``du`` to the same positions, so ``out`` may alias ``g``
and ``u`` (``sdd_glu_backward``'s docstring).

Same schedule, grid, TMA rules and expert-edge handling as ``kernels/sdd_persistent.py``
(whose helpers come from ``persistent_common``). Opt-in only
(``blocksparse_moe.kernels.sdd_glu_backward``): not timed, so nothing calls it by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_block_args, check_block_data, check_same, check_tensor
from .config import dot_precision, interpreting, needs_upcast
from .persistent_common import (
    _default_programs,
    check_config_keys,
    expert_weight_desc,
    load_expert_tile,
    resolve_tma,
    tma_problem,
)
from .sdd_persistent import _b_layout, default_config, tile_schedule


@triton.jit
def _sdd_glu_bwd_kernel(
    a_ptr,  # [S, K] dy_sorted, strides (stride_am, stride_ak)
    b_ptr,  # [E, K, N] w2^T per expert (a view of w2 [E, N, K]), strides (stride_be, stride_bk, stride_bn)
    g_ptr,  # [capacity, BLOCK, BLOCK] contiguous: the saved gate pre-activation x @ w1
    u_ptr,  # [capacity, BLOCK, BLOCK] contiguous: the saved up pre-activation x @ v1
    dg_ptr,  # [capacity, BLOCK, BLOCK] contiguous out: dh * u * silu'(g)
    du_ptr,  # [capacity, BLOCK, BLOCK] contiguous out: dh * silu(g)
    h_ptr,  # [capacity, BLOCK, BLOCK] contiguous out: silu(g) * u (STORE_H only; dg_ptr otherwise, never written)
    w_ptr,  # [S] routing weights in sorted order (ROW_WEIGHTS only; dg_ptr otherwise, never read)
    dw_ptr,  # [NT, S] fp32 out: column tile c's partial sums of dh_unscaled * h per row (ROW_WEIGHTS only)
    schedule_ptr,  # [num_tiles] int32: tile -> (r << COL_BITS) | c
    block_row_expert_ptr,  # [R] int32: block row -> expert (E if spare)
    block_row_start_ptr,  # [R] int32: block row -> first sorted position (S if spare)
    block_row_end_ptr,  # [R] int32: block row -> end of its expert's rows (S if spare)
    offsets_ptr,  # [R + 1] int32: offsets[R] = number of active blocks
    num_tiles,
    num_programs,
    S,
    R,
    K,
    N,
    F,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_w,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_N: tl.constexpr,
    COL_BITS: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_K_MAJOR: tl.constexpr,  # B_TMA only: b is a K-contiguous view (stride_bk == 1), w2^T as w2 stores it
    EPI_TMA: tl.constexpr,  # g, u and the outputs through [capacity, BLOCK, BLOCK] descriptors (BLOCKS_N == 1 only)
    STORE_H: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr,  # dh = w[row] * (dy @ w2^T), and the routing-weight gradient's partial sums
    WEIGHTED_H: tl.constexpr,  # STORE_H and ROW_WEIGHTS only: h_ptr gets w[row] * silu(g) * u
    EPI_SPLIT: tl.constexpr,  # 1, 2 or 4: the epilogue runs over that many column chunks of the tile, one at a time
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """Grid ``(min(num_programs, num_tiles),)``; the main loop is ``_sdd_persistent_kernel``'s (no GLU, no gather)."""
    BN: tl.constexpr = BLOCKS_N * BLOCK
    offs = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BLOCK_K)
    n_active = tl.load(offsets_ptr + R)
    k_steps = tl.cdiv(K, BLOCK_K)
    # Once per program, reused for every tile (as in the forward SDD).
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[S, K], strides=[stride_am, 1], block_shape=[BLOCK, BLOCK_K])
    if B_TMA:
        b_desc = expert_weight_desc(b_ptr, E, K, N, stride_be, stride_bk, stride_bn, B_K_MAJOR, BLOCK_K, BN)
    else:  # unused: load_expert_tile takes both forms
        b_desc = b_ptr
    CW: tl.constexpr = BN // EPI_SPLIT  # the epilogue's chunk: EPI_SPLIT column slices of the tile, one at a time
    if EPI_TMA:
        # The epilogue's block tensors by TMA: with pointers every thread holds a 64-bit address
        # per element pair of each 128x128 tile (tests/sm90_persistent_worker.py glu_bwd).
        C = num_tiles * BLOCKS_N  # = capacity: R * F blocks when BLOCKS_N == 1
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK, CW])  # fmt: skip
        u_desc = tl.make_tensor_descriptor(u_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK, CW])  # fmt: skip
        dg_desc = tl.make_tensor_descriptor(dg_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                            block_shape=[1, BLOCK, CW])  # fmt: skip
        du_desc = tl.make_tensor_descriptor(du_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                            block_shape=[1, BLOCK, CW])  # fmt: skip
        if STORE_H:
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                               block_shape=[1, BLOCK, CW])  # fmt: skip
        else:
            h_desc = dg_desc
    else:  # unused: the chunk function takes both forms
        g_desc, u_desc, dg_desc, du_desc, h_desc = g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr
    for t in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        packed = tl.load(schedule_ptr + t)
        r = packed >> COL_BITS
        c = packed & ((1 << COL_BITS) - 1)  # the column tile: the workspace row of its partial sums
        f0 = c * BLOCKS_N
        first = r * F + f0
        steps = tl.where(first < n_active, k_steps, 0)  # a spare tile: no K step, zeros stored
        e = tl.load(block_row_expert_ptr + r)
        row0 = tl.load(block_row_start_ptr + r)
        row_end = tl.load(block_row_end_ptr + r)
        rows = row0 + offs
        row_mask = rows < row_end
        col0 = f0 * BLOCK
        cols = col0 + offs_n
        col_mask = cols < N
        acc = tl.zeros((BLOCK, BN), dtype=tl.float32)
        # int64 before the multiply: a row index times stride_am can pass 2**31.
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_off = e.to(tl.int64) * stride_be + offs_k.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
        for ks in range(0, steps):
            k0 = ks * BLOCK_K
            k_mask = offs_k < K - k0
            if A_TMA:
                a = a_desc.load([row0, k0])
            else:
                a = tl.load(a_ptrs + k0 * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = load_expert_tile(b_desc, b_ptr, b_off, e, k0, col0, k_mask, col_mask, stride_bk, B_TMA, B_K_MAJOR,
                                 BLOCK_K, BN)  # fmt: skip
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # The tile's blocks start at block `first` (an int64 scalar base: first * BLOCK**2 can pass 2**31).
        base = first.to(tl.int64) * (BLOCK * BLOCK)
        if ROW_WEIGHTS:
            w = tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=row_mask, other=0.0).to(tl.float32)
        else:
            w = tl.zeros((BLOCK,), dtype=tl.float32)  # unused
        # The accumulator in column chunks, one at a time, so that each chunk's g, u, masks and
        # addresses are live alone (docs/perf-notes.md: what keeps the pointer path from spilling).
        part = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(EPI_SPLIT):
            part += _glu_bwd_chunk(_column_chunk(acc, j, EPI_SPLIT), j, w, row_mask, first, base, f0, col0, N, F,
                                   g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, g_desc, u_desc, dg_desc, du_desc, h_desc,
                                   BLOCK, CW, EPI_TMA, STORE_H, ROW_WEIGHTS, WEIGHTED_H)  # fmt: skip
        if ROW_WEIGHTS:
            # d w[row] = sum_f dh[row, f] * h[row, f] over this tile's columns: one partial per (column
            # tile, row), each written by exactly one tile (rows of other block rows are masked off).
            tl.store(dw_ptr + c.to(tl.int64) * S + rows.to(tl.int64), part, mask=row_mask)


@triton.jit
def _column_chunk(acc, j: tl.constexpr, SPLIT: tl.constexpr):
    """Columns ``[j * n / SPLIT, (j + 1) * n / SPLIT)`` of ``acc [m, n]`` (SPLIT 1, 2 or 4) by reshape and
    split: on the MMA layout each thread holds columns c and c + n/2, so no data moves."""
    M: tl.constexpr = acc.shape[0]
    out = acc
    if SPLIT >= 2:  # one return below: Triton types every return statement of a function together
        lo, hi = out.reshape(M, 2, out.shape[1] // 2).permute(0, 2, 1).split()
        out = lo if j < SPLIT // 2 else hi
    if SPLIT == 4:
        q0, q1 = out.reshape(M, 2, out.shape[1] // 2).permute(0, 2, 1).split()
        out = q0 if j % 2 == 0 else q1
    return out


@triton.jit
def _glu_bwd_chunk(acc, j: tl.constexpr, w, row_mask, first, base, f0, col0, N, F, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr,
                   g_desc, u_desc, dg_desc, du_desc, h_desc, BLOCK: tl.constexpr, CW: tl.constexpr,
                   EPI_TMA: tl.constexpr, STORE_H: tl.constexpr, ROW_WEIGHTS: tl.constexpr,
                   WEIGHTED_H: tl.constexpr):  # fmt: skip
    """Columns ``[j * CW, (j + 1) * CW)`` of a tile's epilogue; returns their part of ``sum_f dh * h`` per row."""
    offs = tl.arange(0, BLOCK)
    on = j * CW + tl.arange(0, CW)  # column within the tile
    # The elements that hold data: rows before the expert's end and columns before ffn; a
    # spare row's range is empty (start = end = S), so its row_mask is all false. g and u
    # are taken only there (0 elsewhere), so the saved blocks' padding never reaches an
    # output. dh is zeroed outside too: past the expert's end TMA read the next expert's
    # dy rows, and an inf there times u = 0 would be NaN in this expert's padding.
    valid = row_mask[:, None] & (col0 + on < N)[None, :]
    dh = tl.where(valid, acc, 0.0)
    # Within the tile the offsets stay int32 (< 256 * BLOCK), fewer registers per element.
    tile_off = (on // BLOCK)[None, :] * (BLOCK * BLOCK) + offs[:, None] * BLOCK + (on % BLOCK)[None, :]
    store_mask = (f0 + on // BLOCK < F)[None, :]
    # Ordered so that few full chunks are live at once and so that every read of a g or u element
    # comes before the store of dg or du to the same element (``out`` may alias g and u: dg over g,
    # du over u): g dies into silu and dh * silu'(g), u is loaded before du's store, and h's second
    # read of g comes before dg's store. Under EPI_TMA the box reads the whole block (padding
    # included: NaN there must not leak), so where() selects 0 outside `valid`.
    # With ROW_WEIGHTS, `dh` is the unweighted product and w scales each output in fp32
    # before its one rounding: du = w * (dh * silu), dg = w * (dh * silu') * u (and, WEIGHTED_H,
    # h = w * (silu * u)); the routing-weight gradient's row sums use the unweighted h.
    if EPI_TMA:
        g = tl.where(valid, g_desc.load([first, 0, j * CW]).reshape(BLOCK, CW).to(tl.float32), 0.0)
    else:
        g = tl.load(g_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dh_dsilu = dh * (s + silu * (1.0 - s))  # dh * silu'(g), silu'(g) = s * (1 + g * (1 - s)); fp32 throughout
    dh_silu = dh * silu
    if EPI_TMA:
        u = tl.where(valid, u_desc.load([first, 0, j * CW]).reshape(BLOCK, CW).to(tl.float32), 0.0)
    else:
        u = tl.load(u_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
    if ROW_WEIGHTS:
        du = (dh_silu * w[:, None]).to(du_ptr.dtype.element_ty)
    else:
        du = dh_silu.to(du_ptr.dtype.element_ty)
    if EPI_TMA:
        du_desc.store([first, 0, j * CW], du.reshape(1, BLOCK, CW))
    else:
        tl.store(du_ptr + base + tile_off, du, mask=store_mask)
    part = tl.zeros((BLOCK,), dtype=tl.float32)
    if ROW_WEIGHTS:
        part = tl.sum(dh_silu * u, axis=1)  # zero outside `valid`
        dg = (dh_dsilu * u * w[:, None]).to(dg_ptr.dtype.element_ty)
    else:
        dg = (dh_dsilu * u).to(dg_ptr.dtype.element_ty)
    if STORE_H:
        # silu(g) again from a second read of the g chunk (in L2: it was just read) rather than
        # kept live across the du store, which spilled at one 128x128 chunk: TMA 255 registers
        # and 16 B of stack, pointers 320 B (tests/sm90_persistent_worker.py glu_bwd, bf16,
        # block 128). The read and h's store come before dg's store (dg may overwrite g).
        if EPI_TMA:
            g2 = tl.where(valid, g_desc.load([first, 0, j * CW]).reshape(BLOCK, CW).to(tl.float32), 0.0)
        else:
            g2 = tl.load(g_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
        h32 = g2 * tl.sigmoid(g2) * u
        if WEIGHTED_H:
            h32 = h32 * w[:, None]
        h = h32.to(h_ptr.dtype.element_ty)
        if EPI_TMA:
            h_desc.store([first, 0, j * CW], h.reshape(1, BLOCK, CW))
        else:
            tl.store(h_ptr + base + tile_off, h, mask=store_mask)
    if EPI_TMA:
        dg_desc.store([first, 0, j * CW], dg.reshape(1, BLOCK, CW))
    else:
        tl.store(dg_ptr + base + tile_off, dg, mask=store_mask)
    return part


def backward_default_config(block: int, elem_bytes: int = 2, use_tma: bool = True, row_weights: bool = False) -> dict:
    """``sdd_glu``'s tile (at block 128: 128x128, BK 64, 8 warps, 4 stages; one pinned config under the
    interpreter) and the epilogue's column chunks: with TMA one (``EPI_SPLIT=1``), two with ``row_weights``,
    four on the pointer path (``EPI_SPLIT=4``: each chunk's masked addresses, ``g`` and ``u`` live alone;
    at one chunk the pointer kernel spilled, 255 registers and 32 to 464 B of stack, at four it needs 136
    to 220 and none: ``tests/sm90_persistent_worker.py glu_bwd``, ``docs/perf-notes.md``). With routing
    weights the TMA epilogue holds three full chunks across u's load (dh * silu for du and the weight
    gradient, dh * silu'(g) for dg, and u: u is read before du's store so that ``out`` may alias g and
    u), which spilled at one chunk (255 registers, 120 to 136 B of stack) and at two needs 184 to 206
    and none. Under the interpreter the pointer path takes two chunks (a chunk is one more interpreted
    call; four are tested explicitly)."""
    if use_tma:
        split = 2 if row_weights else 1
    else:
        split = 2 if interpreting() else 4
    return dict(default_config(block, elem_bytes, glu=True), EPI_SPLIT=split)


def _workspace(tiles: int, rows: int, device) -> torch.Tensor:
    """The routing-weight gradient's partial sums ``[tiles, rows]`` fp32 (uninitialised: every entry is written)."""
    return torch.empty((tiles, rows), dtype=torch.float32, device=device)


def sdd_glu_backward(dy_sorted: torch.Tensor, w2: torch.Tensor, g: torch.Tensor, u: torch.Tensor, topo, *,
                     row_weights: torch.Tensor | None = None, store_h: bool = False, weighted_h: bool = False,
                     out: tuple | None = None,
                     use_tma: bool | None = None, config: dict | None = None, num_programs: int | None = None,
                     schedule: torch.Tensor | None = None):  # fmt: skip
    """``(dg, du)``, or ``(dg, du, h)`` with ``store_h``: the SwiGLU gradients at the topology's blocks;
    with ``row_weights``, ``(dg, du, d_row_weights)`` or ``(dg, du, h, d_row_weights)``.

    ``dy_sorted [S, H]`` is the gradient of the down projection's output rows in sorted
    order, ``w2 [E, ffn, H]`` (any strides; read as ``w2[e]^T``), ``g`` and ``u`` the saved
    ``[capacity, bs, bs]`` pre-activations (``sdd_glu(..., store_pre=True)``; their padding
    is never read). ``dh = dy_sorted @ w2[e]^T`` is formed in fp32 registers and never
    stored. Outputs are new ``[capacity, bs, bs]`` tensors of ``dy_sorted``'s dtype, spare
    blocks and padding zero; ``out`` gives them instead (``(dg, du)`` or ``(dg, du, h)``, contiguous,
    that shape and dtype), every element written. ``use_tma``, ``config``, ``num_programs`` and ``schedule``
    (``tile_schedule(topo, config's BLOCKS_N)``) as ``sdd_persistent``.

    ``out`` may alias ``g`` and ``u``: ``out=(g, u)`` or ``out=(g, u, h_buf)`` writes ``dg`` over ``g``
    and ``du`` over ``u`` in place, with results identical to separate buffers. Every element of the
    three block tensors is touched by exactly one tile (its own blocks) and, within the tile, one
    epilogue column chunk, which reads its ``g`` and ``u`` elements (both reads of ``g`` where
    ``store_h``) before it stores ``du``, ``h`` and ``dg`` to the same positions, on the pointer path
    and the TMA path alike (a TMA load completes, its barrier waited, before the values that depend on
    it are stored). Only that pairing: ``dg`` over ``u``, ``du`` over ``g``, or ``h`` over either is
    not supported, nor a partial overlap.

    ``row_weights [S]`` (sorted order, any float dtype and stride): the forward was
    ``y_sorted[r] = row_weights[r] * (h[r] @ w2[e])`` (``dsd_persistent(..., row_weights=)``).
    Then ``dh`` is ``row_weights[r] * (dy_sorted @ w2[e]^T)`` (in fp32, before ``dg``/``du``
    round; ``h`` is still ``silu(g) * u``), and ``d_row_weights[r] = dy_sorted[r] . (h[r] @ w2[e])
    = sum_f (dy_sorted @ w2[e]^T)[r, f] * h[r, f]`` comes from the same pass: a new fp32 ``[S]``
    tensor (never in ``out``), each column tile's row sums written once into an fp32 workspace
    ``[column tiles, S]`` and summed over tiles by one deterministic ``sum(0)`` (no atomics).

    ``weighted_h`` (needs ``store_h`` and ``row_weights``): ``h`` is stored as ``row_weights[r] * silu(g[r])
    * u[r]``, scaled in fp32 before its one rounding, so that the down projection's weight gradient is
    ``dw2[e] = h_w[e]^T dy_sorted`` with no ``dy_sorted * row_weights`` pass; ``dg``, ``du`` and
    ``d_row_weights`` (which uses the unweighted ``h`` in registers) are unchanged, bit for bit.
    """
    op = "sdd_glu_backward"
    check_block_args(op, dy_sorted, w2, topo, rows_name="dy_sorted", expert_name="w2")
    check_block_data(op, "g", g, topo)
    check_block_data(op, "u", u, topo)
    check_same(op, {"dy_sorted": dy_sorted, "g": g, "u": u}, device=topo.device)
    S, H = dy_sorted.shape
    E, ffn, Hw = w2.shape
    if Hw != H:
        raise ValueError(f"{op}: w2.shape[2] must equal dy_sorted.shape[1]={H} (w2 is [E, ffn, H]), got {Hw}")
    if ffn != topo.ffn_size:
        raise ValueError(f"{op}: w2.shape[1] must equal topo.ffn_size={topo.ffn_size} (w2 is [E, ffn, H]), got {ffn}")
    if row_weights is not None:
        check_tensor(op, "row_weights", row_weights, dim=1)
        if row_weights.shape[0] != S or row_weights.device != dy_sorted.device:
            raise ValueError(f"{op}: row_weights must be [{S}] (one weight per sorted row) on {dy_sorted.device}, "
                             f"got {tuple(row_weights.shape)} on {row_weights.device}")  # fmt: skip
    if weighted_h and not (store_h and row_weights is not None):
        raise ValueError(f"{op}: weighted_h=True needs store_h=True and row_weights (it stores row_weights[r] * h[r]), "
                         f"got store_h={store_h}, row_weights={'None' if row_weights is None else 'given'}")  # fmt: skip
    bs = topo.block_size
    new = lambda: torch.empty((topo.capacity, bs, bs), dtype=dy_sorted.dtype, device=dy_sorted.device)  # noqa: E731
    names = ("dg", "du", "h") if store_h else ("dg", "du")
    if out is None:
        outs = tuple(new() for _ in names)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != len(names):
            raise ValueError(f"{op}: out must be a tuple ({', '.join(names)}) with store_h={store_h}, got {out!r:.80}")
        for name, t in zip(names, out):
            check_block_data(op, f"out {name}", t, topo)
            if t.dtype != dy_sorted.dtype or t.device != dy_sorted.device:
                raise ValueError(f"{op}: out {name} must be {dy_sorted.dtype} on {dy_sorted.device} (dy_sorted's), "
                                 f"got {t.dtype} on {t.device}")  # fmt: skip
        outs = tuple(out)
    dg, du = outs[0], outs[1]
    h = outs[2] if store_h else None
    if topo.capacity == 0:
        return outs if row_weights is None else (*outs, torch.zeros(S, dtype=torch.float32, device=dy_sorted.device))
    b = w2.transpose(1, 2)  # [E, H, ffn]: K = H, N = ffn; K-contiguous when w2 is contiguous
    problems = [p for p in [tma_problem("dy_sorted", dy_sorted, 1)] if p]
    k_major, b_problems = _b_layout({"w2^T": b})
    problems += b_problems
    tma = resolve_tma(op, use_tma, dy_sorted, problems)
    cfg = dict(
        backward_default_config(bs, dy_sorted.element_size(), use_tma=tma, row_weights=row_weights is not None),
        **(config or {}),
    )
    check_config_keys(op, cfg, ("BLOCK_K", "BLOCKS_N", "num_warps", "num_stages", "FLATTEN", "EPI_SPLIT"))
    if cfg["BLOCKS_N"] * bs > 256:
        raise ValueError(f"{op}: config BLOCKS_N={cfg['BLOCKS_N']} x block {bs} > 256 columns (a TMA box's limit)")
    split = cfg.get("EPI_SPLIT", 1)
    if split not in (1, 2, 4) or cfg["BLOCKS_N"] * bs % split:
        raise ValueError(f"{op}: config EPI_SPLIT={split} must be 1, 2 or 4 and divide the tile's "
                         f"{cfg['BLOCKS_N'] * bs} columns")  # fmt: skip
    # The epilogue's blocks by TMA too where each tile is one block (a wider tile's box would
    # reach into the next block row past F), every block tensor's base is 16-byte aligned and
    # a chunk's rows are at least 16 bytes (a TMA box's inner extent).
    epi_tma = (tma and cfg["BLOCKS_N"] == 1 and bs // split * dy_sorted.element_size() >= 16
               and not any(tma_problem("", t, 2) for t in (g, u, *outs)))  # fmt: skip
    nt = triton.cdiv(topo.ffn_blocks, cfg["BLOCKS_N"])
    num_tiles = topo.max_block_rows * nt
    if schedule is None:
        schedule = tile_schedule(topo, cfg["BLOCKS_N"])
    elif schedule.dtype != torch.int32 or schedule.shape != (num_tiles,) or schedule.device != dy_sorted.device:
        raise ValueError(f"{op}: schedule must be int32 [{num_tiles}] on {dy_sorted.device} (tile_schedule(topo, "
                         f"{cfg['BLOCKS_N']})), got {schedule.dtype} {tuple(schedule.shape)} on {schedule.device}")  # fmt: skip
    programs = num_programs or _default_programs(dy_sorted.device)
    if programs < 1:
        raise ValueError(f"{op}: num_programs must be >= 1, got {programs}")
    rw = row_weights is not None
    # Every (column tile, sorted row) entry is written by the one tile over that row's block row
    # (each sorted row lies in exactly one active block row): no zero fill needed.
    ws = _workspace(nt, S, dy_sorted.device) if rw else None
    _sdd_glu_bwd_kernel[(min(programs, num_tiles),)](
        dy_sorted, b, g, u, dg, du, h if store_h else dg, row_weights if rw else dg, ws if rw else dg, schedule,
        topo.block_row_expert, topo.block_row_start, topo.block_row_end, topo.offsets,
        num_tiles, programs, S, topo.max_block_rows, H, ffn, topo.ffn_blocks, E,
        dy_sorted.stride(0), dy_sorted.stride(1), b.stride(0), b.stride(1), b.stride(2),
        row_weights.stride(0) if rw else 0,
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], BLOCKS_N=cfg["BLOCKS_N"], COL_BITS=max(1, (nt - 1).bit_length()),
        A_TMA=tma, B_TMA=tma, B_K_MAJOR=bool(tma and k_major), EPI_TMA=epi_tma, STORE_H=bool(store_h),
        ROW_WEIGHTS=rw, WEIGHTED_H=bool(weighted_h), EPI_SPLIT=split, UPCAST=needs_upcast(dy_sorted.dtype),
        PRECISION=dot_precision(dy_sorted.dtype),
        FLATTEN=bool(cfg.get("FLATTEN", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return outs if not rw else (*outs, ws.sum(0))

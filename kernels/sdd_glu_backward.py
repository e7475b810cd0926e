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

Same schedule, grid, TMA rules and expert-edge handling as ``kernels/sdd_persistent.py``
(whose helpers come from ``persistent_common``). Opt-in only
(``blocksparse_moe.kernels.sdd_glu_backward``): not timed, so nothing calls it by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_block_args, check_block_data, check_same
from .config import dot_precision, needs_upcast
from .persistent_common import _default_programs, check_config_keys, resolve_tma, tma_problem
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
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_N: tl.constexpr,
    COL_BITS: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_K_MAJOR: tl.constexpr,  # B_TMA only: b is a K-contiguous view (stride_bk == 1), w2^T as w2 stores it
    EPI_TMA: tl.constexpr,  # g, u and the outputs through [capacity, BLOCK, BLOCK] descriptors (BLOCKS_N == 1 only)
    STORE_H: tl.constexpr,
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
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E, N, K], strides=[stride_be, stride_bn, 1],
                                               block_shape=[1, BN, BLOCK_K])  # fmt: skip
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E, K, N], strides=[stride_be, stride_bk, 1],
                                               block_shape=[1, BLOCK_K, BN])  # fmt: skip
    if EPI_TMA:
        # The epilogue's block tensors by TMA: with pointers every thread holds a 64-bit address
        # per element pair of each 128x128 tile, and the default kernel spills (255 registers,
        # 32 B of stack); by TMA it needs 149 and no stack (tests/sm90_persistent_worker.py glu_bwd).
        C = num_tiles * BLOCKS_N  # = capacity: R * F blocks when BLOCKS_N == 1
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK, BLOCK])  # fmt: skip
        u_desc = tl.make_tensor_descriptor(u_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                           block_shape=[1, BLOCK, BLOCK])  # fmt: skip
        dg_desc = tl.make_tensor_descriptor(dg_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                            block_shape=[1, BLOCK, BLOCK])  # fmt: skip
        du_desc = tl.make_tensor_descriptor(du_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                            block_shape=[1, BLOCK, BLOCK])  # fmt: skip
        if STORE_H:
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[C, BLOCK, BLOCK], strides=[BLOCK * BLOCK, BLOCK, 1],
                                               block_shape=[1, BLOCK, BLOCK])  # fmt: skip
    for t in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        packed = tl.load(schedule_ptr + t)
        r = packed >> COL_BITS
        f0 = (packed & ((1 << COL_BITS) - 1)) * BLOCKS_N
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
            if B_TMA:
                if B_K_MAJOR:
                    b = tl.trans(b_desc.load([e, col0, k0]).reshape(BN, BLOCK_K))
                else:
                    b = b_desc.load([e, k0, col0]).reshape(BLOCK_K, BN)
            else:
                b = tl.load(b_ptr + b_off + k0 * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # The elements that hold data: rows before the expert's end and columns before ffn; a
        # spare row's range is empty (start = end = S), so its row_mask is all false. g and u
        # are taken only there (0 elsewhere), so the saved blocks' padding never reaches an
        # output. dh is zeroed outside too: past the expert's end TMA read the next expert's
        # dy rows, and an inf there times u = 0 would be NaN in this expert's padding.
        valid = row_mask[:, None] & col_mask[None, :]
        dh = tl.where(valid, acc, 0.0)
        # The tile's blocks start at block `first` (an int64 scalar base: first * BLOCK**2 can pass
        # 2**31); within the tile the offsets stay int32 (< 256 * BLOCK), fewer registers per element.
        base = first.to(tl.int64) * (BLOCK * BLOCK)
        tile_off = (offs_n // BLOCK)[None, :] * (BLOCK * BLOCK) + offs[:, None] * BLOCK + (offs_n % BLOCK)[None, :]
        store_mask = (f0 + offs_n // BLOCK < F)[None, :]
        # Ordered so that few full tiles are live at once: g dies into silu and dh * silu'(g),
        # dh after du's store, and u is loaded last. Under EPI_TMA the box reads the whole block
        # (padding included: NaN there must not leak), so where() selects 0 outside `valid`.
        if EPI_TMA:
            g = tl.where(valid, g_desc.load([first, 0, 0]).reshape(BLOCK, BN).to(tl.float32), 0.0)
        else:
            g = tl.load(g_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        dh_dsilu = dh * (s + silu * (1.0 - s))  # dh * silu'(g), silu'(g) = s * (1 + g * (1 - s)); fp32 throughout
        du = (dh * silu).to(du_ptr.dtype.element_ty)
        if EPI_TMA:
            du_desc.store([first, 0, 0], du.reshape(1, BLOCK, BN))
            u = tl.where(valid, u_desc.load([first, 0, 0]).reshape(BLOCK, BN).to(tl.float32), 0.0)
        else:
            tl.store(du_ptr + base + tile_off, du, mask=store_mask)
            u = tl.load(u_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
        dg = (dh_dsilu * u).to(dg_ptr.dtype.element_ty)
        if EPI_TMA:
            dg_desc.store([first, 0, 0], dg.reshape(1, BLOCK, BN))
        else:
            tl.store(dg_ptr + base + tile_off, dg, mask=store_mask)
        if STORE_H:
            # silu(g) again from a second read of the g tile (in L2: it was just read) rather than
            # kept live across the du and dg stores, which spilled: TMA 255 registers and 16 B of
            # stack, pointers 320 B; with the reload 181 and none, pointers 184 B
            # (tests/sm90_persistent_worker.py glu_bwd, bf16, block 128).
            if EPI_TMA:
                g2 = tl.where(valid, g_desc.load([first, 0, 0]).reshape(BLOCK, BN).to(tl.float32), 0.0)
                h = (g2 * tl.sigmoid(g2) * u).to(h_ptr.dtype.element_ty)
                h_desc.store([first, 0, 0], h.reshape(1, BLOCK, BN))
            else:
                g2 = tl.load(g_ptr + base + tile_off, mask=valid, other=0.0).to(tl.float32)
                h = (g2 * tl.sigmoid(g2) * u).to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + base + tile_off, h, mask=store_mask)


def backward_default_config(block: int, elem_bytes: int = 2) -> dict:
    """``sdd_glu``'s default (at block 128: a 128x128 tile, BK 64, 8 warps, 4 stages; one pinned config
    under the interpreter). One accumulator, but the epilogue holds ``g`` and ``u`` tiles beside it
    and computes three outputs: the GLU's half-width tile keeps that within the forward GLU's registers."""
    return default_config(block, elem_bytes, glu=True)


def sdd_glu_backward(dy_sorted: torch.Tensor, w2: torch.Tensor, g: torch.Tensor, u: torch.Tensor, topo, *,
                     store_h: bool = False, out: tuple | None = None, use_tma: bool | None = None, config: dict | None = None,
                     num_programs: int | None = None, schedule: torch.Tensor | None = None):  # fmt: skip
    """``(dg, du)``, or ``(dg, du, h)`` with ``store_h``: the SwiGLU gradients at the topology's blocks.

    ``dy_sorted [S, H]`` is the gradient of the down projection's output rows in sorted
    order, ``w2 [E, ffn, H]`` (any strides; read as ``w2[e]^T``), ``g`` and ``u`` the saved
    ``[capacity, bs, bs]`` pre-activations (``sdd_glu(..., store_pre=True)``; their padding
    is never read). ``dh = dy_sorted @ w2[e]^T`` is formed in fp32 registers and never
    stored. Outputs are new ``[capacity, bs, bs]`` tensors of ``dy_sorted``'s dtype, spare
    blocks and padding zero; ``out`` gives them instead (``(dg, du)`` or ``(dg, du, h)``, contiguous,
    that shape and dtype), every element written. ``use_tma``, ``config``, ``num_programs`` and ``schedule``
    (``tile_schedule(topo, config's BLOCKS_N)``) as ``sdd_persistent``.
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
        return outs
    cfg = dict(backward_default_config(bs, dy_sorted.element_size()), **(config or {}))
    check_config_keys(op, cfg, ("BLOCK_K", "BLOCKS_N", "num_warps", "num_stages", "FLATTEN"))
    if cfg["BLOCKS_N"] * bs > 256:
        raise ValueError(f"{op}: config BLOCKS_N={cfg['BLOCKS_N']} x block {bs} > 256 columns (a TMA box's limit)")
    b = w2.transpose(1, 2)  # [E, H, ffn]: K = H, N = ffn; K-contiguous when w2 is contiguous
    problems = [p for p in [tma_problem("dy_sorted", dy_sorted, 1)] if p]
    k_major, b_problems = _b_layout({"w2^T": b})
    problems += b_problems
    tma = resolve_tma(op, use_tma, dy_sorted, problems)
    # The epilogue's blocks by TMA too where each tile is one block (a wider tile's box would
    # reach into the next block row past F) and every block tensor's base is 16-byte aligned.
    epi_tma = tma and cfg["BLOCKS_N"] == 1 and not any(tma_problem("", t, 2) for t in (g, u, *outs))
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
    _sdd_glu_bwd_kernel[(min(programs, num_tiles),)](
        dy_sorted, b, g, u, dg, du, h if store_h else dg, schedule,
        topo.block_row_expert, topo.block_row_start, topo.block_row_end, topo.offsets,
        num_tiles, programs, S, topo.max_block_rows, H, ffn, topo.ffn_blocks, E,
        dy_sorted.stride(0), dy_sorted.stride(1), b.stride(0), b.stride(1), b.stride(2),
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], BLOCKS_N=cfg["BLOCKS_N"], COL_BITS=max(1, (nt - 1).bit_length()),
        A_TMA=tma, B_TMA=tma, B_K_MAJOR=bool(tma and k_major), EPI_TMA=epi_tma, STORE_H=bool(store_h),
        UPCAST=needs_upcast(dy_sorted.dtype), PRECISION=dot_precision(dy_sorted.dtype),
        FLATTEN=bool(cfg.get("FLATTEN", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return outs

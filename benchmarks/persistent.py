"""Times the persistent SDD kernels against ``sdd``, ``torch._grouped_mm`` and dense ``torch.matmul`` (issue 15).

``python -m benchmarks.persistent --out DIR`` on a CUDA GPU (bf16): for the Mixtral
(h4096/f14336/E8/k2) and fine-grained (h2048/f768/E128/k8) shapes at 16K tokens,
uniform and skewed routing, it times with ``triton.testing.do_bench`` (medians):

* the forward SDD ``h = x_sorted @ w1``: ``sdd`` (autotuned unless
  ``BSMOE_AUTOTUNE=0``), ``sdd_persistent`` with pointer loads and with TMA (its
  default config, plus a few others with ``--sweep``), ``torch._grouped_mm`` over the
  sorted rows, and a dense ``[S, H] @ [H, N]`` of equal useful FLOPs;
* the SwiGLU front half ``h = silu(x@w1) * (x@v1)``: ``sdd_glu`` (pointers, TMA),
  two ``sdd`` plus the torch activation-and-product, and ``grouped_mm`` on the
  concatenated ``[w1 | v1]`` plus the same torch epilogue;
* the fused gather (``--kernels`` has ``gather``): ``sdd_persistent(x, w1, topo,
  gather=token_index(plan))`` on the unsorted ``x [T, H]`` (A's rows by masked pointer
  loads through the index, ``w1`` by TMA) against the separate ``permute.gather`` kernel
  plus the TMA-fed ``sdd_persistent`` on its ``[S, H]`` copy, the gather alone, and the
  same two for ``sdd_glu``; the index is built once per routing plan, outside the timings;
* the forward DSD ``y_sorted = blocks(h) @ w2`` (``--kernels`` has ``dsd``): ``dsd``
  (autotuned), ``dsd_persistent`` with pointers and with TMA (``w2 [E, ffn, H]`` and
  transformers' ``down_proj [E, H, ffn]`` transposed; a few other TMA configs with
  ``--sweep``), ``torch._grouped_mm`` on the same product over the sorted rows (both
  weight layouts), and the weighted combine after it: ``dsd`` + ``combine(weights)``
  against ``dsd_persistent(row_weights=...)`` + the unweighted gather-sum; and the GLU
  backward's ``dx_sorted = dg @ w1^T + du @ v1^T`` (both weights K-major views of
  ``[E, H, ffn]``): ``dsd_persistent(dg, w1^T, also=(du, v1^T))``, one launch, against two
  TMA ``dsd_persistent`` launches and an add;
* the weight gradient DSD^T ``dw2 = blocks(h)^T @ dy_sorted`` (``--kernels`` has
  ``dsd_t``): ``dsd_t`` (autotuned), ``dsd_t_persistent`` with pointers and with TMA
  (into ``[E, ffn, H]``, and into a transposed ``[E, H, ffn]`` target as ``dw1^T`` is
  written; a few other TMA configs with ``--sweep``), and ``torch._grouped_mm`` on the
  same product over the sorted rows (``h_rows^T @ dy`` grouped along the rows: the
  grouped weight gradient);
* the SwiGLU backward's front half (``--kernels`` has ``glu_bwd``; not in the default list,
  so ``device_persistent.sh``'s run is unchanged): ``sdd`` for ``dh = dy_sorted @ w2^T`` plus
  the torch activation backward (``dg``, ``du`` in fp32, rounded once) against
  ``sdd_glu_backward`` (pointers, TMA, TMA with ``store_h``), on saved ``g``/``u`` from
  ``sdd_glu(store_pre=True)``; its check compares ``dg``.

Every Triton output is first checked against ``sdd``'s (relative Frobenius error,
recorded). Results go to ``DIR/persistent.json`` after every measurement (a run cut
short keeps what it measured); ``--budget-s`` stops starting new measurements.

``--dry-run`` (any machine, no GPU): builds the routings and topologies of the real
shapes on the CPU and prints the launch plan (tiles, grid, configs, TMA
eligibility, FLOPs, bytes) without allocating the operands. ``--smoke`` runs a tiny
shape through every implementation on the CPU (``TRITON_INTERPRET=1``), to catch
errors in this script before device time is spent on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch
import triton

from blocksparse_moe import build_topology, plan_routing

from .shapes import FINE_GRAINED, MIXTRAL, KernelShape, make_expert_ids

P = importlib.import_module("blocksparse_moe.kernels.sdd_persistent")
D = importlib.import_module("blocksparse_moe.kernels.dsd_persistent")
DT = importlib.import_module("blocksparse_moe.kernels.dsd_t_persistent")
SHAPES = (MIXTRAL, FINE_GRAINED)
SMOKE = KernelShape("smoke-h64-f96-e7-k2-t40", "smoke", 40, 64, 96, 7, 2, 16)
ROUTINGS = ("uniform", "skewed")
SWEEP = (  # TMA configs besides the default at BLOCK=128 (bf16): narrower tile, shallower pipe, BLOCK_K 128
    dict(BLOCK_K=64, BLOCKS_N=1, num_warps=4, num_stages=4),
    dict(BLOCK_K=64, BLOCKS_N=2, num_warps=8, num_stages=3),
    dict(BLOCK_K=128, BLOCKS_N=2, num_warps=8, num_stages=2),
    dict(BLOCK_K=64, BLOCKS_N=2, num_warps=8, num_stages=4, FLATTEN=True),
)
DSD_SWEEP = (  # dsd_persistent TMA configs besides the default 128x256x64/8 warps/4 stages
    dict(BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(BLOCK_K=64, BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_K=128, BLOCK_N=256, num_warps=8, num_stages=2),
    dict(BLOCK_K=64, BLOCK_N=256, num_warps=8, num_stages=4, FLATTEN=True),
)


def _setup(shape: KernelShape, routing: str, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(shape.tokens, shape.experts, shape.top_k, routing, gen)
    plan = plan_routing(ids.to(device), shape.experts)
    topo = build_topology(plan, shape.ffn, shape.block_size)
    return plan, topo


def _counts(shape: KernelShape, es: int = 2) -> dict:
    S, H, N, E = shape.tokens * shape.top_k, shape.hidden, shape.ffn, shape.experts
    flops = 2 * S * H * N
    return dict(S=S, flops=flops, min_bytes=es * (S * H + E * H * N + S * N),
                glu_flops=2 * flops, glu_min_bytes=es * (S * H + 2 * E * H * N + S * N))  # fmt: skip


def gather_counts(shape: KernelShape, es: int = 2) -> dict:
    """Bytes and launches of the SDD's A operand per forward, from the shapes (counted, not measured).

    Before: ``permute.gather`` reads ``S`` rows of ``x`` (``T`` distinct; the rest may hit L2)
    and writes the ``[S, H]`` copy, which the SDD reads again. After (``gather=``): the SDD
    reads the same ``S`` rows of ``x`` through the int32 index (``token_index(plan)``: reads
    ``sorted_to_slot``, writes the index, once per routing plan). The weights, the output and
    the schedule are the same on both sides and left out.
    """
    S, T, H = shape.tokens * shape.top_k, shape.tokens, shape.hidden
    before = dict(gather_read=es * S * H, copy_write=es * S * H, sdd_a_read=es * S * H, index_bytes=4 * S,
                  launches=2)  # fmt: skip
    after = dict(sdd_a_read=es * S * H, index_bytes=4 * S + 4 * S, launches=2)  # token_index + the SDD
    return dict(before=before, after=after, bytes_saved=es * S * H * 2 - 4 * S, distinct_x_bytes=es * T * H,
                note="launches: the gather launch is replaced by token_index's (one per plan, shared by "
                     "every SDD of a step); counted from shapes, not timed")  # fmt: skip


def plan_shape(shape: KernelShape, routing: str) -> dict:
    """What a run of this shape launches, from host-side sizes (no operand allocated)."""
    plan, topo = _setup(shape, routing, torch.device("cpu"))
    bs, F, R = topo.block_size, topo.ffn_blocks, topo.max_block_rows
    S, H, N, E = plan.num_slots, shape.hidden, shape.ffn, shape.experts
    meta = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")  # noqa: E731
    out = dict(shape=shape.asdict(), routing=routing, R=R, F=F, capacity=topo.capacity,
               active_block_rows=int(topo.expert_block_offsets[-1]), **_counts(shape))  # fmt: skip
    for glu in (False, True):
        cfg = P.persistent_configs(bs, 2, glu, use_tma=False)
        default = P.preferred_config(cfg)  # default_config's choice on a GPU
        nt = triton.cdiv(F, default["BLOCKS_N"])
        out["glu" if glu else "sdd"] = dict(default_config=default, configs=len(cfg), tiles=R * nt,
                                            grid_on_132_sms=min(132, R * nt))  # fmt: skip
    out["tma"] = {
        "a": P.tma_problem("a", meta(S, H), 1) or "ok",
        "w1 [E,H,N]": P.tma_problem("w1", meta(E, H, N), 2) or "ok",
        "w2^T view": P.tma_problem("w2^T", meta(E, N, H).transpose(1, 2), 1) or "ok",
    }
    out["gather"] = gather_counts(shape)
    # The DSD y_sorted = blocks(h) @ w2: output tiles over [S, H], K = ffn.
    dcfg = D.preferred_config(D.dsd_persistent_configs(bs, 2, use_tma=False))  # default_config's choice on a GPU
    dtiles = R * triton.cdiv(H, dcfg["BLOCK_N"])
    out["dsd"] = dict(default_config=dcfg, tiles=dtiles, grid_on_132_sms=min(132, dtiles), k_tail=N % bs != 0, tma={
        "h_blocks": P.tma_problem("h_blocks", meta(topo.capacity, bs, bs), 2) or "ok",
        "w2 [E,F,H]": P.tma_problem("w2", meta(E, N, H), 2) or "ok",
        "down_proj^T view": P.tma_problem("down_proj^T", meta(E, H, N).transpose(1, 2), 1) or "ok",
    })  # fmt: skip
    # The dual DSD of the backward, dx_sorted = dg @ w1^T + du @ v1^T: the same tiles, twice the K steps.
    out["dsd"]["dual_dx"] = dict(k_steps_per_tile=2 * triton.cdiv(N, dcfg["BLOCK_K"]), tma={
        "w1^T view": P.tma_problem("w1^T", meta(E, H, N).transpose(1, 2), 1) or "ok",
        "v1^T view": P.tma_problem("v1^T", meta(E, H, N).transpose(1, 2), 1) or "ok",
    })  # fmt: skip
    # The DSD^T dw2 = blocks(h)^T @ dy_sorted: output tiles over [E, ffn, H], K = the expert's rows.
    tcfg = D.preferred_config(DT.dsd_t_persistent_configs(bs, 2, use_tma=False))  # default_config's choice on a GPU
    ttiles = E * F * triton.cdiv(H, tcfg["BLOCK_N"])
    out["dsd_t"] = dict(default_config=tcfg, tiles=ttiles, grid_on_132_sms=min(132, ttiles), tma={
        "h_blocks": P.tma_problem("h_blocks", meta(topo.capacity, bs, bs), 2) or "ok",
        "dy_sorted [S,H]": P.tma_problem("dy_sorted", meta(S, H), 1) or "ok",
    })  # fmt: skip
    return out


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.float(), ref.float()
    return float((g - r).norm() / r.norm().clamp_min(1e-30))


class Runner:
    def __init__(self, out_dir: str, budget_s: float, device, smoke: bool):
        self.path = os.path.join(out_dir, "persistent.json")
        self.t_end = time.monotonic() + budget_s
        self.device, self.smoke = device, smoke
        self.records = []
        self.env = dict(torch=torch.__version__, triton=triton.__version__, argv=sys.argv,
                        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        git_sha=os.environ.get("BSMOE_GIT_SHA"), autotune=os.environ.get("BSMOE_AUTOTUNE", "1"))  # fmt: skip

    def time(self, fn) -> float:
        if self.smoke:  # CPU: one run, to exercise the code; not a measurement
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def record(self, base: dict, name: str, fn, check=None, flops: int = 0):
        if time.monotonic() > self.t_end:
            return None
        rec = dict(base, impl=name)
        try:
            result = fn()  # the first call compiles (and autotunes): outside the timing
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if check is not None:
                rec["rel_err_vs_sdd"] = _rel_err(*check(result))
            rec["ms"] = self.time(fn)
            rec["tflops"] = round(flops / rec["ms"] / 1e9, 1) if flops and not self.smoke else None
        except Exception as err:  # noqa: BLE001 - record it and measure the rest
            rec["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        self.records.append(rec)
        with open(self.path + ".tmp", "w") as f:
            json.dump(dict(env=self.env, results=self.records), f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        print(f"{base['shape']:<36} {base['routing']:<8} {name:<28} "
              + (f"{rec['ms']:9.3f} ms" if "ms" in rec else rec.get("error", "")[:80]), flush=True)  # fmt: skip
        return result if "ms" in rec else None


def run_shape(run: Runner, shape: KernelShape, routing: str, sweep: bool):
    dev, dt = run.device, torch.bfloat16
    plan, topo = _setup(shape, routing, dev)
    S, H, N, E = plan.num_slots, shape.hidden, shape.ffn, shape.experts
    c = _counts(shape)
    gen = torch.Generator(device=dev).manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=dev) * scale).to(dt)  # noqa: E731
    x, w1, v1 = rnd(S, H), rnd(E, H, N, scale=H**-0.5), rnd(E, H, N, scale=H**-0.5)
    base = dict(shape=shape.name, routing=routing)
    offs = plan.expert_offsets[1:].to(torch.int32).clone()
    ref = run.record(base, "sdd", lambda: P_sdd(x, w1, topo), flops=c["flops"])
    same = (lambda out: (out, ref)) if ref is not None else None
    run.record(base, "sdd_persistent pointers", lambda: P.sdd_persistent(x, w1, topo, use_tma=False),
               check=same, flops=c["flops"])  # fmt: skip
    # TMA: the GPU's, or under --smoke the interpreter's emulation of it.
    run.record(base, "sdd_persistent tma", lambda: P.sdd_persistent(x, w1, topo, use_tma=True), check=same,
               flops=c["flops"])  # fmt: skip
    for i, cfg in enumerate(SWEEP if sweep else ()):
        run.record(dict(base, config=cfg), f"sdd_persistent tma sweep{i}",
                   lambda cfg=cfg: P.sdd_persistent(x, w1, topo, use_tma=True, config=cfg), check=same,
                   flops=c["flops"])  # fmt: skip
    # The backward's SDD, dh = dy_sorted @ w2^T: b a K-contiguous view (the K-major descriptor).
    w2t = rnd(E, N, H, scale=N**-0.5).transpose(1, 2)
    ref_t = run.record(base, "bwd sdd (w2^T)", lambda: P_sdd(x, w2t, topo), flops=c["flops"])
    run.record(base, "bwd sdd_persistent tma (w2^T)", lambda: P.sdd_persistent(x, w2t, topo, use_tma=True),
               check=(lambda out: (out, ref_t)) if ref_t is not None else None, flops=c["flops"])  # fmt: skip
    if hasattr(torch, "_grouped_mm"):  # torch 2.13 has a CPU version too: --smoke runs it
        run.record(base, "grouped_mm", lambda: torch._grouped_mm(x, w1, offs=offs), flops=c["flops"])
    wd = w1[0].contiguous()  # dense [S, H] @ [H, N]: the same useful FLOPs as the SDD
    run.record(base, "dense matmul", lambda: torch.matmul(x, wd), flops=c["flops"])
    # SwiGLU front half.
    act = torch.nn.functional.silu
    g_ref = run.record(base, "glu: 2x sdd + torch epilogue",
                       lambda: act(P_sdd(x, w1, topo)) * P_sdd(x, v1, topo), flops=c["glu_flops"])  # fmt: skip
    same_h = (lambda out: (out, g_ref)) if g_ref is not None else None
    for tma in (False, True):
        run.record(base, f"sdd_glu {'tma' if tma else 'pointers'}", lambda tma=tma: P.sdd_glu(x, w1, v1, topo, use_tma=tma),
                   check=same_h, flops=c["glu_flops"])  # fmt: skip
    if hasattr(torch, "_grouped_mm"):
        w13 = torch.cat([w1, v1], dim=2)

        def gmm_glu():
            gu = torch._grouped_mm(x, w13, offs=offs)
            return act(gu[:, :N]) * gu[:, N:]

        run.record(base, "glu: grouped_mm [w1|v1] + torch epilogue", gmm_glu, flops=c["glu_flops"])


def run_gather(run: Runner, shape: KernelShape, routing: str, sweep: bool):
    """The fused gather against the gather kernel + the TMA-fed SDD on the permuted copy (MLP and GLU)."""
    dev, dt = run.device, torch.bfloat16
    plan, topo = _setup(shape, routing, dev)
    T, H, N, E, k = plan.num_tokens, shape.hidden, shape.ffn, shape.experts, plan.top_k
    c = _counts(shape)
    gen = torch.Generator(device=dev).manual_seed(4)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=dev) * scale).to(dt)  # noqa: E731
    x, w1, v1 = rnd(T, H), rnd(E, H, N, scale=H**-0.5), rnd(E, H, N, scale=H**-0.5)
    base = dict(shape=shape.name, routing=routing)
    kern = importlib.import_module("blocksparse_moe.kernels")
    idx = P.token_index(plan)  # once per routing plan (every SDD of a step shares it): not timed
    run.record(base, "gather alone", lambda: kern.gather(x, plan.sorted_to_slot, k))
    ref = run.record(base, "gather + sdd_persistent tma",
                     lambda: P.sdd_persistent(kern.gather(x, plan.sorted_to_slot, k), w1, topo, use_tma=True),
                     flops=c["flops"])  # fmt: skip
    # Bit-identical on the same operands (same loads, same K steps): rel_err 0 expected.
    run.record(base, "sdd_persistent gather (tma b)", lambda: P.sdd_persistent(x, w1, topo, use_tma=True, gather=idx),
               check=(lambda out: (out, ref)) if ref is not None else None, flops=c["flops"])  # fmt: skip
    ref_h = run.record(base, "gather + sdd_glu tma",
                       lambda: P.sdd_glu(kern.gather(x, plan.sorted_to_slot, k), w1, v1, topo, use_tma=True),
                       flops=c["glu_flops"])  # fmt: skip
    run.record(base, "sdd_glu gather (tma b)", lambda: P.sdd_glu(x, w1, v1, topo, use_tma=True, gather=idx),
               check=(lambda out: (out, ref_h)) if ref_h is not None else None, flops=c["glu_flops"])  # fmt: skip


def _rows_to_blocks(h_rows: torch.Tensor, topo) -> torch.Tensor:
    """Sorted rows ``[S, ffn]`` into the block layout ``[capacity, bs, bs]`` (zeros in padding and spare blocks)."""
    b, F, R = topo.block_size, topo.ffn_blocks, topo.max_block_rows
    idx = topo.padded_row_to_sorted()
    padded = h_rows.new_zeros(R * b, F * b)
    padded[:, : h_rows.shape[1]] = torch.where((idx >= 0)[:, None], h_rows[idx.clamp_min(0)], 0)
    return padded.view(R, b, F, b).permute(0, 2, 1, 3).contiguous().view(R * F, b, b)


def run_dsd(run: Runner, shape: KernelShape, routing: str, sweep: bool):
    """``y_sorted = blocks(h) @ w2`` and the combine after it, every implementation on the same operands."""
    dev, dt = run.device, torch.bfloat16
    plan, topo = _setup(shape, routing, dev)
    S, H, N, E = plan.num_slots, shape.hidden, shape.ffn, shape.experts
    c = _counts(shape)
    gen = torch.Generator(device=dev).manual_seed(2)
    h_rows = torch.randn(S, N, generator=gen, device=dev).to(dt)
    h = _rows_to_blocks(h_rows, topo)
    w2 = (torch.randn(E, N, H, generator=gen, device=dev) * N**-0.5).to(dt)
    base = dict(shape=shape.name, routing=routing)
    offs = plan.expert_offsets[1:].to(torch.int32).clone()
    kern = importlib.import_module("blocksparse_moe.kernels")
    ref = run.record(base, "dsd", lambda: kern.dsd(h, w2, topo), flops=c["flops"])
    same = (lambda out: (out, ref)) if ref is not None else None
    for tma in (False, True):
        run.record(base, f"dsd_persistent {'tma' if tma else 'pointers'}",
                   lambda tma=tma: D.dsd_persistent(h, w2, topo, use_tma=tma), check=same, flops=c["flops"])  # fmt: skip
    for i, cfg in enumerate(DSD_SWEEP if sweep else ()):
        run.record(dict(base, config=cfg), f"dsd_persistent tma sweep{i}",
                   lambda cfg=cfg: D.dsd_persistent(h, w2, topo, use_tma=True, config=cfg), check=same,
                   flops=c["flops"])  # fmt: skip
    w2_k = w2.transpose(1, 2).contiguous().transpose(1, 2)  # down_proj [E, H, ffn] seen as w2: the same values
    run.record(base, "dsd_persistent tma (down_proj^T)", lambda: D.dsd_persistent(h, w2_k, topo, use_tma=True),
               check=same, flops=c["flops"])  # fmt: skip
    if hasattr(torch, "_grouped_mm"):
        run.record(base, "dsd: grouped_mm", lambda: torch._grouped_mm(h_rows, w2, offs=offs), check=same,
                   flops=c["flops"])  # fmt: skip
        run.record(base, "dsd: grouped_mm (down_proj^T)", lambda: torch._grouped_mm(h_rows, w2_k, offs=offs),
                   check=same, flops=c["flops"])  # fmt: skip
    # The combine: routing weights in the combine (today) or in the DSD's epilogue (then a gather-sum).
    weights = torch.rand(plan.num_tokens, plan.top_k, generator=gen, device=dev)
    row_weights = weights.reshape(-1)[plan.sorted_to_slot.long()]
    k = plan.top_k
    y_ref = run.record(base, "dsd + combine(weights)",
                       lambda: kern.combine(kern.dsd(h, w2, topo), plan.slot_to_sorted, k, weights))  # fmt: skip
    run.record(base, "dsd_persistent tma row_weights",
               lambda: D.dsd_persistent(h, w2, topo, row_weights=row_weights, use_tma=True), flops=c["flops"])  # fmt: skip
    run.record(base, "dsd_persistent tma row_weights + combine",
               lambda: kern.combine(D.dsd_persistent(h, w2, topo, row_weights=row_weights, use_tma=True),
                                    plan.slot_to_sorted, k),
               check=(lambda out: (out, y_ref)) if y_ref is not None else None)  # fmt: skip
    # The backward's dx_sorted = dg @ w1^T + du @ v1^T (w1, v1 [E, H, ffn]: K-major views), h standing in for dg.
    du = _rows_to_blocks(torch.randn(S, N, generator=gen, device=dev).to(dt), topo)
    w1t, v1t = ((torch.randn(E, H, N, generator=gen, device=dev) * N**-0.5).to(dt).transpose(1, 2) for _ in range(2))
    dx_ref = run.record(base, "2x dsd_persistent + add (dx)",
                        lambda: D.dsd_persistent(h, w1t, topo, use_tma=True).add_(
                            D.dsd_persistent(du, v1t, topo, use_tma=True)), flops=2 * c["flops"])  # fmt: skip
    run.record(base, "dsd_persistent dual (dx)", lambda: D.dsd_persistent(h, w1t, topo, also=(du, v1t), use_tma=True),
               check=(lambda out: (out, dx_ref)) if dx_ref is not None else None, flops=2 * c["flops"])  # fmt: skip


def run_dsd_t(run: Runner, shape: KernelShape, routing: str, sweep: bool):
    """The weight gradient ``dw2 = blocks(h)^T @ dy_sorted``, every implementation on the same operands."""
    dev, dt = run.device, torch.bfloat16
    plan, topo = _setup(shape, routing, dev)
    S, H, N, E = plan.num_slots, shape.hidden, shape.ffn, shape.experts
    c = _counts(shape)
    gen = torch.Generator(device=dev).manual_seed(3)
    h_rows = torch.randn(S, N, generator=gen, device=dev).to(dt)
    h = _rows_to_blocks(h_rows, topo)
    dy = (torch.randn(S, H, generator=gen, device=dev) * S**-0.5).to(dt)
    base = dict(shape=shape.name, routing=routing)
    offs = plan.expert_offsets[1:].to(torch.int32).clone()
    kern = importlib.import_module("blocksparse_moe.kernels")
    ref = run.record(base, "dsd_t", lambda: kern.dsd_t(h, dy, topo), flops=c["flops"])
    same = (lambda out: (out, ref)) if ref is not None else None
    for tma in (False, True):
        run.record(base, f"dsd_t_persistent {'tma' if tma else 'pointers'}",
                   lambda tma=tma: DT.dsd_t_persistent(h, dy, topo, use_tma=tma), check=same, flops=c["flops"])  # fmt: skip
    for i, cfg in enumerate(DSD_SWEEP if sweep else ()):
        run.record(dict(base, config=cfg), f"dsd_t_persistent tma sweep{i}",
                   lambda cfg=cfg: DT.dsd_t_persistent(h, dy, topo, use_tma=True, config=cfg), check=same,
                   flops=c["flops"])  # fmt: skip
    dw_t = torch.empty(E, H, N, dtype=dt, device=dev).transpose(1, 2)  # a weight stored [E, H, ffn], written as dw1^T
    run.record(base, "dsd_t_persistent tma ([E,H,ffn] target)",
               lambda: DT.dsd_t_persistent(h, dy, topo, out=dw_t, use_tma=True), check=same, flops=c["flops"])  # fmt: skip
    if hasattr(torch, "_grouped_mm"):  # 2-D x 2-D with offs: groups along the rows (the K of this product)
        run.record(base, "dsd_t: grouped_mm", lambda: torch._grouped_mm(h_rows.t(), dy, offs=offs), check=same,
                   flops=c["flops"])  # fmt: skip


def run_glu_bwd(run: Runner, shape: KernelShape, routing: str, sweep: bool):
    """``dh = dy @ w2^T`` + the torch activation backward against ``sdd_glu_backward`` (``sweep`` unused);
    then with routing weights: the unfused side scales ``dy`` first (``(w * dy) @ w2^T``, no ``d_row_weights``:
    a conservative baseline), the fused one also returns ``d_row_weights``."""
    G = importlib.import_module("blocksparse_moe.kernels.sdd_glu_backward")
    dev, dt = run.device, torch.bfloat16
    plan, topo = _setup(shape, routing, dev)
    S, H, N, E = plan.num_slots, shape.hidden, shape.ffn, shape.experts
    c = _counts(shape)
    gen = torch.Generator(device=dev).manual_seed(4)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=dev) * scale).to(dt)  # noqa: E731
    x, w1, v1 = rnd(S, H), rnd(E, H, N, scale=H**-0.5), rnd(E, H, N, scale=H**-0.5)
    _, g, u = P.sdd_glu(x, w1, v1, topo, store_pre=True)  # the forward's saved pre-activations (untimed)
    del x, w1, v1
    dy, w2 = rnd(S, H), rnd(E, N, H, scale=N**-0.5)
    rw = torch.rand(S, generator=gen, device=dev)  # fp32 routing weights in sorted order
    base = dict(shape=shape.name, routing=routing)

    def unfused(dy=dy):
        dh = P_sdd(dy, w2.transpose(1, 2), topo).float()
        gf, uf = g.float(), u.float()
        s = torch.sigmoid(gf)
        return (dh * uf * s * (1 + gf * (1 - s))).to(dt), (dh * gf * s).to(dt)

    ref = run.record(base, "glu bwd: sdd (w2^T) + torch", unfused, flops=c["flops"])
    same = (lambda out: (out[0], ref[0])) if ref is not None else None
    for tma in (False, True):
        run.record(base, f"sdd_glu_backward {'tma' if tma else 'pointers'}",
                   lambda tma=tma: G.sdd_glu_backward(dy, w2, g, u, topo, use_tma=tma), check=same, flops=c["flops"])  # fmt: skip
    run.record(base, "sdd_glu_backward tma store_h", lambda: G.sdd_glu_backward(dy, w2, g, u, topo, store_h=True,
               use_tma=True), check=same, flops=c["flops"])  # fmt: skip
    ref_w = run.record(base, "glu bwd rw: sdd (w*dy, w2^T) + torch", lambda: unfused((dy.float() * rw[:, None]).to(dt)),
                       flops=c["flops"])  # fmt: skip
    same_w = (lambda out: (out[0], ref_w[0])) if ref_w is not None else None
    for tma in (False, True):
        run.record(base, f"sdd_glu_backward {'tma' if tma else 'pointers'} row_weights",
                   lambda tma=tma: G.sdd_glu_backward(dy, w2, g, u, topo, row_weights=rw, use_tma=tma), check=same_w,
                   flops=c["flops"])  # fmt: skip


def P_sdd(x, w, topo):  # noqa: N802 - the existing kernel, by import path (the package exports the function)
    return importlib.import_module("blocksparse_moe.kernels.sdd").sdd(x, w, topo)


def _run(run: Runner, kernels: list[str], shape: KernelShape, routing: str, sweep: bool) -> None:
    # Each function's operands are freed when it returns (no del: the timed lambdas hold them).
    for name, fn in (("sdd", run_shape), ("gather", run_gather), ("dsd", run_dsd), ("dsd_t", run_dsd_t),
                     ("glu_bwd", run_glu_bwd)):  # fmt: skip
        if name in kernels:
            fn(run, shape, routing, sweep)
            if run.device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bsmoe-out"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new measurement after this many seconds")
    ap.add_argument("--routing", default=",".join(ROUTINGS))
    ap.add_argument("--shapes", default="mixtral,fine", help="comma list of: mixtral, fine")
    ap.add_argument("--sweep", action="store_true", help="time a few TMA configs besides the default")
    ap.add_argument("--kernels", default="sdd,gather,dsd,dsd_t",
                    help="comma list of: sdd (SDD and GLU rows), gather (the fused gather's rows), dsd, dsd_t, "
                         "glu_bwd (the GLU backward SDD; not in the default)")  # fmt: skip
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print the launch plan of the real shapes (CPU, no operands)"
    )
    mode.add_argument("--smoke", action="store_true", help="a tiny shape through every implementation on the CPU")
    args = ap.parse_args(argv)
    routings = args.routing.split(",")
    kernels = args.kernels.split(",")
    if not set(kernels) <= {"sdd", "gather", "dsd", "dsd_t", "glu_bwd"}:
        ap.error(f"--kernels must be a comma list of sdd, gather, dsd, dsd_t, glu_bwd; got {args.kernels!r}")
    shapes = [{"mixtral": MIXTRAL, "fine": FINE_GRAINED}[s] for s in args.shapes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        plans = [plan_shape(s, r) for s in shapes for r in routings]
        with open(os.path.join(args.out, "persistent-plan.json"), "w") as f:
            json.dump(plans, f, indent=1)
        print(json.dumps(plans, indent=1))
        return 0
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs under the interpreter: set TRITON_INTERPRET=1")
        run = Runner(args.out, args.budget_s, torch.device("cpu"), smoke=True)
        for r in routings:
            _run(run, kernels, SMOKE, r, sweep=False)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --dry-run or --smoke on a CPU")
        run = Runner(args.out, args.budget_s, torch.device("cuda"), smoke=False)
        for r in routings:  # every shape's uniform run before any skewed one, should the budget end
            for s in shapes:
                _run(run, kernels, s, r, args.sweep)
    bad = [r for r in run.records if "error" in r or r.get("rel_err_vs_sdd", 0) > 2e-2]
    print(f"{len(run.records)} records in {run.path}; {len(bad)} errors or mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

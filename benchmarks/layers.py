"""Layer benchmarks: dMoE forward+backward against the other ways of running the same experts.

Variants (all share one router and one set of expert weights, so they route alike):

``dmoe``          :class:`blocksparse_moe.dMoE` with ``backend="auto"`` (grouped on a CPU; on a GPU
                  Triton or grouped by measured shape, ``backends/select.py``).
``dmoe_<b>``      the same layer on each other backend ``b`` the device runs: ``grouped``
                  (both), ``triton`` (CUDA), ``torch`` (CPU: the block-layout reference).
``moe_cf<f>``     :class:`blocksparse_moe.MoE`, capacity ``ceil(f * T * k / E)`` rows per
                  expert, at ``f`` = 1.0, 1.25 and 2.0; rows past capacity are dropped.
``expert_loop``   a Python loop over experts that gathers each expert's tokens and
                  ``index_add``s the result back, as Hugging Face models do; it is
                  :func:`blocksparse_moe.reference.moe_ffn_dense` after the router.
``grouped_mm``    dropless with ``torch._grouped_mm`` over the sorted rows (where torch
                  has it for the device): router, ``plan_routing``, gather, two or three
                  grouped GEMMs, weighted combine.

Per variant: fwd+bwd median time and quantiles, tokens per second, TFLOP/s of the
expert matmuls (useful FLOPs only), peak memory (CUDA only: the caching allocator's
peak during one step), dropped (token, expert) assignments, and padding overhead
(rows the expert matmuls compute over rows routed). For dMoE also the time of the
router, of ``plan_routing`` (the sort) and of ``build_topology``, and their share of
its fwd+bwd time.

Correctness before timing: each variant's output and weight gradients are compared
with ``moe_ffn_dense`` in the reference dtype, for the same routing (with the weight
of each dropped assignment set to zero for ``MoE``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from blocksparse_moe import MoE, MoEConfig, build_topology, dMoE, ops, plan_routing
from blocksparse_moe.reference import combine_torch, gather_torch, moe_ffn_dense

from .common import Rotation, Timer, check_close, l2_bytes, ref_dtype, run_grid, short_error, sync, tensor_bytes
from .shapes import LayerShape, layer_inputs, load_stats

CAPACITY_FACTORS = (1.0, 1.25, 2.0)
DMOE_BACKENDS = ("grouped", "triton", "torch")
VARIANTS = (("dmoe",) + tuple(f"dmoe_{b}" for b in DMOE_BACKENDS) + tuple(f"moe_cf{f}" for f in CAPACITY_FACTORS)
            + ("expert_loop", "grouped_mm"))  # fmt: skip


def _backend_runs_here(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` is not timed on ``device``, or None when it is."""
    if backend == "triton" and device.type != "cuda":
        return "Triton runs compiled on CUDA only (the CPU interpreter is not a timing target)"
    if backend == "torch" and device.type == "cuda":
        return "the torch block reference reads counts back per op on a GPU; not a timing target there"
    return None


class ExpertLoop(nn.Module):
    """Router, then one expert at a time over its tokens (``moe_ffn_dense``)."""

    def __init__(self, base: dMoE):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        x2 = x.reshape(-1, b.config.hidden_size)
        route = b.router(x2)
        out = moe_ffn_dense(x2, route.expert_ids, route.weights, b.w1, b.w2, b.v1, b.activation)
        return out.reshape(x.shape)


class GroupedMM(nn.Module):
    """Dropless with ``torch._grouped_mm``: no block padding, one GEMM per projection."""

    def __init__(self, base: dMoE):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, cfg = self.base, self.base.config
        x2 = x.reshape(-1, cfg.hidden_size)
        route = b.router(x2)
        plan = plan_routing(route.expert_ids, cfg.num_experts)
        offs = plan.expert_offsets[1:].clone()  # cumulative ends, in their own allocation
        xs = gather_torch(x2, plan)
        h = b.activation(torch._grouped_mm(xs, b.w1, offs=offs))
        if b.v1 is not None:
            h = h * torch._grouped_mm(xs, b.v1, offs=offs)
        ys = torch._grouped_mm(h, b.w2, offs=offs)
        return combine_torch(ys, plan, route.weights).reshape(x.shape)


def _share(module, base: dMoE):
    """Make ``module`` use ``base``'s router and weights (no copy)."""
    module.router = base.router
    module.w1, module.w2 = base.w1, base.w2
    if base.v1 is not None:
        module.v1 = base.v1
    return module


def _config(shape: LayerShape, device, dtype) -> MoEConfig:
    return MoEConfig(
        hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, num_experts=shape.experts, top_k=shape.top_k,
        block_size=shape.block_size, activation=shape.activation, glu=shape.glu, dtype=dtype, device=device,
    )  # fmt: skip


def useful_flops(shape: LayerShape) -> int:
    """Expert matmul FLOPs of one fwd+bwd (backward = 2x forward), padding and router excluded."""
    mats = 3 if shape.glu else 2
    return 3 * 2 * shape.tokens * shape.top_k * shape.hidden * shape.ffn * mats


def _kept(ids: torch.Tensor, experts: int, capacity: int) -> torch.Tensor:
    """``[T, k]`` bool: the assignments a capacity-based layer keeps (MoE's rule: slot order)."""
    plan = plan_routing(ids, experts)
    rank = plan.slot_to_sorted.long() - plan.expert_offsets.long()[ids.reshape(-1)]
    return (rank < capacity).view(ids.shape)


def _check(variant: nn.Module, base: dMoE, x: torch.Tensor, g: torch.Tensor, keep, rd, dtype) -> dict:
    """Output and weight gradients of ``variant`` against ``moe_ffn_dense`` for the same routing."""
    params = [p for p in (base.w1, base.w2, base.v1) if p is not None]
    for p in params:
        p.grad = None
    with torch.no_grad():
        route = base.router(x)
    weights = route.weights if keep is None else torch.where(keep, route.weights, torch.zeros_like(route.weights))
    out = variant(x)
    out.backward(g)
    ref_params = [p.detach().to(rd).requires_grad_(True) for p in params]
    w1r, w2r = ref_params[0], ref_params[1]
    v1r = ref_params[2] if base.v1 is not None else None
    ref = moe_ffn_dense(x.detach().to(rd), route.expert_ids, weights.to(rd), w1r, w2r, v1r, base.activation)
    ref.backward(g.to(rd))
    checks = {"output": check_close(out, ref, dtype)}
    for name, p, r in zip(("w1_grad", "w2_grad", "v1_grad"), params, ref_params):
        checks[name] = check_close(p.grad, r.grad, dtype)
    for p in params:
        p.grad = None
    bad = [f"{k}: {v['message']}" for k, v in checks.items() if not v["ok"]]
    return {"ok": not bad, "message": "; ".join(bad) or "ok",
            "max_abs_err": {k: v.get("max_abs_err") for k, v in checks.items()}}  # fmt: skip


def _peak_memory(step, device, grads) -> dict:
    if device.type != "cuda":
        return {"peak_bytes": None, "step_peak_bytes": None}
    for t in grads:
        t.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    for t in grads:
        t.grad = None
    return {"peak_bytes": peak, "step_peak_bytes": peak - before}


def run_config(shape: LayerShape, routing: str, seed: int, device, dtype, timer: Timer, env: dict,
               progress=None, skip: tuple = ()) -> dict:  # fmt: skip
    """Check and time every variant on one (shape, routing)."""
    torch.manual_seed(seed)
    cfg = _config(shape, device, dtype)
    base = dMoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    rd = ref_dtype(device, dtype)
    T, E, k = shape.tokens, shape.experts, shape.top_k
    x0 = layer_inputs(T, shape.hidden, routing, gen, dtype, device)
    g = torch.randn(T, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        ids = base.router(x0).expert_ids
    plan = plan_routing(ids, E)
    topo = build_topology(plan, shape.ffn, shape.block_size)
    active_rows = int(topo.expert_block_offsets[-1]) * shape.block_size  # host read, untimed
    flops = useful_flops(shape)
    rec = {
        "shape": shape.asdict(), "routing": routing, "seed": seed, "tokens": T, "useful_flops": flops,
        "load": load_stats(ids, E), "backend": ops.resolve_backend(cfg.backend, x0.device, dtype, E, shape.ffn),
        "impls": {},
    }  # fmt: skip
    params = [p for p in base.parameters()]
    xs_bytes = tensor_bytes(x0)

    def make_x(i):
        x = x0 if i == 0 else layer_inputs(T, shape.hidden, routing, gen, dtype, device)
        return x.detach().requires_grad_(True)

    rot = Rotation(make_x, xs_bytes, l2_bytes(device), max_sets=4)
    rec["rotation_sets"] = rot.count
    for name in VARIANTS:
        if name in skip:
            rec["impls"][name] = {"status": "skipped", "error": "left out with --skip"}
            continue
        info = {"real_rows": T * k}
        keep = None
        if name == "dmoe" or name.startswith("dmoe_"):
            backend = rec["backend"] if name == "dmoe" else name[len("dmoe_"):]
            why_not = None if name == "dmoe" else _backend_runs_here(backend, device)
            if why_not is None and name != "dmoe" and backend == rec["backend"]:
                why_not = f"the same as dmoe (auto resolves to {backend} here)"
            rows = active_rows if backend in ("triton", "torch") else T * k  # grouped pads nothing
            info.update(backend=backend, computed_rows=rows, dropped_assignments=0)
            if why_not is not None:
                rec["impls"][name] = {"status": "unsupported", "error": why_not, **info}
                _step(progress, shape, routing, name, "unsupported")
                continue
            variant = base if name == "dmoe" else _share(dMoE(replace(cfg, backend=backend)), base)
        elif name.startswith("moe_cf"):
            cf = float(name[len("moe_cf"):])
            variant = _share(MoE(replace(cfg, capacity_factor=cf)), base)
            C = variant.config.capacity(T)
            keep = _kept(ids, E, C)
            info.update(capacity_factor=cf, capacity=C, computed_rows=E * C)
        elif name == "expert_loop":
            variant = ExpertLoop(base)
            info.update(computed_rows=T * k, dropped_assignments=0)
        else:
            variant = GroupedMM(base)
            info.update(computed_rows=T * k, dropped_assignments=0)
            if not env["grouped_mm"]["available"]:
                rec["impls"][name] = {"status": "unsupported", "error": env["grouped_mm"]["error"], **info}
                _step(progress, shape, routing, name, "unsupported")
                continue
        info["padding_rows"] = info["computed_rows"] / info["real_rows"]
        rec["impls"][name] = _run_variant(name, variant, base, rot, g, keep, rd, dtype, device, timer, params, info)
        _step(progress, shape, routing, name, rec["impls"][name]["status"])
    _finish(rec, shape)
    rec["overheads"] = _overheads(base, x0, ids, shape, timer, rec["impls"].get("dmoe", {}))
    _step(progress, shape, routing, "overheads", "ok")
    return rec


def _step(progress, shape, routing, name, status):
    if progress:
        progress.step(f"layers {shape.name} {routing} {name}: {status}")


def _run_variant(name, variant, base, rot, g, keep, rd, dtype, device, timer, params, info) -> dict:
    x0 = rot.sets[0]
    try:
        check = _check(variant, base, x0, g, keep, rd, dtype)
        if keep is not None:  # MoE reports its drops: they must match the capacity rule
            with torch.no_grad():
                _, aux = variant(x0, return_aux=True)
            info["dropped_assignments"] = int(aux.dropped_tokens)
            expected_drops = int((~keep).sum())
            if info["dropped_assignments"] != expected_drops:
                check["ok"] = False
                check["message"] = f"reported {info['dropped_assignments']} dropped, the capacity rule drops {expected_drops}"
        sync(device)
    except Exception as err:  # noqa: BLE001 - recorded, never hidden
        return {"status": "error", "error": short_error(err), **info}
    info["dropped_fraction"] = info["dropped_assignments"] / info["real_rows"] if info["real_rows"] else 0.0
    if not check["ok"]:
        return {"status": "failed", "error": f"correctness check failed: {check['message']}", "check": check, **info}
    grads = params + rot.sets

    def step():
        variant(rot.next()).backward(g)

    try:
        t = timer.measure_twice(step, grad_to_none=grads)
        mem = _peak_memory(step, device, grads)
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "error": f"while timing: {short_error(err)}", "check": check, **info}
    return {"status": "ok", "check": check, **info, **t, **mem}


def _finish(rec: dict, shape: LayerShape) -> None:
    """Throughput figures and the comparison with dMoE measured in the same run."""
    dmoe_ms = rec["impls"].get("dmoe", {}).get("median_ms")
    for r in rec["impls"].values():
        med = r.get("median_ms")
        r["tokens_per_s"] = shape.tokens / (med * 1e-3) if med else None
        r["tflops"] = rec["useful_flops"] / (med * 1e-3) / 1e12 if med else None
        r["time_over_dmoe"] = med / dmoe_ms if (med and dmoe_ms) else None


def _overheads(base: dMoE, x: torch.Tensor, ids: torch.Tensor, shape: LayerShape, timer: Timer, dmoe: dict) -> dict:
    """Router, sort (``plan_routing``) and ``build_topology`` times, and their share of dMoE fwd+bwd."""
    E, b = shape.experts, shape.block_size
    try:
        parts = {"router": timer.measure_twice(lambda: base.router(x))}  # with autograd, as in forward
        with torch.no_grad():
            plan = plan_routing(ids, E)
            parts["sort"] = timer.measure_twice(lambda: plan_routing(ids, E))
            parts["topology"] = timer.measure_twice(lambda: build_topology(plan, shape.ffn, b))
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "error": short_error(err)}
    total = dmoe.get("median_ms") if dmoe.get("status") == "ok" else None
    out = {"status": "ok", "dmoe_fwd_bwd_ms": total}
    for k, v in parts.items():
        out[f"{k}_ms"] = v["median_ms"]
        out[f"{k}_spread"] = v["spread"]
        out[f"{k}_share"] = v["median_ms"] / total if total else None
    routing_topology = sum(v["median_ms"] for v in parts.values())
    out["routing_topology_ms"] = routing_topology
    out["routing_topology_share"] = routing_topology / total if total else None
    return out


def count_steps(shapes, routings, skip: tuple = ()) -> int:
    return len(shapes) * len(routings) * (len([v for v in VARIANTS if v not in skip]) + 1)


def run_all(shapes, routings, device, dtype, timer, env, progress=None, seed: int = 4321, skip: tuple = (),
            budget=None, on_record=None) -> list[dict]:  # fmt: skip
    """Every (shape, routing) in turn (see :func:`common.run_grid` for ``budget`` and ``on_record``)."""

    def run_one(shape, routing, sd):
        return [run_config(shape, routing, sd, device, dtype, timer, env, progress, skip)]

    return run_grid(shapes, routings, seed, device, run_one, budget, on_record)

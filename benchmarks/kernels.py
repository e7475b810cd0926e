"""Kernel benchmarks: every product of the expert FFN, forward and backward, against the ceilings.

Products (``S = T * k`` sorted rows, ``H`` hidden, ``N`` ffn; every one does
``2 * S * H * N`` useful FLOPs, padding excluded):

============  ==========================  =======  ==================================
product       computes                    kernel   dense comparator (same FLOPs)
============  ==========================  =======  ==================================
fwd_sdd       ``h = x @ w1``              SDD      ``[S, H] @ [H, N]``
fwd_dsd       ``y = h @ w2``              DSD      ``[S, N] @ [N, H]``
bwd_sdd       ``dh = dy @ w2^T``          SDD      ``[S, H] @ [N, H]^T``
bwd_dsd       ``dx = dh @ w1^T``          DSD      ``[S, N] @ [H, N]^T``
bwd_dsd_t_w2  ``dw2 = h^T @ dy``          DSD^T    ``[S, N]^T @ [S, H]``
bwd_dsd_t_w1  ``dw1^T = dh^T @ x``        DSD^T    ``[S, N]^T @ [S, H]``
============  ==========================  =======  ==================================

Implementations:

``bsmoe_triton``  this library's Triton launchers (``blocksparse_moe.kernels``).
``bsmoe_torch``   this library's torch backend (CPU runs only: on a GPU it syncs per expert).
``dense``         ``torch.matmul`` on dense operands of the same useful FLOPs (cuBLAS on a GPU).
``grouped_mm``    ``torch._grouped_mm`` over the sorted rows (no padding), where torch has it.
``stk``           stanford-stk's Triton kernels (``stk.ops``) on ``Topology.to_stk()`` and
                  MegaBlocks' padded layout; 128 x 128 blocks only.

Every implementation's output is compared with :mod:`blocksparse_moe.reference`
(``sdd_torch``/``dsd_torch``/``dsd_t_torch``; ``dense`` with ``torch.matmul`` in the
reference dtype) before it is timed; one that fails is reported ``failed`` and not
timed. Under Triton's interpreter (CPU) the Triton implementations are checked but
not timed (``checked``): the interpreter's time measures numpy, not a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksparse_moe import build_topology, plan_routing
from blocksparse_moe import kernels as K
from blocksparse_moe.kernels.config import interpreting
from blocksparse_moe.reference import dsd_t_torch, dsd_torch, sdd_torch

from .common import Rotation, Timer, check_close, l2_bytes, ref_dtype, run_grid, short_error, sync, tensor_bytes
from .shapes import KernelShape, load_stats, make_expert_ids

IMPLS = ("bsmoe_triton", "bsmoe_torch", "dense", "grouped_mm", "stk")


@dataclass(frozen=True)
class Product:
    name: str
    kernel: str  # "sdd" | "dsd" | "dsd_t"
    formula: str
    transposed_weight: bool = False


PRODUCTS = (
    Product("fwd_sdd", "sdd", "h = x @ w1"),
    Product("fwd_dsd", "dsd", "y = h @ w2"),
    Product("bwd_sdd", "sdd", "dh = dy @ w2^T", True),
    Product("bwd_dsd", "dsd", "dx = dh @ w1^T", True),
    Product("bwd_dsd_t_w2", "dsd_t", "dw2 = h^T @ dy"),
    Product("bwd_dsd_t_w1", "dsd_t", "dw1^T = dh^T @ x"),
)


class Layout:
    """Index maps of one topology for the layout conversions (built once, host reads allowed)."""

    def __init__(self, plan, topo):
        b, F = topo.block_size, topo.ffn_blocks
        e = plan.sorted_expert.long()
        local = torch.arange(plan.num_slots, device=topo.device) - plan.expert_offsets.long()[e]
        self.block_row = topo.expert_block_offsets.long()[e] + local // b  # [S] sorted row -> block row
        self.in_row = local % b  # [S] sorted row -> row inside its block
        self.sorted_to_padded = self.block_row * b + self.in_row  # MegaBlocks' padded row of each sorted row
        self.active_rows = int(topo.expert_block_offsets[-1])  # host read, outside any timing
        self.padded_to_sorted = topo.padded_row_to_sorted()[: self.active_rows * b]
        self.offs = plan.expert_offsets[1:].to(torch.int32).clone()  # grouped_mm's cumulative ends (own allocation)
        self.topo, self.b, self.F = topo, b, F

    def blocks_to_rows(self, data: torch.Tensor) -> torch.Tensor:
        """Block data ``[capacity, b, b]`` -> the real rows and columns ``[S, ffn]``."""
        R = self.topo.max_block_rows
        rows = data.view(R, self.F, self.b, self.b)[self.block_row, :, self.in_row, :]
        return rows.reshape(-1, self.F * self.b)[:, : self.topo.ffn_size]

    def pad_rows(self, a: torch.Tensor) -> torch.Tensor:
        """Sorted rows ``[S, H]`` -> MegaBlocks' padded rows ``[active_rows * b, H]`` (zeros in padding)."""
        src = self.padded_to_sorted
        return torch.where((src >= 0)[:, None], a[src.clamp(min=0)], torch.zeros((), dtype=a.dtype, device=a.device))


# --------------------------------------------------------------------------- operands
def _randn(shape, gen, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _make_base(p: Product, s: KernelShape, topo, gen, device, dtype) -> dict:
    """Fresh random operands of product ``p`` in this library's layout."""
    S, H, N, E, b = s.tokens * s.top_k, s.hidden, s.ffn, s.experts, s.block_size
    if p.kernel == "sdd":
        a = _randn((S, H), gen, device, dtype)
        if p.transposed_weight:  # w2 [E, N, H] read as [E, H, N]
            w = _randn((E, N, H), gen, device, dtype, H**-0.5).transpose(1, 2)
        else:
            w = _randn((E, H, N), gen, device, dtype, H**-0.5)
        return {"a": a, "w": w}
    data = _randn((topo.capacity, b, b), gen, device, dtype)
    if p.kernel == "dsd":
        if p.transposed_weight:  # w1 [E, H, N] read as [E, N, H]
            w = _randn((E, H, N), gen, device, dtype, N**-0.5).transpose(1, 2)
        else:
            w = _randn((E, N, H), gen, device, dtype, N**-0.5)
        return {"data": data, "w": w}
    return {"data": data, "d": _randn((S, H), gen, device, dtype)}


def _make_dense(p: Product, s: KernelShape, gen, device, dtype) -> tuple:
    S, H, N = s.tokens * s.top_k, s.hidden, s.ffn
    if p.kernel == "sdd":
        w = _randn((N, H), gen, device, dtype, H**-0.5).t() if p.transposed_weight else _randn((H, N), gen, device, dtype, H**-0.5)
        return (_randn((S, H), gen, device, dtype), w)
    if p.kernel == "dsd":
        w = _randn((H, N), gen, device, dtype, N**-0.5).t() if p.transposed_weight else _randn((N, H), gen, device, dtype, N**-0.5)
        return (_randn((S, N), gen, device, dtype), w)
    return (_randn((S, N), gen, device, dtype).t(), _randn((S, H), gen, device, dtype))


# --------------------------------------------------------------------------- implementations
# Each implementation: prepare(base) -> args (layout conversion, untimed), run(args) -> output,
# canon(output) -> the reference's layout (rows [S, ffn], rows [S, H] or [E, ffn, H]).


def _impl_triton(p, lay):
    topo = lay.topo
    if p.kernel == "sdd":
        return (lambda base: (base["a"], base["w"]), lambda a: K.sdd(a[0], a[1], topo), lay.blocks_to_rows)
    if p.kernel == "dsd":
        return (lambda base: (base["data"], base["w"]), lambda a: K.dsd(a[0], a[1], topo), lambda o: o)
    return (lambda base: (base["data"], base["d"]), lambda a: K.dsd_t(a[0], a[1], topo), lambda o: o)


def _impl_torch(p, lay):
    topo = lay.topo
    fn = {"sdd": sdd_torch, "dsd": dsd_torch, "dsd_t": dsd_t_torch}[p.kernel]
    second = "d" if p.kernel == "dsd_t" else "w"
    first = "a" if p.kernel == "sdd" else "data"
    canon = lay.blocks_to_rows if p.kernel == "sdd" else (lambda o: o)
    return (lambda base: (base[first], base[second]), lambda a: fn(a[0], a[1], topo), canon)


def _impl_grouped(p, lay):
    gmm, offs = torch._grouped_mm, lay.offs
    if p.kernel == "sdd":
        return (lambda base: (base["a"], base["w"]), lambda a: gmm(a[0], a[1], offs=offs), lambda o: o)
    if p.kernel == "dsd":
        return (lambda base: (lay.blocks_to_rows(base["data"]).contiguous(), base["w"]),
                lambda a: gmm(a[0], a[1], offs=offs), lambda o: o)  # fmt: skip
    # Weight gradient: groups along the reduced dimension, [N, S] x [S, H] -> [E, N, H].
    return (lambda base: (lay.blocks_to_rows(base["data"]).contiguous().t(), base["d"]),
            lambda a: gmm(a[0], a[1], offs=offs), lambda o: o)  # fmt: skip


def _impl_stk(p, lay):
    import stk

    topo, E, N, b = lay.topo, lay.topo.num_experts, lay.topo.ffn_size, lay.b
    if p.kernel == "sdd":
        # MegaBlocks keeps w as [E * N, K] and passes its transpose; x padded to whole blocks.
        def prep(base):
            w = base["w"]  # [E, K, N]
            wcat = w.transpose(1, 2).reshape(E * N, w.shape[1])
            m = topo.to_stk(torch.empty(topo.capacity, b, b, dtype=w.dtype, device=w.device))
            return (lay.pad_rows(base["a"]), wcat.t(), m)

        return prep, lambda a: stk.ops.sdd(a[0], a[1], a[2]).data, lambda o: _stk_blocks_to_rows(lay, o)
    if p.kernel == "dsd":
        def prep(base):
            w = base["w"]  # [E, N, H]
            return (topo.to_stk(base["data"]), w.reshape(E * N, w.shape[2]))

        return prep, lambda a: stk.ops.dsd(a[0], a[1]), lambda o: o[lay.sorted_to_padded]

    def prep(base):
        return (topo.to_stk(base["data"]).t(), lay.pad_rows(base["d"]))

    return prep, lambda a: stk.ops.dsd(a[0], a[1]), lambda o: o.view(E, -1, o.shape[1])[:, :N]


def _stk_blocks_to_rows(lay, data):
    full = torch.zeros(lay.topo.capacity, lay.b, lay.b, dtype=data.dtype, device=data.device)
    full[: data.shape[0]] = data
    return lay.blocks_to_rows(full)


def _impl_dense(p):
    return (lambda dense: dense, lambda a: torch.matmul(a[0], a[1]), lambda o: o)


def _stk_unsupported(s: KernelShape) -> str | None:
    if s.block_size != 128:
        return f"stk's Triton kernels are fixed to 128 x 128 blocks; this shape uses block_size={s.block_size}"
    if s.ffn % 128:
        return f"stk needs ffn to be a multiple of 128 (its weight layout has no column padding); ffn={s.ffn}"
    try:
        import stk  # noqa: F401
    except ImportError as err:
        return f"stk not installed: {short_error(err)}"
    return None


def _stk_overflows(lay: Layout, shape: KernelShape) -> str | None:
    """stk's kernels keep block indices in int16 and multiply them by the block size in int16
    under Triton >= 3.2 (``pid_n * BLOCK_N``): past 255 block rows or block columns the address
    wraps. Seen here as an illegal memory access on an H100 (triton 3.6, E=64), which kills the
    CUDA context and every timing after it, so such shapes are not run."""
    import triton

    col_blocks = shape.experts * lay.F
    if int(triton.__version__.split(".")[0]) * 100 + int(triton.__version__.split(".")[1]) < 302:
        return None
    if max(lay.active_rows, col_blocks) > 256:
        return (f"not run: stk's int16 block indices overflow on Triton >= 3.2 past 256 block rows or columns "
                f"(here {lay.active_rows} block rows, {col_blocks} block columns); an illegal memory access")  # fmt: skip
    return None


# --------------------------------------------------------------------------- one configuration
def impls_for(device: torch.device, env: dict) -> list[str]:
    out = ["bsmoe_triton", "dense"]
    if device.type == "cpu":
        out.insert(1, "bsmoe_torch")
    out += ["grouped_mm", "stk"]
    return out


def run_config(shape: KernelShape, routing: str, seed: int, device, dtype, timer: Timer, env: dict,
               progress=None, skip: tuple = ()) -> list[dict]:  # fmt: skip
    """Check and time every product of one (shape, routing); returns one record per product."""
    impls = impls_for(device, env)
    gen_cpu = torch.Generator().manual_seed(seed)
    ids = make_expert_ids(shape.tokens, shape.experts, shape.top_k, routing, gen_cpu)
    plan = plan_routing(ids.to(device), shape.experts)
    topo = build_topology(plan, shape.ffn, shape.block_size)
    lay = Layout(plan, topo)
    S, H, N = shape.tokens * shape.top_k, shape.hidden, shape.ffn
    useful = 2 * S * H * N
    computed = 2 * lay.active_rows * shape.block_size * H * topo.ffn_blocks * shape.block_size
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rd = ref_dtype(device, dtype)
    stk_reason = _stk_unsupported(shape) or (_stk_overflows(lay, shape) if device.type == "cuda" else None)
    records = []
    for p in PRODUCTS:
        rec = {
            "shape": shape.asdict(), "routing": routing, "seed": seed, "product": p.name, "kernel": p.kernel,
            "formula": p.formula, "rows": S, "useful_flops": useful, "computed_flops": computed,
            "padding": computed / useful, "active_block_rows": lay.active_rows, "capacity_blocks": topo.capacity,
            "load": load_stats(ids, shape.experts), "impls": {},
        }  # fmt: skip
        bases: list[dict] = []

        def make_base(i):
            while len(bases) <= i:
                bases.append(_make_base(p, shape, topo, gen, device, dtype))
            return bases[i]

        base0 = make_base(0)
        expected = _reference(p, base0, topo, lay, rd)
        for name in impls:
            if name in skip:
                rec["impls"][name] = {"status": "skipped", "error": "left out with --skip"}
                continue
            rec["impls"][name] = _run_impl(name, p, shape, lay, make_base, base0, expected, rd, device, dtype,
                                           timer, env, stk_reason, gen)  # fmt: skip
            if progress:
                progress.step(f"kernels {shape.name} {routing} {p.name} {name}: {rec['impls'][name]['status']}")
        dense = rec["impls"].get("dense", {})
        for r in rec["impls"].values():
            med = r.get("median_ms")
            r["tflops"] = useful / (med * 1e-3) / 1e12 if med else None
            ok_dense = dense.get("status") == "ok" and dense.get("median_ms")
            r["ratio_to_dense"] = dense["median_ms"] / med if (med and ok_dense) else None
        records.append(rec)
    return records


def _reference(p: Product, base: dict, topo, lay: Layout, rd: torch.dtype) -> torch.Tensor:
    """The reference output of ``p`` in the canonical layout, computed in ``rd``."""
    with torch.no_grad():
        if p.kernel == "sdd":
            return lay.blocks_to_rows(sdd_torch(base["a"].to(rd), base["w"].to(rd), topo))
        if p.kernel == "dsd":
            return dsd_torch(base["data"].to(rd), base["w"].to(rd), topo)
        return dsd_t_torch(base["data"].to(rd), base["d"].to(rd), topo)


def _run_impl(name, p, shape, lay, make_base, base0, expected, rd, device, dtype, timer, env, stk_reason, gen) -> dict:
    untimed = None
    if name == "bsmoe_triton":
        if device.type != "cuda" and not interpreting():
            return {"status": "unsupported", "error": "Triton needs a CUDA device or TRITON_INTERPRET=1"}
        if interpreting():
            untimed = "Triton interpreter (CPU): checked, not timed"
        factory = _impl_triton(p, lay)
    elif name == "bsmoe_torch":
        factory = _impl_torch(p, lay)
    elif name == "grouped_mm":
        if not env["grouped_mm"]["available"]:
            return {"status": "unsupported", "error": env["grouped_mm"]["error"]}
        factory = _impl_grouped(p, lay)
    elif name == "stk":
        if stk_reason:
            return {"status": "unsupported", "error": stk_reason}
        if interpreting():
            untimed = "Triton interpreter (CPU): checked, not timed"
        factory = _impl_stk(p, lay)
    elif name == "dense":
        return _run_dense(p, shape, rd, device, dtype, timer, gen)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    prepare, run, canon = factory
    return _check_and_time(prepare, run, canon, make_base, base0, expected, device, dtype, timer, untimed)


def _check_and_time(prepare, run, canon, make_base, base0, expected, device, dtype, timer, untimed):
    try:
        with torch.no_grad():
            args0 = prepare(base0)
            out = canon(run(args0))
            sync(device)
    except Exception as err:  # noqa: BLE001 - recorded, never hidden
        return {"status": "error", "error": short_error(err)}
    check = check_close(out, expected, dtype)
    del out
    if not check["ok"]:
        return {"status": "failed", "error": f"correctness check failed: {check['message']}", "check": check}
    if untimed:
        return {"status": "checked", "note": untimed, "check": check}
    set_bytes = tensor_bytes(*[t for t in args0 if isinstance(t, torch.Tensor)])
    try:
        with torch.no_grad():
            rot = Rotation(lambda i: args0 if i == 0 else prepare(make_base(i)), set_bytes, _cache(device))
            t = timer.measure_twice(lambda: run(rot.next()))
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "error": f"while timing: {short_error(err)}", "check": check}
    return {"status": "ok", "check": check, "rotation_sets": rot.count, **t}


def _run_dense(p, shape, rd, device, dtype, timer, gen) -> dict:
    sets: list[tuple] = []

    def make(i):
        while len(sets) <= i:
            sets.append(_make_dense(p, shape, gen, device, dtype))
        return sets[i]

    a0 = make(0)
    with torch.no_grad():
        expected = torch.matmul(a0[0].to(rd), a0[1].to(rd))
    prepare, run, canon = _impl_dense(p)
    return _check_and_time(prepare, run, canon, make, a0, expected, device, dtype, timer, None)


_CACHE_BYTES: dict = {}


def _cache(device) -> int:
    key = str(device)
    if key not in _CACHE_BYTES:
        _CACHE_BYTES[key] = l2_bytes(device)
    return _CACHE_BYTES[key]


def count_steps(shapes, routings, impls, skip: tuple = ()) -> int:
    return len(shapes) * len(routings) * len(PRODUCTS) * len([i for i in impls if i not in skip])


def run_all(shapes, routings, device, dtype, timer, env, progress=None, seed: int = 1234, skip: tuple = (),
            budget=None, on_record=None) -> list[dict]:  # fmt: skip
    """Every (shape, routing) in turn (see :func:`common.run_grid` for ``budget`` and ``on_record``)."""

    def run_one(shape, routing, sd):
        return run_config(shape, routing, sd, device, dtype, timer, env, progress, skip)

    return run_grid(shapes, routings, seed, device, run_one, budget, on_record)

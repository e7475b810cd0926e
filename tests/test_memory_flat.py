"""Flat memory while routing shifts (issue 18, item 2; one process).

dMoE trains with AdamW for 150 steps; the token count changes every step (1 to 512,
the largest in the first step) and the hot expert (the one the inputs point to) moves
every 30 steps. After a warm-up of 40 steps (the largest batch and two hot experts
seen), nothing may accumulate:

* the live torch tensors (count, and bytes of their distinct storages, found through
  ``gc``) never exceed the warm-up figure;
* nor do the objects the garbage collector tracks, or the items all lists, dicts,
  sets and deques hold (any statistic, cache entry or autotuner key kept in Python),
  beyond a slack of 20;
* the process's peak resident memory (``VmHWM``, reset through
  ``/proc/self/clear_refs`` so that each phase has its own peak; ``ru_maxrss`` where
  that is not possible) grows by at most 5%.

The tiny sizes keep it at a few seconds per backend; every CPU backend but the
interpreted Triton one runs it, each in a fresh process (``python tests/test_memory_flat.py
BACKEND`` prints the measurements as JSON).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import re
import resource
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from blocksparse_moe import MoEConfig, dMoE, ops
from blocksparse_moe.backends.select import TRITON_BACKENDS

# The training runs in a fresh process without TRITON_INTERPRET (the interpreter's own allocations
# would swamp the peak), so only the backends that run natively on the CPU are measured here.
BACKENDS = []
for _b in ops.BACKENDS:
    if _b != "auto" and _b not in TRITON_BACKENDS:
        try:
            ops.resolve_backend(_b, torch.device("cpu"))
            BACKENDS.append(_b)
        except ValueError:
            pass

STEPS, WARMUP, MOVE_EVERY, MAX_TOKENS = 150, 40, 30, 512
# Python objects / container items allowed to appear over the 110 steps after warm-up: far less
# than one per step, so a statistic, cache entry or key kept per step (or per new token count) shows.
SLACK = 20


def census() -> dict[str, int]:
    """After a full collection: live torch tensors (count, bytes of their distinct storages), objects
    the collector tracks, and the items held by every list, dict, set and deque that is tracked or
    held by a tracked object (a statistic or key added per step grows it)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy module objects warns (deprecated aliases)
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    storages, count = {}, 0
    for t in tensors:
        try:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # subclasses without a real storage (fake tensors
            continue  # left in the collector by earlier compile tests in the same process)
        count += 1
        storages[key] = st.nbytes()
    containers = (list, dict, set, collections.deque, collections.OrderedDict)
    items = sum(len(o) for o in objects if type(o) in containers)
    # A container of atoms only (a dict of ints keyed by token count, say) is not tracked by the
    # collector: count those that tracked objects (a module, an instance) hold, once each.
    untracked = {id(r): len(r) for r in gc.get_referents(*objects) if type(r) in containers and not gc.is_tracked(r)}
    items += sum(untracked.values())
    del objects, tensors
    return {"tensors": count, "tensor bytes": sum(storages.values()), "objects": len(gc.get_objects()), "items": items}


def _trim_heap() -> None:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim``; a no-op elsewhere).

    Called before each peak reset: the census just before it (``gc.get_objects()``, lists
    of every object) frees several MB that glibc may or may not keep resident, depending
    on where the blocks landed. Kept, they raised the next phase's starting point, so its
    peak: measured on a 2-core Xeon VM, a half's peak moved by -5 to +20 MB between
    launches without the trim (the training itself the same every time).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def train_and_measure(backend: str) -> dict:
    """The run itself, in a fresh process (see the test): census and peaks after warm-up and per half."""
    # Tiny tensors: a second thread only adds contention (the CI machine has two cores, shared).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    H, E = 16, 8
    cfg = MoEConfig(
        hidden_size=H, ffn_hidden_size=24, num_experts=E, top_k=2, block_size=16, glu=True, activation="silu",
        backend=backend, init_std=0.2,
    )  # fmt: skip
    layer = dMoE(cfg).train()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, MAX_TOKENS + 1, size=STEPS)
    tokens[0], tokens[1] = MAX_TOKENS, 1
    g = torch.Generator().manual_seed(1)
    hot_load = np.zeros(STEPS)  # preallocated: the run itself keeps nothing per step

    def step(i: int) -> None:
        T = int(tokens[i])
        hot = (i // MOVE_EVERY) % E
        with torch.no_grad():
            direction = layer.router.weight[hot] / layer.router.weight[hot].norm()
        x = torch.randn(T, H, generator=g) + 3.0 * direction
        target = torch.randn(T, H, generator=g)
        out, aux = layer(x, return_aux=True)
        loss = (out - target).square().mean() + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hot_load[i] = int(aux.tokens_per_expert[hot]) / (2 * T)

    return dict(measure_phases(step, STEPS, WARMUP), hot_load=float(hot_load[WARMUP:].mean()))


def measure_phases(step, steps: int, warmup: int) -> dict:
    """Run ``step(i)`` for ``i < steps``: the census after ``warmup`` steps and after each half that follows,
    and each half's peak resident memory (``VmHWM`` reset between phases where the kernel allows)."""
    reset = _reset_peak()
    for i in range(warmup):
        step(i)
    base = census()
    if reset:
        _reset_peak()
    later, peaks = [], []
    mid = warmup + (steps - warmup) // 2
    for lo, hi in ((warmup, mid), (mid, steps)):
        for i in range(lo, hi):
            step(i)
        # the peak is read before the census: gc.get_objects() itself costs memory
        peaks.append(_peak_kib())
        later.append(census())
        if reset:
            _reset_peak()
    return dict(base=base, later=later, peaks=peaks, reset=reset, lifetime_peak=_peak_kib())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmoe_memory_flat_while_routing_shifts(backend):
    # A fresh process: the peak is this training's, not that of whatever earlier tests left in the
    # suite's process (their garbage and allocator state moved it by more than 5% in a full run).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, backend], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    base, later, reset = r["base"], r["later"], r["reset"]
    # Both phases start after a census (whose freed heap stays resident), so they compare alike.
    peak_warm, peak_after = r["peaks"]

    # The premise: the hot expert takes most of the load (it moves every MOVE_EVERY steps).
    assert r["hot_load"] > 0.3, r["hot_load"]
    for c in later:
        for key in ("tensors", "tensor bytes"):
            assert c[key] <= base[key], f"live {key} grew: {base[key]} after warm-up, {c[key]} later"
        for key in ("objects", "items"):  # a little slack for the checks' own frames and lists
            assert c[key] <= base[key] + SLACK, f"Python {key} grew: {base[key]} after warm-up, {c[key]} later"
    if reset:
        assert peak_after <= 1.05 * peak_warm, f"peak resident memory {peak_warm} KiB in the first half after warm-up, {peak_after} KiB in the second"
    else:  # both are the lifetime peak (ru_maxrss): the check still holds, more weakly
        assert r["lifetime_peak"] <= 1.05 * peak_warm


if __name__ == "__main__":  # the child of the test: python tests/test_memory_flat.py BACKEND
    print(json.dumps(train_and_measure(sys.argv[1])))

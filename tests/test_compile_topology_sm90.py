"""The topology kernels compile for sm_90 (H100) on this CPU, with no stack frame.

The interpreter runs code the compiler rejects, so the CPU suite compiles them too.
The compile runs in a subprocess without TRITON_INTERPRET, since the kernels are
interpreted functions in this process. They are index arithmetic with no dot, so
the check is that they compile and that ``cuobjdump`` reports neither stack nor
local memory. ``tests/test_compile_sm90.py`` does the same for the matmul and
permute kernels, with their configs.
"""

import json
import os
import subprocess
import sys

import pytest

_WORKER = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blocksparse_moe.kernels import topology as T

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
names = ["expert_offsets_ptr", "ebo_ptr", "block_row_expert_ptr", "block_row_start_ptr", "block_row_end_ptr",
         "offsets_ptr", "row_indices_ptr", "column_indices_ptr", "offsets_t_ptr", "column_indices_t_ptr",
         "block_offsets_t_ptr"]
cases = []
for block in (16, 128):
    for steps in (1, 8):
        sig = {n: "*i32" for n in names}
        sig.update({"R": "i32", "F": "i32", "E": "i32", "S": "i32", "BLOCK": "constexpr", "TILE": "constexpr",
                    "SEARCH_STEPS": "constexpr"})
        cases.append((T._topology_kernel, sig, {"BLOCK": block, "TILE": 1024, "SEARCH_STEPS": steps}))
    sig = {"expert_offsets_ptr": "*i32", "expert_block_offsets_ptr": "*i32", "E": "i32", "BLOCK": "constexpr",
           "BLOCK_E": "constexpr"}
    for block_e in (1, 256):
        cases.append((T._block_offsets_kernel, sig, {"BLOCK": block, "BLOCK_E": block_e}))
out = []
for fn, sig, const in cases:
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    res = {m.lower(): int(v) for m, v in re.findall(r"\b(STACK|LOCAL):(\d+)", usage)}
    out.append({"kernel": fn.__name__, "constexprs": const, **res})
print(json.dumps(out))
"""


def test_topology_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("no cuobjdump in the triton wheel: cannot inspect sm_90 code here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    for r in results:
        assert {"stack", "local"} <= set(r), f"cuobjdump reported no resource usage: {r}"
        assert r["stack"] == 0 and r["local"] == 0, f"stack or local memory in {r}"

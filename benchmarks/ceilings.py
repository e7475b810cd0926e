"""The device's two ceilings, measured: copy bandwidth and dense bf16 matmul rate.

    python -m benchmarks.ceilings [--out DIR]

A device-to-device copy of 2 GiB (bytes read plus bytes written over the time) and an
8192 x 8192 x 8192 ``torch.matmul`` in bf16 on random data, each timed with
``triton.testing.do_bench`` (median). The kernel results are read against these: a
product whose FLOPs over its bytes sit far above the ridge point (rate / bandwidth)
should run near the matmul rate. Writes ``<device>-<date>-ceilings.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import common


def measure(device: torch.device) -> dict:
    from triton.testing import do_bench

    n_copy = 1 << 30  # bf16 elements: 2 GiB, far past any L2
    copy_ms = _copy_ms(do_bench, n_copy, device)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    copy_tbs = 2 * n_copy * 2 / (copy_ms * 1e-3) / 1e12
    mm_tflops = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    return {
        "copy": {"bytes_moved": 4 * n_copy, "median_ms": copy_ms, "tb_per_s": copy_tbs},
        "matmul_bf16_8192": {"flops": 2 * n**3, "median_ms": mm_ms, "tflops": mm_tflops},
        "ridge_flop_per_byte": mm_tflops / copy_tbs,
    }


def _copy_ms(do_bench, n: int, device: torch.device) -> float:
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.ceilings: needs a CUDA device")
    device = torch.device("cuda")
    started = common.now()
    env = common.environment(device, torch.bfloat16)
    res = {"schema": common.SCHEMA, "kind": "ceilings", "created": started.isoformat(), "env": env, **measure(device)}
    path = Path(args.out) / f"{env['device_slug']}-{started.strftime('%Y-%m-%d')}-ceilings.json"
    common.write_results(path, res)
    print(f"ceilings on {env['device_name']}: copy {res['copy']['tb_per_s']:.2f} TB/s, bf16 matmul "
          f"{res['matmul_bf16_8192']['tflops']:.0f} TFLOP/s; wrote {path}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

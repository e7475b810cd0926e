"""Benchmarks of blocksparse-moe: kernels and layers against dense cuBLAS, grouped GEMM, stk and capacity MoE.

Run from the repository root (this directory is not installed)::

    python -m benchmarks --quick     # tiny shapes: a CPU smoke run in under two minutes
    python -m benchmarks --full      # the issue's shapes on a GPU (bf16); --only kernels|layers to split
    python -m benchmarks.report      # plots + the tables of docs/benchmarks.md from benchmarks/results/*.json

Modules: ``shapes`` (what runs), ``kernels`` (SDD/DSD/DSD^T products), ``layers``
(dMoE and the other layers), ``common`` (timing, checks, environment, results IO),
``report`` (plots and markdown).

Results file
------------
``benchmarks/results/<device>-<YYYY-MM-DD>[-<suite>][-<part>].json`` (``<suite>`` is
left out for ``--full``; ``<part>`` names an ``--only``/``--filter`` run). Schema
``blocksparse-moe-bench/1``; times in milliseconds, sizes in bytes, floats rounded
to 6 significant digits, ``null`` where a figure does not exist::

    schema      "blocksparse-moe-bench/1"
    suite       "smoke" | "quick" | "full"
    created     ISO 8601 UTC start time
    argv        the command line
    wall_s      seconds the whole run took
    env         device ("cpu"|"cuda"), device_name, device_slug, torch, triton, stk,
                blocksparse_moe, python, platform, cuda, git_sha, git_dirty,
                triton_interpret, dtype, timer, torch_threads, cache_bytes,
                grouped_mm {available, error}, [compute_capability, device_memory_bytes]
    timer       how times were taken (do_bench warmup/rep or perf_counter reps; quantiles)
    settings    routings, grid, filter, only, skip, part
    kernels     one record per (shape, routing, product):
        shape {name, family, tokens, hidden, ffn, experts, top_k, block_size},
        routing, seed, product, kernel ("sdd"|"dsd"|"dsd_t"), formula,
        rows (T*k), useful_flops (2*rows*hidden*ffn), computed_flops (with padding),
        padding (computed/useful), active_block_rows, capacity_blocks,
        load {max_over_mean, min_over_mean, empty_experts},
        impls {name: IMPL}   names: bsmoe_triton, bsmoe_torch (CPU only), dense,
                             grouped_mm, stk
    layers      one record per (shape, routing):
        shape {name, family, tokens, hidden, ffn, experts, top_k, glu, activation,
        block_size}, routing, seed, tokens, useful_flops (expert matmuls, fwd+bwd),
        load, backend (dMoE's), rotation_sets,
        impls {name: IMPL + LAYER}  names: dmoe, moe_cf1.0, moe_cf1.25, moe_cf2.0,
                                    expert_loop, grouped_mm
        overheads {status, dmoe_fwd_bwd_ms, router_ms, sort_ms, topology_ms,
                   <part>_share (of dMoE fwd+bwd), <part>_spread,
                   routing_topology_ms, routing_topology_share}
    summary     statuses {kernels|layers: {impl: {status: count}}},
                problems [{where, impl, status, error}], ours_failed

    IMPL   status: "ok" (checked, then timed) | "checked" (checked, not timed: Triton
                   interpreter) | "failed" (wrong result: not timed) | "error" (raised)
                   | "unsupported" (not attempted, reason in error) | "skipped" (--skip)
           error, check {ok, max_abs_err, scale, bad, numel, message},
           median_ms, q20_ms, q80_ms, reps (CPU), repeat_median_ms, spread
           (|first - second| / min of the two medians), rotation_sets,
           tflops (useful FLOPs / median), ratio_to_dense (dense median / this median;
           kernels only: the TFLOP/s ratio at equal useful FLOPs)
    LAYER  real_rows (T*k), computed_rows, padding_rows (computed/real),
           dropped_assignments, dropped_fraction, capacity_factor, capacity (MoE),
           tokens_per_s, time_over_dmoe (> 1: dMoE is faster), peak_bytes and
           step_peak_bytes (CUDA allocator peak during one fwd+bwd; null on CPU)
"""

"""One layer's decode attention (Llama-3.1-8B shapes, batch 32, context 32k) for KIVI-2 (three calls) and
fp16 (one), to run under Nsight Compute (needs CUDA). A KIVI call is two launches of the split kernel (the fast splits,
then the split that reaches into the fp16 windows), an fp16 call one; the README's profiler figures come from
the third KIVI call's two launches and the fp16 call:

    ncu --clock-control none -k regex:_split_kernel -s 4 -c 3 --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --metrics "$(python benchmarks/kernel_profile.py --metrics)" \\
        python benchmarks/kernel_profile.py

With --remat it runs the fused rematerialization kernel instead, XQuant-2 remat then absorb_v (batch 8, context
8k, one call each; profile with `-k regex:_remat_kernel -c 2` and `--metrics "$(... --metrics --remat)"`).
"""

from __future__ import annotations

import sys

METRICS = [
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "smsp__inst_executed.sum",
    "dram__bytes_read.sum",
]
REMAT_METRICS = [
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "lts__t_bytes.sum.per_second",
    "lts__t_sectors_srcunit_tex_op_read.sum",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "dram__bytes_read.sum",
]


def remat() -> None:
    """One XQuant-2 remat call, then one absorb_v call, at Llama-3.1-8B's shapes (batch 8, context 8k)."""
    import torch

    sys.path.insert(0, "benchmarks")
    from kernel_roofline import layer_stores, remat_sources

    from xqsim import loading, specs
    from xqsim.engine.kernels.remat import remat_attention

    spec = loading.load_model("llama-3.1-8b")
    for strategy in ("remat", "absorb_v"):
        cfg = specs.SchemeConfig(scheme="xquant", bits=2, strategy=strategy).resolved(spec)
        sr = remat_sources(cfg, layer_stores(spec, cfg, 8, 8192, torch.bfloat16, 0))
        w = torch.randn(2, spec.d_model, spec.dkv, device="cuda", dtype=torch.bfloat16) / 64
        q = torch.randn(8, spec.n_heads, spec.hd, device="cuda", dtype=torch.bfloat16)
        remat_attention(q, sr["xk"], w[0], spec.rope_theta, xv=sr["xv"], wv=w[1], absorb=strategy == "absorb_v")
        torch.cuda.synchronize()


def main() -> None:
    if "--metrics" in sys.argv:
        print(",".join(REMAT_METRICS if "--remat" in sys.argv else METRICS))
        return
    if "--remat" in sys.argv:
        remat()
        return
    import torch

    sys.path.insert(0, "benchmarks")
    from kernel_roofline import layer_stores

    from xqsim import loading, specs
    from xqsim.engine.kernels.attention import Source, decode_attention

    spec = loading.load_model("llama-3.1-8b")
    for cfg in (specs.SchemeConfig(scheme="kivi", bits=2), specs.SchemeConfig(scheme="fp16")):
        st = layer_stores(spec, cfg.resolved(spec), 32, 32768, torch.bfloat16, 0)
        q = torch.randn(32, spec.n_heads, spec.hd, device="cuda", dtype=torch.bfloat16)
        for _ in range(3 if cfg.bits < 16 else 1):
            decode_attention(q, Source.of(st["k"]), Source.of(st["v"]))
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

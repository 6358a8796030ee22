#!/usr/bin/env bash
# The fused rematerialization kernels on the GPU machine, in one device call (PYTHONPATH carries .gpu_site's
# pydantic): the GPU and its versions, the per-layer roofline of the kernels at Llama-3.1-8B's shapes with their
# error against float64 torch, then the full-model steps (benchmarks/kernel_roofline.py --remat), the kernels'
# correctness tests on the GPU, a few kernel variants (--remat-tune) and Nsight Compute's counters for one remat
# and one absorb_v launch. Each part has its own time limit so that a cut keeps what came before; everything is
# written under $OUT.
set -u
export PYTHONPATH=.:.gpu_site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
# a part given 0 seconds is left out
run() { [ "$1" -gt 0 ] && timeout "$@"; }
run "${TESTS_S:-50}" python -m pytest -q tests/test_kernels_remat.py > "$OUT/pytest_gpu_remat.log" 2>&1
run "${ROOFLINE_S:-100}" python benchmarks/kernel_roofline.py --remat --out "$OUT" > "$OUT/kernel_roofline_remat.log" 2>&1
run "${TUNE_S:-30}" python benchmarks/kernel_roofline.py --remat-tune --out "$OUT/tune" > "$OUT/tune_remat.log" 2>&1
run "${NCU_S:-60}" ncu --clock-control none -k regex:_remat_kernel -c 2 --section SpeedOfLight --section Occupancy \
    --metrics "$(python benchmarks/kernel_profile.py --metrics --remat)" python benchmarks/kernel_profile.py --remat \
    > "$OUT/ncu_remat.txt" 2>&1
tail -n 3 "$OUT"/*.log
grep -E "_remat_kernel|Duration|tensor_op|lts__t_bytes|stalled|issue_active|Registers|Achieved Occ|dram__bytes" \
    "$OUT/ncu_remat.txt" | head -60

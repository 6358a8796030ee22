#!/usr/bin/env bash
# The fused rematerialization kernels on the GPU machine, in one device call (PYTHONPATH carries .gpu_site's
# pydantic): the GPU and its versions, the per-layer roofline of the kernels at Llama-3.1-8B's shapes with their
# error against float64 torch, then the full-model steps (benchmarks/kernel_roofline.py --remat), the kernels'
# correctness tests on the GPU, and a few kernel variants (--remat-tune). Each part has its own time limit so
# that a cut keeps what came before; everything is written under $OUT.
set -u
export PYTHONPATH=.:.gpu_site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${ROOFLINE_S:-100}" python benchmarks/kernel_roofline.py --remat --out "$OUT" > "$OUT/kernel_roofline_remat.log" 2>&1
timeout "${TESTS_S:-50}" python -m pytest -q -x tests/test_kernels_remat.py > "$OUT/pytest_gpu_remat.log" 2>&1
timeout "${TUNE_S:-30}" python benchmarks/kernel_roofline.py --remat-tune --out "$OUT/tune" > "$OUT/tune_remat.log" 2>&1
tail -3 "$OUT"/*.log

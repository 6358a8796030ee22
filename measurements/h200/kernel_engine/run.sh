#!/usr/bin/env bash
# One grid of the kernel-engine measurements per device call (issue 14), on the GPU machine: PYTHONPATH carries
# .gpu_site's pydantic. Rows are written after each configuration, so a cut keeps what was measured.
#   OUT=... GRID=grid_llama31_8b_kv LIMIT_S=540 bash measurements/h200/kernel_engine/run.sh
set -u
export PYTHONPATH=.:.gpu_site
here=measurements/h200/kernel_engine
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${LIMIT_S:-540}" python -c 'import sys; sys.argv[0] = "xqsim"; from xqsim.entry import main; main()' \
    measure --grid "$here/$GRID.yaml" --device cuda --kernels triton -o "$OUT/$GRID" > "$OUT/$GRID.log" 2>&1
tail -n 5 "$OUT/$GRID.log"

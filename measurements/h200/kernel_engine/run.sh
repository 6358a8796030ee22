#!/usr/bin/env bash
# Kernel-engine measurements on the GPU machine, one or more grids per device call, each under its own time limit
# (PYTHONPATH carries .gpu_site's pydantic where the machine has none). Rows are written after each configuration,
# and a grid runs every scheme at a (batch, context) before the next size, so a grid cut at its limit keeps every
# scheme at the sizes it reached.
#   OUT=... GRIDS="grid_llama31_8b_kv:400 grid_full_depth:120" bash measurements/h200/kernel_engine/run.sh
# (DEVICE=cpu HERE=<folder> with a small grid of its own tries the script on a CPU machine under Triton's interpreter)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
python -c "import pydantic" 2>/dev/null || export PYTHONPATH=.:.gpu_site  # the GPU machine has no pydantic
here=${HERE:-measurements/h200/kernel_engine}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
for item in ${GRIDS:-grid_llama31_8b_kv:540}; do
    grid=${item%%:*} limit=${item##*:}
    start=$(date +%s)
    timeout "$limit" python -c 'import sys; sys.argv[0] = "xqsim"; from xqsim.entry import main; main()' \
        measure --grid "$here/$grid.yaml" --device "${DEVICE:-cuda}" --kernels triton -o "$OUT/$grid" > "$OUT/$grid.log" 2>&1
    echo "$grid: exit $?, $(( $(date +%s) - start )) s, $(grep -c '^\[' "$OUT/$grid.log") rows"
    tail -n 3 "$OUT/$grid.log"
done

"""How many configurations per second the analytic model evaluates, on one core.

Grid: 8 GPUs x 7 models x 16 scheme configurations x 9 batches x 128 contexts (~1.03M rows), built
into the tidy result table (everything `xqsim sweep` computes before it writes files). Prints the
figure; the goal is >= 1,000,000 configurations in under 2 s.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from xqsim import loading, specs, sweep  # noqa: E402

HARDWARE = ["h100_sxm", "h200", "a100_80gb", "b200", "mi300x", "l40s", "rtx_4090", "furiosa_rngd"]
MODELS = ["llama-2-7b", "llama-2-13b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"]
CONFIGS = [
    specs.SchemeConfig(scheme="fp16"),
    *[specs.SchemeConfig(scheme="kivi", bits=b) for b in (2, 4)],
    *[specs.SchemeConfig(scheme="xquant", bits=b, strategy=s) for b in (2, 4) for s in ("remat", "absorb_v")],
    *[specs.SchemeConfig(scheme="xquant_cl", bits=b, first_layers=3) for b in (2, 3)],
    *[specs.SchemeConfig(scheme="xquant_gqa", bits=b, strategy=s, fused=f)
      for b in (2, 4) for s, f in (("remat", False), ("absorb_v", True))],
    *[specs.SchemeConfig(scheme="xquant_cl_gqa", bits=b, first_layers=3) for b in (2, 3)],
    specs.SchemeConfig(scheme="xquant_yang", bits=2),
    specs.SchemeConfig(scheme="xquant_yang", bits=2, share_from=1000),
]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CONTEXT = sorted({int(x) for x in np.geomspace(1024, 2**20, 128)})


def main() -> None:
    hws = [loading.load_hardware(h) for h in HARDWARE]
    models = [loading.load_model(m) for m in MODELS]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        df = sweep.run(hws, models, CONFIGS, BATCH, CONTEXT)
        best = min(best, time.perf_counter() - t0)
    print(f"grid: {len(hws)} GPUs x {len(models)} models x {len(CONFIGS)} schemes x {len(BATCH)} batches x "
          f"{len(CONTEXT)} contexts = {len(df):,} configurations, {df.shape[1]} columns")
    print(f"best of 3: {best:.3f} s")
    print(f"configs/s: {len(df) / best:,.0f}")


if __name__ == "__main__":
    main()

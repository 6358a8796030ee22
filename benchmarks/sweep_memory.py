"""Peak memory and speed of a huge sweep (`xqsim sweep --yes --no-csv`, which streams its table to Parquet).

Writes a scenario of 2 GPUs x 1 model x 39 scheme configurations x 64 batches x N contexts, N chosen so that the
grid holds --configs configurations (default 10^8), runs `xqsim sweep` on it in a child process once per
--workers value (default 1, then 2), and polls the resident memory of the child and its worker processes every
0.1 s. Prints per run the configurations per second, the peak memory of the whole process tree and the size of
results.parquet; last line `peak_rss_mb: <number>` (the peak over all runs; the goal is <= 2000).

    python benchmarks/sweep_memory.py [--configs 1e8] [--workers 1 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SCHEMES = [
    {"scheme": "fp16"},
    {"scheme": "kivi", "bits": [2, 3, 4, 8], "fused": [False, True]},
    {"scheme": "xquant", "bits": [2, 3, 4], "strategy": ["remat", "absorb_v"], "fused": [False, True]},
    {"scheme": "xquant_cl", "bits": [2, 3], "first_layers": 3},
    {"scheme": "xquant_gqa", "bits": [2, 3, 4], "strategy": ["remat", "absorb_v"], "fused": [False, True]},
    {"scheme": "xquant_cl_gqa", "bits": [2, 3], "first_layers": 3},
    {"scheme": "xquant_yang", "bits": 2, "v_bits": 1, "fused": [False, True]},
]  # 39 configurations
HARDWARE, MODELS = ["h100_sxm", "h200"], ["llama-3.1-8b"]
BATCH = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256} | set(range(5, 256, 5)))[:64]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=float, default=1e8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep", type=Path, default=None, help="keep the last run's results in this folder")
    a = ap.parse_args()
    n_ctx = max(2, round(a.configs / (len(HARDWARE) * len(MODELS) * 39 * len(BATCH))))
    scenario = {"name": "sweep_memory", "fitted": False, "hardware": HARDWARE, "models": MODELS, "schemes": SCHEMES,
                "batch": BATCH, "context": {"start": 1024, "stop": 1048576, "num": n_ctx, "log": False},
                "plot_batch": 16, "plot_context": 32768}
    peak_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep_memory.yaml"
        path.write_text(yaml.safe_dump(scenario, sort_keys=False))
        n = len(HARDWARE) * len(MODELS) * 39 * len(BATCH) * n_ctx
        print(f"{n:,} configurations ({n_ctx:,} contexts)", flush=True)
        for w in a.workers:
            out = Path(tmp) / f"out{w}"
            cmd = [sys.executable, "-m", "xqsim.entry", "sweep", str(path), "-o", str(out), "--yes", "--no-csv",
                   "--workers", str(w)]
            t0 = time.time()
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            peak = 0
            while child.poll() is None:
                peak = max(peak, tree_rss(child.pid))
                time.sleep(0.1)
            dt = time.time() - t0
            if child.returncode:
                sys.exit(f"sweep with {w} workers failed ({child.returncode}): {child.stderr.read()[-2000:]}")
            size = (out / "results.parquet").stat().st_size
            peak_all = max(peak_all, peak / 2**20)
            print(f"workers {w}: {dt:.0f} s, {n / dt:,.0f} configurations/s, peak memory {peak / 2**20:,.0f} MB "
                  f"(the sweep and its workers), results.parquet {size / 1e9:.2f} GB", flush=True)
            if a.keep and w == a.workers[-1]:
                shutil.rmtree(a.keep, ignore_errors=True)
                shutil.copytree(out, a.keep)
            shutil.rmtree(out)
    print(f"peak_rss_mb: {peak_all:.0f}")


if __name__ == "__main__":
    main()

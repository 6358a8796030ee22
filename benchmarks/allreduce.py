"""All-reduce latency and bandwidth over message sizes, and the alpha-beta fit a tensor-parallel step model takes:
time = alpha + wire bytes / beta, a ring all-reduce putting 2 (p - 1) / p of the message on each rank's link.

One process per rank (torch.distributed): NCCL on GPUs (CUDA events around each call; keep NCCL_NVLS_ENABLE=0,
multicast off), gloo on CPUs (wall clock after a barrier). Writes allreduce.json and allreduce.csv under --out
(sizes, median time, algorithm and bus bandwidth; the fit; backend, NCCL, torch and device names, date) and ends with
`alpha_us: <number> beta_gb_s: <number>`.

    python benchmarks/allreduce.py [--backend nccl|gloo] [--world 2] [--sizes 8,1k,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_SIZES = [2**k for k in range(3, 29, 1)]  # 8 B .. 256 MiB


def wire_bytes(size: int, world: int) -> float:
    """Bytes a ring all-reduce moves over each rank's link for a message of `size` bytes: 2 (p - 1) / p of it."""
    return 2 * (world - 1) / world * size


def fit_alpha_beta(sizes: list[int], times: list[float], world: int) -> tuple[float, float]:
    """Least squares of time = alpha + wire_bytes / beta over the sizes, each weighed by 1/time (relative error,
    so the small messages that set alpha count as much as the large ones that set beta); alpha >= 0."""
    w = np.array([wire_bytes(s, world) for s in sizes])
    t = np.array(times)
    a = np.stack([np.ones_like(w), w], axis=1) / t[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if alpha < 0:  # no latency left once bandwidth is fitted: refit through the origin
        alpha, inv_beta = 0.0, float(np.sum(w / t) / np.sum((w / t) ** 2))
    return float(alpha), float(1 / inv_beta) if inv_beta > 0 else float("inf")


def _rank(rank: int, world: int, backend: str, init: str, sizes: list[int], repeats: int, warmup: int,
          out: str) -> None:
    import torch
    import torch.distributed as dist

    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # what a decode step reduces on a GPU; gloo sums fp32
    rows = []
    for size in sizes:
        x = torch.ones(max(size * 8 // torch.finfo(dtype).bits, 1), dtype=dtype, device=dev)
        for _ in range(warmup):
            dist.all_reduce(x)
        ts = []
        for _ in range(repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dist.all_reduce(x)
                b.record()
                ts.append((a, b))
            else:
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                ts.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize()
            ts = [a.elapsed_time(b) / 1e3 for a, b in ts]
        mine = torch.tensor([statistics.median(ts)], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank's median: what a step waits for
        rows.append({"bytes": x.numel() * x.element_size(), "time_s": float(mine)})
    if rank == 0:
        info = {"backend": backend, "world": world, "torch": torch.__version__,
                "date": datetime.date.today().isoformat(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                "devices": [torch.cuda.get_device_name(i) for i in range(world)] if cuda else ["cpu"] * world,
                "dtype": str(dtype).removeprefix("torch.")}
        Path(out).write_text(json.dumps({"info": info, "rows": rows}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(backend: str, world: int, sizes: list[int], repeats: int = 20, warmup: int = 5) -> dict:
    """Run the ranks and return {info, rows: [{bytes, time_s, algbw_gb_s, busbw_gb_s}], alpha_s, beta_bytes_per_s}."""
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # multicast off (the GPU machines' rule)
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "rank0.json")
        mp.spawn(_rank, args=(world, backend, f"tcp://127.0.0.1:{_free_port()}", sizes, repeats, warmup, out),
                 nprocs=world, join=True)
        data = json.loads(Path(out).read_text())
    for r in data["rows"]:
        r["algbw_gb_s"] = r["bytes"] / r["time_s"] / 1e9
        r["busbw_gb_s"] = wire_bytes(r["bytes"], world) / r["time_s"] / 1e9
    alpha, beta = fit_alpha_beta([r["bytes"] for r in data["rows"]], [r["time_s"] for r in data["rows"]], world)
    return data | {"alpha_s": alpha, "beta_bytes_per_s": beta}


def _size(v: str) -> int:
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(v[-1:].lower(), 1)
    return int(float(v[:-1] if mult > 1 else v) * mult)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("nccl", "gloo"), default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="message sizes in bytes (8, 1k, 4M)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("results/allreduce"))
    a = ap.parse_args()
    res = measure(a.backend, a.world, [_size(s) for s in a.sizes.split(",")], a.repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "allreduce.json").write_text(json.dumps(res, indent=1))
    import pandas as pd

    pd.DataFrame(res["rows"]).to_csv(a.out / "allreduce.csv", index=False)
    for r in res["rows"]:
        print(f"{r['bytes']:>12,} B  {r['time_s'] * 1e6:10.1f} us  busbw {r['busbw_gb_s']:8.2f} GB/s")
    print(f"alpha_us: {res['alpha_s'] * 1e6:.2f} beta_gb_s: {res['beta_bytes_per_s'] / 1e9:.2f}")


if __name__ == "__main__":
    main()

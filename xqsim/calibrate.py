"""Measurements against the analytic model: achieved FLOP rate and bandwidth of each op, as a fraction
of a profile's spec peak. (The fit of the `fitted:` block is issue 5; this is what it will stand on.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import loading, schemes
from .specs import TENSOR_CLASSES, HardwareProfile, SchemeConfig


def load_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(device info per file, measured rows with status 'ok') from `xqsim measure` JSON files."""
    infos, rows = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        infos.append(data["device"])
        rows += [r | {"file": Path(p).name} for r in data["rows"] if r["status"] == "ok"]
    return infos, rows


def op_rates(rows: list[dict], hw: HardwareProfile) -> pd.DataFrame:
    """One row per measured op: its time, the analytic FLOPs and bytes, achieved rates and their share
    of the spec peak (bf16 tensor peak for matmul/attention/remat, fp32 vector peak for the rest)."""
    out = []
    models: dict[tuple[str, int], object] = {}
    for r in rows:
        key = (r["model"], r["layers"])
        if key not in models:
            models[key] = loading.load_model(r["model"]).model_copy(update={"n_layers": r["layers"]})
        model = models[key]
        cfg = SchemeConfig(**{k: v for k, v in r["config"].items() if v is not None}).resolved(model)
        ops = schemes.step_ops(model, cfg, np.int64(r["batch"]), np.int64(r["context"]))
        analytic: dict[str, list[float]] = {}
        for op in ops:
            a = analytic.setdefault(op.name, [op.cls, 0.0, 0.0])
            a[1] += float(op.flops) * op.layers
            a[2] += float(op.bytes) * op.layers
        for name, m in r["ops"].items():
            cls, flops, nbytes = analytic[name]
            t = m["time_s"]
            peak = hw.flops_per_s["bf16" if cls in TENSOR_CLASSES else "fp32"].value
            out.append({"file": r["file"], "model": r["model"], "label": r["label"], "batch": r["batch"],
                        "context": r["context"], "op": name, "op_class": cls, "time_s": t, "flops": flops,
                        "bytes": nbytes, "flops_per_s": flops / t, "bytes_per_s": nbytes / t,
                        "flops_of_peak": flops / t / peak, "bw_of_peak": nbytes / t / hw.mem_bytes_per_s.value})
    return pd.DataFrame(out)


def rates_by_class(df: pd.DataFrame) -> pd.DataFrame:
    """Per op class: median and p90 of the achieved share of peak FLOP/s and bandwidth, and the ops'
    share of the measured time; only ops of at least 20 us count toward the rates (launch-bound below)."""
    big = df[df["time_s"] >= 20e-6]
    g = big.groupby("op_class")
    res = pd.DataFrame({
        "ops": g.size(),
        "flops_of_peak_median": g["flops_of_peak"].median(), "flops_of_peak_p90": g["flops_of_peak"].quantile(0.9),
        "bw_of_peak_median": g["bw_of_peak"].median(), "bw_of_peak_p90": g["bw_of_peak"].quantile(0.9),
    })
    res["share_of_time"] = df.groupby("op_class")["time_s"].sum() / df["time_s"].sum()
    return res.reset_index()

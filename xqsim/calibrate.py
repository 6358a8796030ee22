"""Measurements against the analytic model: achieved FLOP rate and bandwidth of each op, as a fraction
of a profile's spec peak. (The fit of the `fitted:` block is issue 5; this is what it will stand on.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import loading, schemes
from .specs import TENSOR_CLASSES, Fitted, HardwareProfile, SchemeConfig


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


# ----------------------------------------------------------------------------- the fit

def _predict(theta: np.ndarray, F, Bt, peak, bw, cls_idx, tensor_mask, n_cls: int):
    """Op times [s]: max(F / (peak * e_c), bytes / (bw * e_m)) + overhead; theta = log of
    (overhead, e_m per class, e_c per class); vector classes keep e_c = 1."""
    o = np.exp(theta[0])
    e_m = np.exp(theta[1:1 + n_cls])[cls_idx]
    e_c = np.where(tensor_mask, np.exp(theta[1 + n_cls:1 + 2 * n_cls])[cls_idx], 1.0)
    return np.maximum(F / (peak * e_c), Bt / (bw * e_m)) + o


def fit(df: pd.DataFrame, hw: HardwareProfile, source: str, iterations: int = 200, min_bound: int = 3):
    """Least squares on log time over measured ops (op_rates rows): the per-kernel overhead, the bandwidth
    efficiency of each op class and the FLOP-rate efficiency of each tensor-core class.

    Returns (Fitted, report). An efficiency that binds fewer than `min_bound` ops is not determined by
    the data: it stays at 1.0, out of the Fitted block, and the report says so."""
    classes = sorted(df["op_class"].unique())
    n = len(classes)
    idx = df["op_class"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    tensor = df["op_class"].isin(TENSOR_CLASSES).to_numpy()
    peak = np.where(tensor, hw.flops_per_s["bf16"].value, hw.flops_per_s["fp32"].value)
    F, Bt, t = (df[c].to_numpy(dtype=float) for c in ("flops", "bytes", "time_s"))
    bw = hw.mem_bytes_per_s.value
    theta = np.concatenate([[np.log(max(np.median(t) * 0.1, 1e-7))], np.zeros(2 * n)])
    used = np.ones(1 + 2 * n, dtype=bool)
    used[1 + n:] = [c in TENSOR_CLASSES for c in classes]

    def resid(th):
        return np.log(_predict(th, F, Bt, peak, bw, idx, tensor, n)) - np.log(t)

    lam = 1e-2
    r = resid(theta)
    for _ in range(iterations):  # Levenberg-Marquardt, finite-difference Jacobian in log-parameters
        J = np.zeros((len(r), used.sum()))
        for j, k in enumerate(np.nonzero(used)[0]):
            d = np.zeros_like(theta)
            d[k] = 1e-6
            J[:, j] = (resid(theta + d) - r) / 1e-6
        A, g = J.T @ J, J.T @ r
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
        trial = theta.copy()
        trial[used] += step
        trial[1:] = np.minimum(trial[1:], np.log(1.5))  # efficiencies at most 1.5 of spec
        rt = resid(trial)
        if rt @ rt < r @ r:
            theta, r, lam = trial, rt, lam / 3
            if np.abs(step).max() < 1e-9:
                break
        else:
            lam *= 5
    e_m = dict(zip(classes, np.exp(theta[1:1 + n]), strict=True))
    e_c = dict(zip(classes, np.exp(theta[1 + n:]), strict=True))
    o = float(np.exp(theta[0]))
    comp_t = F / (peak * np.where(tensor, np.exp(theta[1 + n:])[idx], 1.0))
    mem_t = Bt / (bw * np.exp(theta[1:1 + n])[idx])
    bound = pd.Series(np.where(comp_t > mem_t, "compute", "memory"))
    counts = pd.crosstab(df["op_class"].to_numpy(), bound)
    binds = {(c, b): int(counts.loc[c, b]) if b in counts.columns else 0
             for c in classes for b in ("compute", "memory")}
    mem = {c: round(float(e_m[c]), 6) for c in classes if binds[(c, "memory")] >= min_bound}
    comp = {c: round(float(e_c[c]), 6) for c in classes if c in TENSOR_CLASSES and binds[(c, "compute")] >= min_bound}
    err = np.exp(r) - 1
    report = {"n_ops": len(df), "median_abs_pct": float(100 * np.median(np.abs(err))),
              "p90_abs_pct": float(100 * np.percentile(np.abs(err), 90)), "kernel_overhead_s": o,
              "mem_efficiency": mem, "compute_efficiency": comp,
              "ops_bound": {f"{c}/{b}": v for (c, b), v in binds.items()},
              "not_determined": sorted({f"mem:{c}" for c in classes if c not in mem}
                                       | {f"compute:{c}" for c in classes if c in TENSOR_CLASSES and c not in comp})}
    return Fitted(source=source, mem_efficiency=mem, compute_efficiency=comp, kernel_overhead_s=o), report

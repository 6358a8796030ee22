"""Measurements against the analytic model: the achieved FLOP rate and bandwidth of each measured op
against a profile's spec peak, the fit of a profile's `fitted:` block, and the model's error per
configuration, in-sample or held out.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import loading, schemes
from .specs import TENSOR_CLASSES, Fitted, HardwareProfile, SchemeConfig, UserError


def row_model_config(r: dict) -> tuple:
    """The (model with the measured number of layers, resolved SchemeConfig) a measured row ran."""
    return _row_model_config(r["model"], r["layers"], json.dumps(r["config"], sort_keys=True))


@functools.cache
def _row_model_config(name: str, layers: int, config: str):
    model = loading.load_model(name).model_copy(update={"n_layers": layers})
    cfg = SchemeConfig(**{k: v for k, v in json.loads(config).items() if v is not None}).resolved(model)
    return model, cfg


def op_rates(rows: list[dict], hw: HardwareProfile) -> pd.DataFrame:
    """One row per measured op: its time, the analytic FLOPs and bytes, achieved rates and their share
    of the spec peak (bf16 tensor peak for matmul/attention/remat, fp32 vector peak for the rest)."""
    out = []
    for r in rows:
        model, cfg = row_model_config(r)
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

def _split(theta: np.ndarray, n: int):
    """log-parameters -> (overhead per class, bandwidth efficiency per class, FLOP-rate efficiency per class)."""
    return np.exp(theta[:n]), np.exp(theta[n:2 * n]), np.exp(theta[2 * n:])


def fit(df: pd.DataFrame, hw: HardwareProfile, source: str, iterations: int = 300, min_bound: int = 3):
    """Least squares on log time over measured ops (op_rates rows). Per op class: the overhead of one of its
    kernels, its bandwidth efficiency and (tensor-core classes) its FLOP-rate efficiency:
    t = max(flops / (peak * e_c), bytes / (bandwidth * e_m)) + overhead.

    Returns (Fitted, report). A parameter that binds fewer than `min_bound` ops (never the larger term, or an
    overhead never above the busy time) is not determined by the data: it is left out of the Fitted block
    (the spec value or the common overhead applies) and the report names it."""
    classes = sorted(df["op_class"].unique())
    n = len(classes)
    idx = df["op_class"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    tensor = df["op_class"].isin(TENSOR_CLASSES).to_numpy()
    peak = np.where(tensor, hw.flops_per_s["bf16"].value, hw.flops_per_s["fp32"].value)
    F, Bt, t = (df[c].to_numpy(dtype=float) for c in ("flops", "bytes", "time_s"))
    bw = hw.mem_bytes_per_s.value

    def terms(th):
        o, e_m, e_c = _split(th, n)
        comp = F / (peak * np.where(tensor, e_c[idx], 1.0))
        return comp, Bt / (bw * e_m[idx]), o[idx]

    def resid(th):
        comp, mem, o = terms(th)
        return np.log(np.maximum(comp, mem) + o) - np.log(t)

    theta = np.concatenate([np.full(n, np.log(max(float(np.min(t)), 1e-7))), np.zeros(2 * n)])
    used = np.ones(3 * n, dtype=bool)
    used[2 * n:] = [c in TENSOR_CLASSES for c in classes]
    lam, r = 1e-2, resid(theta)
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
        trial[n:] = np.minimum(trial[n:], np.log(1.5))  # efficiencies at most 1.5 of spec
        rt = resid(trial)
        if rt @ rt < r @ r:
            theta, r, lam = trial, rt, lam / 3
            if np.abs(step).max() < 1e-9:
                break
        else:
            lam *= 5
    o, e_m, e_c = _split(theta, n)
    comp, mem, over = terms(theta)
    cls = df["op_class"].to_numpy()
    binding = (("compute", comp > mem), ("memory", mem >= comp), ("overhead", over > np.maximum(comp, mem)))
    count = {(c, kind): int(np.sum((cls == c) & m)) for c in classes for kind, m in binding}
    keep = {kind: [c for c in classes if count[(c, kind)] >= min_bound and (kind != "compute" or c in TENSOR_CLASSES)]
            for kind in ("compute", "memory", "overhead")}
    overhead = {c: float(o[i]) for i, c in enumerate(classes) if c in keep["overhead"]}
    fitted = Fitted(source=source,
                    mem_efficiency={c: round(float(e_m[i]), 6) for i, c in enumerate(classes) if c in keep["memory"]},
                    compute_efficiency={c: round(float(e_c[i]), 6) for i, c in enumerate(classes)
                                        if c in keep["compute"]},
                    kernel_overhead_s=min(overhead.values()) if overhead else None, overhead_s=overhead)
    err = np.exp(r) - 1
    report = {"n_ops": len(df), "median_abs_pct": float(100 * np.median(np.abs(err))),
              "p90_abs_pct": float(100 * np.percentile(np.abs(err), 90)),
              "ops_bound": {f"{c}/{k}": v for (c, k), v in count.items()},
              "not_determined": [f"{k}:{c}" for k in ("overhead", "memory", "compute") for c in classes
                                 if c not in keep[k] and (k != "compute" or c in TENSOR_CLASSES)]}
    return fitted, report


# ----------------------------------------------------------------------------- validation

REQUIRED = ("model", "layers", "config", "batch", "context", "status", "step_time_s", "ops")


def read_measurements(paths: list[Path], device: str | None = None) -> tuple[list[dict], list[dict]]:
    """(device info per file, rows with status 'ok') from `xqsim measure` JSON files, all of one device;
    a file that is missing, not a measurement file, empty or of another device is a UserError."""
    infos, rows = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: file not found")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{p}: not a JSON measurement file ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict) or "device" not in data or "rows" not in data:
            raise UserError(f"{p}: not an `xqsim measure` file: expected keys 'device' and 'rows'")
        ok = [r for r in data["rows"] if r.get("status") == "ok"]
        if not ok:
            raise UserError(f"{p}: no measured rows (status 'ok')")
        missing = [k for k in REQUIRED if k not in ok[0]]
        if missing:
            raise UserError(f"{p}: field 'rows.0': missing {', '.join(missing)}")
        name = data["device"].get("device_name", "?")
        if device and name != device:
            raise UserError(f"{p}: field 'device.device_name': '{name}', but the other files are from '{device}'; "
                            f"calibrate one device at a time")
        device = name
        infos.append(data["device"])
        rows += [r | {"file": p.name} for r in ok]
    return infos, rows


def _family(label: str) -> str:
    return label.split("-")[0]


def step_predictions(rows: list[dict], hw: HardwareProfile) -> pd.DataFrame:
    """Measured vs predicted step time of every row on hw (its fitted block if any), with the predicted bound."""
    from .roofline import BOUNDS, step_time

    rates, out = hw.rates(), []
    for r in rows:
        model, cfg = row_model_config(r)
        t = step_time(schemes.step_ops(model, cfg, np.int64(r["batch"]), np.int64(r["context"])), rates, False)
        out.append({"model": r["model"], "label": r["label"], "scheme": _family(r["label"]), "batch": r["batch"],
                    "context": r["context"], "measured_s": r["step_time_s"], "predicted_s": float(t["step_time_s"]),
                    "regime": BOUNDS[int(t["bound_code"])]})
    df = pd.DataFrame(out)
    df["error_pct"] = 100 * (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    return df


def error_report(df: pd.DataFrame) -> dict:
    """n, median / p90 / max absolute % error, overall, per regime and per scheme."""
    def stats(e: pd.Series) -> dict:
        a = e.abs()
        return {"n": int(len(a)), "median_abs_pct": float(a.median()), "p90_abs_pct": float(a.quantile(0.9)),
                "max_abs_pct": float(a.max())}

    return stats(df["error_pct"]) | {
        "per_regime": {k: stats(g["error_pct"]) for k, g in df.groupby("regime")},
        "per_scheme": {k: stats(g["error_pct"]) for k, g in df.groupby("scheme")}}


def held_out(rows: list[dict], hw: HardwareProfile, by: str) -> pd.DataFrame:
    """Predictions of each block of rows (one context length, or one scheme) by a fit that never saw it."""
    key = (lambda r: r["context"]) if by == "context" else (lambda r: _family(r["label"]))
    parts = []
    for value in sorted({key(r) for r in rows}, key=str):
        train = [r for r in rows if key(r) != value]
        test = [r for r in rows if key(r) == value]
        fitted, _ = fit(op_rates(train, hw), hw, f"held-out fit without {by}={value}")
        parts.append(step_predictions(test, hw.model_copy(update={"fitted": fitted})).assign(held_out=f"{by}={value}"))
    return pd.concat(parts, ignore_index=True)


def plot_validation(df: pd.DataFrame, path: Path) -> list[Path]:
    """Predicted vs measured step time and error vs context, coloured by scheme (PNG and SVG)."""
    from .plots import plt, save  # pyplot on the Agg backend

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    for scheme, g in df.groupby("scheme"):
        a.scatter(g["measured_s"] * 1e3, g["predicted_s"] * 1e3, s=12, label=scheme)
        b.scatter(g["context"], g["error_pct"], s=12, label=scheme)
    lim = [df[["measured_s", "predicted_s"]].min().min() * 1e3, df[["measured_s", "predicted_s"]].max().max() * 1e3]
    a.plot(lim, lim, "k--", lw=1)
    a.set(xscale="log", yscale="log", xlabel="measured step [ms]", ylabel="predicted step [ms]",
          title="Predicted vs measured decode step")
    b.axhline(0, color="k", lw=1)
    b.set(xscale="log", xlabel="context [tokens]", ylabel="(predicted - measured) / measured [%]",
          title="Error vs context")
    a.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)

"""The model against measurements: each measured configuration's decode step (and each op's kernel time) predicted
by a profile, in sample or by fits that never saw it (held out by context, batch or scheme), and the error report
`xqsim validate`, the dashboard and benchmarks/model_error.py print."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import rates
from .calibrate import MIN_OP_S, default_target, fit, measured_name, measured_op_s, measured_step, row_ops, timed_op
from .roofline import BOUNDS, kernels, step_time
from .specs import HardwareProfile, UserError


def op_errors(rows: list[dict], hw: HardwareProfile, min_time_s: float = MIN_OP_S) -> pd.DataFrame:
    """Measured vs predicted time of every op of at least `min_time_s`, in the rows their engine runs as the model
    describes them (rates.runs: the torch engine's unfused rows, the kernel engine's fused ones); predicted: the
    roofline time and overhead of each kernel, given to the op its time is measured under (calibrate.timed_op;
    unfused, the op's own); measured: measured_op_s."""
    rates_, out = hw.rates(), []
    for r in rows:
        if not rates.runs(r["config"]["scheme"], bool(r.get("fused")), r.get("engine", "torch")):
            continue
        pred: dict[str, float] = {}
        for kern in kernels(row_ops(r)):
            name = measured_name(r, kern[timed_op(r, kern)].name)
            pred[name] = pred.get(name, 0.0) + float(step_time(kern, rates_, False)["step_time_s"])  # all layers
        for name, m in r["ops"].items():
            t = measured_op_s(m)
            if t >= min_time_s and pred.get(name, 0) > 0:
                out.append({"model": r["model"], "label": r["label"], "batch": r["batch"], "context": r["context"],
                            "op": name, "op_class": m["op_class"], "measured": "kernel" if "kernel_time_s" in m
                            else "eager", "measured_s": t, "predicted_s": pred[name]})
    df = pd.DataFrame(out)
    df["error_pct"] = 100 * (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    return df


def step_predictions(rows: list[dict], hw: HardwareProfile, target: str | None = None) -> pd.DataFrame:
    """Measured (`target`: the CUDA-graph or the eager step; default the fitted block's, else graph where
    measured) vs predicted step time of every row on hw (its fitted block if any), with the predicted bound."""
    target = target or (hw.fitted.target if hw.fitted else default_target(rows))
    rates, out = hw.rates(), []
    for r in rows:
        t = step_time(row_ops(r), rates, False)
        out.append({"model": r["model"], "label": r["label"], "scheme": r["config"]["scheme"], "batch": r["batch"],
                    "context": r["context"], "fused": bool(r.get("fused")), "engine": r.get("engine", "torch"),
                    "target": target,
                    "measured_s": measured_step(r, target), "predicted_s": float(t["step_time_s"]),
                    "regime": BOUNDS[int(t["bound_code"])]})
    df = pd.DataFrame(out)
    df["error_pct"] = 100 * (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    return df


def stats(e: pd.Series) -> dict:
    """n, median, p90 and max of the absolute % errors."""
    a = e.abs()
    return {"n": int(len(a)), "median_abs_pct": float(a.median()), "p90_abs_pct": float(a.quantile(0.9)),
            "max_abs_pct": float(a.max())}


def error_report(df: pd.DataFrame) -> dict:
    """n, median / p90 / max absolute % error over the rows the engine runs as the model describes them (the
    torch engine's unfused rows, the kernel engine's fused ones), per regime and per scheme; the torch engine's
    fused rows (tiles of torch kernels, not the fused kernel the model describes) apart under `fused_tiled`."""
    fused = df["fused"] if "fused" in df else pd.Series(False, index=df.index)
    engine = df["engine"] if "engine" in df else pd.Series("torch", index=df.index)
    native = [rates.runs(s, f, e) for s, f, e in zip(df["scheme"], fused, engine, strict=True)]
    main, tiled = df[native], df[fused & (engine == "torch")]
    out = stats(main["error_pct"]) | {
        "per_regime": {k: stats(g["error_pct"]) for k, g in main.groupby("regime")},
        "per_scheme": {k: stats(g["error_pct"]) for k, g in main.groupby("scheme")}}
    if len(tiled):
        out["fused_tiled"] = stats(tiled["error_pct"])
    return out


HELD_OUT = ("context", "batch", "scheme")  # the blocks a validation may hold out, each whole


def held_out(rows: list[dict], hw: HardwareProfile, by: str, target: str | None = None,
             per_op: bool = False) -> pd.DataFrame:
    """Predictions of each block of rows (one context length, one batch, or one scheme) by a fit that never saw it:
    step predictions, or with `per_op` the op errors (op_errors) of the held-out rows."""
    if by not in HELD_OUT:
        raise UserError(f"command line: field 'held_out': '{by}' is not allowed; allowed: {', '.join(HELD_OUT)}")
    key = (lambda r: r["config"]["scheme"]) if by == "scheme" else (lambda r: r[by])
    target = target or default_target(rows)
    parts = []
    for value in sorted({key(r) for r in rows}, key=str):
        train = [r for r in rows if key(r) != value]
        test = [r for r in rows if key(r) == value]
        fitted, _ = fit(train, hw, f"held-out fit without {by}={value}", target)
        h = hw.model_copy(update={"fitted": fitted})
        df = op_errors(test, h) if per_op else step_predictions(test, h, target)
        parts.append(df.assign(held_out=f"{by}={value}"))
    return pd.concat(parts, ignore_index=True)


def transferred(hw: HardwareProfile, src: HardwareProfile) -> HardwareProfile:
    """hw's spec figures with src's fitted efficiencies, labelled as transferred."""
    if src.fitted is None:
        raise UserError(f"command line: field 'transfer_from': {src.name} has no fitted block; run xqsim calibrate "
                        f"first")
    return rates.lend(hw, src)


def validation(rows: list[dict], hw: HardwareProfile, by: str | None = None,
               target: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Every measured row predicted (in sample, or by fits that held out each `by` block: context or scheme) and
    the report `xqsim validate` prints: the error overall, per regime, per scheme and, for a fitted profile in
    sample, per op."""
    df = held_out(rows, hw, by, target) if by else step_predictions(rows, hw, target)
    report = {"hardware": hw.name, "profile": "held-out fits" if by else "fitted" if hw.fitted else "spec",
              "held_out": by or "none", "target": df["target"].iloc[0]} | error_report(df)
    if hw.fitted and not by:
        report["per_op"] = stats(op_errors(rows, hw)["error_pct"])
    return df, report


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

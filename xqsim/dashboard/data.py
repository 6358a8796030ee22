"""What each dashboard view shows, as tidy DataFrames built from the library (sweep, crossover, roofline,
calibrate): no Streamlit and no charts here, and no cost formula either."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import measurements, rates, schemes, sweep, validation
from ..crossover import crossovers
from ..roofline import op_table
from ..specs import Figure, HardwareProfile, ModelSpec, SchemeConfig, UserError

# Memory parts of the breakdown, in stacking order (sweep.evaluate's columns -> legend names).
MEMORY_PARTS = {"weights_bytes": "weights", "cache_codes_bytes": "cache codes",
                "cache_metadata_bytes": "cache metadata (fp16 scale+zero)",
                "cache_residual_bytes": "cache fp16 residual window", "transient_bytes": "transient buffers"}
ACCURACY_COLUMNS = ("model", "scheme", "bits", "strategy", "mem_ratio", "ppl", "delta_ppl")


def context_grid(lo: int, hi: int, num: int = 64) -> list[int]:
    """num log-spaced contexts from lo to hi [tokens]."""
    return sorted({int(round(x)) for x in np.geomspace(lo, hi, num)})


def with_budget(hws: list[HardwareProfile], budget_bytes: float) -> list[HardwareProfile]:
    """The profiles with their usable memory capped at the budget (0: as shipped)."""
    if not budget_bytes:
        return list(hws)
    return [hw.model_copy(update={"usable_fraction": Figure(
        value=min(hw.usable_fraction.value, budget_bytes / hw.memory_bytes.value),
        source=f"dashboard memory budget {budget_bytes / 1e9:g} GB")}) for hw in hws]


def sweep_frame(hws: list[HardwareProfile], model: ModelSpec, configs: list[SchemeConfig], batch: int,
                contexts: list[int], rate_mode: str = "fitted") -> tuple[pd.DataFrame, list[str]]:
    """The sweep table at one batch (also the largest batch of the capacity-limited throughput), plus the
    configurations the model cannot take, one message each."""
    skipped: list[str] = []
    df = sweep.run(hws, [model], configs, [batch], contexts, rate_mode,
                   on_step=lambda m: skipped.append(m) if m else None)
    df["step_time_ms"] = df["step_time_s"] * 1e3
    for c in ("hardware", "label"):
        df[c] = df[c].astype(str)
    return df, skipped


def exact_crossovers(df: pd.DataFrame, hws: list[HardwareProfile], model: ModelSpec, configs: list[SchemeConfig],
                     batch: int, metrics: tuple[str, ...] | None = None, rate_mode: str = "fitted") -> pd.DataFrame:
    """crossovers(df), each placed on the model to 0.1% (sweep.solve_crossovers; the table is at one batch, its
    capacity-limited throughput at most that batch): fewer search steps than the exact integer."""
    return sweep.solve_crossovers(crossovers(df, metrics), hws, [model], configs, batch, rate_mode, rel_tol=1e-3)


def _curves(df: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """Row positions of each (hardware, label) curve, in context order."""
    ctx = df["context"].to_numpy()
    return {k: v[np.argsort(ctx[v])] for k, v in df.groupby(["hardware", "label"], sort=False).indices.items()}


def context_crossovers(df: pd.DataFrame, cr: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Of crossovers(df): where one scheme's metric passes another's along context, with the values of the
    curves there; metric: step_time_s (at the batch, where both fit) or throughput_cap_tokens_per_s."""
    cr = cr[(cr["metric"] == metric) & (cr["axis"] == "context")].reset_index(drop=True)
    cols = ["hardware", "scheme_a", "scheme_b", "crossover_context", "winner", "step_time_ms", "tokens_per_s",
            "throughput_cap_tokens_per_s"]
    if cr.empty:
        return pd.DataFrame(columns=cols)
    out = cr.rename(columns={"crossover": "crossover_context"}).astype({"hardware": str})
    rows, logc = _curves(df), np.log(df["context"].to_numpy(float))
    on_a = [rows[(h, a)] for h, a in zip(out["hardware"], out["scheme_a"], strict=True)]  # drawn on scheme_a's curve
    for col in cols[5:]:  # linear in log(context), as the crossover itself
        y = df[col].to_numpy(float)
        out[col] = [float(np.interp(np.log(x), logc[i], y[i])) for i, x in zip(on_a, out["crossover_context"],
                                                                                strict=True)]
    return out[cols]


def memory_walls(df: pd.DataFrame) -> pd.DataFrame:
    """Per GPU and scheme at the sweep's batch: the longest context that fits [tokens] (the wall), the values
    of its curve at the last context shown that fits, and whether the wall lies inside the range shown."""
    fits, wall = df["fits"].to_numpy(), df["max_context"].to_numpy()
    step, tps = df["step_time_ms"].to_numpy(), df["tokens_per_s"].to_numpy()
    rows = []
    for (hw, label), i in _curves(df).items():
        ok = i[fits[i]]
        last = ok[-1] if len(ok) else i[0]
        rows.append({"hardware": hw, "label": label, "max_context": int(wall[i[0]]), "in_range": len(ok) < len(i),
                     "fits_at_start": len(ok) > 0, "step_time_ms": step[last], "tokens_per_s": tps[last]})
    return pd.DataFrame(rows)


def nearest_context(df: pd.DataFrame, context: int) -> int:
    """The grid context nearest to `context` in log scale [tokens]."""
    ctx = np.unique(df["context"].to_numpy())
    return int(ctx[np.abs(np.log(ctx) - np.log(context)).argmin()])


def memory_breakdown(df: pd.DataFrame, context: int) -> pd.DataFrame:
    """Memory of each scheme at the grid context nearest `context`, one row per part [GB]; the same on every
    GPU (only the capacity differs), so taken from the first."""
    at = df[(df["context"] == nearest_context(df, context)) & (df["hardware"] == df["hardware"].iloc[0])]
    long = at.melt(id_vars=["label", "context", "batch", "fits"], value_vars=list(MEMORY_PARTS), var_name="part",
                   value_name="bytes")
    long["part"] = long["part"].map(MEMORY_PARTS)
    long["order"] = long["part"].map({p: i for i, p in enumerate(MEMORY_PARTS.values())})
    long["gb"] = long["bytes"] / 1e9
    return long.drop(columns="bytes")


def capacities(hws: list[HardwareProfile]) -> pd.DataFrame:
    """Usable memory of each GPU [GB]."""
    cap = [hw.capacity_bytes / 1e9 for hw in hws]
    return pd.DataFrame({"hardware": [hw.name for hw in hws], "capacity_gb": cap,
                         "caption": [f"{hw.name} usable {c:.1f} GB" for hw, c in zip(hws, cap, strict=True)]})


def roofline_ops(hws: list[HardwareProfile], model: ModelSpec, configs: list[SchemeConfig], batch: int,
                 context: int, rate_mode: str = "fitted") -> pd.DataFrame:
    """Every op with FLOPs of every scheme at (batch, context) on every GPU: arithmetic intensity, achieved
    rate (FLOPs / its roofline time with overhead) and its bound, at the rates (column `rates`) the rule of
    xqsim.rates gives each (GPU, scheme) under rate_mode."""
    rows = []
    for hw in hws:
        for cfg in configs:
            try:
                rc = cfg.resolved(model)
            except UserError:  # reported by the sweep
                continue
            own, basis = rates.rates(hw, rc, rate_mode)
            for op in op_table(schemes.step_ops(model, rc, np.int64(batch), np.int64(context)), own):
                if op["flops"] > 0 and op["bytes_read"] + op["bytes_written"] > 0:
                    rows.append({"hardware": hw.name, "label": cfg.label, "op": op["name"], "op_class": op["op_class"],
                                 "layers": op["layers"], "bound": op["bound"],
                                 "intensity_flop_per_byte": op["intensity_flop_per_byte"],
                                 "achieved_tflops": op["achieved_flops_per_s"] / 1e12, "time_us": op["time_s"] * 1e6,
                                 "gflop": op["flops"] / 1e9,
                                 "mb_moved": (op["bytes_read"] + op["bytes_written"]) / 1e6, "rates": basis.label})
    return pd.DataFrame(rows)


def roofs(hws: list[HardwareProfile], x_lo: float = 0.1, x_hi: float = 1e5, rate_mode: str = "fitted") -> pd.DataFrame:
    """Roof lines of each GPU [TFLOP/s] over arithmetic intensity: spec bf16 tensor and fp32 vector roofs, and
    the fitted matmul and dequant roofs where the profile has a fitted block (not under rate_mode spec)."""
    x = np.geomspace(x_lo, x_hi, 121)
    parts = []
    for hw in hws:
        spec, lines = hw.rates(fitted=False), []
        lines += [("spec: bf16 tensor", spec.flops_per_s["matmul"], spec.bytes_per_s["matmul"]),
                  ("spec: fp32 vector", spec.flops_per_s["dequant"], spec.bytes_per_s["dequant"])]
        if hw.fitted and rate_mode != "spec":
            fit = hw.rates(fitted=True)
            lines += [(f"fitted: {c}", fit.flops_per_s[c], fit.bytes_per_s[c]) for c in ("matmul", "dequant")]
        for name, peak, bw in lines:
            parts.append(pd.DataFrame({"hardware": hw.name, "roof": name, "intensity_flop_per_byte": x,
                                       "tflops": np.minimum(peak, x * bw) / 1e12}))
    return pd.concat(parts, ignore_index=True)


def gpu_compare(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch: int, contexts: list[int],
                context: int, rate_mode: str = "fitted") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One scheme against fp16 on every GPU: (curves: capacity-limited throughput of both and their ratio vs
    context; table: ridge point, the scheme's extra FLOPs per byte of step traffic it saves at (batch,
    `context`), and where its capacity-limited throughput passes fp16's)."""
    fp16 = SchemeConfig(scheme="fp16")
    df, _ = sweep_frame(hws, model, [fp16, cfg], batch, contexts, rate_mode)
    tp = df.pivot_table(index=["hardware", "context"], columns="label", values="throughput_cap_tokens_per_s",
                        observed=True).reset_index()
    tp = tp.rename(columns={cfg.label: "scheme_tokens_per_s", "fp16": "fp16_tokens_per_s"})
    tp["ratio"] = tp["scheme_tokens_per_s"] / tp["fp16_tokens_per_s"].where(tp["fp16_tokens_per_s"] > 0)
    at = df[df["context"] == nearest_context(df, context)].set_index(["hardware", "label"])
    cross = context_crossovers(df, exact_crossovers(df, hws, model, [fp16, cfg], batch,
                                                    ("throughput_cap_tokens_per_s",), rate_mode),
                               "throughput_cap_tokens_per_s").set_index("hardware")
    rows = []
    for hw in hws:
        a, b = at.loc[(hw.name, cfg.label)], at.loc[(hw.name, "fp16")]
        saved = b["bytes_moved"] - a["bytes_moved"]
        c = cross.loc[[hw.name]] if hw.name in cross.index else None
        rows.append({"hardware": hw.name, "ridge_flop_per_byte": hw.ridge_flop_per_byte,
                     "extra_flop_per_byte_saved": (a["flops"] - b["flops"]) / saved if saved > 0 else np.nan,
                     "passes_fp16_at_context": float(c["crossover_context"].iloc[0]) if c is not None else np.nan,
                     "better_after": str(c["winner"].iloc[0]) if c is not None else ""})
    table = pd.DataFrame(rows)
    # above the ridge the memory time saved is less than the compute time added: slower per step at equal batch
    table["per_step"] = np.where(table["extra_flop_per_byte_saved"] > table["ridge_flop_per_byte"],
                                 "slower (extra FLOP/B above the ridge)", "faster (below the ridge)")
    tp["gpu"] = tp["hardware"].map({hw.name: f"{hw.name} (ridge {hw.ridge_flop_per_byte:.0f} FLOP/B)" for hw in hws})
    return tp, table


def leads_throughout(tp: pd.DataFrame) -> bool | None:
    """Of one GPU's gpu_compare curves: True if the scheme's capacity-limited throughput is above fp16's at every
    context, False if at none, None if it changes (or neither serves anything)."""
    a, b = tp["scheme_tokens_per_s"].to_numpy(float), tp["fp16_tokens_per_s"].to_numpy(float)
    served = (a > 0) | (b > 0)
    if not served.any():
        return None
    ahead = a[served] > b[served]
    return True if ahead.all() else False if not ahead.any() else None


# ----------------------------------------------------------------------------- measurements


def measurement_sets(root: Path) -> dict[str, list[Path]]:
    """Folders under root holding `xqsim measure` JSON files, by their path under root ('h100', and a subfolder of
    one engine's files as 'h200/kernel_engine'): each folder's own files, one set."""
    if not root.is_dir():
        return {}
    folders = sorted(d for d in root.rglob("*") if d.is_dir())
    sets = {d.relative_to(root).as_posix(): sorted(p for p in d.glob("*.json")
                                                    if _is_measurement(p, p.stat().st_mtime_ns)) for d in folders}
    return {k: v for k, v in sets.items() if v}


@functools.lru_cache(maxsize=256)
def _is_measurement(path: Path, mtime_ns: int) -> bool:
    """An `xqsim measure` file (device and rows), not another JSON there (accuracy results). Cached per file
    version: the page asks on every redraw, and the measurement files are megabytes."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # let calibration say what is wrong with it
    return not isinstance(data, dict) or measurements.is_measurement(data)


def calibration(paths: list[Path], hw: HardwareProfile) -> tuple[pd.DataFrame, dict]:
    """Measured vs predicted step time of every measured configuration, on the spec rates and (where the
    profile has them) the fitted rates (column `rates`); and the device the files come from."""
    infos, rows = measurements.read_measurements(paths)
    parts = [validation.step_predictions(rows, hw.model_copy(update={"fitted": None})).assign(rates="spec")]
    if hw.fitted:
        parts.append(validation.step_predictions(rows, hw).assign(rates="fitted"))
    df = pd.concat(parts, ignore_index=True)
    df["measured_ms"], df["predicted_ms"] = df["measured_s"] * 1e3, df["predicted_s"] * 1e3
    return df, infos[0]


def measurement_files(root: Path, hws: list[HardwareProfile]) -> dict[str, list[Path]]:
    """Per GPU: the `xqsim measure` files under root's folder named for it (a profile's name begins with its
    folder's: measurements/h100 holds h100_sxm's), subfolders included (one engine's set each)."""
    out: dict[str, list[Path]] = {}
    for name, files in measurement_sets(root).items():  # 'h200', 'h200/kernel_engine', ...
        for hw in hws:
            if hw.name.startswith(name.split("/")[0]):
                out.setdefault(hw.name, []).extend(files)
    return out


MEASURED_COLUMNS = ("hardware", "label", "context", "batch", "layers", "engine", "device", "file", "rates",
                    "measured_ms", "predicted_ms", "error_pct", "step_time_ms", "tokens_per_s", "at_batch",
                    "at_capacity")


@functools.lru_cache(maxsize=64)
def _read(path: Path, mtime_ns: int) -> tuple[list[dict], list[dict]]:
    """read_measurements of one file, cached per file version: the views ask on every redraw, and the files are
    megabytes of rows checked one by one."""
    return measurements.read_measurements([path])


def measured_points(files: dict[str, list[Path]], hws: list[HardwareProfile], model: ModelSpec,
                    configs: list[SchemeConfig], batch: int, rate_mode: str = "fitted") -> tuple[pd.DataFrame,
                                                                                                  list[str]]:
    """Measured decode steps beside the predicted curves: every measured row of this model and of a configuration
    shown, on the engine that runs it as the model describes it (rates.runs), predicted with the rates the curve
    uses (xqsim.rates). measured_ms/predicted_ms/error_pct are at the layers measured (the CUDA-graph step where
    measured); step_time_ms places the point at the model's full-depth step times measured/predicted (the
    measurement itself when it ran every layer), tokens_per_s = batch / that. at_batch: measured at the sidebar's
    batch (the step-time curves); at_capacity: at the largest batch that fits, at most that (the capacity curve).
    Also one message per file that cannot be read."""
    by_label = {cfg.resolved(model).label: cfg for cfg in configs}
    hw_of = {hw.name: hw for hw in hws}
    found, problems = [], []
    for name, paths in files.items():
        hw = hw_of.get(name)
        if hw is None:
            continue
        for p in paths:
            try:
                infos, rows = _read(p, p.stat().st_mtime_ns)
            except UserError as err:
                problems.append(str(err))
                continue
            for r in rows:
                if r["model"] != model.name:
                    continue
                _, res = measurements.config_of(r["model"], r["layers"], json.dumps(r["config"], sort_keys=True))
                cfg = by_label.get(res.label)
                if cfg is None or not rates.runs(res.scheme, res.fused, r["engine"]):
                    continue
                found.append((hw, cfg, r, infos[0].get("device_name", "?")))
    if not found:
        return pd.DataFrame(columns=list(MEASURED_COLUMNS)), problems
    ctx = sorted({r["context"] for _, _, r, _ in found})
    full = sweep.run([hw_of[n] for n in files if n in hw_of], [model], list(by_label.values()), [batch], ctx,
                     rate_mode)
    curve = {(h, lab, t): (fits, step, cap, tput) for h, lab, t, fits, step, cap, tput in zip(
        full["hardware"].astype(str), full["label"].astype(str), full["context"], full["fits"], full["step_time_s"],
        full["batch_cap"], full["throughput_cap_tokens_per_s"], strict=True)}
    out = []
    for hw, cfg, r, device in found:
        fits, step_s, cap, tput = curve[(hw.name, cfg.label, r["context"])]
        if r["batch"] == batch and fits:  # past the memory wall the curve has ended
            model_s = float(step_s)
        elif r["batch"] == cap and tput > 0:
            model_s = int(cap) / float(tput)
        else:  # on neither curve: not predicted at all
            continue
        prof, basis = rates.choose(hw, cfg, rate_mode)
        pred = validation.step_predictions([r], prof).iloc[0]
        step = model_s * pred["measured_s"] / pred["predicted_s"] if r["layers"] != model.n_layers \
            else pred["measured_s"]
        out.append({"hardware": hw.name, "label": cfg.label, "context": r["context"], "batch": r["batch"],
                    "layers": r["layers"], "engine": r["engine"], "device": device, "file": r["file"],
                    "rates": basis.label, "measured_ms": pred["measured_s"] * 1e3,
                    "predicted_ms": pred["predicted_s"] * 1e3, "error_pct": pred["error_pct"],
                    "step_time_ms": step * 1e3, "tokens_per_s": r["batch"] / step,
                    "at_batch": bool(r["batch"] == batch and fits), "at_capacity": bool(r["batch"] == cap)})
    return pd.DataFrame(out, columns=list(MEASURED_COLUMNS)), problems


def error_table(pred: pd.DataFrame) -> pd.DataFrame:
    """validation.error_report per set of rates, as rows: all, each regime, each scheme."""
    rows = []
    for basis, g in pred.groupby("rates", sort=False):
        rep = validation.error_report(g)
        blocks = [("all", "all", rep)] + [("regime", k, v) for k, v in rep["per_regime"].items()] \
            + [("scheme", k, v) for k, v in rep["per_scheme"].items()]
        rows += [{"rates": basis, "by": by, "group": k, "n": v["n"], "median_abs_pct": v["median_abs_pct"],
                  "p90_abs_pct": v["p90_abs_pct"], "max_abs_pct": v["max_abs_pct"]} for by, k, v in blocks]
    return pd.DataFrame(rows)


def read_accuracy(folder: Path) -> pd.DataFrame | None:
    """Every accuracy CSV in folder as one table with a `label` and a `pareto` column (None: no CSV there)."""
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        return None
    parts = []
    for f in files:
        try:
            d = pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise UserError(f"{f}: not a readable CSV ({str(err).splitlines()[0]})") from None
        if "mem_ratio" not in d.columns and "mem_ratio_paper" in d.columns:
            # `xqsim accuracy` writes both accountings: the chart's memory ratio is the papers' (codes + fp16
            # scale/zero, no residual window), the one their tables compare
            d = d.assign(mem_ratio=d["mem_ratio_paper"])
        missing = [c for c in ACCURACY_COLUMNS if c not in d.columns]
        if missing:
            raise UserError(f"{f}: field '{missing[0]}': column missing; expected columns "
                            f"{', '.join(ACCURACY_COLUMNS)}")
        for c in ("mem_ratio", "ppl", "delta_ppl"):
            if not pd.api.types.is_numeric_dtype(d[c]):
                raise UserError(f"{f}: field '{c}': expected numbers, got {d[c].astype(str).iloc[0]!r}")
        parts.append(d.assign(file=f.name))
    df = pd.concat(parts, ignore_index=True)
    strategy = df["strategy"].fillna("").astype(str)
    made = np.where(df["scheme"] == "fp16", "fp16", df["scheme"].astype(str) + "-" + df["bits"].astype(str)
                    + "b" + np.where(strategy.isin(["", "none", "remat"]), "", "-" + strategy))
    # `xqsim accuracy` names each configuration itself (group, residual, first layers...): keep its label
    df["label"] = df["label"].fillna(pd.Series(made, index=df.index)) if "label" in df.columns else made
    df["pareto"] = pareto_front(df)
    return df


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """Per model: True for the points no other point beats on both memory ratio and quality loss (lower is
    better on both)."""
    front = pd.Series(False, index=df.index)
    for _, g in df.groupby("model", sort=False):
        best = np.inf
        for i, r in g.sort_values(["mem_ratio", "delta_ppl"]).iterrows():
            if r["delta_ppl"] < best:
                front[i], best = True, r["delta_ppl"]
    return front

"""The dashboard's views: one render_* function each, drawing tables from data.py (cached per input) as charts,
with the crossover contexts printed and every table and chart downloadable."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from .. import rates
from ..loading import ROOT
from ..recommend import fmt_threshold, recommend, verdict_lines
from ..schemes import SCHEMES
from ..specs import HardwareProfile, SchemeConfig, UserError
from . import charts, data
from .controls import Controls, keep_valid


@st.cache_data(max_entries=64, show_spinner=False)
def sweep_views(hws: tuple[HardwareProfile, ...], model, configs: tuple[SchemeConfig, ...], batch: int,
                ctx_range: tuple[int, int], rate_mode: str = "fitted") -> dict:
    """The sweep at one batch and its memory walls."""
    df, skipped = data.sweep_frame(list(hws), model, list(configs), batch, data.context_grid(*ctx_range), rate_mode)
    return {"df": df, "skipped": skipped, "walls": data.memory_walls(df)}


@st.cache_data(max_entries=64, show_spinner=False)
def view_crossovers(hws: tuple[HardwareProfile, ...], model, configs: tuple[SchemeConfig, ...], batch: int,
                    ctx_range: tuple[int, int], metric: str, rate_mode: str = "fitted") -> pd.DataFrame:
    """The crossovers of one metric (the one the view draws), solved on the model: only those are computed."""
    df = sweep_views(hws, model, configs, batch, ctx_range, rate_mode)["df"]
    cr = data.exact_crossovers(df, list(hws), model, list(configs), batch, (metric,), rate_mode)
    return data.context_crossovers(df, cr, metric)


@st.cache_data(max_entries=32, show_spinner=False)
def _verdict(hws: tuple[HardwareProfile, ...], model, configs: tuple[SchemeConfig, ...], batch: int, at: int,
             max_delta_ppl: float, accuracy: str, rate_mode: str = "fitted") -> tuple[pd.DataFrame, str]:
    """recommend() at the sidebar's batch and context; '' or why the quality results could not be read."""
    try:
        return recommend(list(hws), model, list(configs), batch, at, max_delta_ppl, rate_mode,
                         accuracy=Path(accuracy)), ""
    except UserError as err:
        return recommend(list(hws), model, list(configs), batch, at, max_delta_ppl, rate_mode,
                         accuracy=Path("")), str(err)


def render_verdict(c: Controls, folder: Path) -> None:
    """The answer first: on each GPU, the scheme that serves the most tokens/s within memory under the quality
    limit, its speed against fp16, its cost, and the runner-up."""
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    csv = folder / "accuracy.csv" if (folder / "accuracy.csv").is_file() else (csvs[0] if csvs else folder / "-")
    df, why = _verdict(c.hws, c.model, c.configs, c.batch, c.at, c.max_delta_ppl, str(csv), c.rate_mode)
    if why:
        st.warning(f"Verdict without quality results: {why}")
    on = df.attrs.get("accuracy_model") or "no accuracy results"
    lines = "\n".join(f"- {line}" for line in verdict_lines(df, c.max_delta_ppl))
    st.success(f"**Verdict** for {c.model.name}, up to {c.batch} sequences of {c.at:,} tokens, "
               f"{fmt_threshold(c.max_delta_ppl)} (quality: {on}; rates {c.rate_mode}, as the panel below "
               f"says):\n{lines}")


@st.cache_data(max_entries=32, show_spinner=False)
def _roofline(hws, model, configs, batch: int, at: int, rate_mode: str = "fitted") -> tuple[pd.DataFrame, pd.DataFrame]:
    ops = data.roofline_ops(list(hws), model, list(configs), batch, at, rate_mode)
    hi = max(1e5, 2 * ops["intensity_flop_per_byte"].max()) if len(ops) else 1e5
    return ops, charts.roofline_table(ops, data.roofs(list(hws), x_hi=hi, rate_mode=rate_mode))


@st.cache_data(max_entries=32, show_spinner=False)
def _compare(hws, model, cfg, batch: int, ctx_range: tuple[int, int], at: int, rate_mode: str = "fitted"):
    return data.gpu_compare(list(hws), model, cfg, batch, data.context_grid(*ctx_range), at, rate_mode)


@st.cache_data(max_entries=8, show_spinner=False)
def _calibration(paths: tuple[Path, ...], stamps: tuple[float, ...], hw: HardwareProfile):
    pred, device = data.calibration(list(paths), hw)
    return pred, data.error_table(pred), device


@st.cache_data(max_entries=32, show_spinner=False)
def _measured(files: tuple[tuple[str, tuple[Path, ...]], ...], stamps: tuple[float, ...], hws, model, configs,
              batch: int, rate_mode: str) -> tuple[pd.DataFrame, list[str]]:
    return data.measured_points({k: list(v) for k, v in files}, list(hws), model, list(configs), batch, rate_mode)


def measured(c: Controls, root: Path) -> pd.DataFrame:
    """The measured steps beside the curves (data.measured_points), with a warning per file that cannot be read."""
    files = data.measurement_files(root, list(c.hws))
    key = tuple((k, tuple(v)) for k, v in files.items())
    stamps = tuple(p.stat().st_mtime for v in files.values() for p in v)
    df, problems = _measured(key, stamps, c.hws, c.model, c.configs, c.batch, c.rate_mode)
    for msg in problems:
        st.warning(f"Measured points: {msg}")
    return df


def _measured_caption(points: pd.DataFrame, c: Controls) -> None:
    """What the measured points are, where they come from and how far the model is from them."""
    if points.empty:
        st.caption(f"●: no measured step of {c.model.name} at this batch for these GPUs and schemes "
                   f"(`xqsim measure` files under measurements/<gpu>/).")
        return
    where = "; ".join(f"{h}: {len(g)} on {', '.join(sorted(set(g['device'])))} ({', '.join(sorted(set(g['engine'])))} "
                      f"engine, {', '.join(str(n) for n in sorted(set(g['layers'])))} of {c.model.n_layers} layers)"
                      for h, g in points.groupby("hardware"))
    err = points["error_pct"].abs()
    st.caption(f"●: measured steps ({where}). Each sits at the model's full-depth value scaled by measured / "
               f"predicted on the layers measured; hover for both and the error. Median |error| "
               f"{err.median():.1f}%, max {err.max():.1f}% over these {len(points)}.")


def show(name: str, template: dict, title: str, frame: pd.DataFrame | None = None, **datasets) -> None:
    """Draw a chart, then download buttons: its table as CSV (`frame`, else its data) and the chart as PNG
    and SVG (rendered only when pressed)."""
    spec = charts.compose(template, title, **datasets)
    st.vega_lite_chart(spec)
    frame = next(iter(datasets.values())) if frame is None else frame
    cols = st.columns([1, 1, 1, 5])
    cols[0].download_button("Data (CSV)", frame.to_csv(index=False), f"{name}.csv", "text/csv", key=f"csv:{name}",
                            on_click="ignore")
    for col, fmt, mime in ((cols[1], "png", "image/png"), (cols[2], "svg", "image/svg+xml")):
        col.download_button(f"Chart ({fmt.upper()})", lambda fmt=fmt: charts.image(spec, fmt), f"{name}.{fmt}", mime,
                            key=f"{fmt}:{name}", on_click="ignore")


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def badge(c: Controls, configs=None, hws=None) -> None:
    """The panel's rate basis (xqsim.rates: which rates each GPU and scheme is predicted with, and why)."""
    where = rates.applied(list(hws or c.hws), list(configs or c.configs), c.rate_mode)
    st.caption(f":material/speed: **rates {c.rate_mode}**: {where}")


def _crossings(cross: pd.DataFrame, what: str) -> None:
    """Each crossover as a line of text, then as a table."""
    if cross.empty:
        st.markdown(f"No crossover in {what} in this context range.")
    for r in cross.itertuples():
        loser = r.scheme_b if r.winner == r.scheme_a else r.scheme_a
        st.markdown(f"**{r.hardware}**: `{r.winner}` passes `{loser}` in {what} at **{r.crossover_context:,.0f} "
                    f"tokens**")
    st.dataframe(pd.DataFrame({"GPU": cross["hardware"], "between": cross["scheme_a"] + " / " + cross["scheme_b"],
                               "crossover context [tokens]": cross["crossover_context"].round().astype("int64"),
                               "better after": cross["winner"]}), hide_index=True)


def _skipped(v: dict) -> None:
    for msg in v["skipped"]:
        st.warning(msg)


def render_crossovers(c: Controls, root: Path) -> None:
    v = sweep_views(c.hws, c.model, c.configs, c.batch, c.contexts, c.rate_mode)
    points = measured(c, root)
    points = points[points["at_batch"].astype(bool)]
    step = view_crossovers(c.hws, c.model, c.configs, c.batch, c.contexts, "step_time_s", c.rate_mode)
    _skipped(v)
    st.subheader(f"Step time vs context: {c.model.name}, batch {c.batch}")
    badge(c)
    shown = {"step": "step time [ms]", "tokens": "tokens/s"}
    keep_valid("metric", list(shown))
    metric = shown[st.radio("Show", list(shown), format_func=shown.get, key="metric", horizontal=True)]
    y = "step_time_ms" if metric == "step time [ms]" else "tokens_per_s"
    df = v["df"]
    marks = tuple(charts.MARKERS) if len(points) else tuple(charts.MARKERS[:2])
    show("crossovers", charts.context_curves(metric, len(c.hws), marks),
         f"{c.model.name}, batch {c.batch}: {metric} per scheme (curves end at the memory wall)",
         frame=df[["hardware", "label", "context", "batch", "fits", "step_time_ms", "tokens_per_s", "bound"]],
         table=charts.curves_table(df[df["fits"]], y, v["walls"], step, points))
    st.caption("x: memory wall, the longest context that fits at this batch; ◆: where one scheme's step time "
               "passes another's (both fit).")
    _measured_caption(points, c)
    _crossings(step, "step time")
    for r in v["walls"][~v["walls"]["fits_at_start"]].itertuples():
        st.info(f"{r.label} on {r.hardware} does not fit {c.batch} sequences of {c.contexts[0]:,} tokens "
                f"(longest context at this batch: {r.max_context:,} tokens)")
    walls = v["walls"][["hardware", "label", "max_context"]]
    st.dataframe(walls.rename(columns={"hardware": "GPU", "label": "scheme",
                                       "max_context": f"memory wall: longest context at batch {c.batch} [tokens]"}),
                 hide_index=True)


def render_capacity(c: Controls, root: Path) -> None:
    v = sweep_views(c.hws, c.model, c.configs, c.batch, c.contexts, c.rate_mode)
    points = measured(c, root)
    points = points[points["at_capacity"].astype(bool)]
    tput = view_crossovers(c.hws, c.model, c.configs, c.batch, c.contexts, "throughput_cap_tokens_per_s", c.rate_mode)
    _skipped(v)
    df = v["df"]
    st.subheader(f"Capacity: {c.model.name}, up to {c.batch} sequences")
    badge(c)
    tp = df[df["throughput_cap_tokens_per_s"] > 0]
    marks = charts.MARKERS[1:] if len(points) else charts.MARKERS[1:2]
    show("throughput_cap", charts.context_curves("tokens/s at the largest batch that fits", len(c.hws), tuple(marks)),
         f"Capacity-limited throughput: tokens/s at the largest batch that fits, at most {c.batch}",
         frame=df[["hardware", "label", "context", "batch_cap", "throughput_cap_tokens_per_s"]],
         table=charts.curves_table(tp, "throughput_cap_tokens_per_s", cross=tput,
                                   measured=points.assign(throughput_cap_tokens_per_s=points["tokens_per_s"])))
    _measured_caption(points, c)
    _crossings(tput, "capacity-limited throughput")
    show("max_batch", charts.context_curves("max batch [sequences]", len(c.hws)), "Most sequences that fit vs context",
         frame=df[["hardware", "label", "context", "max_batch"]],
         table=charts.curves_table(df[df["max_batch"] > 0], "max_batch"))
    parts = data.memory_breakdown(df, c.at)
    show("memory_breakdown", charts.memory_bars(tuple(data.MEMORY_PARTS.values())),
         f"Memory at batch {c.batch}, context {parts['context'].iloc[0]:,}: weights, cache and transient buffers "
         f"vs usable memory", parts=parts, caps=data.capacities(list(c.hws)))


def render_roofline(c: Controls) -> None:
    ops, table = _roofline(c.hws, c.model, c.configs, c.batch, c.at, c.rate_mode)
    st.subheader(f"Roofline: every op of one decode step, {c.model.name}, batch {c.batch}, context {c.at:,}")
    badge(c)
    show("roofline", charts.roofline(len(c.hws)), f"Ops by arithmetic intensity and achieved rate, batch {c.batch}, "
                                                  f"context {c.at:,} (shape: bound)", frame=ops, table=table)
    st.caption("Achieved rate = FLOPs / the op's roofline time including its per-kernel overhead, so overhead-bound "
               "ops sit below the roof. Ops without FLOPs (cache appends, embedding) are not drawn.")
    st.dataframe(ops, hide_index=True)


def render_compare(c: Controls) -> None:
    # rematerializing schemes first: the view asks which GPU's ridge makes rematerialization pay
    options = sorted((cfg for cfg in c.configs if SCHEMES[cfg.scheme].compresses),
                     key=lambda o: not SCHEMES[o.scheme].rematerializes)
    if not options:
        st.info("Select a scheme other than fp16 to compare it with fp16 across GPUs.")
        return
    keep_valid("cmp", [o.label for o in options])
    label = st.selectbox("Scheme to compare with fp16", [o.label for o in options], key="cmp")
    cfg = next(o for o in options if o.label == label)
    tp, table = _compare(c.all_hws, c.model, cfg, c.batch, c.contexts, c.at, c.rate_mode)
    st.subheader(f"{label} vs fp16 on every GPU: {c.model.name}, up to {c.batch} sequences")
    badge(c, (SchemeConfig(scheme="fp16"), cfg), c.all_hws)
    show("compare_gpus", charts.compare_ratio(),
         f"{label} / fp16 capacity-limited throughput (above 1: the scheme serves more)", table=tp)
    show("compare_ridge", charts.compare_ridge(), f"Ridge point of each GPU vs the extra FLOPs {label} spends per "
                                                  f"byte of step traffic it saves (dashed), batch {c.batch}, "
                                                  f"context {c.at:,}", table=table)
    st.caption("Above its ridge a GPU rebuilds the cache slower than it would have read it: the scheme is slower "
               "per step at equal batch and wins only through capacity (more sequences or context fit).")
    for r in table.itertuples():
        lead = data.leads_throughout(tp[tp["hardware"] == r.hardware])
        where = (f"passes fp16 at **{r.passes_fp16_at_context:,.0f} tokens**" if r.better_after == label else
                 f"falls behind fp16 at {r.passes_fp16_at_context:,.0f} tokens" if r.better_after else
                 "serves more than fp16 at **every context in range**" if lead is True else
                 "serves less than fp16 at every context in range" if lead is False else
                 "no crossover in this context range")
        st.markdown(f"**{r.hardware}** (ridge {r.ridge_flop_per_byte:.0f} FLOP/B): {where}")
    st.dataframe(table.round({"ridge_flop_per_byte": 0, "extra_flop_per_byte_saved": 0, "passes_fp16_at_context": 0}),
                 hide_index=True)


def render_calibration(c: Controls, root: Path) -> None:
    sets = data.measurement_sets(root)
    if not sets:
        st.info(f"No measurements yet: {_where(root)} holds no folder of `xqsim measure` JSON files.")
        return
    keep_valid("mset", list(sets))
    name = st.selectbox("Measurements", list(sets), key="mset")
    by_name = {h.name: h for h in c.all_hws}
    keep_valid("calhw", list(by_name))
    gpu = name.split("/")[0]  # measurements/<gpu>/...: the profiles named for that GPU first, a fitted one first
    fitted = [n for n, h in by_name.items() if h.fitted and n.startswith(gpu)]
    st.session_state.setdefault("calhw", (fitted or [n for n in by_name if n.startswith(gpu)] or list(by_name))[0])
    hw = by_name[st.selectbox("Profile that predicts them", list(by_name), key="calhw")]
    paths = tuple(sets[name])
    try:
        pred, err, device = _calibration(paths, tuple(p.stat().st_mtime for p in paths), hw)
    except UserError as exc:
        st.error(str(exc))
        return
    n = int((pred["rates"] == "spec").sum())
    st.subheader(f"Calibration: {n} configurations measured on {device['device_name']} (torch {device['torch']}), "
                 f"predicted by {hw.name}")
    if not hw.fitted:
        st.info(f"{hw.name} has no fitted block: spec rates only (`xqsim calibrate` writes a profile with one).")
    for r in err[err["by"] == "all"].itertuples():
        st.markdown(f"**{r.rates} rates**: median |error| **{r.median_abs_pct:.1f}%**, p90 {r.p90_abs_pct:.1f}%, "
                    f"max {r.max_abs_pct:.1f}% over {r.n} configurations")
    show("calibration", charts.calibration_scatter(pred["rates"].nunique()),
         "Predicted vs measured decode step (dashed: exact)", frame=pred, table=charts.calibration_table(pred))
    show("calibration_error", charts.error_bars(),
         "Median |predicted − measured| / measured, by predicted regime and by scheme", frame=err,
         table=err[err["by"] != "all"])
    st.dataframe(err, hide_index=True)


def render_accuracy(c: Controls, folder: Path) -> None:
    try:
        df = data.read_accuracy(folder)
    except UserError as exc:
        st.error(str(exc))
        return
    if df is None:
        st.info(f"No accuracy results yet: {_where(folder)} holds no CSV (`xqsim accuracy -o` writes them there, with "
                f"the columns {', '.join(data.ACCURACY_COLUMNS)}, or `xqsim accuracy`'s own CSV).")
        return
    st.subheader("Accuracy: quality loss vs memory, per scheme")
    front = df[df["pareto"]].sort_values(["model", "mem_ratio"])
    st.markdown(f"Pareto front: {len(front)} of {len(df)} results: "
                + "; ".join(f"{r.model} `{r.label}` (memory {r.mem_ratio:.3f}, Δppl {r.delta_ppl:+.3f})"
                            for r in front.itertuples()))
    show("accuracy", charts.accuracy(df["model"].nunique()),
         "Perplexity increase vs memory ratio to fp16 (ringed and dashed: Pareto front)", table=df)
    st.dataframe(df, hide_index=True)

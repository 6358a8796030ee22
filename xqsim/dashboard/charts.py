"""Altair charts of the dashboard's tables: a title, axis units and a legend on each; every number on hover.

Each chart is built once per shape as a Vega-Lite template over named datasets (building and validating an
Altair chart takes ~100 ms, too slow to redo on every control change); `compose` fills in the title and the
data. Faceted charts (one panel per GPU) draw all their layers from one table with a `kind` column, as a
facet needs one dataset; each layer filters its rows."""

from __future__ import annotations

import copy
import functools
import json
import textwrap

import altair as alt
import pandas as pd

CTX = alt.X("context:Q", scale=alt.Scale(type="log", nice=False), axis=alt.Axis(format="~s"),
            title="context [tokens]")
MARKERS = ["memory wall", "crossover", "measured"]
FAMILY_DASH = {"fp16": [1, 0], "kivi": [1, 0], "xquant": [8, 3], "xquant_cl": [2, 2], "xquant_gqa": [6, 3],
               "xquant_cl_gqa": [4, 2, 1, 2], "xquant_yang": [3, 3]}
WALL_SHAPE = "M-1,-1L1,1M-1,1L1,-1"  # an x
TABLE = alt.NamedData(name="table")
PALETTE = alt.Scale(scheme="tableau10")  # distinct hues per scheme (the Streamlit theme shades one blue)


def compose(template: dict, title: str, **datasets: pd.DataFrame) -> dict:
    """A template with its title and data: a spec for st.vega_lite_chart (which sends the tables as Arrow)."""
    spec = copy.deepcopy(template)
    # never truncated: a long title wraps at about 110 characters a line instead of ending in "..."
    lines = textwrap.wrap(title, 110, break_long_words=False)
    spec["title"] = {"text": lines if len(lines) > 1 else title, "limit": 0}
    spec["datasets"] = datasets
    return spec


def with_records(spec: dict) -> dict:
    """The spec with its tables as JSON records (what a stand-alone Vega-Lite renderer reads)."""
    return spec | {"datasets": {k: json.loads(v.to_json(orient="records")) for k, v in spec["datasets"].items()}}


def image(spec: dict, fmt: str) -> bytes:
    """A composed chart as PNG or SVG bytes (vl-convert, on demand: when a download button is pressed)."""
    import vl_convert as vlc

    full = with_records(spec)
    return vlc.vegalite_to_png(full, scale=2) if fmt == "png" else vlc.vegalite_to_svg(full).encode()


def _scheme_color(field: str = "label", columns: int = 2) -> alt.Color:
    return alt.Color(f"{field}:N", title="scheme", scale=PALETTE,
                     legend=alt.Legend(orient="bottom", columns=columns, labelLimit=320))


def _facet(layers: alt.LayerChart, panels: int, field: str = "hardware") -> dict:
    """One panel per value of field, two to a row, sized for a laptop's wide layout."""
    return (layers.properties(width=880 if panels == 1 else 430, height=300)
            .facet(facet=alt.Facet(f"{field}:N", title=None, header=alt.Header(labelFontSize=13)),
                   columns=min(panels, 2), data=TABLE)
            .properties(title="-").to_dict())


def short_tokens(x: float) -> str:
    """32768 -> '32.8k' (a context as written on a chart)."""
    x = round(x)
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


# ----------------------------------------------------------------------------- curves vs context


def curves_table(curves: pd.DataFrame, y: str, walls: pd.DataFrame | None = None,
                 cross: pd.DataFrame | None = None, measured: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of a context_curves chart: the curves, the memory walls inside the range, the crossovers and the
    measured steps (data.measured_points, placed at their y)."""
    cols = [c for c in ("hardware", "label", "context", "bound", "max_batch") if c in curves]
    parts = [curves[cols].assign(kind="curve", y=curves[y])]
    if walls is not None:
        w = walls[walls["in_range"]]
        parts.append(pd.DataFrame({"hardware": w["hardware"], "label": w["label"], "kind": "marker",
                                   "marker": MARKERS[0], "context": w["max_context"], "y": w[y],
                                   "max_context": w["max_context"], "text": w["max_context"].map(short_tokens)}))
    if cross is not None:
        parts.append(pd.DataFrame({"hardware": cross["hardware"],
                                   "label": cross["scheme_a"] + " / " + cross["scheme_b"], "kind": "marker",
                                   "marker": MARKERS[1], "context": cross["crossover_context"], "y": cross[y],
                                   "winner": cross["winner"], "text": cross["crossover_context"].map(short_tokens)}))
    if measured is not None and len(measured):
        cols = ["hardware", "label", "context", "batch", "layers", "engine", "device", "rates", "measured_ms",
                "predicted_ms", "error_pct"]
        parts.append(measured[cols].assign(kind="measured", marker=MARKERS[2], y=measured[y]))
    return pd.concat(parts, ignore_index=True)


@functools.lru_cache(maxsize=32)
def context_curves(y_title: str, panels: int, marks: tuple[str, ...] = ()) -> dict:
    """Template: y vs context per scheme, one panel per GPU; an x where a scheme hits its memory wall and a
    diamond where one scheme passes another, with the context written beside each (data: curves_table);
    `marks`: which of MARKERS the legend lists."""
    base = alt.Chart()
    color = _scheme_color()
    shape = alt.Shape("marker:N", title="mark", scale=alt.Scale(domain=MARKERS,
                                                                range=[WALL_SHAPE, "diamond", "circle"]),
                      legend=alt.Legend(orient="bottom", values=list(marks)) if marks else None)
    yenc = alt.Y("y:Q", scale=alt.Scale(type="log"), title=y_title)
    tip = [alt.Tooltip("hardware:N", title="GPU"), alt.Tooltip("label:N", title="scheme"),
           alt.Tooltip("context:Q", title="context [tokens]", format=",.0f"),
           alt.Tooltip("y:Q", title=y_title, format=",.4g")]
    # a dash pattern per scheme family: two schemes whose curves coincide (KIVI-2 and XQuant-GQA-2 on the fitted
    # H100, within 1%) both stay visible
    dash = alt.StrokeDash("family:N", legend=None, scale=alt.Scale(
        domain=list(FAMILY_DASH), range=list(FAMILY_DASH.values())))
    lines = base.transform_filter(alt.datum.kind == "curve").transform_calculate(
        family="split(datum.label, '-')[0]").mark_line(strokeWidth=2).encode(
        CTX, yenc, color, dash, tooltip=tip + [alt.Tooltip("bound:N", title="bound"),
                                               alt.Tooltip("max_batch:Q", title="max batch here", format=",")])
    wall = base.transform_filter(alt.datum.marker == MARKERS[0]).mark_point(size=140, strokeWidth=3).encode(
        CTX, yenc, color, shape, tooltip=tip[:2] + [alt.Tooltip("max_context:Q", title="memory wall [tokens]",
                                                                format=",")])
    diamonds = base.transform_filter(alt.datum.marker == MARKERS[1]).mark_point(
        size=120, filled=True, color="black").encode(
        CTX, yenc, shape, tooltip=[alt.Tooltip("hardware:N", title="GPU"), alt.Tooltip("label:N", title="between"),
                                   alt.Tooltip("context:Q", title="crossover [tokens]", format=",.0f"),
                                   alt.Tooltip("winner:N", title="better after")])
    labels = base.transform_filter(alt.datum.kind == "marker").mark_text(
        dy=-12, fontSize=11, fontWeight="bold").encode(CTX, yenc, text="text:N")
    # measured steps: filled circles in the scheme's colour, ringed in black so they stand off their curve
    measured = base.transform_filter(alt.datum.kind == "measured").mark_point(
        size=70, filled=True, stroke="black", strokeWidth=1, opacity=0.9).encode(
        CTX, yenc, color, shape, tooltip=tip[:2] + [
            alt.Tooltip("context:Q", title="context [tokens]", format=",.0f"),
            alt.Tooltip("batch:Q", title="batch"), alt.Tooltip("device:N", title="measured on"),
            alt.Tooltip("engine:N", title="engine"), alt.Tooltip("layers:Q", title="layers measured"),
            alt.Tooltip("measured_ms:Q", title="measured step, those layers [ms]", format=",.3f"),
            alt.Tooltip("predicted_ms:Q", title="predicted step, those layers [ms]", format=",.3f"),
            alt.Tooltip("error_pct:Q", title="error (predicted − measured) / measured [%]", format="+.1f"),
            alt.Tooltip("rates:N", title="predicted with rates"),
            alt.Tooltip("y:Q", title=f"{y_title}, placed (model at full depth × measured / predicted)",
                        format=",.4g")])
    return _facet(alt.layer(lines, wall, diamonds, labels, measured), panels)


# ----------------------------------------------------------------------------- memory, roofline


@functools.lru_cache(maxsize=1)
def memory_bars(parts: tuple[str, ...]) -> dict:
    """Template: stacked memory parts per scheme [GB] (data 'parts': memory_breakdown) against each GPU's usable
    memory, a dashed line each (data 'caps': capacities)."""
    bars = alt.Chart(alt.NamedData(name="parts")).mark_bar().encode(
        alt.X("label:N", title="scheme", axis=alt.Axis(labelAngle=-20, labelLimit=260)),
        alt.Y("gb:Q", title="memory [GB]", stack="zero"),
        alt.Color("part:N", title="part", sort=list(parts), scale=PALETTE,
                  legend=alt.Legend(orient="right", labelLimit=320)),
        alt.Order("order:Q"),
        tooltip=[alt.Tooltip("label:N", title="scheme"), alt.Tooltip("part:N"),
                 alt.Tooltip("gb:Q", title="GB", format=",.3f"), alt.Tooltip("fits:N", title="fits the first GPU")])
    caps = alt.Chart(alt.NamedData(name="caps"))
    cap = caps.mark_rule(strokeDash=[6, 4], color="black", strokeWidth=1.5).encode(
        y="capacity_gb:Q", tooltip=[alt.Tooltip("hardware:N", title="GPU"),
                                    alt.Tooltip("capacity_gb:Q", title="usable [GB]", format=",.1f")])
    text = caps.mark_text(align="left", dx=4, dy=-6, x=0).encode(y="capacity_gb:Q", text="caption:N")
    return alt.layer(bars, cap, text).properties(height=380, title="-").to_dict()


def roofline_table(ops: pd.DataFrame, roof: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([roof.assign(kind="roof"), ops.assign(kind="op")], ignore_index=True)


@functools.lru_cache(maxsize=16)
def roofline(panels: int) -> dict:
    """Template: each op of each scheme by arithmetic intensity and achieved FLOP rate under its GPU's roofs,
    the marker shape telling its bound (data: roofline_table)."""
    x = alt.X("intensity_flop_per_byte:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format="~s"),
              title="arithmetic intensity [FLOP/B]")
    lines = alt.Chart().transform_filter(alt.datum.kind == "roof").mark_line(color="black", strokeWidth=1.5).encode(
        x, alt.Y("tflops:Q", scale=alt.Scale(type="log"), title="achieved [TFLOP/s]"),
        alt.StrokeDash("roof:N", title="roof", legend=alt.Legend(orient="bottom", columns=2)),
        tooltip=[alt.Tooltip("roof:N"), alt.Tooltip("intensity_flop_per_byte:Q", format=",.3g"),
                 alt.Tooltip("tflops:Q", title="TFLOP/s", format=",.4g")])
    pts = alt.Chart().transform_filter(alt.datum.kind == "op").mark_point(size=70, filled=True, opacity=0.8).encode(
        x, alt.Y("achieved_tflops:Q"),
        _scheme_color(),
        alt.Shape("bound:N", title="bound", scale=alt.Scale(domain=["memory", "compute", "overhead"]),
                  legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("label:N", title="scheme"), "op:N", alt.Tooltip("op_class:N", title="class"),
                 "bound:N", alt.Tooltip("intensity_flop_per_byte:Q", title="FLOP/B", format=",.3g"),
                 alt.Tooltip("achieved_tflops:Q", title="TFLOP/s", format=",.4g"),
                 alt.Tooltip("time_us:Q", title="µs per layer", format=",.1f"),
                 alt.Tooltip("layers:Q", title="× layers")])
    return _facet(alt.layer(lines, pts), panels)


# ----------------------------------------------------------------------------- GPUs compared


@functools.lru_cache(maxsize=1)
def compare_ratio() -> dict:
    """Template: a scheme's capacity-limited throughput over fp16's vs context, a line per GPU (data: the
    `ratio` table of data.gpu_compare); the dashed line at 1 is parity."""
    line = alt.Chart(TABLE).transform_filter("isValid(datum.ratio) && datum.ratio > 0").mark_line(
        strokeWidth=2).encode(
        CTX, alt.Y("ratio:Q", scale=alt.Scale(type="log"), title="throughput vs fp16 [×]"),
        alt.Color("gpu:N", title="GPU (ridge point)", scale=PALETTE,
                  legend=alt.Legend(labelLimit=360)),
        tooltip=[alt.Tooltip("gpu:N", title="GPU"), alt.Tooltip("context:Q", format=",.0f"),
                 alt.Tooltip("ratio:Q", title="× fp16", format=".3g"),
                 alt.Tooltip("scheme_tokens_per_s:Q", title="scheme tokens/s", format=",.0f"),
                 alt.Tooltip("fp16_tokens_per_s:Q", title="fp16 tokens/s", format=",.0f")])
    one = alt.Chart(TABLE).mark_rule(color="black", strokeDash=[4, 3]).encode(y=alt.datum(1))
    return alt.layer(line, one).properties(height=340, title="-").to_dict()


@functools.lru_cache(maxsize=1)
def compare_ridge() -> dict:
    """Template: each GPU's ridge point as a bar against the scheme's extra FLOPs per byte saved, the dashed
    line (data: the table of data.gpu_compare)."""
    base = alt.Chart(TABLE)
    bars = base.mark_bar().encode(
        alt.X("hardware:N", title="GPU", sort="-y"), alt.Y("ridge_flop_per_byte:Q", title="FLOP per byte"),
        alt.Color("per_step:N", title="per step at equal batch", legend=alt.Legend(labelLimit=360),
                  scale=alt.Scale(domain=["slower (extra FLOP/B above the ridge)", "faster (below the ridge)"],
                                  range=["#d62728", "#2ca02c"])),
        tooltip=[alt.Tooltip("hardware:N", title="GPU"),
                 alt.Tooltip("ridge_flop_per_byte:Q", title="ridge [FLOP/B]", format=",.0f"),
                 alt.Tooltip("extra_flop_per_byte_saved:Q", title="scheme [FLOP/B saved]", format=",.0f"),
                 alt.Tooltip("passes_fp16_at_context:Q", title="passes fp16 at [tokens]", format=",.0f")])
    rule = base.mark_rule(color="black", strokeDash=[6, 4], strokeWidth=2).encode(
        y="mean(extra_flop_per_byte_saved):Q")
    return alt.layer(bars, rule).properties(height=260, title="-").to_dict()


# ----------------------------------------------------------------------------- measurements


def calibration_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Measured vs predicted points and, per set of rates, the diagonal over their range."""
    lo, hi = pred[["measured_ms", "predicted_ms"]].min().min(), pred[["measured_ms", "predicted_ms"]].max().max()
    diag = pd.DataFrame([{"rates": r, "measured_ms": v, "predicted_ms": v, "kind": "diag"}
                         for r in pred["rates"].unique() for v in (lo, hi)])
    return pd.concat([pred.assign(kind="point"), diag], ignore_index=True)


@functools.lru_cache(maxsize=4)
def calibration_scatter(panels: int) -> dict:
    """Template: predicted vs measured step time per configuration, one panel per set of rates (spec,
    fitted); the dashed diagonal is an exact prediction (data: calibration_table)."""
    x = alt.X("measured_ms:Q", scale=alt.Scale(type="log"), title="measured step [ms]")
    y = alt.Y("predicted_ms:Q", scale=alt.Scale(type="log"), title="predicted step [ms]")
    line = alt.Chart().transform_filter(alt.datum.kind == "diag").mark_line(color="black", strokeDash=[4, 3]).encode(
        x, y)
    pts = alt.Chart().transform_filter(alt.datum.kind == "point").mark_point(size=30, filled=True, opacity=0.7).encode(
        x, y, _scheme_color("scheme"),
        alt.Shape("regime:N", title="predicted regime", legend=alt.Legend(orient="bottom")),
        tooltip=["label:N", "model:N", "batch:Q", alt.Tooltip("context:Q", format=","), "regime:N",
                 alt.Tooltip("measured_ms:Q", format=",.3f"), alt.Tooltip("predicted_ms:Q", format=",.3f"),
                 alt.Tooltip("error_pct:Q", title="error [%]", format="+.1f")])
    return _facet(alt.layer(line, pts), panels, field="rates")


@functools.lru_cache(maxsize=1)
def error_bars() -> dict:
    """Template: median |error| per regime and per scheme, a bar per set of rates (data: data.error_table
    without the 'all' rows)."""
    bars = alt.Chart(TABLE).transform_calculate(group=alt.datum.by + ": " + alt.datum.group).mark_bar().encode(
        alt.X("group:N", title="predicted regime, scheme", axis=alt.Axis(labelAngle=-40, labelLimit=200,
                                                                          labelOverlap=False)),
        alt.XOffset("rates:N"), alt.Y("median_abs_pct:Q", title="median |error| [%]"),
        alt.Color("rates:N", title="rates", scale=alt.Scale(domain=["spec", "fitted"], range=["#9e9e9e", "#1f77b4"])),
        tooltip=["by:N", "group:N", "rates:N", "n:Q", alt.Tooltip("median_abs_pct:Q", format=".1f"),
                 alt.Tooltip("p90_abs_pct:Q", format=".1f"), alt.Tooltip("max_abs_pct:Q", format=".1f")])
    return alt.layer(bars).properties(height=420, title="-").to_dict()  # a layer: Streamlit sizes it like the others


@functools.lru_cache(maxsize=4)
def accuracy(panels: int) -> dict:
    """Template: quality loss vs memory ratio per scheme, one panel per model; the Pareto front as a dashed
    line and rings (data: data.read_accuracy)."""
    x = alt.X("mem_ratio:Q", title="memory vs fp16 KV cache [ratio]")
    # symlog: Δppl spans 1e-3 to 1e5 (2-bit XQuant on a 135M model) and crosses zero; a linear axis flattens the
    # rest of the results onto one line
    y = alt.Y("delta_ppl:Q", title="perplexity increase vs fp16 [Δ ppl, symlog]",
              scale=alt.Scale(type="symlog", constant=0.01),
              axis=alt.Axis(values=[-1, 0, 0.01, 0.1, 1, 10, 100, 1000, 10000, 100000]))
    tip = ["model:N", "label:N", alt.Tooltip("mem_ratio:Q", format=".4f"), alt.Tooltip("ppl:Q", format=".3f"),
           alt.Tooltip("delta_ppl:Q", format="+.3f"), "pareto:N", "file:N"]
    pts = alt.Chart().mark_point(size=80, filled=True).encode(
        x, y, _scheme_color(columns=3), tooltip=tip)
    front = alt.Chart().transform_filter(alt.datum.pareto).mark_line(color="black", strokeDash=[5, 3]).encode(
        x, y, order="mem_ratio:Q")
    rings = alt.Chart().transform_filter(alt.datum.pareto).mark_point(size=260, color="black", strokeWidth=1.5).encode(
        x, y, tooltip=tip)
    return _facet(alt.layer(front, pts, rings), panels, field="model")

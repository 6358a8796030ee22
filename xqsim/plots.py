"""Sweep plots (matplotlib, PNG and SVG): one panel per model (rows) and hardware (columns)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import rates as xrates  # noqa: E402
from . import schemes  # noqa: E402
from .loading import write_atomic  # noqa: E402
from .roofline import op_table  # noqa: E402
from .specs import SCHEMES, HardwareProfile, ModelSpec, SchemeConfig, UserError  # noqa: E402

MARKERS = {"matmul": "o", "attention": "s", "remat": "^", "dequant": "v", "quant": "D", "rope": "x", "elementwise": "."}


MAX_COLUMNS = 4  # panels a row: a figure no wider than a laptop screen


class _Panels:
    """Panels of (model i, hardware j): one row per model, the GPUs wrapped into rows of at most MAX_COLUMNS; the
    x label on each column's lowest panel, the y label on each row's first."""

    def __init__(self, models: list[str], hws: list[str], title: str):
        self.per_row = min(len(hws), MAX_COLUMNS)
        self.rows_per_model = -(-len(hws) // self.per_row)
        nrows = len(models) * self.rows_per_model
        self.fig, self.axes = plt.subplots(nrows, self.per_row, figsize=(4.2 * self.per_row + 3, 3.4 * nrows + 0.8),
                                           squeeze=False, sharex=True)
        self.fig.suptitle(title)
        self.n = (len(models), len(hws))
        for k in range(len(hws), self.rows_per_model * self.per_row):  # empty cells of a model's last row
            for i in range(len(models)):
                self.axes[i * self.rows_per_model + k // self.per_row, k % self.per_row].set_visible(False)

    def __getitem__(self, ij: tuple[int, int]):
        i, j = ij
        return self.axes[i * self.rows_per_model + j // self.per_row, j % self.per_row]

    def bottom(self, i: int, j: int) -> bool:
        """Whether panel (i, j) is the lowest drawn in its column."""
        below = (i, j + self.per_row) if j + self.per_row < self.n[1] else (i + 1, j)
        return below[0] >= self.n[0]

    def all(self) -> list:
        return [self[i, j] for i in range(self.n[0]) for j in range(self.n[1])]

    def finish(self, i: int, j: int, title: str, xlabel: str, ylabel: str) -> None:
        """Log axes, major grid, the panel's title; axis labels on the outer panels only. A panel with nothing drawn
        (nothing fits this GPU's memory at the sweep's batch) says so, on linear axes: log axes of no data cannot be
        drawn."""
        ax = self[i, j]
        if any(np.any((x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y))
               for x, y in (np.asarray(line.get_data(), dtype=float) for line in ax.get_lines())):
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "nothing fits", transform=ax.transAxes, ha="center", va="center", fontsize=9)
            ax.tick_params(labelleft=False, labelbottom=False, length=0)
        ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        if self.bottom(i, j):
            ax.set_xlabel(xlabel)
        if j % self.per_row == 0:
            ax.set_ylabel(ylabel)


def _grid(models: list[str], hws: list[str], title: str):
    p = _Panels(models, hws, title)
    return p.fig, p


# One hue per scheme family, far apart; the bit width sets the shade (fewer bits: darker)
SCHEME_COLORS = {"fp16": "#000000", "kivi": "#1f77b4", "xquant": "#2ca02c", "xquant_cl": "#8c8c00",
                 "xquant_gqa": "#9467bd", "xquant_cl_gqa": "#8c564b", "xquant_yang": "#ff7f0e"}
assert set(SCHEME_COLORS) == set(SCHEMES), "a scheme without a colour"
BIT_SHADE = {1: 0.0, 2: 0.0, 3: 0.3, 4: 0.5, 8: 0.65, 16: 0.75}  # mixed with white


def _color(scheme: str, bits: int) -> tuple:
    """The family's hue, lighter for more bits."""
    import matplotlib.colors as mcolors

    base = mcolors.to_rgb(SCHEME_COLORS[scheme])
    shade = 0.0 if scheme == "fp16" else BIT_SHADE.get(bits, 0.5)
    return tuple(c + (1 - c) * shade for c in base)


def _styles(variants) -> dict[str, dict]:
    """Per variant label: colour by scheme family and bits; solid for remat, dashed for absorb_v, dotted or dash-dot
    when fused. variants: (label, scheme, bits, strategy, fused) each, from configs or a results table's columns."""
    out = {}
    for lab, scheme, bits, strategy, fused in variants:
        style = "--" if strategy == "absorb_v" else "-"
        out[lab] = {"color": _color(scheme, int(bits)),
                    "ls": (":" if fused and style == "-" else "-." if fused else style), "lw": 1.4}
    return out


def _variants(df: pd.DataFrame) -> list[tuple]:
    """(label, scheme, bits, strategy, fused) of each variant of a results table, in order."""
    return list(df.drop_duplicates("label")[["label", "scheme", "bits", "strategy", "fused"]]
                .astype({"label": str, "scheme": str}).itertuples(index=False, name=None))


def save(fig, path: Path, dpi: int = 110) -> list[Path]:
    """Write the figure as path.png and path.svg (each under a temporary name first) and close it."""
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    try:
        for p in out:
            write_atomic(p, lambda tmp, p=p: fig.savefig(tmp, dpi=dpi, format=p.suffix[1:]))
    finally:
        plt.close(fig)
    return out


def _finish(fig, styles: dict, path: Path) -> list[Path]:
    handles = [plt.Line2D([], [], label=lab, **st) for lab, st in styles.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / fig.get_figwidth(), 0.97))
    return save(fig, path)


def _per_context(df: pd.DataFrame, path: Path, y: str, ylabel: str, title: str) -> list[Path]:
    """y vs context of every variant, one panel per model and GPU, each curve ending at its memory wall (x)."""
    models = list(dict.fromkeys(df["model"].astype(str)))
    hws = list(dict.fromkeys(df["hardware"].astype(str)))
    fig, axes = _grid(models, hws, title)
    styles = _styles(_variants(df))
    for i, m in enumerate(models):
        for j, h in enumerate(hws):
            ax = axes[i, j]
            sub = df[(df["model"] == m) & (df["hardware"] == h)]
            for lab, s in sub.groupby("label", observed=True, sort=False):
                s = s.sort_values("context")
                ok = s[s["fits"]]
                ax.plot(ok["context"], ok[y], **styles[str(lab)])
                if len(ok) and len(ok) < len(s):  # memory wall: the last context that fits
                    ax.plot(ok["context"].iloc[-1], ok[y].iloc[-1], "x", color=styles[str(lab)]["color"], ms=7,
                            mew=2)
            axes.finish(i, j, f"{m} on {h}", "context [tokens]", ylabel)
    return _finish(fig, styles, path)


def rates_note(df: pd.DataFrame) -> str:
    """The rate bases a table's rows were predicted with (its `rates` column), for a figure's title."""
    if "rates" not in df:
        return ""
    return "\n" + "\n".join(textwrap.wrap("rates: " + "; ".join(dict.fromkeys(df["rates"].astype(str))), 160))


def step_time_vs_context(df: pd.DataFrame, batch: int, path: Path) -> list[Path]:
    sub = df[df["batch"] == batch].assign(step_time_ms=lambda d: d["step_time_s"] * 1e3)
    return _per_context(sub, path, "step_time_ms", "decode step time [ms]",
                        f"Decode step time vs context, batch {batch} (x = memory wall: last context that fits)"
                        + rates_note(sub))


def _curve_names(d: pd.DataFrame) -> pd.DataFrame:
    """Add the columns a per-(scheme, bits) curve is drawn by: family and its name ('kivi 2-bit')."""
    scheme = d["scheme"].astype(str)
    return d.assign(family=scheme, curve=np.where(scheme == "fp16", "fp16", scheme + " " + d["bits"].astype(str)
                                                  + "-bit"))


def _curve_styles(best: pd.DataFrame) -> dict[str, dict]:
    """fp16 first and thick, then each family's curves by bits, in the family's hue."""
    order = best.drop_duplicates("curve").sort_values(["family", "bits"])
    styles = {"fp16": {"color": "k", "ls": "-", "lw": 2.2}} if (order["curve"] == "fp16").any() else {}
    for r in order.itertuples():
        if r.curve != "fp16":
            styles[r.curve] = {"color": _color(r.family, int(r.bits)), "ls": "-", "lw": 1.5}
    return styles


def memory_vs_context(df: pd.DataFrame, batch: int, path: Path) -> list[Path]:
    """Memory does not depend on the GPU: one panel per model, each scheme and bit width in its leanest execution,
    and each GPU's usable capacity as a labelled horizontal line (GPUs of equal capacity on one line)."""
    sub = _curve_names(df[df["batch"] == batch].assign(total_gb=lambda d: d["total_bytes"] / 1e9))
    first_hw = str(sub["hardware"].iloc[0])
    best = (sub[sub["hardware"] == first_hw].groupby(["model", "curve", "family", "bits", "context"], observed=True)
            ["total_gb"].min().reset_index())
    models = list(dict.fromkeys(sub["model"].astype(str)))
    caps = sub.groupby("hardware", observed=True)["capacity_bytes"].first()
    lines = {}
    for h, cap in caps.items():
        lines.setdefault(round(cap / 1e9), []).append(str(h))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 3, 5.4), squeeze=False, sharey=True)
    fig.suptitle(f"Memory (weights + cache + transient) vs context, batch {batch}, each scheme and bit width in its "
                 f"leanest execution; dashed: usable capacity")
    styles = _curve_styles(best)
    for j, m in enumerate(models):
        ax = axes[0, j]
        panel = best[best["model"] == m]
        for c, st in styles.items():
            s = panel[panel["curve"] == c].sort_values("context")
            ax.plot(s["context"], s["total_gb"], **st)
        for gb, names in lines.items():
            ax.axhline(gb, color="k", ls="--", lw=0.8)
            ax.text(panel["context"].min(), gb, f" {', '.join(names)} ({gb} GB)", va="bottom", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_title(m, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("context [tokens]")
        if j == 0:
            ax.set_ylabel("memory [GB]")
    return _finish(fig, styles, path)


def throughput_cap_vs_context(df: pd.DataFrame, path: Path, limit: int | None = None) -> list[Path]:
    """Per model and GPU, each scheme at each bit width in its fastest execution (strategy, fusion) at every
    context, one hue per family and a shade per bit width; a diamond where a scheme's curve passes fp16's (or
    where fp16 stops fitting while it still serves). One y scale for the whole figure. limit: the most sequences
    the sweep allowed (its largest batch; default the table's, for a table of every batch)."""
    sub = _curve_names(df[df["batch"] == df["batch"].min()])
    best = (sub.groupby(["model", "hardware", "curve", "family", "bits", "context"], observed=True)
            ["throughput_cap_tokens_per_s"].max().reset_index())
    models = list(dict.fromkeys(sub["model"].astype(str)))
    hws = list(dict.fromkeys(sub["hardware"].astype(str)))
    fig, axes = _grid(models, hws, f"Capacity-limited throughput vs context (the largest batch that fits, up to "
                                   f"{limit or int(df['batch'].max())}; each scheme and bit width in its fastest "
                                   "execution)" + rates_note(sub))
    for ax in axes.all()[1:]:
        ax.sharey(axes[0, 0])
    styles = _curve_styles(best)
    curves = list(styles)
    for i, m in enumerate(models):
        for j, h in enumerate(hws):
            ax = axes[i, j]
            panel = best[(best["model"] == m) & (best["hardware"] == h)]
            fp = panel[panel["curve"] == "fp16"].set_index("context")["throughput_cap_tokens_per_s"]
            for c in curves:
                s = panel[panel["curve"] == c].sort_values("context")
                y = s["throughput_cap_tokens_per_s"].to_numpy(float)
                x = s["context"].to_numpy(float)
                served = y > 0
                ax.plot(x[served], y[served], **styles[c])
                if c == "fp16" or not len(fp):
                    continue
                lead = y > fp.reindex(s["context"]).to_numpy(float)
                flips = np.nonzero(~lead[:-1] & lead[1:] & served[1:])[0]
                for k in flips[:1]:  # where it first passes fp16: the grid point after the flip
                    ax.plot(x[k + 1], y[k + 1], "D", color=styles[c]["color"], ms=5, mec="k", mew=0.6)
            axes.finish(i, j, f"{m} on {h}", "context [tokens]", "tokens/s at the largest batch that fits")
    styles["passes fp16 (first grid point after)"] = {"color": "grey", "ls": "none", "marker": "D", "mec": "k"}
    return _finish(fig, styles, path)


def roofline(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch: int,
             context: int, path: Path, rate_mode: str = "fitted") -> list[Path]:
    """Each scheme's ops at (batch, context) placed by arithmetic intensity and roofline FLOP rate, each at the rates
    its (GPU, configuration) takes under rate_mode; the roofs are the spec's."""
    note = "\n".join(textwrap.wrap(xrates.summary(hws, configs, rate_mode), 160))
    fig, axes = _grid([m.name for m in models], [h.name for h in hws],
                      f"Roofline: ops of one decode step, batch {batch}, context {context}\n{note}")
    styles = _styles((c.label, c.scheme, c.bits, c.strategy, c.fused) for c in configs)
    for i, m in enumerate(models):
        for j, hw in enumerate(hws):
            ax = axes[i, j]
            rates = hw.rates(fitted=False)
            bw, peak = rates.mem_bytes_per_s, rates.flops_per_s["matmul"]
            pts = {cls: ([], [], []) for cls in MARKERS}  # op class -> x, y, colour: one scatter each
            for cfg in configs:
                try:
                    rc = cfg.resolved(m)
                except UserError:  # a config this model cannot take is simply not drawn
                    continue
                own = xrates.rates(hw, rc, rate_mode)[0]
                for op in op_table(schemes.step_ops(m, rc, np.int64(batch), np.int64(context)), own):
                    if op["flops"] > 0:
                        x_, y_, c_ = pts[op["op_class"]]
                        x_.append(op["intensity_flop_per_byte"])
                        y_.append(op["flops"] / max(op["t_compute_s"], op["t_mem_s"]) / 1e12)
                        c_.append(styles[cfg.label]["color"])
            xs = [v for x_, _, _ in pts.values() for v in x_ if np.isfinite(v) and v > 0]
            x = np.logspace(np.log10(min([0.1, *xs]) / 2), np.log10(max([1e5, *xs]) * 2), 200)  # roofs past every op
            ax.plot(x, np.minimum(peak, x * bw) / 1e12, "k-", lw=1.5)
            ax.plot(x, np.minimum(rates.flops_per_s["dequant"], x * bw) / 1e12, "k:", lw=1)
            for cls, (x_, y_, c_) in pts.items():
                if x_:
                    ax.scatter(x_, y_, s=14, marker=MARKERS[cls], c=c_, alpha=0.8)
            ax.axvline(peak / bw, color="grey", lw=0.8, ls="--")
            axes.finish(i, j, f"{m.name} on {hw.name} (ridge {peak / bw:.0f} FLOP/B)", "arithmetic intensity [FLOP/B]",
                        "attainable [TFLOP/s]")
    for cls, mk in MARKERS.items():
        axes[0, 0].scatter([], [], marker=mk, color="grey", label=cls)
    axes[0, 0].legend(fontsize=6, loc="lower right", title="op class (solid: tensor roof, dotted: vector)",
                      title_fontsize=6)
    return _finish(fig, styles, path)

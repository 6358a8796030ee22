"""Sweep plots (matplotlib, PNG and SVG): one panel per model (rows) and hardware (columns)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import schemes  # noqa: E402
from .roofline import op_table  # noqa: E402
from .specs import SCHEMES, HardwareProfile, ModelSpec, SchemeConfig, UserError  # noqa: E402

MARKERS = {"matmul": "o", "attention": "s", "remat": "^", "dequant": "v", "quant": "D", "rope": "x", "elementwise": "."}


def _grid(models: list[str], hws: list[str], title: str):
    fig, axes = plt.subplots(len(models), len(hws), figsize=(4.2 * len(hws) + 3, 3.4 * len(models) + 0.8),
                             squeeze=False, sharex=True)
    fig.suptitle(title)
    return fig, axes


SCHEME_COLORS = dict(zip(SCHEMES, plt.get_cmap("tab10").colors, strict=False))


def _styles(labels: list[str]) -> dict[str, dict]:
    """Colour by scheme, darker for fewer bits; dashed for absorb_v, thin dotted for fused."""
    out = {}
    for lab in labels:
        scheme = lab.split("-")[0]
        variants = [x for x in labels if x.split("-")[0] == scheme]
        shade = 0.35 * variants.index(lab) / max(len(variants) - 1, 1)
        color = tuple(c + (1 - c) * shade for c in SCHEME_COLORS[scheme])
        style = "--" if "absorb_v" in lab else "-"
        out[lab] = {"color": color, "ls": (":" if "fused" in lab and style == "-" else
                                           "-." if "fused" in lab else style), "lw": 1.3}
    return out


def save(fig, path: Path, dpi: int = 110) -> list[Path]:
    """Write the figure as path.png and path.svg and close it."""
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for p in out:
        fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return out


def _finish(fig, styles: dict, path: Path) -> list[Path]:
    handles = [plt.Line2D([], [], label=lab, **st) for lab, st in styles.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / fig.get_figwidth(), 0.97))
    return save(fig, path)


def _per_context(df: pd.DataFrame, path: Path, y: str, ylabel: str, title: str, wall: bool = False,
                 capacity: bool = False) -> list[Path]:
    models = list(dict.fromkeys(df["model"].astype(str)))
    hws = list(dict.fromkeys(df["hardware"].astype(str)))
    fig, axes = _grid(models, hws, title)
    styles = _styles(list(dict.fromkeys(df["label"].astype(str))))
    for i, m in enumerate(models):
        for j, h in enumerate(hws):
            ax = axes[i, j]
            sub = df[(df["model"] == m) & (df["hardware"] == h)]
            for lab, s in sub.groupby("label", observed=True, sort=False):
                s = s.sort_values("context")
                ok = s[s["fits"]] if wall else s
                ax.plot(ok["context"], ok[y], **styles[str(lab)])
                if wall and len(ok) and len(ok) < len(s):  # memory wall: the last context that fits
                    ax.plot(ok["context"].iloc[-1], ok[y].iloc[-1], "x", color=styles[str(lab)]["color"], ms=7,
                            mew=2)
            if capacity and len(sub):
                ax.axhline(sub["capacity_bytes"].iloc[0] / 1e9, color="k", ls="--", lw=1)
                ax.text(sub["context"].min(), sub["capacity_bytes"].iloc[0] / 1e9, " capacity", va="bottom",
                        fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.minorticks_off()
            ax.set_title(f"{m} on {h}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("context [tokens]")
            if j == 0:
                ax.set_ylabel(ylabel)
    return _finish(fig, styles, path)


def step_time_vs_context(df: pd.DataFrame, batch: int, path: Path) -> list[Path]:
    sub = df[df["batch"] == batch].assign(step_time_ms=lambda d: d["step_time_s"] * 1e3)
    return _per_context(sub, path, "step_time_ms", "decode step time [ms]",
                        f"Decode step time vs context, batch {batch} (x = memory wall: last context that fits)",
                        wall=True)


def memory_vs_context(df: pd.DataFrame, batch: int, path: Path) -> list[Path]:
    sub = df[df["batch"] == batch].assign(total_gb=lambda d: d["total_bytes"] / 1e9)
    return _per_context(sub, path, "total_gb", "memory [GB]",
                        f"Memory (weights + cache + transient) vs context, batch {batch}; dashed: usable capacity",
                        capacity=True)


def throughput_cap_vs_context(df: pd.DataFrame, path: Path) -> list[Path]:
    sub = df[df["batch"] == df["batch"].min()]
    sub = sub[sub["throughput_cap_tokens_per_s"] > 0]
    return _per_context(sub, path, "throughput_cap_tokens_per_s", "tokens/s at the largest batch that fits",
                        f"Capacity-limited throughput vs context (batch up to {int(df['batch'].max())})")


def roofline(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch: int,
             context: int, path: Path, fitted: bool = True) -> list[Path]:
    """Each scheme's ops at (batch, context) placed by arithmetic intensity and roofline FLOP rate."""
    fig, axes = _grid([m.name for m in models], [h.name for h in hws],
                      f"Roofline: ops of one decode step, batch {batch}, context {context}")
    styles = _styles(list(dict.fromkeys(c.label for c in configs)))
    for i, m in enumerate(models):
        for j, hw in enumerate(hws):
            ax = axes[i, j]
            rates = hw.rates(fitted)
            bw, peak = rates["mem_bytes_per_s"], rates["matmul_flops_per_s"]
            x = np.logspace(-1, 5, 200)
            ax.plot(x, np.minimum(peak, x * bw) / 1e12, "k-", lw=1.5)
            ax.plot(x, np.minimum(rates["dequant_flops_per_s"], x * bw) / 1e12, "k:", lw=1)
            pts = {cls: ([], [], []) for cls in MARKERS}  # op class -> x, y, colour: one scatter each
            for cfg in configs:
                try:
                    rc = cfg.resolved(m)
                except UserError:  # a config this model cannot take is simply not drawn
                    continue
                for op in op_table(schemes.step_ops(m, rc, np.int64(batch), np.int64(context)), rates):
                    if op["flops"] > 0:
                        x_, y_, c_ = pts[op["op_class"]]
                        x_.append(op["intensity_flop_per_byte"])
                        y_.append(op["flops"] / max(op["t_compute_s"], op["t_mem_s"]) / 1e12)
                        c_.append(styles[cfg.label]["color"])
            for cls, (x_, y_, c_) in pts.items():
                if x_:
                    ax.scatter(x_, y_, s=14, marker=MARKERS[cls], c=c_, alpha=0.8)
            ax.axvline(peak / bw, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{m.name} on {hw.name} (ridge {peak / bw:.0f} FLOP/B)", fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("arithmetic intensity [FLOP/B]")
            if j == 0:
                ax.set_ylabel("attainable [TFLOP/s]")
    for cls, mk in MARKERS.items():
        axes[0, 0].scatter([], [], marker=mk, color="grey", label=cls)
    axes[0, 0].legend(fontsize=6, loc="lower right", title="op class (solid: tensor roof, dotted: vector)",
                      title_fontsize=6)
    return _finish(fig, styles, path)

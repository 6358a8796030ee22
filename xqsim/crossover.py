"""Crossovers between schemes over a sweep, and each scheme's memory wall.

A crossover is where the sign of (metric of A - metric of B) flips strictly between two neighbouring
grid points along context (or batch), `lo` and `hi`; two schemes that both stop fitting do not cross. Its
position here is interpolated linearly in log(context) (or log(batch)); xqsim.sweep.solve_crossovers places it
exactly on the model (the sweep and the dashboard do). `winner` is the scheme that is better after the
crossover. Step time counts only where both fit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .capacity import MAX_CONTEXT

# metric, better when higher, axis it runs along, grouping keys beside hardware and model
CROSSOVER_METRICS = [
    ("step_time_s", False, "context", "batch"),
    ("throughput_cap_tokens_per_s", True, "context", None),
    ("tokens_per_s", True, "batch", "context"),
]


def _crossings(df: pd.DataFrame, metric: str, higher: bool, axis: str, key: str | None) -> pd.DataFrame:
    keys = ["hardware", "model"] + ([key] if key else [])
    sub = df if key or axis != "context" else df[df["batch"] == df["batch"].min()]
    value = sub[metric].where(sub["fits"]) if metric != "throughput_cap_tokens_per_s" else sub[metric]
    table = (sub.assign(_v=value).pivot_table(index=keys + ["label"], columns=axis, values="_v", observed=True,
                                               dropna=False))
    if table.empty:
        return pd.DataFrame()
    x = np.log(table.columns.to_numpy(dtype=float))
    rows = []
    for gkey, block in table.groupby(level=list(range(len(keys))), observed=True):
        labels = block.index.get_level_values("label").to_numpy()
        v = block.to_numpy(dtype=float)  # (schemes, points)
        sign = -1.0 if higher else 1.0  # a positive diff means "a is better"
        diff = sign * (v[None, :, :] - v[:, None, :])  # (a, b, points): b - a for lower-is-better
        d0, d1 = diff[..., :-1], diff[..., 1:]
        hit = np.isfinite(d0) & np.isfinite(d1) & (d0 * d1 < 0)  # a strict change of sign
        ia, ib, ip = np.nonzero(hit)
        keep = ia < ib
        ia, ib, ip = ia[keep], ib[keep], ip[keep]
        frac = d0[ia, ib, ip] / (d0[ia, ib, ip] - d1[ia, ib, ip])
        pos = np.exp(x[ip] + frac * (x[ip + 1] - x[ip]))
        gk = gkey if isinstance(gkey, tuple) else (gkey,)
        grid = np.exp(x)
        for a, b, p, after, i in zip(ia, ib, pos, d1[ia, ib, ip], ip, strict=True):
            rows.append((*gk, metric, axis, labels[a], labels[b], float(p),
                         labels[a] if after > 0 else labels[b], round(grid[i]), round(grid[i + 1])))
    cols = keys + ["metric", "axis", "scheme_a", "scheme_b", "crossover", "winner", "lo", "hi"]
    out = pd.DataFrame(rows, columns=cols)
    if not key:
        out.insert(2, "at", "max batch that fits" if metric == "throughput_cap_tokens_per_s" else "")
    else:
        out.insert(2, "at", out.pop(key).map(lambda v: f"{key}={v}"))
    return out


def crossovers(df: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """All crossovers of every scheme pair, for each metric of CROSSOVER_METRICS (or those named)."""
    parts = [_crossings(df, *m) for m in CROSSOVER_METRICS if metrics is None or m[0] in metrics]
    parts = [p for p in parts if not p.empty]
    cols = ["hardware", "model", "at", "metric", "axis", "scheme_a", "scheme_b", "crossover", "winner", "lo", "hi"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def memory_walls(df: pd.DataFrame) -> pd.DataFrame:
    """Per hardware, model, scheme and batch: the first context that no longer fits [tokens]."""
    walls = (df.groupby(["hardware", "model", "label", "batch"], observed=True)["max_context"].first()
             .reset_index())
    # tokens, an integer; empty where no context up to MAX_CONTEXT hits a wall
    walls["memory_wall_context"] = pd.array(np.where(walls["max_context"] >= MAX_CONTEXT, pd.NA,
                                                     walls["max_context"] + 1), dtype="Int64")
    return walls

"""Crossovers between schemes over a sweep, and each scheme's memory wall.

A crossover is where the sign of (metric of A - metric of B) flips strictly between two neighbouring
grid points along context (or batch), `lo` and `hi`; two schemes that both stop fitting do not cross. Its
position here is interpolated linearly in log(context) (or log(batch)); xqsim.sweep.solve_crossovers places it
exactly on the model (the sweep and the dashboard do). `winner` is the scheme that is better after the
crossover. Step time counts only where both fit.
"""

from __future__ import annotations

from itertools import islice

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
        return _rows([], metric, axis, key)
    grid = table.columns.to_numpy(dtype=float)
    rows = []
    for gkey, block in table.groupby(level=list(range(len(keys))), observed=True):
        labels = block.index.get_level_values("label").to_numpy()
        rows += _group_crossings(gkey if isinstance(gkey, tuple) else (gkey,), metric, axis, labels,
                                 block.to_numpy(dtype=float), grid, higher)
    return _rows(rows, metric, axis, key)


def _group_crossings(gkey: tuple, metric: str, axis: str, labels, v: np.ndarray, grid: np.ndarray,
                     higher: bool) -> list[tuple]:
    """The crossings of one group's curves v (schemes, points) along grid: one row per pair and sign change, in
    the order of (scheme a, scheme b, point). Long curves go in blocks of points, so that the pairwise differences
    stay small (a 20,000-point context axis of 40 schemes would take 256 MB at once)."""
    x = np.log(grid)
    sign = -1.0 if higher else 1.0  # a positive diff means "a is better"
    n = v.shape[0]
    width = max(2, 4_000_000 // max(1, n * n))  # points per block, each block overlapping the next by one
    found = []
    for p0 in range(0, max(1, v.shape[1] - 1), width - 1):
        w = v[:, p0:p0 + width]
        diff = sign * (w[None, :, :] - w[:, None, :])  # (a, b, points): b - a for lower-is-better
        d0, d1 = diff[..., :-1], diff[..., 1:]
        hit = np.isfinite(d0) & np.isfinite(d1) & (d0 * d1 < 0)  # a strict change of sign
        ia, ib, ip = np.nonzero(hit)
        keep = ia < ib
        ia, ib, ip = ia[keep], ib[keep], ip[keep]
        found.append((ia, ib, ip + p0, d0[ia, ib, ip], d1[ia, ib, ip]))
    ia, ib, ip, e0, e1 = (np.concatenate(f) for f in zip(*found, strict=True))
    order = np.lexsort((ip, ib, ia))  # as one block would give them
    ia, ib, ip, e0, e1 = ia[order], ib[order], ip[order], e0[order], e1[order]
    pos = np.exp(x[ip] + e0 / (e0 - e1) * (x[ip + 1] - x[ip]))
    return [(*gkey, metric, axis, labels[a], labels[b], float(p), labels[a] if after > 0 else labels[b],
             round(grid[i]), round(grid[i + 1]))
            for a, b, p, after, i in zip(ia, ib, pos, e1, ip, strict=True)]


def _rows(rows: list[tuple], metric: str, axis: str, key: str | None) -> pd.DataFrame:
    keys = ["hardware", "model"] + ([key] if key else [])
    out = pd.DataFrame(rows, columns=keys + ["metric", "axis", "scheme_a", "scheme_b", "crossover", "winner", "lo",
                                             "hi"])
    if not key:
        out.insert(2, "at", "max batch that fits" if metric == "throughput_cap_tokens_per_s" else "")
    else:
        out.insert(2, "at", out.pop(key).map(lambda v: f"{key}={v}"))
    return out


COLUMNS = ["hardware", "model", "at", "metric", "axis", "scheme_a", "scheme_b", "crossover", "winner", "lo", "hi"]


def _join(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True)[COLUMNS] if parts else pd.DataFrame(columns=COLUMNS)


def crossovers(df: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """All crossovers of every scheme pair, for each metric of CROSSOVER_METRICS (or those named)."""
    return _join([_crossings(df, *m) for m in CROSSOVER_METRICS if metrics is None or m[0] in metrics])


def grid_crossovers(step: dict[str, np.ndarray], cap: dict[str, np.ndarray], hardware: list[str], labels: list[str],
                    batches, contexts, mapper=map) -> pd.DataFrame:
    """crossovers() of a whole grid from its curves alone, in the same order: per model (in the sweep's order), the
    step time where the configuration fits, NaN where not (hardware, schemes, batches, contexts), and the throughput
    cap at the smallest batch (hardware, schemes, contexts). A streamed sweep keeps these instead of its table.
    mapper(fn, items) maps lazily and in order (map, or a pool's bounded map): the groups go to it in batches."""
    b_grid, c_grid = np.asarray(batches, dtype=float), np.asarray(contexts, dtype=float)
    labels = np.asarray(labels, dtype=object)

    def tasks(metric: str, higher: bool):
        for h, hw in enumerate(hardware):
            for model, st in step.items():
                if metric == "step_time_s":  # along context, at each batch
                    for j, b in enumerate(batches):
                        yield (hw, model, b), metric, "context", labels, st[h, :, j], c_grid, higher
                elif metric == "tokens_per_s":  # along batch, at each context: batch / step time
                    for j, c in enumerate(contexts):
                        yield (hw, model, c), metric, "batch", labels, st[h, :, :, j], b_grid, higher
                else:
                    yield (hw, model), metric, "context", labels, cap[model][h], c_grid, higher

    parts = []
    for metric, higher, axis, key in CROSSOVER_METRICS:
        size = 1 if metric == "step_time_s" else 256  # groups a batch (a step-time group is a whole context axis)
        it = tasks(metric, higher)
        batched = iter(lambda it=it, size=size: list(islice(it, size)), [])
        rows = [r for part in mapper(_crossing_batch, batched) for r in part]
        parts.append(_rows(rows, metric, axis, key))
    return _join(parts)


def _crossing_batch(tasks: list[tuple]) -> list[tuple]:
    """_group_crossings of each task; tokens/s groups come as step times and become batch / step time here."""
    rows = []
    for gkey, metric, axis, labels, v, grid, higher in tasks:
        rows += _group_crossings(gkey, metric, axis, labels, grid / v if metric == "tokens_per_s" else v, grid,
                                 higher)
    return rows


def memory_walls(df: pd.DataFrame) -> pd.DataFrame:
    """Per hardware, model, scheme and batch: the first context that no longer fits [tokens]."""
    walls = (df.groupby(["hardware", "model", "label", "batch"], observed=True)["max_context"].first()
             .reset_index())
    # tokens, an integer; empty where no context up to MAX_CONTEXT hits a wall
    walls["memory_wall_context"] = pd.array(np.where(walls["max_context"] >= MAX_CONTEXT, pd.NA,
                                                     walls["max_context"] + 1), dtype="Int64")
    return walls

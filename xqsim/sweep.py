"""Scenario -> vectorized grid -> tidy DataFrame -> files and plots.

For one (model, scheme) the whole hardware x batch x context grid is one set of numpy arrays
(axes: hardware, batch, context); there is no Python loop per configuration.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import schemes
from .capacity import MAX_CONTEXT, max_batch, max_context, memory, seq_memory
from .crossover import grid_crossovers, memory_walls
from .loading import partial, to_json, write_atomic
from .roofline import BOUNDS, step_time
from .schemes.layout import paper_bytes_per_token
from .specs import OP_CLASSES, HardwareProfile, ModelSpec, Scenario, SchemeConfig, Strategy, UserError

CHUNK_ROWS = 100_000  # rows a sweep evaluates, writes and lets go of at once
# Measured on streamed sweeps of 2*10^7 and 10^8 configurations (benchmarks/sweep_memory.py): the interpreter, its
# libraries and a piece in flight; per configuration, the curves kept for the crossovers (8 B) and the rows kept
# for the plots; each worker process; a CSV row and a Parquet row (the flagship's: 585 B and 101 B)
MEMORY_BASE_BYTES, MEMORY_PER_CONFIG_BYTES, MEMORY_PER_WORKER_BYTES = 300e6, 9.5, 270e6
CSV_ROW_BYTES, PARQUET_ROW_BYTES = 585, 150
LARGE_SWEEP = 2_000_000  # configurations: above this a sweep asks first, and writes the CSV only if asked


def size_estimate(n_configs: int, csv: bool = True, workers: int = 1) -> tuple[float, float]:
    """Peak memory and the files' size of a sweep of n configurations [B]."""
    return (MEMORY_BASE_BYTES + MEMORY_PER_CONFIG_BYTES * n_configs + MEMORY_PER_WORKER_BYTES * (workers > 1) * workers,
            (PARQUET_ROW_BYTES + CSV_ROW_BYTES * csv) * n_configs)


# Column order of the result table (snake_case, unit-suffixed).
KEY_COLUMNS = ["hardware", "model", "scheme", "label", "bits", "strategy", "fused", "batch", "context"]


def hardware_rates(hws: list[HardwareProfile], fitted: bool = True) -> dict[str, np.ndarray]:
    """Achieved rates of each profile, stacked along a leading hardware axis (shape (nH, 1, 1))."""
    rows = [hw.rates(fitted) for hw in hws]
    return {k: np.array([r[k] for r in rows], dtype=float)[:, None, None] for k in rows[0]}


def evaluate(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch, context,
             fitted: bool = True, batch_limit: int | None = None) -> dict[str, np.ndarray]:
    """Every metric of one (model, scheme) on the grid hardware x batch x context, as arrays."""
    cfg = cfg.resolved(model)
    B = np.asarray(batch, dtype=np.int64)[None, :, None]
    T = np.asarray(context, dtype=np.int64)[None, None, :]
    shape = (len(hws), B.shape[1], T.shape[2])
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)[:, None, None]
    out = _metrics(hardware_rates(hws, fitted), cap, model, cfg, B, T, batch_limit or int(B.max()))
    return {k: np.broadcast_to(v, shape) for k, v in out.items()}


def _metrics(rates: dict, cap, model: ModelSpec, cfg: SchemeConfig, B, T, limit: int) -> dict[str, np.ndarray]:
    """The metrics of a resolved config, broadcast over rates/capacity, batch B and context T."""
    groups = schemes.layout(model, cfg)
    out = step_time(schemes.step_ops(model, cfg, B, T, groups), rates)
    out |= memory(model, cfg, B, T, groups)
    mem = seq_memory(model, cfg, groups)
    W = out["weights_bytes"]
    out["capacity_bytes"] = cap
    out["paper_cache_bytes"] = B * T * paper_bytes_per_token(groups, cfg)
    out["fits"] = W + B * mem.envelope(T) <= cap
    out["max_batch"] = max_batch(cap, W, mem, T)
    out["max_context"] = max_context(cap, W, mem, B)
    out["tokens_per_s"] = B / out["step_time_s"]
    out["tpot_s"] = out["step_time_s"]
    out["intensity_flop_per_byte"] = out["flops"] / out["bytes_moved"]
    out["batch_cap"], out["throughput_cap_tokens_per_s"] = _throughput_cap(rates, out["max_batch"], model, cfg,
                                                                           groups, T, limit)
    return out


def _throughput_cap(rates: dict, most: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, T, limit: int):
    """Throughput under capacity: (the batch, tokens/s) at the most sequences that fit at context T (`most`, the
    max batch), at most `limit`; 0 tokens/s where not even one fits."""
    b_cap = np.minimum(most, limit)
    t_cap = step_time(schemes.step_ops(model, cfg, np.maximum(b_cap, 1), T, groups), rates, per_class=False)
    return b_cap, np.where(b_cap > 0, b_cap / t_cap["step_time_s"], 0.0)


def _throughput_in(rates: dict, cap: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, T, limit: int):
    """_throughput_cap with the max batch found from the capacity `cap` (per point) first."""
    most = max_batch(cap, schemes.weights_bytes(model, cfg), seq_memory(model, cfg, groups), T)
    return _throughput_cap(rates, most, model, cfg, groups, T, limit)


def capped_point(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch: int, context: int,
                 fitted: bool = True) -> dict[str, np.ndarray]:
    """At one batch and context, per GPU: the most sequences up to `batch` that fit (batch_cap), their tokens/s
    (throughput_cap_tokens_per_s) and one sequence's cache (cache_bytes_per_seq): evaluate()'s values for a
    verdict, without the rest of its metrics."""
    cfg = cfg.resolved(model)
    groups = schemes.layout(model, cfg)
    rates = {k: v[:, 0, 0] for k, v in hardware_rates(hws, fitted).items()}
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)
    T = np.full(len(hws), context, dtype=np.int64)
    b_cap, tput = _throughput_in(rates, cap, model, cfg, groups, T, batch)
    per_seq = memory(model, cfg, 1, T, groups)["cache_bytes"]
    return {"batch_cap": b_cap, "throughput_cap_tokens_per_s": tput, "cache_bytes_per_seq": per_seq}


def _point_values(rates: dict, cap: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, B, T, limit: int,
                  metric: np.ndarray) -> np.ndarray:
    """One crossover metric per point (step_time_s, tokens_per_s or throughput_cap_tokens_per_s) of a resolved
    config, rates and capacity given per point: the part of _metrics each needs, no more."""
    out = np.empty(len(B))
    cap_rows = metric == "throughput_cap_tokens_per_s"
    plain = ~cap_rows
    if plain.any():
        r = {k: v[plain] for k, v in rates.items()}
        t = step_time(schemes.step_ops(model, cfg, B[plain], T[plain], groups), r, per_class=False)["step_time_s"]
        out[plain] = np.where(metric[plain] == "step_time_s", t, B[plain] / t)
    if cap_rows.any():
        r = {k: v[cap_rows] for k, v in rates.items()}
        out[cap_rows] = _throughput_in(r, cap[cap_rows], model, cfg, groups, T[cap_rows], limit)[1]
    return out


CROSS_WAYS = 16  # solve_crossovers: points a bracket is split at per step


def solve_crossovers(cr: pd.DataFrame, hws: list[HardwareProfile], models: list[ModelSpec],
                     configs: list[SchemeConfig], batch_limit: int, fitted: bool = True,
                     rel_tol: float = 0.0) -> pd.DataFrame:
    """Each crossover of crossovers(df) placed exactly: the first integer context (or batch) in its bracket of grid
    points (lo, hi] at which the winner is the better, by a CROSS_WAYS-way search (geometric points, all of a step
    evaluated at once: 5 steps where bisection takes 20) on the analytic model itself. Where a curve ends at a
    memory wall inside the bracket, that is the wall. All crossovers of one (model, scheme) are evaluated together
    at each step. rel_tol > 0 stops the search once its bracket is that narrow (relative): the point returned is
    then at most rel_tol past the first (the dashboard's redraws)."""
    if cr.empty:
        return cr
    hw_at = {hw.name: i for i, hw in enumerate(hws)}
    model_of = {m.name: m for m in models}
    cfg_of = {c.label: c for c in configs}
    lo, hi = cr["lo"].to_numpy(np.int64).copy(), cr["hi"].to_numpy(np.int64).copy()
    along_batch = (cr["axis"] == "batch").to_numpy()
    fixed = cr["at"].astype(str).str.extract(r"=(\d+)$")[0].astype(float).fillna(1).to_numpy(np.int64)
    metric = cr["metric"].astype(str).to_numpy()
    higher = metric != "step_time_s"
    hw_i = cr["hardware"].astype(str).map(hw_at).to_numpy(np.int64)
    winner = cr["winner"].astype(str).to_numpy()
    loser = np.where(winner == cr["scheme_a"].astype(str).to_numpy(), cr["scheme_b"].astype(str).to_numpy(),
                     cr["scheme_a"].astype(str).to_numpy())
    models_ = cr["model"].astype(str).to_numpy()
    # per point: the rates and capacity of its GPU; per (model, scheme): the resolved config and layout, once
    rates = {k: v[:, 0, 0][hw_i] for k, v in hardware_rates(hws, fitted).items()}
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)[hw_i]
    resolved = {}
    for mname, label in set(zip(models_, winner, strict=True)) | set(zip(models_, loser, strict=True)):
        rc = cfg_of[label].resolved(model_of[mname])
        resolved[mname, label] = (model_of[mname], rc, schemes.layout(model_of[mname], rc))
    # rows of each (model, scheme) in each role, found once
    roles = {role: pd.DataFrame({"m": models_, "l": labels}).groupby(["m", "l"], sort=False).indices
             for role, labels in (("w", winner), ("l", loser))}
    steps = np.arange(1, CROSS_WAYS) / CROSS_WAYS  # each step splits every bracket in CROSS_WAYS parts
    while True:
        active = (hi - lo > 1) & (hi - lo > rel_tol * lo)
        if not active.any():
            break
        rows = np.nonzero(active)[0]
        a, b = np.maximum(lo[rows], 1).astype(float), hi[rows].astype(float)
        pts = np.rint(a[:, None] * (b / a)[:, None] ** steps[None, :]).astype(np.int64)  # geometric, non-decreasing
        pts = np.clip(pts, lo[rows, None] + 1, np.maximum(hi[rows, None] - 1, lo[rows, None] + 1))
        k = pts.shape[1]
        flat = np.repeat(rows, k)  # row of each (row, point)
        mid = pts.ravel()
        B, T = np.where(along_batch[flat], mid, fixed[flat]), np.where(along_batch[flat], fixed[flat], mid)
        vals = {"w": np.empty(len(flat)), "l": np.empty(len(flat))}
        for role, groups in roles.items():
            for (mname, label), idx in groups.items():
                sel = np.nonzero(np.isin(flat, idx))[0]
                if len(sel):
                    m, rc, groups_ = resolved[mname, label]
                    r = flat[sel]
                    vals[role][sel] = _point_values({kk: v[r] for kk, v in rates.items()}, cap[r], m, rc, groups_,
                                                    B[sel], T[sel], batch_limit, metric[r])
        wins = np.where(higher[flat], vals["w"] > vals["l"], vals["w"] < vals["l"]).reshape(len(rows), k)
        # the first point where the winner is the better closes the bracket; the point before it opens it
        first = np.where(wins.any(1), wins.argmax(1), k)
        new_hi = np.where(first < k, pts[np.arange(len(rows)), np.minimum(first, k - 1)], hi[rows])
        new_lo = np.where(first > 0, pts[np.arange(len(rows)), np.maximum(first - 1, 0)], lo[rows])
        hi[rows], lo[rows] = new_hi, new_lo
    # a capacity-limited flip that a stopped search left short of the exact point, because the loser ran out of
    # memory: the loser's memory wall (its longest context at batch 1, plus one) is the crossover, exactly
    for i in np.nonzero((metric == "throughput_cap_tokens_per_s") & (hi - lo > 1))[0]:
        a = evaluate([hws[hw_i[i]]], model_of[models_[i]], cfg_of[loser[i]], [1], [hi[i]], fitted, batch_limit)
        wall = int(a["max_context"][0, 0, 0]) + 1
        if a["throughput_cap_tokens_per_s"][0, 0, 0] == 0 and lo[i] < wall <= hi[i]:
            hi[i] = wall
    return cr.assign(crossover=hi.astype(float))


CATEGORIES = ("hardware", "model", "scheme", "label", "strategy")


def _flatten(arrays: dict[str, np.ndarray], batch, context) -> dict[str, np.ndarray]:
    """One evaluate() result as flat columns (hardware as its index along the grid's first axis)."""
    shape = arrays["step_time_s"].shape
    cols = {"hardware": np.broadcast_to(np.arange(shape[0], dtype=np.int16)[:, None, None], shape).ravel(),
            "batch": np.broadcast_to(np.asarray(batch)[None, :, None], shape).ravel(),
            "context": np.broadcast_to(np.asarray(context)[None, None, :], shape).ravel()}
    return cols | {k: v.ravel() for k, v in arrays.items()}


def _frame(blocks: list[tuple[dict, dict[str, np.ndarray]]], hws: list[HardwareProfile],
           categories: dict[str, list] | None = None) -> pd.DataFrame:
    """Concatenate (names, columns) blocks once into the tidy table, string columns as categoricals (of the given
    categories, so that the pieces of a streamed table agree; else those present)."""
    sizes = [len(cols["batch"]) for _, cols in blocks]
    out = {}
    for k in blocks[0][0]:  # constant within a block: model, scheme, label, bits, strategy, fused
        values = [names[k] for names, _ in blocks]
        if k in CATEGORIES:
            cats = (categories or {}).get(k) or list(dict.fromkeys(values))
            codes = np.repeat(np.array([cats.index(v) for v in values], dtype=np.int16), sizes)
            out[k] = pd.Categorical.from_codes(codes, cats)
        else:
            out[k] = np.repeat(np.array(values), sizes)
    for k in blocks[0][1]:
        v = np.concatenate([cols[k] for _, cols in blocks])
        if k == "hardware":
            v = pd.Categorical.from_codes(v, [hw.name for hw in hws])
        elif k == "bound_code":
            k, v = "bound", pd.Categorical.from_codes(v.astype(np.int8), list(BOUNDS))
        out[k] = v
    order = KEY_COLUMNS + [c for c in out if c not in KEY_COLUMNS]
    return pd.DataFrame({c: out[c] for c in order}, copy=False)  # no consolidation copy


def _names(model: ModelSpec, cfg: SchemeConfig, resolved: SchemeConfig) -> dict:
    return {"model": model.name, "scheme": cfg.scheme, "label": cfg.label, "bits": cfg.bits,
            "strategy": resolved.strategy or "", "fused": cfg.fused}  # "": the scheme has none


def evaluate_frame(hws, model, cfg, batch, context, fitted=True, batch_limit=None) -> pd.DataFrame:
    """evaluate() as a tidy table."""
    rcfg = cfg.resolved(model)
    arrays = evaluate(hws, model, rcfg, batch, context, fitted, batch_limit)
    return _frame([(_names(model, cfg, rcfg), _flatten(arrays, batch, context))], hws)


def run(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch, context,
        fitted: bool = True, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The full grid as one table; configs a model cannot take (e.g. a rank above its dkv) are skipped
    and reported through on_step."""
    blocks = []
    limit = int(max(batch))
    for model in models:
        for cfg in configs:
            try:
                rcfg = cfg.resolved(model)
                arrays = evaluate(hws, model, rcfg, batch, context, fitted, limit)
                blocks.append((_names(model, cfg, rcfg), _flatten(arrays, batch, context)))
            except UserError as err:
                if on_step:
                    on_step(f"skipped {cfg.label} on {model.name}: {err}")
            if on_step:
                on_step("")
    if not blocks:
        raise UserError("no configuration of the scenario could be evaluated")
    return _frame(blocks, hws)


def thinned(contexts, most: int = 512, near=()) -> list[int]:
    """At most `most` of a context axis, spread evenly along it (all if it is no longer), plus the grid point
    nearest each of `near`: the contexts a huge sweep keeps for its plots and summary."""
    c = np.asarray(contexts)
    idx = set(np.unique(np.linspace(0, len(c) - 1, min(len(c), most)).round().astype(int)).tolist())
    idx |= {int(np.abs(np.log(c) - np.log(x)).argmin()) for x in near}
    return [int(c[i]) for i in sorted(idx)]


def _units(n_hw: int, n_models: int, n_configs: int, n_batch: int, n_ctx: int) -> list[tuple]:
    """The pieces a streamed sweep evaluates: (model, config slice, batch slice, context slice) of at most about
    CHUNK_ROWS rows each, in the table's order (a piece spans every GPU; as many whole configurations as fit, else
    one configuration split along batch, then context)."""
    per_config, per_batch = n_hw * n_batch * n_ctx, n_hw * n_ctx
    if per_config <= CHUNK_ROWS:
        k = CHUNK_ROWS // per_config
        return [(m, slice(c, min(n_configs, c + k)), slice(0, n_batch), slice(0, n_ctx))
                for m in range(n_models) for c in range(0, n_configs, k)]
    b_step = max(1, CHUNK_ROWS // per_batch)
    c_step = n_ctx if per_batch <= CHUNK_ROWS else max(1, CHUNK_ROWS // n_hw)
    return [(m, slice(c, c + 1), slice(b, min(n_batch, b + b_step)), slice(t, min(n_ctx, t + c_step)))
            for m in range(n_models) for c in range(n_configs)
            for b in range(0, n_batch, b_step) for t in range(0, n_ctx, c_step)]


_JOB: dict = {}  # what every piece of a streamed sweep shares (set in each worker process once)


def _init_job(job: dict, worker: bool = False) -> None:
    if worker:  # a Ctrl-C reaches the whole process group: the sweep's own process answers it
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _JOB.clear()
    _JOB.update(job)


def _evaluate_unit(unit: tuple) -> tuple:
    """One piece, ready to write: (unit, why schemes were skipped on the model, piece or None when none was
    evaluated). A piece holds its rows as an Arrow table, the step times where they fit and the throughput caps of
    its configurations (for the crossovers; NaN for a skipped one), its memory walls and its rows that the plots
    keep; all of it made here, in a worker if any."""
    import pyarrow as pa

    j = _JOB
    mi, cfgs, bs, cs = unit
    model = j["models"][mi]
    batch, context = j["batch"][bs], j["context"][cs]
    shape = (len(j["hws"]), len(batch), len(context))
    blocks, skips = [], []
    step = np.full((cfgs.stop - cfgs.start, *shape), np.nan)
    cap = np.full((cfgs.stop - cfgs.start, shape[0], shape[2]), np.nan)
    for i, cfg in enumerate(j["configs"][cfgs]):
        try:
            rcfg = cfg.resolved(model)
            arrays = evaluate(j["hws"], model, rcfg, batch, context, j["fitted"], j["limit"])
        except UserError as err:
            skips.append(f"skipped {cfg.label} on {model.name}: {err}")
            continue
        blocks.append((_names(model, cfg, rcfg), _flatten(arrays, batch, context)))
        step[i] = np.where(arrays["fits"], arrays["step_time_s"], np.nan)
        cap[i] = arrays["throughput_cap_tokens_per_s"][:, 0]  # the smallest batch, where bs.start == 0
    if not blocks:
        return unit, skips, None
    frame = _frame(blocks, j["hws"], j["categories"])
    keep = frame["batch"].isin(j["keep_batches"])
    if j["keep_contexts"] is not None:
        keep &= frame["context"].isin(j["keep_contexts"])
    return unit, skips, {
        "table": pa.Table.from_pandas(frame, preserve_index=False), "rows": len(frame), "step": step,
        "cap": cap if bs.start == 0 else None,
        "walls": memory_walls(frame[frame["context"] == j["context"][0]]),  # one per (GPU, model, scheme, batch)
        "kept": frame[keep]}


def _pool(job: dict, workers: int):
    """`workers` processes that each hold the job once (None for one: everything runs here). They are spawned, not
    forked (the progress display's thread may hold a lock at any moment), so, as with any spawned process, the
    caller's main module must be safe to import (the `xqsim` command's is)."""
    if workers <= 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_job,
                               initargs=(job, True))


def _bounded_map(pool, fn: Callable, items, window: int) -> Iterator:
    """fn over items, in order, in the pool (or here if None), with at most `window` items in flight, so that
    memory stays bounded whatever the number of items."""
    if pool is None:
        yield from map(fn, items)
        return
    todo, pending = iter(items), deque()
    for item in todo:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        done = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield done


@dataclass
class Streamed:
    """What a streamed sweep keeps of its table: its row count, its crossovers (not yet placed on the model,
    crossover.crossovers' columns), its memory walls, and its rows at the batches kept (for plots and summary)."""

    rows: int
    crossovers: pd.DataFrame
    walls: pd.DataFrame
    kept: pd.DataFrame


def stream(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch, context,
           parquet: Path, csv: Path | None = None, keep_batches=(), keep_contexts=None, fitted: bool = True,
           workers: int = 1, on_step: Callable[[str, int], None] | None = None) -> Streamed:
    """run()'s table, evaluated and written piece by piece (at most about CHUNK_ROWS rows in memory at once): to
    `parquet` and, if given, `csv`, each first under a temporary name that becomes the file only once the whole
    table is written (an interrupted sweep leaves no half file). Keeps the curves the crossovers need (8 bytes a
    configuration) and its rows at keep_batches and keep_contexts (default: every context; see thinned) for plots
    and summaries. on_step(message, rows) after each piece ('' when nothing to report)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    batch = np.array(sorted(set(int(b) for b in batch)), dtype=np.int64)
    context = np.asarray(context, dtype=np.int64)
    nH, nL, nB, nC = len(hws), len(configs), len(batch), len(context)
    units = _units(nH, len(models), nL, nB, nC)
    cats = {"hardware": [hw.name for hw in hws], "model": [m.name for m in models],
            "scheme": list(dict.fromkeys(c.scheme for c in configs)), "label": [c.label for c in configs],
            "strategy": ["", *Strategy.__args__]}
    job = {"hws": hws, "models": models, "configs": configs, "batch": batch, "context": context, "fitted": fitted,
           "limit": int(batch.max()), "categories": cats, "keep_batches": list(keep_batches),
           "keep_contexts": None if keep_contexts is None else list(keep_contexts)}
    step = {m.name: np.full((nH, nL, nB, nC), np.nan) for m in models}
    cap = {m.name: np.full((nH, nL, nC), np.nan) for m in models}
    walls, kept, skipped, rows, buffer = [], [], set(), 0, []
    tmp = [partial(p) for p in (parquet, csv) if p is not None]
    writer, fh, meta = None, None, None

    def flush() -> None:  # the buffered pieces as one piece of the table
        nonlocal writer
        table = pa.concat_tables(buffer).replace_schema_metadata(meta)
        buffer.clear()
        if writer is None:
            # dictionary pages for the few-valued columns only: tried on every float column, they took 70% of
            # the time to write (the flagship's table: 0.16 s, 0.045 s so; 18 MB instead of 15)
            writer = pq.ParquetWriter(tmp[0], table.schema, use_dictionary=[*CATEGORIES, "bound", "bits", "batch"])
        writer.write_table(table)
        if fh is not None:
            table.to_pandas().to_csv(fh, header=fh.tell() == 0, index=False)

    _init_job(job)
    pool = _pool(job, workers)
    try:
        fh = open(tmp[1], "w", newline="") if csv is not None else None  # noqa: SIM115 (closed below)
        for (mi, ci, bs, cs), skips, piece in _bounded_map(pool, _evaluate_unit, units, 2 * workers):
            for skip in skips:
                if skip not in skipped and on_step:
                    on_step(skip, rows)
                skipped.add(skip)
            if piece is None:
                continue
            step[models[mi].name][:, ci, bs, cs] = piece["step"].transpose(1, 0, 2, 3)
            if piece["cap"] is not None:
                cap[models[mi].name][:, ci, cs] = piece["cap"].transpose(1, 0, 2)
            walls.append(piece["walls"])
            kept.append(piece["kept"])
            meta = meta or piece["table"].schema.metadata
            buffer.append(piece["table"].replace_schema_metadata(None))
            rows += piece["rows"]
            if sum(len(t) for t in buffer) >= CHUNK_ROWS:
                flush()
            if on_step:
                on_step("", rows)
        if buffer:
            flush()
        if writer is None:
            raise UserError("no configuration of the scenario could be evaluated")
        writer.close()
        writer = None
        if fh is not None:
            fh.close()
            fh = None
        for t, p in zip(tmp, (parquet, csv), strict=False):
            os.replace(t, p)
        tmp = []
    finally:
        if writer is not None:
            writer.close()
        if fh is not None:
            fh.close()
        for t in tmp:
            t.unlink(missing_ok=True)
        if tmp and pool is not None:  # interrupted: drop what is queued
            pool.shutdown(wait=True, cancel_futures=True)
    try:
        cr = grid_crossovers(step, cap, cats["hardware"], cats["label"], batch.tolist(), context.tolist(),
                             lambda fn, items: _bounded_map(pool, fn, items, 2 * workers))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    keys = ["hardware", "model", "label", "batch"]
    return Streamed(rows, cr, pd.concat(walls, ignore_index=True).sort_values(keys, kind="stable",
                                                                                ignore_index=True),
                    pd.concat(kept, ignore_index=True))


def summary(df: pd.DataFrame, batch: int, context: int, hardware: str | None = None) -> pd.DataFrame:
    """At the grid point nearest (batch, context), on one hardware (default: the first): the fastest
    fitting variant of each scheme per model, fastest first; schemes that fit nowhere come last."""
    b = df["batch"].iloc[(df["batch"] - batch).abs().argmin()]
    c = df["context"].iloc[(np.log(df["context"]) - np.log(context)).abs().argmin()]
    hardware = hardware or str(df["hardware"].cat.categories[0])
    sel = df[(df["batch"] == b) & (df["context"] == c) & (df["hardware"] == hardware)]
    sel = sel.assign(_rank=np.where(sel["fits"], sel["step_time_s"], np.inf))
    best = sel.sort_values(["model", "_rank", "max_context"], ascending=[True, True, False])
    best = best.groupby(["model", "scheme"], observed=True).head(1)
    cols = ["hardware", "model", "label", "batch", "context", "cache_bytes", "total_bytes", "fits", "step_time_s",
            "tokens_per_s", "bound", "max_context", "throughput_cap_tokens_per_s"]
    return best.sort_values(["model", "_rank"])[cols].reset_index(drop=True)


def output_files(out: Path) -> list[Path]:
    """Every file a sweep writes into `out`."""
    plots = ["step_time_vs_context", "memory_vs_context", "roofline", "throughput_cap_vs_context"]
    return ([out / "results.parquet", out / "results.csv", out / "crossovers.csv", out / "memory_walls.csv",
             out / "inputs.json", out / "scenario.yaml"]
            + [out / f"{p}.{ext}" for p in plots for ext in ("png", "svg")])


def check_writable(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to overwrite a file that is already there unless forced, and any of the sweep's own inputs ever."""
    import os

    there = next(p for p in [out, *out.parents] if p.exists())  # the nearest part of the path that exists
    if not there.is_dir():
        raise UserError(f"{there}: is a file, not a folder; choose another -o DIR"
                        + (f" ({out} would be under it)" if there != out else ""))
    if not os.access(there, os.W_OK | os.X_OK):
        raise UserError(f"{there}: not writable; choose another -o DIR")
    mine = {p.resolve() for p in inputs}
    own = [p for p in output_files(out) if p.resolve() in mine]
    if own:
        raise UserError(f"{own[0]}: is an input of this sweep; the sweep would write over it: choose another -o DIR")
    existing = [p for p in output_files(out) if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists ({len(existing)} of the sweep's files are there); "
                        f"choose another -o DIR or pass --force to overwrite")


def write_inputs(out: Path, scenario_path: Path, scenario: Scenario, hws, models, configs) -> None:
    """The scenario file as given, and every resolved input as JSON, beside the results."""
    write_atomic(out / "scenario.yaml", lambda p: shutil.copyfile(scenario_path, p))
    inputs = {
        "scenario": scenario.model_dump(mode="json"),
        "hardware": [hw.model_dump(mode="json") for hw in hws],
        "models": [m.model_dump(mode="json") for m in models],
        "schemes": [c.model_dump(mode="json") for c in configs],
        "contexts": scenario.contexts(),
        "max_context_searched": MAX_CONTEXT,
        "op_classes": list(OP_CLASSES),
    }
    text = to_json(inputs)
    write_atomic(out / "inputs.json", lambda p: p.write_text(text))


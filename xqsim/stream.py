"""A sweep too large to hold in memory: the grid evaluated in pieces (in worker processes if asked), each written
to the table's files as it comes and let go of; kept are only the curves the crossovers need and the rows the
plots draw. `xqsim sweep` runs every sweep this way; xqsim.sweep.run is the in-memory table of small grids (the
dashboard's), and gives the same rows.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .crossover import grid_crossovers, memory_walls
from .loading import partial, write_atomic
from .scenario import Scenario
from .specs import HardwareProfile, ModelSpec, SchemeConfig, Strategy, UserError
from .sweep import CATEGORIES, _flatten, _frame, evaluated, rate_labels

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
    n_hw, n_cfg = len(j["hws"]), cfgs.stop - cfgs.start
    blocks, skips = [], []
    step = np.full((n_hw, n_cfg, len(batch), len(context)), np.nan)  # as the sweep's curves hold them
    cap = np.full((n_hw, n_cfg, len(context)), np.nan)
    for i, cfg in enumerate(j["configs"][cfgs]):
        got = evaluated(j["hws"], model, cfg, batch, context, j["rate_mode"], j["limit"])
        if isinstance(got, str):
            skips.append(got)
            continue
        names, arrays = got
        blocks.append((names, _flatten(arrays, batch, context)))
        step[:, i] = np.where(arrays["fits"], arrays["step_time_s"], np.nan)
        cap[:, i] = arrays["throughput_cap_tokens_per_s"][:, 0]  # the smallest batch, where bs.start == 0
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
    """What a streamed sweep keeps of its table: its row count, its crossovers (crossover.crossovers' columns; placed
    on the model by sweep_scenario), its memory walls, its rows at the batches kept (for plots and summary), and the
    batch and context its plots and summary are drawn at."""

    rows: int
    crossovers: pd.DataFrame
    walls: pd.DataFrame
    kept: pd.DataFrame
    plot_batch: int = 0
    plot_context: int = 0


class _TableWriter:
    """The sweep's table, written piece by piece to Parquet (and CSV) under temporary names that become the files
    only on commit(); close() removes what commit() did not rename (an interrupted sweep leaves no half file)."""

    def __init__(self, parquet: Path, csv: Path | None):
        self.final = [p for p in (parquet, csv) if p is not None]
        self.tmp = [partial(p) for p in self.final]
        self.fh = open(self.tmp[1], "w", newline="") if csv is not None else None  # noqa: SIM115 (close())
        self.writer, self.meta, self.buffer = None, None, []

    def add(self, table) -> None:
        """One piece; the buffered pieces are written once they hold CHUNK_ROWS rows."""
        self.meta = self.meta or table.schema.metadata
        self.buffer.append(table.replace_schema_metadata(None))
        if sum(len(t) for t in self.buffer) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer).replace_schema_metadata(self.meta)
        self.buffer.clear()
        if self.writer is None:
            # dictionary pages for the few-valued columns only: tried on every float column, they took 70% of
            # the time to write (the flagship's table: 0.16 s, 0.045 s so; 18 MB instead of 15)
            self.writer = pq.ParquetWriter(self.tmp[0], table.schema,
                                           use_dictionary=[*CATEGORIES, "bound", "bits", "batch"])
        self.writer.write_table(table)
        if self.fh is not None:
            table.to_pandas().to_csv(self.fh, header=self.fh.tell() == 0, index=False)

    def commit(self) -> None:
        self.flush()
        if self.writer is None:
            raise UserError("no configuration of the scenario could be evaluated")
        self._close_handles()
        for t, p in zip(self.tmp, self.final, strict=True):
            os.replace(t, p)
        self.tmp = []

    def _close_handles(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def close(self) -> bool:
        """Close and remove what was not committed; True when something was (the sweep was cut short)."""
        self._close_handles()
        for t in self.tmp:
            t.unlink(missing_ok=True)
        return bool(self.tmp)


def stream(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch, context,
           parquet: Path, csv: Path | None = None, keep_batches=(), keep_contexts=None, rate_mode: str = "fitted",
           workers: int = 1, on_step: Callable[[str, int], None] | None = None) -> Streamed:
    """run()'s table, evaluated and written piece by piece (at most about CHUNK_ROWS rows in memory at once): to
    `parquet` and, if given, `csv`, each first under a temporary name that becomes the file only once the whole
    table is written (an interrupted sweep leaves no half file). Keeps the curves the crossovers need (8 bytes a
    configuration) and its rows at keep_batches and keep_contexts (default: every context; see thinned) for plots
    and summaries. on_step(message, rows) after each piece ('' when nothing to report)."""
    batch = np.array(sorted(set(int(b) for b in batch)), dtype=np.int64)
    context = np.asarray(context, dtype=np.int64)
    nH, nL, nB, nC = len(hws), len(configs), len(batch), len(context)
    units = _units(nH, len(models), nL, nB, nC)
    cats = {"hardware": [hw.name for hw in hws], "model": [m.name for m in models],
            "scheme": list(dict.fromkeys(c.scheme for c in configs)), "label": [c.label for c in configs],
            "strategy": ["", *Strategy.__args__], "rates": rate_labels(hws, configs, rate_mode)}
    job = {"hws": hws, "models": models, "configs": configs, "batch": batch, "context": context, "rate_mode": rate_mode,
           "limit": int(batch.max()), "categories": cats, "keep_batches": list(keep_batches),
           "keep_contexts": None if keep_contexts is None else list(keep_contexts)}
    step = {m.name: np.full((nH, nL, nB, nC), np.nan) for m in models}
    cap = {m.name: np.full((nH, nL, nC), np.nan) for m in models}
    walls, kept, skipped, rows = [], [], set(), 0
    _init_job(job)
    pool = _pool(job, workers)
    out = _TableWriter(parquet, csv)
    try:
        for (mi, ci, bs, cs), skips, piece in _bounded_map(pool, _evaluate_unit, units, 2 * workers):
            for skip in skips:
                if skip not in skipped and on_step:
                    on_step(skip, rows)
                skipped.add(skip)
            if piece is None:
                continue
            step[models[mi].name][:, ci, bs, cs] = piece["step"]
            if piece["cap"] is not None:
                cap[models[mi].name][:, ci, cs] = piece["cap"]
            walls.append(piece["walls"])
            kept.append(piece["kept"])
            out.add(piece["table"])
            rows += piece["rows"]
            if on_step:
                on_step("", rows)
        out.commit()
    finally:
        if out.close() and pool is not None:  # interrupted: drop what is queued
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


def sweep_scenario(path: Path, sc: Scenario, hws: list[HardwareProfile], models: list[ModelSpec],
                   configs: list[SchemeConfig], out: Path, csv: bool = True, rate_mode: str = "fitted",
                   workers: int = 1, on_step: Callable[..., None] | None = None) -> Streamed:
    """Everything `xqsim sweep` writes into `out` (checked writable before): the table (stream), the crossovers
    placed on the model, the memory walls, the scenario and its resolved inputs, the four plots. Returns the
    Streamed result with its crossovers placed. on_step(message, rows): progress ('skipped ...' for a scheme a
    model cannot take, else what is being done)."""
    from . import plots
    from .sweep import solve_crossovers, write_inputs

    say = on_step or (lambda *a: None)
    contexts, batches = sc.contexts(), sorted(set(sc.batch))
    plot_batch = sc.plot_batch or min(batches, key=lambda b: abs(b - 16))
    plot_context = sc.plot_context or min(contexts, key=lambda c: abs(c - 32768))
    res = stream(hws, models, configs, batches, contexts, out / "results.parquet",
                 out / "results.csv" if csv else None, keep_batches=(plot_batch, batches[0]),
                 keep_contexts=thinned(contexts, near=(plot_context,)), rate_mode=rate_mode, workers=workers,
                 on_step=say)
    if not csv:  # a CSV of an earlier sweep there (--force) no longer matches the table
        (out / "results.csv").unlink(missing_ok=True)
    say("placing crossovers on the model")
    cross = solve_crossovers(res.crossovers, hws, models, configs, int(max(batches)), rate_mode=rate_mode)
    write_atomic(out / "crossovers.csv", lambda p: cross.to_csv(p, index=False))
    write_atomic(out / "memory_walls.csv", lambda p: res.walls.to_csv(p, index=False))
    write_inputs(out, path, sc, hws, models, configs)
    df = res.kept  # the rows at the plotted batch and the smallest (at most 512 contexts of a longer axis)
    for name, fn in (("step_time_vs_context", lambda p: plots.step_time_vs_context(df, plot_batch, p)),
                     ("memory_vs_context", lambda p: plots.memory_vs_context(df, plot_batch, p)),
                     ("throughput_cap_vs_context", lambda p: plots.throughput_cap_vs_context(df, p, batches[-1])),
                     ("roofline", lambda p: plots.roofline(hws, models, configs, plot_batch, plot_context, p,
                                                           rate_mode=rate_mode))):
        say(f"plotting {name}")
        fn(out / name)
    return Streamed(res.rows, cross, res.walls, res.kept, plot_batch, plot_context)

"""Scenario -> vectorized grid -> tidy DataFrame -> files and plots.

For one (model, scheme) the whole hardware x batch x context grid is one set of numpy arrays
(axes: hardware, batch, context); there is no Python loop per configuration.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from . import rates, schemes
from .capacity import MAX_CONTEXT, max_batch, max_context, memory, seq_memory
from .loading import check_folder, to_json, write_atomic
from .roofline import BOUNDS, step_time
from .scenario import Scenario
from .schemes.layout import paper_bytes_per_token
from .specs import OP_CLASSES, HardwareProfile, ModelSpec, Rates, SchemeConfig, UserError

# Column order of the result table (snake_case, unit-suffixed).
KEY_COLUMNS = ["hardware", "model", "scheme", "label", "bits", "strategy", "fused", "batch", "context"]


def hardware_rates(hws: list[HardwareProfile], cfg: SchemeConfig, rate_mode: str = "fitted") -> Rates:
    """The rates each profile gives cfg under rate_mode (xqsim.rates), stacked along a leading hardware axis (shape
    (nH, 1, 1))."""
    return Rates.stack([rates.rates(hw, cfg, rate_mode)[0] for hw in hws])


def evaluate(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch, context,
             rate_mode: str = "fitted", batch_limit: int | None = None) -> dict[str, np.ndarray]:
    """Every metric of one (model, scheme) on the grid hardware x batch x context, as arrays; rates by the rule of
    xqsim.rates under rate_mode."""
    cfg = cfg.resolved(model)
    B = np.asarray(batch, dtype=np.int64)[None, :, None]
    T = np.asarray(context, dtype=np.int64)[None, None, :]
    shape = (len(hws), B.shape[1], T.shape[2])
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)[:, None, None]
    out = _metrics(hardware_rates(hws, cfg, rate_mode), cap, model, cfg, B, T, batch_limit or int(B.max()))
    return {k: np.broadcast_to(v, shape) for k, v in out.items()}


def _metrics(rates: Rates, cap, model: ModelSpec, cfg: SchemeConfig, B, T, limit: int) -> dict[str, np.ndarray]:
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


def _throughput_cap(rates: Rates, most: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, T, limit: int):
    """Throughput under capacity: (the batch, tokens/s) at the most sequences that fit at context T (`most`, the
    max batch), at most `limit`; 0 tokens/s where not even one fits."""
    b_cap = np.minimum(most, limit)
    t_cap = step_time(schemes.step_ops(model, cfg, np.maximum(b_cap, 1), T, groups), rates, per_class=False)
    return b_cap, np.where(b_cap > 0, b_cap / t_cap["step_time_s"], 0.0)


def _throughput_in(rates: Rates, cap: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, T, limit: int):
    """_throughput_cap with the max batch found from the capacity `cap` (per point) first."""
    most = max_batch(cap, schemes.weights_bytes(model, cfg), seq_memory(model, cfg, groups), T)
    return _throughput_cap(rates, most, model, cfg, groups, T, limit)


def capped_point(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch: int, context: int,
                 rate_mode: str = "fitted") -> dict[str, np.ndarray]:
    """At one batch and context, per GPU: the most sequences up to `batch` that fit (batch_cap), their tokens/s
    (throughput_cap_tokens_per_s) and one sequence's cache (cache_bytes_per_seq): evaluate()'s values for a
    verdict, without the rest of its metrics."""
    cfg = cfg.resolved(model)
    groups = schemes.layout(model, cfg)
    r = hardware_rates(hws, cfg, rate_mode).map(lambda v: v[:, 0, 0])
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)
    T = np.full(len(hws), context, dtype=np.int64)
    b_cap, tput = _throughput_in(r, cap, model, cfg, groups, T, batch)
    per_seq = memory(model, cfg, 1, T, groups)["cache_bytes"]
    return {"batch_cap": b_cap, "throughput_cap_tokens_per_s": tput, "cache_bytes_per_seq": per_seq}


def _point_values(rates: Rates, cap: np.ndarray, model: ModelSpec, cfg: SchemeConfig, groups, B, T, limit: int,
                  metric: np.ndarray) -> np.ndarray:
    """One crossover metric per point (step_time_s, tokens_per_s or throughput_cap_tokens_per_s) of a resolved
    config, rates and capacity given per point: the part of _metrics each needs, no more."""
    out = np.empty(len(B))
    cap_rows = metric == "throughput_cap_tokens_per_s"
    plain = ~cap_rows
    if plain.any():
        r = rates.map(lambda v: v[plain])
        t = step_time(schemes.step_ops(model, cfg, B[plain], T[plain], groups), r, per_class=False)["step_time_s"]
        out[plain] = np.where(metric[plain] == "step_time_s", t, B[plain] / t)
    if cap_rows.any():
        r = rates.map(lambda v: v[cap_rows])
        out[cap_rows] = _throughput_in(r, cap[cap_rows], model, cfg, groups, T[cap_rows], limit)[1]
    return out


CROSS_WAYS = 16  # solve_crossovers: points a bracket is split at per step


def solve_crossovers(cr: pd.DataFrame, hws: list[HardwareProfile], models: list[ModelSpec],
                     configs: list[SchemeConfig], batch_limit: int, rate_mode: str = "fitted",
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
    # per point: the capacity of its GPU; per (model, scheme): the resolved config, layout and each GPU's rates, once
    cap = np.array([hw.capacity_bytes for hw in hws], dtype=float)[hw_i]
    resolved = {}
    for mname, label in set(zip(models_, winner, strict=True)) | set(zip(models_, loser, strict=True)):
        rc = cfg_of[label].resolved(model_of[mname])
        resolved[mname, label] = (model_of[mname], rc, schemes.layout(model_of[mname], rc),
                                  hardware_rates(hws, rc, rate_mode).map(lambda v: v[:, 0, 0]))
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
        vals = {role: _role_values(groups, flat, B, T, resolved, hw_i, cap, metric, batch_limit)
                for role, groups in roles.items()}
        wins = np.where(higher[flat], vals["w"] > vals["l"], vals["w"] < vals["l"]).reshape(len(rows), k)
        # the first point where the winner is the better closes the bracket; the point before it opens it
        first = np.where(wins.any(1), wins.argmax(1), k)
        new_hi = np.where(first < k, pts[np.arange(len(rows)), np.minimum(first, k - 1)], hi[rows])
        new_lo = np.where(first > 0, pts[np.arange(len(rows)), np.maximum(first - 1, 0)], lo[rows])
        hi[rows], lo[rows] = new_hi, new_lo
    # a capacity-limited flip that a stopped search left short of the exact point, because the loser ran out of
    # memory: the loser's memory wall (its longest context at batch 1, plus one) is the crossover, exactly
    for i in np.nonzero((metric == "throughput_cap_tokens_per_s") & (hi - lo > 1))[0]:
        a = evaluate([hws[hw_i[i]]], model_of[models_[i]], cfg_of[loser[i]], [1], [hi[i]], rate_mode, batch_limit)
        wall = int(a["max_context"][0, 0, 0]) + 1
        if a["throughput_cap_tokens_per_s"][0, 0, 0] == 0 and lo[i] < wall <= hi[i]:
            hi[i] = wall
    return cr.assign(crossover=hi.astype(float))


def _role_values(groups: dict, flat, B, T, resolved: dict, hw_i, cap, metric, batch_limit: int) -> np.ndarray:
    """The metric of one side (winner or loser) of every (crossover, search point): groups maps each (model,
    label) to the crossover rows it plays that side in; flat is each point's crossover row, hw_i each row's GPU."""
    out = np.empty(len(flat))
    for key, idx in groups.items():
        sel = np.nonzero(np.isin(flat, idx))[0]
        if len(sel):
            m, rc, layers, per_hw = resolved[key]
            r = flat[sel]
            out[sel] = _point_values(per_hw.map(lambda v, r=r: v[hw_i[r]]), cap[r], m, rc, layers, B[sel],
                                     T[sel], batch_limit, metric[r])
    return out


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
        if k == "rates":  # one label per GPU: each row's, by its GPU
            cats = (categories or {}).get(k) or list(dict.fromkeys(x for names, _ in blocks for x in names[k]))
            per_hw = [np.array([cats.index(x) for x in names[k]], dtype=np.int16) for names, _ in blocks]
            codes = np.concatenate([lab[cols["hardware"]] for lab, (_, cols) in zip(per_hw, blocks, strict=True)])
            out[k] = pd.Categorical.from_codes(codes, cats)
            continue
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
    order = KEY_COLUMNS + [c for c in ("rates",) if c in out] + [c for c in out if c not in KEY_COLUMNS + ["rates"]]
    return pd.DataFrame({c: out[c] for c in order}, copy=False)  # no consolidation copy


def _names(model: ModelSpec, cfg: SchemeConfig, resolved: SchemeConfig, hws: list[HardwareProfile],
           rate_mode: str) -> dict:
    """A block's constant columns; `rates` holds each GPU's basis label (the column takes each row's)."""
    return {"model": model.name, "scheme": cfg.scheme, "label": cfg.label, "bits": cfg.bits,
            "strategy": resolved.strategy or "", "fused": cfg.fused,  # "": the scheme has none
            "rates": [rates.choose(hw, resolved, rate_mode)[1].label for hw in hws]}


def rate_labels(hws: list[HardwareProfile], configs: list[SchemeConfig], rate_mode: str) -> list[str]:
    """Every basis label the (GPU, configuration) pairs can take: the `rates` column's categories."""
    return list(dict.fromkeys(rates.choose(hw, c, rate_mode)[1].label for hw in hws for c in configs))


def evaluate_frame(hws, model, cfg, batch, context, rate_mode="fitted", batch_limit=None) -> pd.DataFrame:
    """evaluate() as a tidy table."""
    rcfg = cfg.resolved(model)
    arrays = evaluate(hws, model, rcfg, batch, context, rate_mode, batch_limit)
    return _frame([(_names(model, cfg, rcfg, hws, rate_mode), _flatten(arrays, batch, context))], hws)


def evaluated(hws: list[HardwareProfile], model: ModelSpec, cfg: SchemeConfig, batch, context, rate_mode: str,
              limit: int) -> tuple[dict, dict[str, np.ndarray]] | str:
    """One (model, scheme) on the grid: (its names, evaluate()'s arrays), or, for a config the model cannot take
    (e.g. a rank above its dkv), why it is skipped."""
    try:
        rcfg = cfg.resolved(model)
        return _names(model, cfg, rcfg, hws, rate_mode), evaluate(hws, model, rcfg, batch, context, rate_mode, limit)
    except UserError as err:
        return f"skipped {cfg.label} on {model.name}: {err}"


def run(hws: list[HardwareProfile], models: list[ModelSpec], configs: list[SchemeConfig], batch, context,
        rate_mode: str = "fitted", on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The full grid as one table; configs a model cannot take are skipped and reported through on_step."""
    blocks = []
    limit = int(max(batch))
    for model in models:
        for cfg in configs:
            got = evaluated(hws, model, cfg, batch, context, rate_mode, limit)
            if isinstance(got, str):
                if on_step:
                    on_step(got)
            else:
                blocks.append((got[0], _flatten(got[1], batch, context)))
            if on_step:
                on_step("")
    if not blocks:
        raise UserError("no configuration of the scenario could be evaluated")
    return _frame(blocks, hws)


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
    check_folder(out, output_files(out), force, inputs, what="sweep")


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


"""Measurements against the analytic model: the achieved FLOP rate and bandwidth of each measured op against a
profile's spec peak, and the fit of a profile's `fitted:` block (its predictions and errors: xqsim.validation).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import loading, rates, schemes
from .measurements import LEGACY_OPS, TARGETS, config_of
from .roofline import kernel_class, kernel_time, kernels, op_busy
from .specs import FACTORS, FIT_RANGES, OP_CLASSES, TENSOR_CLASSES, Fitted, HardwareProfile, UserError


def row_ops(r: dict) -> tuple:
    """The analytic ops of the decode step a measured row ran (cached: a fit, its held-out refits, the
    predictions and the per-op errors all ask for the same rows)."""
    return _row_ops(r["model"], r["layers"], json.dumps(r["config"], sort_keys=True), r["batch"], r["context"])


@functools.cache
def _row_ops(name: str, layers: int, config: str, batch: int, context: int) -> tuple:
    model, cfg = config_of(name, layers, config)
    return tuple(schemes.step_ops(model, cfg, np.int64(batch), np.int64(context)))




def with_legacy_names(by_name: dict, measured: dict, combine=sum) -> dict:
    """Per-name analytic values with the LEGACY_OPS names a measured row uses added: each `combine` of the values of
    the ops it stands for (the sum of amounts; for their class, pass the first)."""
    for old, new in LEGACY_OPS.items():
        if old in measured and old not in by_name and all(n in by_name for n in new):
            by_name[old] = combine([by_name[n] for n in new])
    return by_name


def measured_name(r: dict, name: str) -> str:
    """The name an analytic op's time is measured under in row r: its own, or the LEGACY_OPS name standing for it."""
    ops = r.get("ops", {})
    if name in ops:
        return name
    return next((old for old, new in LEGACY_OPS.items() if name in new and old in ops), name)


def measured_op_s(m: dict) -> float:
    """A measured op's time: the GPU time of its kernels where profiled, else its eager event time (which
    also times the CPU launching it)."""
    return m.get("kernel_time_s", m["time_s"])


def op_rates(rows: list[dict], hw: HardwareProfile) -> pd.DataFrame:
    """One row per measured op: its time (GPU kernel time where profiled, else eager), the analytic FLOPs and
    bytes, achieved rates and their share of the spec peak (bf16 tensor peak for matmul/attention/remat,
    fp32 vector peak for the rest)."""
    out = []
    for r in rows:
        analytic: dict[str, np.ndarray] = {}  # FLOPs and bytes per op name
        classes = {}
        for op in row_ops(r):
            analytic[op.name] = analytic.get(op.name, 0.0) + np.array([float(op.flops), float(op.bytes)]) * op.layers
            classes[op.name] = op.cls
        analytic = with_legacy_names(analytic, r["ops"])
        classes = with_legacy_names(classes, r["ops"], combine=lambda parts: parts[0])
        for name, m in r["ops"].items():
            cls, (flops, nbytes) = classes[name], analytic[name]
            t = measured_op_s(m)
            if t <= 0:
                continue
            peak = hw.peak_flops(cls)
            out.append({"file": r["file"], "model": r["model"], "label": r["label"], "batch": r["batch"],
                        "context": r["context"], "op": name, "op_class": cls, "time_s": t, "flops": flops,
                        "bytes": nbytes, "flops_per_s": flops / t, "bytes_per_s": nbytes / t,
                        "flops_of_peak": flops / t / peak, "bw_of_peak": nbytes / t / hw.mem_bytes_per_s.value})
    return pd.DataFrame(out)


def rates_by_class(df: pd.DataFrame) -> pd.DataFrame:
    """Per op class: median and p90 of the achieved share of peak FLOP/s and bandwidth, and the ops'
    share of the measured time; only ops of at least 20 us count toward the rates (launch-bound below)."""
    big = df[df["time_s"] >= 20e-6]
    g = big.groupby("op_class")
    res = pd.DataFrame({
        "ops": g.size(),
        "flops_of_peak_median": g["flops_of_peak"].median(), "flops_of_peak_p90": g["flops_of_peak"].quantile(0.9),
        "bw_of_peak_median": g["bw_of_peak"].median(), "bw_of_peak_p90": g["bw_of_peak"].quantile(0.9),
    })
    res["share_of_time"] = df.groupby("op_class")["time_s"].sum() / df["time_s"].sum()
    return res.reset_index()


# ----------------------------------------------------------------------------- the fit

# quantization and dequantization kernels come in pairs (one of each per quantized tensor and layer), so
# their per-kernel overheads cannot be told apart from step times: one parameter serves both
OVERHEAD_OF = {"quant": "dequant"}


def measured_step(r: dict, target: str) -> float:
    if TARGETS[target] not in r:
        raise UserError(f"{r.get('file', 'measurements')}: field '{TARGETS[target]}' is missing (measured without "
                        f"CUDA graphs, e.g. on CPU); use --target eager")
    return r[TARGETS[target]]


def default_target(rows: list[dict]) -> str:
    """'graph' when every row has a CUDA-graph time, else 'eager'."""
    return "graph" if all(TARGETS["graph"] in r for r in rows) else "eager"


def timed_op(r: dict, kern: list) -> int:
    """Which op of a kernel its measured GPU time is recorded under in row r: the engine measures a fused kernel
    under one of its ops' names (the attention op; XQuant-CL's accumulation) and records the others empty, for
    their FLOPs; so the op with the most measured time, else (nothing measured) the kernel's last op."""
    ops = r.get("ops", {})
    times = [measured_op_s(ops[n]) if (n := measured_name(r, op.name)) in ops else -1.0 for op in kern]
    return int(np.argmax(times)) if max(times) > 0 else len(kern) - 1


def _design(rows: list[dict]) -> dict[str, np.ndarray]:
    """Every op of every row's decode step, flattened: row, kernel, class index, the class of the kernel's overhead
    (roofline.kernel_class), FLOPs, bytes, times per step, bit-plane flag, whether it is the first op of its kernel
    (which counts the overhead once) and whether it is the op the kernel's measured time is recorded under."""
    ci = {c: i for i, c in enumerate(OP_CLASSES)}
    cols: dict[str, list] = {k: [] for k in ("row", "kern", "cls", "kcls", "flops", "bytes", "n", *FACTORS,
                                             "first", "timed", "opgroup")}
    groups: dict[tuple[int, str], int] = {}
    kid = 0
    for i, r in enumerate(rows):
        for kern in kernels(row_ops(r)):
            timed = timed_op(r, kern)
            for j, op in enumerate(kern):
                g = groups.setdefault((i, measured_name(r, op.name)), len(groups))
                for k, v in (("row", i), ("kern", kid), ("cls", ci[op.cls]), ("kcls", ci[kernel_class(kern)]),
                             ("flops", float(op.flops)), ("bytes", float(op.bytes)), ("n", op.layers),
                             *((k, getattr(op, k)) for k in FACTORS), ("first", j == 0),
                             ("timed", j == timed), ("opgroup", g)):
                    cols[k].append(v)
            kid += 1
    d = {k: np.asarray(v) for k, v in cols.items()}
    # per (row, op name): the op's measured GPU kernel time (profiler), NaN where not measured
    d["op_measured"] = np.array([rows[i]["ops"].get(name, {}).get("kernel_time_s", np.nan)
                                 if "ops" in rows[i] else np.nan for (i, name) in groups])
    d["kern_row"] = np.bincount(d["kern"], d["row"], minlength=kid) / np.maximum(
        np.bincount(d["kern"], minlength=kid), 1)
    d["kern_n"] = np.bincount(d["kern"], d["n"] * d["first"], minlength=kid)
    return d


class _Model:
    """Step times of many rows as a function of log-parameters: per class an overhead (quant shares
    dequant's), a bandwidth efficiency and, for tensor-core classes, a FLOP-rate efficiency; one bit-plane
    factor and one per-channel factor. Each op's and kernel's time is roofline's (op_busy, kernel_time), over
    all rows' ops at once."""

    def __init__(self, d: dict[str, np.ndarray], n_rows: int, hw: HardwareProfile):
        self.d, self.n_rows = d, n_rows
        nc = len(OP_CLASSES)
        self.tensor = np.array([c in TENSOR_CLASSES for c in OP_CLASSES])
        self.peak = np.array([hw.peak_flops(c) for c in OP_CLASSES])
        self.bw = hw.mem_bytes_per_s.value
        over = [c for c in OP_CLASSES if c not in OVERHEAD_OF]
        self.names = ([f"overhead:{c}" for c in over] + [f"memory:{c}" for c in OP_CLASSES]
                      + [f"compute:{c}" for c in OP_CLASSES if c in TENSOR_CLASSES] + list(FACTORS))
        at = {n: i for i, n in enumerate(self.names)}  # parameters are found by name, never by position
        self.o_at = np.array([at[f"overhead:{OVERHEAD_OF.get(c, c)}"] for c in OP_CLASSES])
        self.m_at = np.array([at[f"memory:{c}"] for c in OP_CLASSES])
        self.c_at = np.array([at[f"compute:{c}"] for c in OP_CLASSES if c in TENSOR_CLASSES])
        self.f_at = {k: at[k] for k in FACTORS}
        self.nc = nc

    def start_and_bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per parameter, in log: the fit's starting point and bounds (an overhead 5 us in [10 ns, 10 ms]; an
        efficiency 1 in [0.001, 1.5]; a factor 1 in its FACTORS range)."""
        r = FIT_RANGES  # what a profile's fitted block may hold
        kind = {"overhead": (5e-6, *r["overhead"]), "memory": (1.0, *r["efficiency"]),
                "compute": (1.0, *r["efficiency"])} | {k: (1.0, *r[k]) for k in FACTORS}
        x0, lo, hi = np.log(np.array([kind[n.split(":")[0]] for n in self.names])).T
        return x0, lo, hi

    def unpack(self, th: np.ndarray):
        """(overhead, bandwidth efficiency, FLOP-rate efficiency) per op class, and each factor by name."""
        e = np.exp(th)
        ec = np.ones(self.nc)
        ec[self.tensor] = e[self.c_at]
        return e[self.o_at], e[self.m_at], ec, {k: e[i] for k, i in self.f_at.items()}

    def terms(self, th: np.ndarray, per_op: bool = False):
        """Per kernel: compute time, memory time and overhead, per run (with `per_op`, also each op's own compute
        and memory time)."""
        d = self.d
        o, em, ec, factors = self.unpack(th)
        nk = len(d["kern_n"])
        op_tc, op_tm = op_busy(d["flops"], d["bytes"], self.peak[d["cls"]] * ec[d["cls"]], self.bw * em[d["cls"]],
                               [(d[k], f) for k, f in factors.items()])
        tc = np.bincount(d["kern"], op_tc, minlength=nk)
        tm = np.bincount(d["kern"], op_tm, minlength=nk)
        _, ov = kernel_time(tc, tm, np.bincount(d["kern"], o[d["kcls"]] * d["first"], minlength=nk))
        return (tc, tm, ov, op_tc, op_tm) if per_op else (tc, tm, ov)

    def step(self, th: np.ndarray) -> np.ndarray:
        tc, tm, ov = self.terms(th)
        t = self.d["kern_n"] * kernel_time(tc, tm, ov)[0]
        return np.bincount(self.d["kern_row"].astype(int), t, minlength=self.n_rows)

    def op_times(self, th: np.ndarray) -> np.ndarray:
        """Per (row, op name): the predicted time over all layers of the kernels measured under it (timed_op;
        unfused: one op, one kernel)."""
        tc, tm, ov = self.terms(th)
        d = self.d
        per_kernel = kernel_time(tc, tm, ov)[0]
        return np.bincount(d["opgroup"], d["n"] * per_kernel[d["kern"]] * d["timed"], minlength=len(d["op_measured"]))

    def shares(self, th: np.ndarray) -> dict[str, np.ndarray]:
        """Per parameter, per row: the share of the predicted step its term accounts for (0 when it does not
        bind), so a parameter no row depends on can be told apart. A kernel's binding term (compute or memory) is
        its ops' own terms, each of its op's class (a fused kernel's remat FLOPs bind remat's FLOP rate); its
        overhead is its kernel class's."""
        d, (tc, tm, ov, op_tc, op_tm) = self.d, self.terms(th, per_op=True)
        step = self.step(th)
        op_row = d["row"].astype(int)
        n = d["kern_n"][d["kern"]]  # runs of each op's kernel
        mem_bound = (tm >= tc)[d["kern"]]
        kr = d["kern_row"].astype(int)
        kcls = np.zeros(len(tc), dtype=int)
        kcls[d["kern"][d["first"]]] = d["kcls"][d["first"]]
        out = {}

        def per_row(values, where):
            return np.bincount(op_row, n * values * where, minlength=self.n_rows) / step

        for i, c in enumerate(OP_CLASSES):
            mine = d["cls"] == i
            out[f"memory:{c}"] = per_row(op_tm, mine & mem_bound)
            out[f"compute:{c}"] = per_row(op_tc, mine & ~mem_bound)
            osel = np.isin(kcls, [OP_CLASSES.index(k) for k in OP_CLASSES if OVERHEAD_OF.get(k, k) == c])
            out[f"overhead:{c}"] = np.bincount(kr, d["kern_n"] * ov * osel, minlength=self.n_rows) / step
        for k in FACTORS:
            out[k] = per_row(op_tm, d[k].astype(bool) & mem_bound)
        return out


def engine_of(rows: list[dict]) -> str:
    """The engine the rows were measured on (one; read_measurements refuses to mix them): 'torch' for rows of
    files from before the Triton kernels, which name none."""
    engines = {r.get("engine", "torch") for r in rows}
    if len(engines) > 1:
        raise UserError(f"calibrate: rows of several engines ({', '.join(sorted(engines))}); fit one at a time")
    return engines.pop() if engines else "torch"


MIN_OP_S = 50e-6  # ops of at least this much GPU time are fitted and judged one by one (see op_errors)


def fit(rows: list[dict], hw: HardwareProfile, source: str, target: str | None = None, min_rows: int = 3,
        min_share: float = 0.005, min_op_s: float = MIN_OP_S):
    """Least squares on log time over the measured configurations each engine runs as the model describes them
    (the torch engine's unfused ones: its fused path is tiles of ordinary kernels, not the fused kernel the model
    describes; the Triton kernel engine's fused ones), jointly on two kinds of residual:
    each row's step time (`target`), and each op's GPU kernel time where the row has it (profiler) and it is
    at least `min_op_s`; each kind weighs as much in total as the other. A kernel takes
    max(flops / (peak * e_c), bytes / (bandwidth * e_m) [* bit-plane factor] [* channel factor]) + the
    overhead of its class.

    Returns (Fitted, report); the Fitted block names the engine (xqsim.rates applies it to the configurations
    that engine runs). A parameter whose term is at least `min_share` of the predicted step in fewer
    than `min_rows` configurations is not determined by the data: it is left out of the Fitted block (the
    spec value applies) and the report names it."""
    from scipy.optimize import least_squares

    target = target or default_target(rows)
    engine = engine_of(rows)
    rows = [r for r in rows if rates.runs(r["config"]["scheme"], bool(r.get("fused")), engine)]
    if not rows:
        raise UserError(f"calibrate: no {'fused' if engine == 'triton' else 'unfused'} configurations of the "
                        f"{engine} engine to fit")
    t = np.array([measured_step(r, target) for r in rows])
    m = _Model(_design(rows), len(rows), hw)
    x0, lo, hi = m.start_and_bounds()
    op_t = m.d["op_measured"]
    op_sel = np.flatnonzero(np.nan_to_num(op_t) >= min_op_s)
    w_op = np.sqrt(len(t) / len(op_sel)) if len(op_sel) else 0.0  # both kinds weigh the same in total

    def residuals(th):
        r = np.log(m.step(th)) - np.log(t)
        return np.concatenate([r, w_op * (np.log(m.op_times(th)[op_sel]) - np.log(op_t[op_sel]))]) if w_op else r

    sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, xtol=1e-8, ftol=1e-8, gtol=1e-8, max_nfev=500)
    sol.fun = sol.fun[: len(t)]
    th = sol.x
    o, em, ec, factors = m.unpack(th)
    shares = m.shares(th)
    bound = {k: int(np.sum(v >= min_share)) for k, v in shares.items()}
    keep = {k for k, v in bound.items() if v >= min_rows}
    ci = {c: i for i, c in enumerate(OP_CLASSES)}
    overhead = {c: float(o[ci[c]]) for c in OP_CLASSES if f"overhead:{OVERHEAD_OF.get(c, c)}" in keep}
    fitted = Fitted(
        source=source, target=target, engine=engine,
        schemes=sorted({r["config"]["scheme"] for r in rows}, key=list(schemes.SCHEMES).index),
        mem_efficiency={c: round(float(em[ci[c]]), 6) for c in OP_CLASSES if f"memory:{c}" in keep},
        compute_efficiency={c: round(float(ec[ci[c]]), 6) for c in OP_CLASSES if f"compute:{c}" in keep},
        kernel_overhead_s=min(overhead.values()) if overhead else None, overhead_s=overhead,
        factors={k: round(float(f), 6) for k, f in factors.items() if k in keep})
    err = np.exp(sol.fun) - 1
    report = {"n": len(rows), "ops_fitted": int(len(op_sel)), "target": target,
              "median_abs_pct": float(100 * np.median(np.abs(err))),
              "p90_abs_pct": float(100 * np.percentile(np.abs(err), 90)), "rows_bound": bound,
              "not_determined": [k for k in m.names if k not in keep]}
    return fitted, report


def write_profile(hw: HardwareProfile, fitted: Fitted, out: Path) -> None:
    """hw with the `fitted:` block, as a profile YAML named after its file (written under a temporary name first)."""
    import yaml

    data = hw.model_copy(update={"name": out.stem, "fitted": fitted}).model_dump(mode="json", exclude_none=True)
    text = (f"# {hw.display_name} with efficiencies fitted by xqsim calibrate; spec figures unchanged\n"
            + yaml.safe_dump(data, sort_keys=False, width=120))
    out.parent.mkdir(parents=True, exist_ok=True)  # checked writable before the fit (loading.check_files)
    loading.write_atomic(out, lambda p: p.write_text(text))

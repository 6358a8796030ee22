"""The model's error against measured decode steps (CUDA-graph step times), in sample and held out: calibrate on
all but one block (one context length, one batch, one scheme), predict that block, for every block in turn.

1. The kernel engine (Triton) on each GPU measured with it (`measurements/<gpu>/kernel_engine/`): the spec
   roofline; the 2-layer rows held out by context, by batch and by scheme; per op (GPU kernel time, ops of 50 us or
   more) held out the same ways; in sample; the full-depth (32-layer) rows predicted by the fit on every 2-layer
   row; and, where two GPUs are measured, each GPU's fit applied to the other's spec figures. Goals: held-out
   median <= 3%, p90 <= 8%, max <= 15%; per op median <= 8%; full depth median <= 5%; transfer median <= 10%.
2. The torch engine on the H100 (the shipped h100_sxm fit): the spec roofline, held out by context and by scheme,
   in sample, per op, and transferred to the H200 set it never saw.

The last line is the worst held-out median of the kernel engine's step predictions (of the torch engine's where
no kernel-engine set is committed). benchmarks/readme_figures.py writes these rows into the README."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xqsim import loading
from xqsim.calibrate import fit
from xqsim.measurements import read_measurements
from xqsim.rates import lend
from xqsim.validation import HELD_OUT, error_report, held_out, op_errors, stats, step_predictions

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SETS = {"h200": "h200", "h100": "h100_sxm"}  # measurements/<folder>/kernel_engine -> hardware profile


def line(name: str, r: dict) -> str:
    regimes = ", ".join(f"{k} {v['median_abs_pct']:.1f}% (n={v['n']})" for k, v in r.get("per_regime", {}).items())
    return (f"{name}: n={r['n']} median {r['median_abs_pct']:.2f}% p90 {r['p90_abs_pct']:.2f}% "
            f"max {r['max_abs_pct']:.1f}%" + (f"; per regime: {regimes}" if regimes else ""))


def kernel_engine(folder: str, profile: str) -> tuple[list[tuple[str, dict]], list[float], tuple] | None:
    """Section 1 for one GPU: (name, report) rows, the held-out medians and (2-layer rows, spec profile, fitted
    profile) for the transfer; None where the GPU has no kernel-engine set."""
    files = sorted((ROOT / "measurements" / folder / "kernel_engine").glob("*.json"))
    if not files:
        return None
    infos, rows = read_measurements(files)
    hw = loading.load_hardware(profile).model_copy(update={"fitted": None})
    n_layers = {r["model"]: loading.load_model(r["model"]).n_layers for r in rows}
    two = [r for r in rows if r["layers"] < n_layers[r["model"]]]
    full = [r for r in rows if r["layers"] == n_layers[r["model"]]]
    gpu = f"{folder.upper()} kernel engine"
    out = [(f"{gpu}, spec roofline", error_report(step_predictions(two, hw, "graph")))]
    medians, per_op = [], []
    for by in HELD_OUT:
        r = error_report(held_out(two, hw, by, "graph"))
        out.append((f"{gpu}, held out by {by}", r))
        medians.append(r["median_abs_pct"])
        per_op.append((f"{gpu}, per op (GPU kernel time, ops >= 50 us), held out by {by}",
                       stats(held_out(two, hw, by, "graph", per_op=True)["error_pct"])))
    fitted, _ = fit(two, hw, f"{folder} kernel engine, 2 layers", "graph")
    own = hw.model_copy(update={"fitted": fitted})
    out.append((f"{gpu}, in sample", error_report(step_predictions(two, own, "graph"))))
    out += per_op + [(f"{gpu}, per op, in sample", stats(op_errors(two, own)["error_pct"]))]
    if full:
        out.append((f"{gpu}, full depth (32 layers) predicted by the 2-layer fit",
                    error_report(step_predictions(full, own, "graph"))))
    return out, medians, (two, hw, own)


def torch_engine() -> tuple[list[tuple[str, dict]], list[float]]:
    """Section 2: (name, report) rows and the held-out medians."""
    _, rows = read_measurements(sorted((ROOT / "measurements/h100").glob("h100_*.json")))
    hw = loading.load_hardware("h100_sxm").model_copy(update={"fitted": None})
    out = [("H100 torch engine, spec roofline", error_report(step_predictions(rows, hw, "graph")))]
    parts, per_op = [], []
    for by in ("context", "scheme"):
        df = held_out(rows, hw, by)
        out.append((f"H100 torch engine, held out by {by}", error_report(df)))
        parts.append(df)
        per_op.append((f"H100 torch engine, per op (GPU kernel time, ops >= 50 us), held out by {by}",
                       stats(held_out(rows, hw, by, per_op=True)["error_pct"])))
    fitted, _ = fit(rows, hw, "all H100 rows")
    h100 = hw.model_copy(update={"fitted": fitted})
    r = error_report(step_predictions(rows, h100))
    out += [("H100 torch engine, in sample", r), *per_op,
            ("H100 torch engine, per op, in sample", stats(op_errors(rows, h100)["error_pct"])),
            ("H100 torch engine, fused rows (tiles of torch kernels), in sample", r["fused_tiled"])]
    _, h200_rows = read_measurements(sorted((ROOT / "measurements/h200").glob("h200_*.json")))
    h200 = loading.load_hardware("h200").model_copy(update={"fitted": None})
    out += [("H200 torch engine, spec roofline", error_report(step_predictions(h200_rows, h200, "graph"))),
            ("H200 torch engine, the H100 fit transferred",
             error_report(step_predictions(h200_rows, h200.model_copy(update={"fitted": fitted}))))]
    return out, [error_report(pd.concat(parts))["median_abs_pct"]]


def results() -> tuple[list[tuple[str, dict]], float]:
    """Every (name, report) row of both sections and the worst held-out median (kernel engine where measured)."""
    done = {k: v for k, p in KERNEL_SETS.items() if (v := kernel_engine(k, p))}
    rows = [r for v in done.values() for r in v[0]]
    for a, (_, _, (_, _, fit_a)) in done.items():  # each GPU's fit on the other's spec figures
        for b, (_, _, (rows_b, hw_b, _)) in done.items():
            if a != b:
                rows.append((f"{a.upper()} kernel-engine fit on {b.upper()} spec figures",
                             error_report(step_predictions(rows_b, lend(hw_b, fit_a), "graph"))))
    torch_rows, torch_medians = torch_engine()
    medians = [m for v in done.values() for m in v[1]] or torch_medians
    return rows + torch_rows, max(medians)


def main() -> None:
    rows, worst = results()
    for name, r in rows:
        print(line(name, r))
    print(f"median_abs_pct: {worst:.2f}")


if __name__ == "__main__":
    main()

"""The model's error on held-out H100 decode-step measurements (CUDA-graph step times, unfused
configurations): calibrate on all but one block (one context length, then one scheme), predict that
block, for every block in turn. Then the transfer: the fit on all H100 rows applied to the H200's spec
figures, against the H200 set it never saw. The last line is the median absolute error over both H100
splits. Goal: median <= 5%, p90 <= 12%; per op median <= 10%."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xqsim import loading
from xqsim.calibrate import error_report, fit, held_out, op_errors, stats, step_predictions
from xqsim.measurements import read_measurements

ROOT = Path(__file__).resolve().parent.parent


def line(name: str, r: dict) -> str:
    regimes = ", ".join(f"{k} {v['median_abs_pct']:.1f}% (n={v['n']})" for k, v in r.get("per_regime", {}).items())
    return (f"{name}: n={r['n']} median {r['median_abs_pct']:.2f}% p90 {r['p90_abs_pct']:.2f}% "
            f"max {r['max_abs_pct']:.1f}%" + (f"; per regime: {regimes}" if regimes else ""))


def main() -> None:
    _, rows = read_measurements(sorted((ROOT / "measurements/h100").glob("h100_*.json")))
    hw = loading.load_hardware("h100_sxm").model_copy(update={"fitted": None})
    parts = []
    for by in ("context", "scheme"):
        df = held_out(rows, hw, by)
        print(line(f"H100 held out by {by}", error_report(df)))
        parts.append(df)
        print(line(f"H100 per op (GPU kernel time, ops >= 50 us), held out by {by}",
                   stats(held_out(rows, hw, by, per_op=True)["error_pct"])))
    fitted, _ = fit(rows, hw, "all H100 rows")
    h100 = hw.model_copy(update={"fitted": fitted})
    r = error_report(step_predictions(rows, h100))
    print(line("H100 in sample", r))
    print(line("H100 fused (tiled torch) rows, in sample", r["fused_tiled"]))
    print(line("H100 per op (GPU kernel time, ops >= 50 us), in sample", stats(op_errors(rows, h100)["error_pct"])))
    _, h200_rows = read_measurements(sorted((ROOT / "measurements/h200").glob("h200_*.json")))
    h200 = loading.load_hardware("h200")
    print(line("H200 spec roofline", error_report(step_predictions(h200_rows, h200, "graph"))))
    print(line("H200 transfer of the H100 fit",
               error_report(step_predictions(h200_rows, h200.model_copy(update={"fitted": fitted})))))
    print(f"median_abs_pct: {error_report(pd.concat(parts))['median_abs_pct']:.2f}")


if __name__ == "__main__":
    main()

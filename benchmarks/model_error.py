"""The model's error on held-out H100 decode-step measurements: calibrate on all but one block (one
context length, then one scheme), predict that block, for every block in turn. Prints the report; the
last line is the median absolute error over both splits. Goal (issue 5): median <= 5%, p90 <= 12%."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xqsim import loading
from xqsim.calibrate import error_report, held_out, read_measurements

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    _, rows = read_measurements(sorted((ROOT / "measurements/h100").glob("h100_*.json")))
    hw = loading.load_hardware("h100_sxm")
    parts = []
    for by in ("context", "scheme"):
        df = held_out(rows, hw, by)
        r = error_report(df)
        regimes = ", ".join(f"{k} {v['median_abs_pct']:.1f}% (n={v['n']})" for k, v in r["per_regime"].items())
        print(f"held out by {by}: n={r['n']} median {r['median_abs_pct']:.1f}% p90 {r['p90_abs_pct']:.1f}% "
              f"max {r['max_abs_pct']:.1f}%; per regime: {regimes}")
        parts.append(df)
    print(f"median_abs_pct: {error_report(pd.concat(parts))['median_abs_pct']:.2f}")


if __name__ == "__main__":
    main()

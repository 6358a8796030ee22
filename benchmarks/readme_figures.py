"""Write the README's model-error table from benchmarks/model_error.py's results, between its markers, so the
figures the README states are the ones the tool computes; `--check` only says whether the README is current (exit
1 if not).

    python benchmarks/readme_figures.py [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- model_error: written by benchmarks/readme_figures.py -->", "<!-- /model_error -->"


def _model_error():
    spec = importlib.util.spec_from_file_location("model_error", Path(__file__).with_name("model_error.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def table(rows: list[tuple[str, dict]], worst: float) -> str:
    """The markdown block: one table row per result, the per-regime errors of the in-sample fits, the worst
    held-out median."""
    out = ["| prediction of the CUDA-graph decode step | n | median error | p90 | max |", "|---|---|---|---|---|"]
    out += [f"| {name} | {r['n']:,} | {r['median_abs_pct']:.1f}% | {r['p90_abs_pct']:.1f}% | {r['max_abs_pct']:.1f}% |"
            for name, r in rows]
    out.append("")
    for name, r in rows:
        if name.endswith("in sample") and r.get("per_regime"):
            regimes = ", ".join(f"{k}-bound {v['median_abs_pct']:.1f}% (n={v['n']})"
                                for k, v in r["per_regime"].items())
            out.append(f"{name}, per regime: {regimes}.")
    out.append(f"Worst held-out median (`median_abs_pct`): {worst:.2f}%.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's table is not the current one")
    a = ap.parse_args()
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    rows, worst = _model_error().results()
    new = f"{head}{BEGIN}\n{table(rows, worst)}\n{END}{tail}"
    if a.check:
        print("README current" if new == text else "README's model-error table is out of date")
        sys.exit(0 if new == text else 1)
    README.write_text(new)
    print(f"wrote {len(rows)} rows into {README.name}")


if __name__ == "__main__":
    main()

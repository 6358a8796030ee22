"""Achieved FLOP rate and bandwidth of each op class on the committed H100 measurements, as a share of
the H100 SXM spec peak; writes measurements/h100/achieved_by_class.csv and prints the table."""

from __future__ import annotations

from pathlib import Path

from xqsim import loading
from xqsim.calibrate import op_rates, rates_by_class
from xqsim.measurements import read_measurements

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    files = sorted((ROOT / "measurements/h100").glob("h100_*.json"))
    infos, rows = read_measurements(files)
    hw = loading.load_hardware("h100_sxm")
    table = rates_by_class(op_rates(rows, hw))
    table.to_csv(ROOT / "measurements/h100/achieved_by_class.csv", index=False, float_format="%.4g")
    print(f"{len(rows)} configurations on {infos[0]['device_name']} (torch {infos[0]['torch']}), vs {hw.display_name}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()

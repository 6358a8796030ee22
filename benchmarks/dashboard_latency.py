"""How long the dashboard takes to redraw after a control change (goal: under 300 ms for a typical view).

Drives the page with Streamlit's AppTest (the server side: the script run, the model evaluation and the chart
specs, not the browser's drawing) on its default view: Capacity (with the verdict on top), Llama-3.1-8B on H100 and
B200, fp16, KIVI-2 and XQuant-GQA-2, 64 contexts. Each change sets a control to a value not drawn before (a cache
miss: the model is evaluated anew) or back to one drawn before (a cache hit). Prints both medians; the last line is
the median over first-time values, the case a user waits on:

    python benchmarks/dashboard_latency.py
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "app.py"


def timed(at: AppTest) -> float:
    t = time.perf_counter()
    at.run()
    assert not at.exception, at.exception[0].value
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    at = AppTest.from_file(str(APP), default_timeout=120)
    first = timed(at)
    miss, hit = [], []
    batches = [8, 12, 24, 32, 48, 64, 96, 128]
    for b in batches:  # new batch values: the sweep, crossovers and chart are computed anew
        at.sidebar.number_input(key="batch").set_value(b)
        miss.append(timed(at))
    for lo, hi in ((2048, 2**20), (4096, 2**19), (1024, 2**21), (512, 2**18)):  # new context ranges
        at.sidebar.select_slider(key="ctx").set_range(lo, hi)
        miss.append(timed(at))
    for bits in ([2, 4], [4], [3]):  # new KIVI variants
        at.sidebar.multiselect(key="bits:kivi").set_value(bits)
        miss.append(timed(at))
    at.sidebar.multiselect(key="bits:kivi").set_value([2])
    at.sidebar.select_slider(key="ctx").set_range(1024, 2**20)
    timed(at)
    for b in batches + batches:  # values drawn before
        at.sidebar.number_input(key="batch").set_value(b)
        hit.append(timed(at))
    print(f"first page (imports, shipped specs, model evaluation): {first:.0f} ms")
    print(f"control change to a value drawn before ({len(hit)} changes): p50 {statistics.median(hit):.0f} ms, "
          f"max {max(hit):.0f} ms")
    print(f"control change to a new value ({len(miss)} changes): p50 {statistics.median(miss):.0f} ms, "
          f"max {max(miss):.0f} ms")
    print(f"p50_ms: {statistics.median(miss):.0f}")


if __name__ == "__main__":
    main()

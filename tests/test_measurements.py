"""The committed GPU measurements against today's analytic model (no GPU needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from xqsim import loading
from xqsim.capacity import memory
from xqsim.measurements import row_model_config

FILES = sorted(Path(__file__).parent.parent.glob("measurements/h100/h100_*.json"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_measured_cache_bytes_equal_analytic(path):
    data = json.loads(path.read_text())
    assert data["device"]["device_name"].startswith("NVIDIA H100")
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert rows and all(r["status"] in ("ok", "oom") for r in data["rows"])
    for r in rows:
        model, cfg = row_model_config(r)
        expect = int(memory(model, cfg, r["batch"], np.array([r["context"]]))["cache_bytes"][0])
        assert r["cache_bytes_allocated"] == expect, f"{path.name} {r['label']} B={r['batch']} T={r['context']}"
        assert r["step_time_s"] > 0 and r["ops"]["lm_head"]["time_s"] > 0


def test_at_least_200_configurations_measured():
    ok = sum(r["status"] == "ok" for p in FILES for r in json.loads(p.read_text())["rows"])
    assert ok >= 200, f"{ok} measured configurations"


def test_achieved_rates_stay_under_the_peak():
    """Every measured op has its analytic counterpart, and no op beats the H100's spec FLOP rate: the
    analytic FLOPs are not overcounted. Remat GEMMs run near the measured GEMM rate (~79% of 989 TFLOP/s)."""
    from xqsim.calibrate import op_rates, rates_by_class
    from xqsim.measurements import read_measurements

    _, rows = read_measurements(FILES)
    df = op_rates(rows, loading.load_hardware("h100_sxm"))
    assert len(df) == sum(len(r["ops"]) for r in rows)
    assert df["flops_of_peak"].max() < 1.0, df.nlargest(3, "flops_of_peak").to_string()
    by = rates_by_class(df).set_index("op_class")
    assert 0.6 < by.loc["remat", "flops_of_peak_median"] < 0.9, by.to_string()

"""The committed GPU measurements against today's analytic model (no GPU needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from xqsim import loading, specs
from xqsim.capacity import memory

FILES = sorted(Path(__file__).parent.parent.glob("measurements/h100/h100_*.json"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_measured_cache_bytes_equal_analytic(path):
    data = json.loads(path.read_text())
    assert data["device"]["device_name"].startswith("NVIDIA H100")
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert rows and all(r["status"] in ("ok", "oom") for r in data["rows"])
    for r in rows:
        model = loading.load_model(r["model"]).model_copy(update={"n_layers": r["layers"]})
        cfg = specs.SchemeConfig(**{k: v for k, v in r["config"].items() if v is not None}).resolved(model)
        expect = int(memory(model, cfg, r["batch"], np.array([r["context"]]))["cache_bytes"][0])
        assert r["cache_bytes_allocated"] == expect, f"{path.name} {r['label']} B={r['batch']} T={r['context']}"
        assert r["step_time_s"] > 0 and r["ops"]["lm_head"]["time_s"] > 0


def test_at_least_200_configurations_measured():
    ok = sum(r["status"] == "ok" for p in FILES for r in json.loads(p.read_text())["rows"])
    assert ok >= 200, f"{ok} measured configurations"

"""The fit of calibrate.py recovers known efficiencies from data the model itself generates."""

import numpy as np
import pandas as pd
import pytest

from xqsim import loading, schemes, specs
from xqsim.calibrate import fit
from xqsim.roofline import op_table

TRUE_MEM = {"matmul": 0.7, "attention": 0.3, "dequant": 0.1, "elementwise": 0.5, "quant": 0.4}
TRUE_COMP = {"remat": 0.75, "matmul": 0.8}
OVERHEAD = 12e-6


def synthetic_ops(hw) -> pd.DataFrame:
    """Op times of many configurations from the roofline with known efficiencies, no noise."""
    truth = hw.model_copy(update={"fitted": specs.Fitted(source="truth", mem_efficiency=TRUE_MEM,
                                                         compute_efficiency=TRUE_COMP,
                                                         kernel_overhead_s=OVERHEAD)})
    rows = []
    for name in ("llama-3.1-8b", "llama-2-7b"):
        model = loading.load_model(name).model_copy(update={"n_layers": 2})
        for scheme, kw in (("fp16", {}), ("kivi", {"bits": 2}), ("xquant", {"bits": 2}),
                           ("xquant_gqa", {"bits": 4, "strategy": "absorb_v"})):
            c = specs.SchemeConfig(scheme=scheme, **kw).resolved(model)
            for B in (1, 16, 256, 2048):  # batch 2048: the weight matmuls turn compute-bound
                for T in (1024, 32768):
                    for r in op_table(schemes.step_ops(model, c, np.int64(B), np.int64(T)), truth.rates()):
                        rows.append({"op_class": r["op_class"], "flops": r["flops"],
                                     "bytes": r["bytes_read"] + r["bytes_written"], "time_s": r["time_s"]})
    return pd.DataFrame(rows)


def test_fit_recovers_known_parameters():
    hw = loading.load_hardware("h100_sxm")
    fitted, report = fit(synthetic_ops(hw), hw, "synthetic")
    assert fitted.overhead_s and all(v == pytest.approx(OVERHEAD, rel=0.01) for v in fitted.overhead_s.values())
    for cls, v in TRUE_MEM.items():
        assert fitted.mem_efficiency[cls] == pytest.approx(v, rel=0.01), (cls, report)
    for cls, v in TRUE_COMP.items():
        assert fitted.compute_efficiency[cls] == pytest.approx(v, rel=0.01), (cls, report)
    assert report["median_abs_pct"] < 0.1
    # rematerialization is compute-bound everywhere here: its bandwidth is not determined by the data
    assert "memory:remat" in report["not_determined"] and "remat" not in fitted.mem_efficiency

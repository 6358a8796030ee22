"""Ops -> time on a profile (xqsim.roofline)."""

import numpy as np
import pytest
from conftest import cfg

from xqsim import loading, schemes, specs
from xqsim.roofline import BOUNDS, op_table, step_time
from xqsim.schemes.ops import Op

RATES = specs.Rates(mem_bytes_per_s=1e12,
                    flops_per_s={c: 100e12 if c in specs.TENSOR_CLASSES else 10e12 for c in specs.OP_CLASSES},
                    bytes_per_s=dict.fromkeys(specs.OP_CLASSES, 1e12), overhead_s=dict.fromkeys(specs.OP_CLASSES, 1e-6),
                    factors=dict.fromkeys(specs.FACTORS, 1.0))


def test_single_op_by_hand():
    ops = [Op("gemm", "matmul", flops=1e12, read=1e9, write=0)]  # 10 ms compute, 1 ms memory
    t = step_time(ops, RATES)
    assert t["step_time_s"] == pytest.approx(10e-3 + 1e-6)
    assert BOUNDS[int(t["bound_code"])] == "compute"
    ops = [Op("copy", "elementwise", flops=1e9, read=1e9, write=1e9)]  # 0.1 ms compute (vector), 2 ms memory
    t = step_time(ops, RATES)
    assert t["step_time_s"] == pytest.approx(2e-3 + 1e-6)
    assert BOUNDS[int(t["bound_code"])] == "memory"
    t = step_time([Op("tiny", "elementwise", flops=10, read=100, write=100)], RATES)
    assert BOUNDS[int(t["bound_code"])] == "overhead" and t["step_time_s"] == pytest.approx(1e-6 + 200 / 1e12)


def test_layers_multiply_and_fused_kernel_pays_one_overhead():
    a = Op("dequant_x", "dequant", flops=1e9, read=1e9, write=0, kernel="attention", layers=4)
    b = Op("attention", "attention", flops=1e11, read=1e8, write=0, kernel="attention", layers=4)
    t = step_time([a, b], RATES)
    tc = 1e9 / 10e12 + 1e11 / 100e12  # compute times add within a kernel
    tm = 1.1e9 / 1e12
    assert t["step_time_s"] == pytest.approx(4 * (max(tc, tm) + 1e-6))
    assert t["t_overhead_s"] == pytest.approx(4e-6)
    # the fused kernel's time is shared between its ops' classes
    assert t["t_dequant_s"] + t["t_attention_s"] == pytest.approx(t["step_time_s"])


def test_vectorised_over_hardware_batch_and_context(tiny, h100):
    c = cfg("kivi", tiny, bits=2, group=16, residual=32)
    B = np.array([1, 8, 64])[None, :, None]
    T = np.array([10, 1000, 100000])[None, None, :]
    rates = h100.rates().map(lambda v: np.array([v, v * 2])[:, None, None])
    grid = step_time(schemes.step_ops(tiny, c, B, T), rates)
    assert np.shape(grid["step_time_s"]) == (2, 3, 3)
    for i, b in enumerate([1, 8, 64]):
        for j, t in enumerate([10, 1000, 100000]):
            one = step_time(schemes.step_ops(tiny, c, np.int64(b), np.int64(t)), h100.rates())
            assert grid["step_time_s"][0, i, j] == pytest.approx(float(one["step_time_s"]))


@pytest.mark.parametrize("scheme", ["fp16", "kivi", "xquant_gqa"])
def test_step_total_is_sum_of_op_table(scheme, h100):
    model = loading.load_model("llama-3.1-8b")
    c = cfg(scheme, model, bits=16 if scheme == "fp16" else 2)
    ops = schemes.step_ops(model, c, np.int64(16), np.int64(32768))
    rows = op_table(ops, h100.rates())
    t = step_time(ops, h100.rates())
    assert sum(r["time_s"] * r["layers"] for r in rows) == pytest.approx(float(t["step_time_s"]), rel=1e-12)
    assert sum(r["flops"] * r["layers"] for r in rows) == pytest.approx(float(t["flops"]), rel=1e-12)
    by_bound = sum(float(t[f"t_{b}_bound_s"]) for b in BOUNDS)
    assert by_bound == pytest.approx(float(t["step_time_s"]), rel=1e-12)
    by_class = sum(float(t[f"t_{c}_s"]) for c in specs.OP_CLASSES)
    assert by_class == pytest.approx(float(t["step_time_s"]), rel=1e-12)


def test_remat_is_compute_bound_and_fp16_memory_bound_at_long_context(h100):
    """Tomar et al.: rematerialization costs ~d FLOPs per cache byte saved, far above H100's ridge."""
    model = loading.load_model("llama-3.1-8b")
    rows = {r["name"]: r for r in op_table(schemes.step_ops(model, cfg("xquant", model, bits=4), np.int64(16),
                                                             np.int64(32768)), h100.rates())}
    assert rows["remat_k"]["bound"] == "compute"
    assert rows["remat_k"]["intensity_flop_per_byte"] > h100.ridge_flop_per_byte
    fp16 = {r["name"]: r for r in op_table(schemes.step_ops(model, cfg("fp16", model), np.int64(16),
                                                             np.int64(32768)), h100.rates())}
    assert fp16["attention"]["bound"] == "memory"


def test_fitted_block_scales_rates(h100):
    fitted = h100.model_copy(update={"fitted": specs.Fitted(source="test", mem_efficiency={"attention": 0.5},
                                                            compute_efficiency={"remat": 0.25},
                                                            kernel_overhead_s=7e-6)})
    r, spec = fitted.rates(), fitted.rates(fitted=False)
    assert r.bytes_per_s["attention"] == 0.5 * spec.bytes_per_s["attention"] == 0.5 * 3.35e12
    assert r.bytes_per_s["matmul"] == spec.bytes_per_s["matmul"] == r.mem_bytes_per_s == 3.35e12
    assert r.flops_per_s["remat"] == 0.25 * spec.flops_per_s["remat"]
    assert r.flops_per_s["matmul"] == spec.flops_per_s["matmul"]
    # the fitted kernel overhead stands for every class the block names none for
    assert set(r.overhead_s.values()) == {7e-6} and set(spec.overhead_s.values()) == {h100.kernel_overhead_s.value}


def test_ops_without_work_are_not_charged_a_kernel():
    """KIVI-2 at context 1 holds its one token in the fp16 window: dequantize and quantize have nothing to do, so
    no kernel overhead (it was charged: 14.5 ms against fp16's 8.9 ms on the fitted H100)."""
    from xqsim import loading, specs
    from xqsim.estimate import estimate

    hw, m = loading.load_hardware("h100_sxm"), loading.load_model("llama-3.1-8b")
    kivi = estimate(hw, m, specs.SchemeConfig(scheme="kivi", bits=2), 1, 1)
    fp16 = estimate(hw, m, specs.SchemeConfig(scheme="fp16"), 1, 1)
    idle = [op for op in kivi["ops"] if op["flops"] == 0 and op["bytes_read"] + op["bytes_written"] == 0]
    assert idle and all(op["time_s"] == 0 and op["achieved_flops_per_s"] == 0 for op in idle), idle
    assert kivi["step_time_s"] == pytest.approx(fp16["step_time_s"], rel=1e-3), (kivi["step_time_s"],
                                                                                  fp16["step_time_s"])

"""The dashboard's tables (xqsim.dashboard.data), chart templates (charts) and uploads (loading.parse_upload)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xqsim import loading, specs
from xqsim.specs import UserError

alt = pytest.importorskip("altair")
import jsonschema  # noqa: E402  (altair's own dependency)

from xqsim.dashboard import charts, data  # noqa: E402

DATA = Path(__file__).parent / "data" / "dashboard"


def frame(rows):
    """A sweep-like table: (hardware, label, context, step_time_ms, fits, max_context)."""
    df = pd.DataFrame(rows, columns=["hardware", "label", "context", "step_time_ms", "fits", "max_context"])
    df["model"], df["batch"] = "m", 1
    df["step_time_s"] = df["step_time_ms"] / 1e3
    df["tokens_per_s"] = 1 / df["step_time_s"]
    df["throughput_cap_tokens_per_s"] = df["tokens_per_s"].where(df["fits"], 0.0)
    return df


def test_context_crossover_and_its_point_on_the_curve():
    # A: 1 ms then 3 ms; B: 2 ms flat, between 500 and 2000 tokens: they cross at the geometric mean, 1000,
    # where A (linear in log context) reads 2 ms
    df = frame([("g", "A", 500, 1.0, True, 10**6), ("g", "A", 2000, 3.0, True, 10**6),
                ("g", "B", 500, 2.0, True, 10**6), ("g", "B", 2000, 2.0, True, 10**6)])
    from xqsim.crossover import crossovers

    cr = data.context_crossovers(df, crossovers(df), "step_time_s")
    assert len(cr) == 1
    r = cr.iloc[0]
    assert (r["scheme_a"], r["scheme_b"], r["winner"]) == ("A", "B", "B")
    assert r["crossover_context"] == pytest.approx(1000.0)
    assert r["step_time_ms"] == pytest.approx(2.0)
    assert data.context_crossovers(df, crossovers(df), "throughput_cap_tokens_per_s").shape[0] == 1


def test_memory_walls_inside_and_beyond_the_range():
    df = frame([("g", "A", 500, 1.0, True, 1234), ("g", "A", 2000, 3.0, False, 1234),
                ("g", "B", 500, 2.0, True, 10**6), ("g", "B", 2000, 2.0, True, 10**6)])
    w = data.memory_walls(df).set_index("label")
    assert w.loc["A", "max_context"] == 1234 and w.loc["A", "in_range"]
    assert w.loc["A", "step_time_ms"] == 1.0  # drawn at the last context shown that fits
    assert not w.loc["B", "in_range"]


def test_budget_caps_usable_memory():
    h100 = loading.load_hardware("h100_sxm")  # 80 GiB x 0.9 usable = 77.3 GB
    assert data.with_budget([h100], 0)[0].capacity_bytes == h100.capacity_bytes
    assert data.with_budget([h100], 40e9)[0].capacity_bytes == pytest.approx(40e9)
    assert data.with_budget([h100], 200e9)[0].capacity_bytes == h100.capacity_bytes  # never above usable


def test_context_grid():
    g = data.context_grid(1024, 2**20)
    assert (g[0], g[-1], len(g)) == (1024, 2**20, 64)
    assert np.allclose(np.diff(np.log(g)), np.log(1024) / 63, rtol=1e-2)


def test_memory_breakdown_sums_to_the_total():
    hws = [loading.load_hardware("h100_sxm")]
    model = loading.load_model("llama-3.1-8b")
    cfgs = [specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="xquant_cl_gqa", bits=2)]
    df, skipped = data.sweep_frame(hws, model, cfgs, 16, [4096, 32768])
    assert skipped == []
    parts = data.memory_breakdown(df, 30000)
    assert set(parts["context"]) == {32768}
    totals = parts.groupby("label")["gb"].sum()
    expect = df[df["context"] == 32768].set_index("label")["total_bytes"] / 1e9
    assert np.allclose(totals.sort_index(), expect.sort_index()), (totals, expect)
    assert parts.query("label == 'fp16' and part == 'transient buffers'")["gb"].iloc[0] > 0


def test_gpu_compare_ridge_and_extra_flops_per_byte():
    """XQuant-GQA on Llama-3.1-8B rebuilds K at rk/2 = 512 FLOP per byte of fp16 K+V (README); per byte of step
    traffic it saves at 2 bits (15/16 of fp16's minus metadata) that is above 512."""
    hws = [loading.load_hardware(n) for n in ("h100_sxm", "a100_80gb")]
    cfg = specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v", fused=True)
    tp, table = data.gpu_compare(hws, loading.load_model("llama-3.1-8b"), cfg, 16, data.context_grid(1024, 2**18, 16),
                                 32768)
    t = table.set_index("hardware")
    assert t.loc["a100_80gb", "ridge_flop_per_byte"] == pytest.approx(312e12 / 2.039e12, rel=1e-3)
    assert 512 < t.loc["h100_sxm", "extra_flop_per_byte_saved"] < 700, t
    assert (t["per_step"] == "slower (extra FLOP/B above the ridge)").all()
    assert set(tp["gpu"]) == {"h100_sxm (ridge 295 FLOP/B)", "a100_80gb (ridge 153 FLOP/B)"}


def test_pareto_front():
    df = pd.DataFrame({"model": ["m"] * 4 + ["n"], "mem_ratio": [1.0, 0.2, 0.3, 0.1, 0.5],
                       "delta_ppl": [0.0, 0.5, 0.6, 2.0, 9.0]})
    assert data.pareto_front(df).tolist() == [True, True, False, True, True]  # (0.3, 0.6) loses to (0.2, 0.5)


def test_leads_throughout():
    tp = pd.DataFrame({"scheme_tokens_per_s": [5.0, 4.0, 3.0], "fp16_tokens_per_s": [4.0, 2.0, 0.0]})
    assert data.leads_throughout(tp) is True
    assert data.leads_throughout(tp.assign(fp16_tokens_per_s=[6.0, 5.0, 4.0])) is False
    assert data.leads_throughout(tp.assign(fp16_tokens_per_s=[6.0, 2.0, 0.0])) is None
    assert data.leads_throughout(tp.assign(scheme_tokens_per_s=0.0, fp16_tokens_per_s=0.0)) is None


def test_read_accuracy(tmp_path):
    assert data.read_accuracy(tmp_path) is None
    assert data.read_accuracy(tmp_path / "missing") is None
    df = data.read_accuracy(DATA / "accuracy")
    assert len(df) == 6 and df["pareto"].sum() == 3
    (tmp_path / "a.csv").write_text("model,scheme,bits,strategy,mem_ratio,ppl,delta_ppl\nm,kivi,2,,small,1,2\n")
    with pytest.raises(UserError, match=r"a\.csv: field 'mem_ratio': expected numbers, got 'small'$"):
        data.read_accuracy(tmp_path)


def test_read_accuracy_reads_the_committed_results():
    """The committed `xqsim accuracy` run (mem_ratio_paper, its own labels) is what the Accuracy view shows."""
    df = data.read_accuracy(Path(__file__).parent.parent / "measurements" / "accuracy")
    committed = pd.read_csv(Path(__file__).parent.parent / "measurements" / "accuracy" / "accuracy.csv")
    assert len(df) == len(committed) == 38, len(df)
    assert (df["mem_ratio"] == committed["mem_ratio_paper"]).all()
    assert df["label"].tolist() == committed["label"].tolist()
    ref = df[df["label"] == "fp32 (reference)"]
    assert len(ref) == 1 and ref["mem_ratio"].iloc[0] == 1 and ref["delta_ppl"].iloc[0] == 0
    front = df[df["pareto"]].sort_values("mem_ratio")
    assert len(front) >= 2 and front["delta_ppl"].is_monotonic_decreasing, front[["label", "mem_ratio", "delta_ppl"]]


def test_calibration_of_the_committed_h100_measurements():
    paths = sorted((data.measurement_sets(Path(__file__).parent.parent / "measurements"))["h100"])
    pred, device = data.calibration(paths, loading.load_hardware("h100_sxm"))
    assert device["device_name"] == "NVIDIA H100 80GB HBM3"
    assert (pred["rates"] == "spec").sum() == 475
    err = data.error_table(pred).set_index(["rates", "by", "group"])
    # the 56 fused (tiled) rows are reported apart, not in these blocks
    assert err.loc[("spec", "all", "all"), "n"] == 419 and err.loc[("fitted", "all", "all"), "n"] == 419
    assert err.loc[("fitted", "all", "all"), "median_abs_pct"] < err.loc[("spec", "all", "all"), "median_abs_pct"]
    assert set(err.loc[("spec", "regime")].index) <= {"memory", "compute", "overhead"}


# ----------------------------------------------------------------------------- charts


SCHEMA = alt.vegalite.v6.schema.core.load_schema()
TEMPLATES = {"context_curves": lambda: charts.context_curves("step [ms]", 2, tuple(charts.MARKERS)),
             "memory_bars": lambda: charts.memory_bars(tuple(data.MEMORY_PARTS.values())),
             "roofline": lambda: charts.roofline(1), "compare_ratio": charts.compare_ratio,
             "compare_ridge": charts.compare_ridge, "calibration_scatter": lambda: charts.calibration_scatter(2),
             "error_bars": charts.error_bars, "accuracy": lambda: charts.accuracy(1)}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_are_valid_vega_lite(name):
    spec = charts.compose(TEMPLATES[name](), "a title", table=pd.DataFrame({"x": [1]}))
    spec.pop("datasets")
    jsonschema.validate(spec, SCHEMA)
    assert spec["title"] == {"text": "a title", "limit": 0}
    long = "Ridge point of each GPU vs the extra FLOPs xquant_gqa-2b-absorb_v-fused spends per byte of step traffic " \
           "it saves (dashed), batch 16, context 32,768"
    t = charts.compose(charts.context_curves("step [ms]", 1), long)["title"]
    assert t["limit"] == 0 and " ".join(t["text"]) == long and max(map(len, t["text"])) <= 110, t


def test_chart_exports_render_title_and_crossover(tmp_path):
    df = frame([("g", "A", 500, 1.0, True, 10**6), ("g", "A", 2000, 3.0, True, 10**6),
                ("g", "B", 500, 2.0, True, 10**6), ("g", "B", 2000, 2.0, True, 10**6)])
    from xqsim.crossover import crossovers

    cross = data.context_crossovers(df, crossovers(df), "step_time_s")
    spec = charts.compose(charts.context_curves("step [ms]", 1, ("crossover",)), "Two schemes cross",
                          table=charts.curves_table(df.assign(bound="memory", max_batch=1), "step_time_ms",
                                                    cross=cross))
    svg = charts.image(spec, "svg").decode()
    assert svg.startswith("<svg") and "Two schemes cross" in svg and ">1.0k<" in svg  # the crossover at 1000
    assert charts.image(spec, "png")[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("name, content, message", [
    ("bad_gpu.yaml", (DATA / "bad_gpu.yaml").read_bytes(),
     "bad_gpu.yaml: field 'mem_bytes_per_s.value': Input should be greater than 0 (got -1.0)"),
    ("x.yaml", b"a: [1", "x.yaml: line 1 is not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("y.yaml", b"foo: 1", "y.yaml: neither a hardware profile nor a model: expected the key 'memory_bytes' (as in "
                          "hardware/h100_sxm.yaml) or 'n_layers' (as in models/llama-3.1-8b.yaml)"),
    ("z.yaml", b"\xff\xfe", "z.yaml: not a UTF-8 text file; upload a hardware or model .yaml"),
    ("e.yaml", b"", "e.yaml: expected a mapping of fields (name: value), got an empty file"),
])
def test_bad_upload_is_one_line_naming_file_and_field(name, content, message):
    with pytest.raises(UserError) as err:
        loading.parse_upload(name, content)
    assert str(err.value) == message


def test_upload_hardware_and_model():
    hw = loading.parse_upload("h.yaml", (DATA / "h100_fixture.yaml").read_bytes())
    assert isinstance(hw, specs.HardwareProfile) and hw.fitted.compute_efficiency["matmul"] == 0.78
    tiny = (Path(loading.MODELS_DIR) / "tiny.yaml").read_bytes()
    assert loading.parse_upload("m.yaml", tiny) == loading.load_model("tiny")
    with pytest.raises(UserError, match=r"^m\.yaml: field 'n_layers': Input should be greater than 0 \(got 0\)$"):
        loading.parse_upload("m.yaml", tiny.replace(b"n_layers: 2", b"n_layers: 0"))


def test_measured_points_sit_where_measurement_and_model_say():
    """A measured H100 step (torch engine, 2 of 32 layers) beside the curves: its measured and predicted times are
    the row's CUDA-graph step and calibrate's prediction of it with the curve's rates; the point sits at the
    model's full-depth step x measured / predicted; a fused configuration takes only kernel-engine rows (the torch
    engine's tiled fused rows are not what the model describes), and a row past the memory wall is no point."""
    import json

    from xqsim import validation
    from xqsim.sweep import run

    root = Path(__file__).parent.parent / "measurements"
    hws = [loading.load_hardware("h100_sxm")]
    model = loading.load_model("llama-3.1-8b")
    cfgs = [specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2),
            specs.SchemeConfig(scheme="kivi", bits=2, fused=True)]
    files = data.measurement_files(root, hws)
    assert [p.name for p in files["h100_sxm"]][:2] == ["h100_llama2_7b.json", "h100_llama2_7b_b.json"], files
    pts, problems = data.measured_points(files, hws, model, cfgs, 16)
    assert problems == [] and set(pts["label"]) == {"fp16", "kivi-2b"}, (problems, set(pts["label"]))
    p = pts[(pts["label"] == "kivi-2b") & (pts["context"] == 4096)].iloc[0]
    row = next(r for r in json.loads((root / "h100/h100_llama31_8b.json").read_text())["rows"]
               if r["label"] == "kivi-2b" and r["batch"] == 16 and r["context"] == 4096 and r["status"] == "ok")
    assert p["measured_ms"] == pytest.approx(row["step_time_graph_s"] * 1e3, rel=1e-12)
    pred = validation.step_predictions([row | {"engine": "torch"}], hws[0]).iloc[0]
    assert p["predicted_ms"] == pytest.approx(pred["predicted_s"] * 1e3, rel=1e-9), (p, pred)
    full = run(hws, [model], cfgs[1:2], [16], [4096], "fitted")["step_time_s"].iloc[0]
    assert p["step_time_ms"] == pytest.approx(full * 1e3 * row["step_time_graph_s"] / pred["predicted_s"], rel=1e-9)
    assert p["rates"] == "fitted (h100_sxm, torch engine)" and p["layers"] == 2 and p["at_batch"]
    fp16 = pts[pts["label"] == "fp16"].set_index("context")
    assert 65536 not in fp16.index and fp16.loc[16384, "at_batch"], fp16  # 16 x 64k of fp16 is past the wall
    table = charts.curves_table(frame([("h100_sxm", "kivi-2b", 4096, 1.0, True, 10**6)]), "step_time_ms",
                                measured=pts)
    assert (table["kind"] == "measured").sum() == len(pts) and set(table.query("kind == 'measured'")["marker"]) == \
        {"measured"}


def test_a_subfolder_of_measurements_is_a_set_of_its_own(tmp_path):
    """measurements/h200/ (torch engine) and measurements/h200/kernel_engine/ (the kernel engine; calibration reads
    one engine at a time) are two sets; a benchmark's JSON beside them is none."""
    import shutil

    src = Path(__file__).parent.parent / "measurements"
    (tmp_path / "h200" / "kernel_engine").mkdir(parents=True)
    shutil.copy(src / "h200" / "h200_transfer.json", tmp_path / "h200")
    shutil.copy(src / "h200" / "h200_transfer_b4.json", tmp_path / "h200" / "kernel_engine")
    shutil.copy(src / "h200" / "kernels" / "kernel_roofline.json", tmp_path / "h200" / "kernel_engine")
    sets = data.measurement_sets(tmp_path)
    assert {k: [p.name for p in v] for k, v in sets.items()} == {
        "h200": ["h200_transfer.json"], "h200/kernel_engine": ["h200_transfer_b4.json"]}, sets

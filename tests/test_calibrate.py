"""The fit of calibrate.py recovers known efficiencies from data the model itself generates."""

import json
import sys
from pathlib import Path

import pytest

from xqsim import calibrate, loading, measurements, roofline, specs, validation
from xqsim.calibrate import fit
from xqsim.cli import main

TRUE_MEM = {"matmul": 0.7, "attention": 0.3, "dequant": 0.1, "rope": 0.15, "elementwise": 0.5}
TRUE_COMP = {"remat": 0.75, "matmul": 0.8}
TRUE_OVERHEAD = {"matmul": 3e-6, "attention": 4e-6, "remat": 5e-6, "dequant": 20e-6, "quant": 20e-6,
                 "rope": 15e-6, "elementwise": 6e-6}
TRUE_BITPLANE, TRUE_CHANNEL = 5.0, 1.8


def synthetic_rows(hw) -> list[dict]:
    """Measured-looking rows whose step times (and per-op kernel times) come from the roofline with known
    parameters, no noise."""
    from xqsim.roofline import op_table

    truth = hw.model_copy(update={"fitted": specs.Fitted(
        source="truth", mem_efficiency=TRUE_MEM, compute_efficiency=TRUE_COMP, overhead_s=TRUE_OVERHEAD,
        factors={"bitplane": TRUE_BITPLANE, "channel": TRUE_CHANNEL})})
    rows = []
    for name in ("llama-3.1-8b", "llama-2-7b"):
        for scheme, kw in (("fp16", {}), ("kivi", {"bits": 2}), ("kivi", {"bits": 3}), ("xquant", {"bits": 2}),
                           ("xquant_cl", {"bits": 2}), ("xquant_gqa", {"bits": 4, "strategy": "absorb_v"})):
            cfg = specs.SchemeConfig(scheme=scheme, **kw)
            for B in (1, 16, 256, 2048):  # batch 2048: the weight matmuls turn compute-bound
                for T in (1024, 32768):
                    row = {"model": name, "layers": 2, "config": cfg.model_dump(mode="json"), "label": cfg.label,
                           "batch": B, "context": T, "fused": False}
                    t = validation.step_predictions([row | {"step_time_graph_s": 1.0}], truth, "graph")
                    row["step_time_graph_s"] = float(t["predicted_s"].iloc[0])
                    ops: dict[str, dict] = {}
                    for o in op_table(calibrate.row_ops(row), truth.rates()):
                        e = ops.setdefault(o["name"], {"op_class": o["op_class"], "time_s": 0.0, "kernel_time_s": 0.0})
                        e["kernel_time_s"] += o["time_s"] * o["layers"]
                    row["ops"] = ops
                    rows.append(row)
    return rows


def test_fit_recovers_known_parameters():
    """Jointly from step times and per-op kernel times (the fit's two kinds of residual). Step times alone do
    not tell the classes' overheads apart: every step launches the classes' kernels in about the same
    proportions, which is why the engine's measurements carry per-op kernel times."""
    hw = loading.load_hardware("h100_sxm").model_copy(update={"fitted": None})
    fitted, report = fit(synthetic_rows(hw), hw, "synthetic")
    assert report["median_abs_pct"] < 0.1, report
    assert report["ops_fitted"] > 500, report
    for cls, v in TRUE_OVERHEAD.items():
        assert fitted.overhead_s[cls] == pytest.approx(v, rel=0.01), (cls, fitted.overhead_s, report)
    for cls, v in TRUE_MEM.items():
        assert fitted.mem_efficiency[cls] == pytest.approx(v, rel=0.01), (cls, fitted.mem_efficiency, report)
    for cls, v in TRUE_COMP.items():
        assert fitted.compute_efficiency[cls] == pytest.approx(v, rel=0.01), (cls, fitted.compute_efficiency)
    assert fitted.factors["bitplane"] == pytest.approx(TRUE_BITPLANE, rel=0.01), fitted.factors
    assert fitted.factors["channel"] == pytest.approx(TRUE_CHANNEL, rel=0.01), fitted.factors
    # quantization moves a few bytes a step: its bandwidth never binds, so it is not determined
    assert "memory:quant" in report["not_determined"] and "quant" not in fitted.mem_efficiency


FILES = sorted((Path(__file__).parent.parent / "measurements/h100").glob("h100_*.json"))


def run_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["xqsim", *map(str, args)])
    main()


def test_calibrate_writes_a_new_profile_and_never_overwrites(monkeypatch, tmp_path, capsys):
    out = tmp_path / "new" / "h100_fit.yaml"  # into a folder not there yet (a FileNotFoundError after the fit)
    run_cli(monkeypatch, "calibrate", *FILES, "--hardware", "h100_sxm", "-o", out)
    hw = loading.load_hardware(out)
    spec = loading.load_hardware("h100_sxm")
    assert hw.fitted is not None and hw.mem_bytes_per_s == spec.mem_bytes_per_s  # spec figures untouched
    assert 0.5 < hw.fitted.compute_efficiency["remat"] <= 1.0 and hw.fitted.overhead_s["matmul"] > 0
    before = out.read_text()
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "calibrate", *FILES, "--hardware", "h100_sxm", "-o", out)
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err and out.read_text() == before


def test_validate_never_overwrites_without_force(monkeypatch, capsys, tmp_path):
    """A user's validation.csv in -o DIR stays as it was (validate overwrote it); --force replaces it."""
    mine = tmp_path / "validation.csv"
    mine.write_text("my notes\n")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "validate", FILES[0], "--hardware", "h100_sxm", "--spec-only", "-o", tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == (f"xqsim: error: {mine}: already exists; choose another -o DIR or "
                                                 f"pass --force to overwrite"), err
    assert mine.read_text() == "my notes\n" and not (tmp_path / "validation.png").exists()
    run_cli(monkeypatch, "validate", FILES[0], "--hardware", "h100_sxm", "--spec-only", "-o", tmp_path, "--force")
    assert mine.read_text().startswith("model,") or "predicted" in mine.read_text()
    assert (tmp_path / "validation.png").exists()


def test_validate_json_and_held_out_blocks(monkeypatch, capsys):
    run_cli(monkeypatch, "validate", FILES[0], "--hardware", "h100_sxm", "--spec-only", "--json")
    spec = json.loads(capsys.readouterr().out)
    assert {"n", "median_abs_pct", "p90_abs_pct", "max_abs_pct", "per_regime", "per_scheme"} <= spec.keys()
    assert spec["profile"] == "spec" and spec["median_abs_pct"] > 50  # the spec roofline misses the torch engine
    seen = []
    real = validation.fit

    def spy(rows, hw, source, *args, **kw):
        seen.append((source, {r["context"] for r in rows}))
        return real(rows, hw, source, *args, **kw)

    monkeypatch.setattr(validation, "fit", spy)
    run_cli(monkeypatch, "validate", FILES[0], "--hardware", "h100_sxm", "--held-out", "context", "--json")
    held = json.loads(capsys.readouterr().out)
    assert held["median_abs_pct"] < spec["median_abs_pct"]
    assert len(seen) == 5  # one fit per context length
    for source, contexts in seen:  # each fit never saw the context it is judged on
        assert source.endswith(tuple(f"context={c}" for c in (1024, 4096, 16384, 65536, 131072)))
        assert int(source.rsplit("=", 1)[1]) not in contexts


@pytest.mark.parametrize("content,fragment", [
    ("{}", "not an `xqsim measure` file"),
    ('{"device": {"device_name": "x"}, "rows": []}', "no measured rows"),
    ('{"device": {"device_name": "x"}, "rows": [{"status": "ok", "model": "tiny"}]}', "missing layers, config"),
    ("not json", "not a JSON measurement file"),
])
def test_bad_measurement_files(monkeypatch, capsys, tmp_path, content, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "validate", bad, "--hardware", "h100_sxm")
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and str(bad) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("where,edit,fragment", [
    (0, {"step_time_s": float("nan")}, "field 'rows.0.step_time_s': nan is not a time"),
    (3, {"step_time_graph_s": -1.0}, "field 'rows.3.step_time_graph_s': -1.0 is not a time"),
    (5, {"step_time_s": 0}, "field 'rows.5.step_time_s': 0 is not a time"),
    (7, {"batch": 1.5}, "field 'rows.7.batch': expected a whole number from 1 to 2,147,483,647 (got 1.5)"),
    (9, {"config": {"scheme": "kivi", "bits": 5}}, "field 'rows.9.config': Value error, bits=5 is not supported"),
    (11, {"config": None}, "field 'rows.11': 'model' must be a name and 'config' an object"),
    (13, {"ops": {"attention": {"time_s": float("inf")}}}, "field 'rows.13.ops.attention.time_s': inf is not a time"),
    (2, "drop config", "field 'rows.2': missing config"),
    (4, "not an object", "field 'rows.4': expected an object"),
    # issue 18's audit: counts past int64 (OverflowError tracebacks), more layers than the model has (a MemoryError
    # at 2^31), rows the fit silently passed over or misread
    (1, {"context": 10**30}, "field 'rows.1.context': expected a whole number from 1 to 2,147,483,647"),
    (1, {"layers": 99}, "field 'rows.1.layers': 99 is more than llama-2-7b's 32 layers"),
    (6, {"status": "done"}, "field 'rows.6.status': 'done' is not allowed; allowed: ok, oom, invalid, error"),
    (8, {"ops": {"frobnicate": {"time_s": 1e-5}}}, "field 'rows.8.ops.frobnicate': not an op of fp16's decode step"),
    (8, {"ops": {"attention": {"op_class": "attention"}}}, "field 'rows.8.ops.attention.time_s': None is not a time"),
    (10, {"fused": "yes"}, "field 'rows.10.fused': 'yes', but its config says False"),
    (12, {"label": 5}, "field 'rows.12.label': expected a name (got 5)"),
])
def test_every_measured_row_is_checked(tmp_path, where, edit, fragment):
    """Each row the fit reads is checked where it lies, not only the first: NaN, zero or negative times (the fit
    died with 'Residuals are not finite'), a configuration the scheme refuses, a fractional batch, a row without
    its configuration (a KeyError), a row that is not an object (an AttributeError)."""
    data = json.loads(FILES[0].read_text())
    ok = [i for i, r in enumerate(data["rows"]) if r["status"] == "ok"]
    assert ok[:14] == list(range(14))
    row = data["rows"][where]
    if edit == "drop config":
        del row["config"]
    elif edit == "not an object":
        data["rows"][where] = 3
    else:
        row.update(edit)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(specs.UserError) as e:
        measurements.read_measurements([bad])
    assert str(e.value).startswith(f"{bad}: {fragment}"), str(e.value)


@pytest.mark.parametrize("text,fragment", [
    ('{"device": {}, "rows": [{"batch": ' + "9" * 5000 + "}]}", "not a JSON measurement file (Exceeds the limit"),
    (FILES[0].read_text().replace('"device_name": "NVIDIA H100 80GB HBM3"', '"device_name": 5'),
     "field 'device.device_name': expected a name (got 5)"),
])
def test_measurement_files_that_are_not_one(tmp_path, text, fragment):
    """An integer of 5,000 digits (a ValueError traceback) and a device that is not a name (accepted)."""
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(specs.UserError) as e:
        measurements.read_measurements([bad])
    assert str(e.value).startswith(f"{bad}: {fragment}"), str(e.value)


def test_files_of_two_devices_are_refused(tmp_path):
    data = json.loads(FILES[0].read_text())
    data["device"]["device_name"] = "NVIDIA H200"
    other = tmp_path / "h200.json"
    other.write_text(json.dumps(data))
    with pytest.raises(specs.UserError, match="calibrate one device at a time"):
        measurements.read_measurements([FILES[0], other])


def _json_of(monkeypatch, capsys, *args) -> dict:
    run_cli(monkeypatch, "validate", *args, "--json")
    return json.loads(capsys.readouterr().out)


def test_validate_on_the_committed_sets_matches_the_readme(monkeypatch, capsys):
    """The shipped h100_sxm fit, in sample, and its transfer to the H200: the figures README.md states."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    h100 = _json_of(monkeypatch, capsys, *FILES, "--hardware", "h100_sxm")
    h200 = _json_of(monkeypatch, capsys, *sorted(FILES[0].parent.parent.glob("h200/h200_*.json")),
                    "--hardware", "h200", "--transfer-from", "h100_sxm")
    for what, r in (("| H100 torch engine, in sample |", h100),
                    ("| H200 torch engine, the H100 fit transferred |", h200)):
        row = next((line for line in readme.splitlines() if what in line), "")
        stated = f"| {r['n']} | {r['median_abs_pct']:.1f}% | {r['p90_abs_pct']:.1f}% |"
        assert stated in row, f"README row {row!r} does not state {stated!r}"
    assert h100["target"] == "graph" and h100["fused_tiled"]["n"] == 56


def test_a_kernel_engine_fit_is_labelled_and_fits_what_that_engine_runs():
    """Rows of the Triton kernel engine: the fit takes its fused rows and fp16 (its unfused compressed rows are
    not what it runs), recovers the step times it was made from, and names its engine, which xqsim.rates then
    applies to fused configurations (and fp16) only. Rows of two engines are refused."""
    from xqsim import rates

    hw = loading.load_hardware("h200")
    truth = hw.model_copy(update={"fitted": specs.Fitted(
        source="truth", engine="triton", mem_efficiency={"attention": 0.45, "matmul": 0.85, "elementwise": 0.6},
        compute_efficiency={"remat": 0.4, "matmul": 0.7}, overhead_s={"attention": 8e-6, "matmul": 4e-6})})
    cfgs = [specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2, fused=True),
            specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="remat", fused=True),
            specs.SchemeConfig(scheme="kivi", bits=2)]  # unfused: not a kernel-engine configuration
    rows = []
    for cfg in cfgs:
        for B in (1, 8, 64):
            for T in (1024, 8192, 65536):
                row = {"model": "llama-3.1-8b", "layers": 2, "config": cfg.model_dump(mode="json"), "label": cfg.label,
                       "batch": B, "context": T, "fused": cfg.fused, "engine": "triton"}
                t = validation.step_predictions([row | {"step_time_graph_s": 1.0}], truth, "graph")
                rows.append(row | {"step_time_graph_s": float(t["predicted_s"].iloc[0]) * (3.0 if not cfg.fused
                                                                                           and cfg.bits < 16 else 1)})
    fitted, report = fit(rows, hw, "kernel engine test", "graph")
    assert fitted.engine == "triton" and report["n"] == 27, report["n"]  # 3 configurations x 9; unfused KIVI left
    assert fitted.schemes == ["fp16", "kivi", "xquant_gqa"], fitted.schemes  # what it saw: rates applies it there
    pred = validation.step_predictions(rows, hw.model_copy(update={"fitted": fitted}), "graph")
    err = validation.error_report(pred)
    assert err["n"] == 27 and err["median_abs_pct"] < 2.0, err  # the unfused KIVI rows (x3) are not judged
    kernel = hw.model_copy(update={"fitted": fitted})
    assert rates.choose(kernel, cfgs[1], "fitted")[1].label == "fitted (h200, triton engine)"
    assert rates.choose(kernel, cfgs[0], "fitted")[1].label == "fitted (h200, triton engine)"  # fp16: either engine
    assert rates.choose(kernel, cfgs[3], "fitted")[1].label == "spec (no torch-engine fit)"
    with pytest.raises(specs.UserError, match="several engines"):
        fit([rows[0] | {"engine": "torch"}, *rows[1:]], hw, "mixed", "graph")


def test_a_fused_kernel_is_judged_under_the_op_the_engine_times_it_under():
    """The kernel engine times a fused kernel under its attention op and records the ops before it (dequantize,
    rebuild, rotate) empty: the per-op residuals and op_errors give the whole kernel's predicted time to that op,
    and the fused kernel pays attention's overhead (roofline.kernel_class), not the quantize kernels'."""
    from xqsim.roofline import kernels

    hw = loading.load_hardware("h200")
    truth = hw.model_copy(update={"fitted": specs.Fitted(
        source="truth", engine="triton", mem_efficiency={"attention": 0.3, "matmul": 0.85, "elementwise": 0.6},
        compute_efficiency={"remat": 0.4, "matmul": 0.7},
        overhead_s={"attention": 20e-6, "dequant": 3e-6, "matmul": 4e-6})})
    rates_ = truth.rates()
    rows = []
    for cfg in (specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2, fused=True),
                specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="remat", fused=True),
                specs.SchemeConfig(scheme="xquant", bits=2, strategy="absorb_v", fused=True)):
        for B in (1, 8, 32):
            for T in (1024, 8192, 32768):
                row = {"model": "llama-3.1-8b", "layers": 2, "config": cfg.model_dump(mode="json"),
                       "label": cfg.label, "batch": B, "context": T, "fused": cfg.fused, "engine": "triton"}
                ops, step = {}, 0.0
                for kern in kernels(calibrate.row_ops(row)):
                    t = float(roofline.step_time(kern, rates_, False)["step_time_s"])
                    under = next((op for op in kern if op.cls == "attention"), kern[0]).name  # attention_qk first
                    for op in kern:
                        ops.setdefault(op.name, {"op_class": op.cls, "time_s": 0.0, "kernel_time_s": 0.0})
                    ops[under]["kernel_time_s"] += t
                    ops[under]["time_s"] += t
                    step += t
                rows.append(row | {"ops": ops, "step_time_s": step, "step_time_graph_s": step})
    fused_attention = [k for k in kernels(calibrate.row_ops(rows[9])) if len(k) > 1]
    assert [op.name for op in fused_attention[0]][0] == "dequant_k" and roofline.kernel_class(fused_attention[0]) \
        == "attention"
    fitted, report = fit(rows, hw, "per-op test", "graph")
    assert report["ops_fitted"] > 36, report["ops_fitted"]
    errs = validation.op_errors(rows, hw.model_copy(update={"fitted": fitted}))
    attention = errs[errs["op"].isin(["attention", "attention_qk"])]
    fused = attention[attention["label"] != "fp16"]
    assert len(fused) == 23 and fused["error_pct"].abs().max() < 0.01, fused  # 27 less 4 kernels under 50 us
    assert errs["error_pct"].abs().max() < 0.01, errs.sort_values("error_pct")
    assert fitted.compute_efficiency["remat"] == pytest.approx(0.4, rel=1e-3), fitted.compute_efficiency
    assert fitted.overhead_s.get("attention", 0) > 2 * fitted.overhead_s.get("dequant", 0), fitted.overhead_s


def test_the_readme_model_error_table_is_the_one_the_benchmark_computes():
    """benchmarks/readme_figures.py --check: the README's model-error table (every row: spec, held out, in sample,
    per op, transfer) is what benchmarks/model_error.py computes from the committed measurements now."""
    import subprocess

    root = Path(__file__).parent.parent
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "readme_figures.py"), "--check"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "README current" in p.stdout, (p.stdout, p.stderr[-2000:])

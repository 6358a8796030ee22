"""The dashboard page driven by Streamlit's AppTest: every control and view, asserting on what is shown."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from xqsim import loading, specs  # noqa: E402
from xqsim.estimate import estimate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "dashboard"
XQ = "xquant_gqa-2b-absorb_v-fused"
STEP = 1024 ** (1 / 63)  # ratio of neighbouring contexts on the default grid (64 points, 1k..1M)


def page(measurements: str, accuracy: str) -> None:
    from pathlib import Path

    from xqsim.dashboard.page import main

    main(Path(measurements), Path(accuracy))


def app(accuracy: Path = DATA / "accuracy", measurements: Path = ROOT / "measurements", **query) -> AppTest:
    at = AppTest.from_function(page, kwargs={"measurements": str(measurements), "accuracy": str(accuracy)},
                               default_timeout=120)
    at.query_params.update(query)
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, at.exception[0].value
    return at


def charts(at: AppTest) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """Every chart on the page: (Vega-Lite spec, its datasets by name)."""
    return [(json.loads(c.proto.spec), {d.name: convert_arrow_bytes_to_pandas_df(d.data.data)
                                        for d in c.proto.datasets}) for c in at.get("vega_lite_chart")]


def curves(at: AppTest, i: int = 0) -> pd.DataFrame:
    return charts(at)[i][1]["table"].query("kind == 'curve'")


def title(spec: dict) -> str:
    """A composed chart's title as one line (charts.compose wraps long ones into lines)."""
    t = spec["title"]["text"]
    return " ".join(t) if isinstance(t, list) else t


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def table(at: AppTest, column: str) -> pd.DataFrame:
    """The first dataframe shown that has this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def crossing(at: AppTest, gpu: str, winner: str, loser: str) -> float:
    pattern = rf"\*\*{gpu}\*\*: `{re.escape(winner)}` passes `{re.escape(loser)}` in [a-z -]+ at \*\*([\d,]+) tokens"
    m = re.search(pattern, texts(at))
    assert m, f"no crossover {winner} over {loser} on {gpu} in:\n{texts(at)}"
    return float(m.group(1).replace(",", ""))


def test_the_default_view_is_capacity_limited_throughput():
    at = ok(app())
    assert at.subheader[0].value == "Capacity: llama-3.1-8b, up to 16 sequences" and at.success, at.subheader


def test_crossovers_view_curves_walls_and_the_step_time_crossover():
    at = ok(app(view="crossovers", spec="1"))  # the README's flagship table is the spec roofline on both GPUs
    c = curves(at)
    pairs = c[["hardware", "label"]].drop_duplicates()
    assert len(pairs) == 6, pairs  # 2 GPUs x 3 schemes
    # memory walls at batch 16 as the README's flagship table prints them (H100 and B200, Llama-3.1-8B)
    walls = table(at, "scheme").set_index(["GPU", "scheme"]).iloc[:, 0]
    expect = {("h100_sxm", "fp16"): 29_200, ("b200", "fp16"): 75_280, ("h100_sxm", "kivi-2b-fused"): 206_949,
              ("b200", "kivi-2b-fused"): 534_629, ("h100_sxm", XQ): 206_451, ("b200", XQ): 534_131}
    assert {k: int(walls[k]) for k in expect} == expect
    # the printed crossover lies between the two grid points where the curves shown change order
    x = crossing(at, "b200", "kivi-2b-fused", "fp16")
    b200 = c[c["hardware"] == "b200"].pivot_table(index="context", columns="label", values="y")
    diff = (b200["kivi-2b-fused"] - b200["fp16"]).dropna()
    lo, hi = diff.index[diff.index <= x].max(), diff.index[diff.index >= x].min()
    assert diff[lo] > 0 > diff[hi], (x, lo, hi, diff[lo], diff[hi])
    marks = charts(at)[0][1]["table"].query("kind == 'marker'")
    assert sorted(marks["marker"].value_counts().items()) == [("crossover", 1), ("memory wall", 6)]
    assert at.query_params["schemes"] == "fp16,kivi-2b-fused," + XQ
    at.radio(key="view").set_value("capacity")
    ok(at.run())
    assert at.subheader[0].value == "Capacity: llama-3.1-8b, up to 16 sequences"
    assert at.query_params["view"] == "capacity"


def test_capacity_crossover_is_fp16s_memory_wall_at_batch_1():
    """Known case (tests/test_crossover.py): on an H100 XQuant-GQA-2 (absorb_v, fused) overtakes fp16 in
    capacity-limited throughput only where fp16 no longer fits one sequence."""
    at = ok(app(view="capacity", spec="1"))  # the known case is a spec-roofline one
    x = crossing(at, "h100_sxm", XQ, "fp16")
    wall = estimate(loading.load_hardware("h100_sxm"), loading.load_model("llama-3.1-8b"),
                    specs.SchemeConfig(scheme="fp16"), 1, 4096)["max_context"]
    assert abs(np.log(x / wall)) < np.log(STEP), (x, wall)
    assert [len(d["table"]) if "table" in d else len(d["parts"]) for _, d in charts(at)][2] == 15  # 3 schemes x 5
    parts, caps = charts(at)[2][1]["parts"], charts(at)[2][1]["caps"]
    assert caps.set_index("hardware")["capacity_gb"].round(1).to_dict() == {"h100_sxm": 77.3, "b200": 173.9}
    fp16 = parts[parts["label"] == "fp16"].set_index("part")["gb"]
    assert fp16["cache codes"] == pytest.approx(16 * 34621 * 131072 / 1e9)  # B * T * 2*n*dkv*2 bytes, fp16 KV
    assert len(at.get("download_button")) == 9  # CSV, PNG, SVG for each of the three charts


def test_scheme_controls_change_the_curves():
    at = ok(app())
    at.sidebar.multiselect(key="bits:kivi").set_value([2, 4])
    at.sidebar.checkbox(key="fused:kivi").uncheck()
    at.sidebar.radio(key="strategy:xquant_gqa").set_value("remat")
    at.sidebar.multiselect(key="schemes").select("xquant_yang")
    ok(at.run())
    labels = sorted(curves(at)["label"].unique())
    assert labels == ["fp16", "kivi-2b", "kivi-4b", "xquant_gqa-2b-fused", "xquant_yang-2b-fused"], labels
    at.sidebar.multiselect(key="hw").unselect("b200")
    ok(at.run())
    assert curves(at)[["hardware", "label"]].drop_duplicates().shape[0] == 5
    assert at.query_params["hw"] == "h100_sxm"


def test_model_batch_context_budget_and_metric():
    at = ok(app(view="crossovers"))
    at.sidebar.selectbox(key="model").set_value("qwen2.5-7b")
    at.sidebar.number_input(key="batch").set_value(4)
    at.sidebar.select_slider(key="ctx").set_range(4096, 262144)
    ok(at.run())
    assert "qwen2.5-7b, batch 4" in at.subheader[0].value
    c = curves(at)
    assert (c["context"].min(), c["context"].max()) == (4096, 262144)
    at.radio(key="metric").set_value("tokens")
    ok(at.run())
    tps = curves(at)
    assert title(charts(at)[0][0]) == "qwen2.5-7b, batch 4: tokens/s per scheme (curves end at the memory wall)"
    both = c.merge(tps, on=["hardware", "label", "context"])
    assert np.allclose(both["y_y"], 4 / (both["y_x"] / 1e3)), "tokens/s = batch / step time"
    # a 40 GB budget: fp16 KV of Llama-3.1-8B is 131,072 B per token and sequence, the weights 16.06 GB, so 16
    # sequences fit about (40 - 16.06) GB / 16 / 131,072 B = 11,400 tokens, a little less with transient buffers
    at = ok(app(view="crossovers"))
    at.sidebar.number_input(key="budget").set_value(40.0)
    ok(at.run())
    walls = table(at, "scheme").set_index(["GPU", "scheme"]).iloc[:, 0]
    assert 10_500 < walls[("h100_sxm", "fp16")] < 11_420, walls


def test_memory_breakdown_context_and_roofline():
    at = ok(app(view="roofline", spec="1"))
    at.sidebar.select_slider(key="at").set_value(131072)
    ok(at.run())
    spec, d = charts(at)[0]
    assert "context 131,072" in title(spec)
    ops = d["table"].query("kind == 'op'")
    assert set(ops["bound"]) <= {"memory", "compute", "overhead"} and len(ops["bound"].unique()) == 3
    roofs = d["table"].query("kind == 'roof'")["roof"].unique()
    assert sorted(roofs) == ["spec: bf16 tensor", "spec: fp32 vector"]  # spec only: fitted blocks ignored
    attn = ops[(ops["op"] == "attention") & (ops["label"] == "fp16") & (ops["hardware"] == "h100_sxm")]
    # fp16 attention at batch 16: 4*B*H*T*hd FLOPs over reading K and V (2*B*T*dkv*2 bytes): H/Hkv = 4 FLOP/B
    assert attn["intensity_flop_per_byte"].iloc[0] == pytest.approx(4.0, rel=1e-3)


def test_upload_a_fitted_gpu_and_a_bad_one():
    at = ok(app(view="roofline"))
    at.sidebar.file_uploader(key="uploads").set_value([
        ("h100_fixture.yaml", (DATA / "h100_fixture.yaml").read_bytes(), "application/x-yaml"),
        ("bad_gpu.yaml", (DATA / "bad_gpu.yaml").read_bytes(), "application/x-yaml")])
    ok(at.run())
    assert [e.value for e in at.error] == [
        "bad_gpu.yaml: field 'mem_bytes_per_s.value': Input should be greater than 0 (got -1.0)"]
    assert "h100_fixture" in at.sidebar.multiselect(key="hw").value  # a new upload is shown at once
    roofs = charts(at)[0][1]["table"].query("kind == 'roof'")
    fixture = sorted(roofs[roofs["hardware"] == "h100_fixture"]["roof"].unique())
    assert fixture == ["fitted: dequant", "fitted: matmul", "spec: bf16 tensor", "spec: fp32 vector"], fixture
    badge = at.caption[0].value  # each panel says which rates it predicts with (xqsim.rates)
    assert "**rates fitted**" in badge and "fitted (h100_fixture, torch engine) on h100_fixture (unfused" in badge
    assert "spec (no triton-engine fit) on h100_sxm, b200, h100_fixture (fused configurations)" in badge, badge


def test_bad_url_values_are_reported_and_defaults_used():
    at = ok(app(batch="many", view="nope", hw="h100_sxm,h999", schemes="kivi-2b-fused,foo-2b"))
    errors = [e.value for e in at.error]
    assert "URL: field 'batch': 'many' is not a count from 1 to 65,536 like 16, 32k or 1M; using the default" in errors
    assert any(e.startswith("URL: field 'view': 'nope' is not allowed; allowed: crossovers,") for e in errors)
    assert any(e.startswith("URL: field 'schemes': unknown scheme 'foo'") for e in errors), errors
    assert any(e.startswith("URL: field 'hw': unknown hardware 'h999'; known: a100_80gb, b200,") for e in errors)
    # the page keeps working on the defaults: the default view is the capacity-limited throughput
    assert at.subheader[0].value == "Capacity: llama-3.1-8b, up to 16 sequences", at.subheader[0].value


def test_bad_view_control_in_the_url():
    at = ok(app(view="compare", cmp="kivi-9b", budget="nan", rates="fast"))
    errors = [e.value for e in at.error]
    assert "URL: field 'rates': 'fast' is not allowed; allowed: spec, fitted, transferred; using the default" in errors
    assert at.sidebar.radio(key="rates").value == "fitted"
    assert "URL: field 'budget': 'nan' is not a size in GB; 0 means each GPU's usable memory; using the default" \
        in errors
    assert f"URL: field 'cmp': 'kivi-9b' is not allowed; allowed: {XQ}, kivi-2b-fused" in errors
    assert at.selectbox(key="cmp").value == XQ


def test_rates_control_sets_every_panel_and_the_url():
    """Rates=transferred: the H200 predicts its unfused configurations with h100_sxm's torch-engine fit, its fused
    ones at spec rates, and the panel's badge and the URL say so."""
    at = ok(app(view="capacity", hw="h200", schemes="fp16,kivi-2b-fused", rates="transferred"))
    badge = at.caption[0].value
    assert "**rates transferred**" in badge and "transferred (h100_sxm, torch engine) on h200 (unfused" in badge, badge
    assert "spec (no triton-engine fit) on h200 (fused configurations)" in badge, badge
    assert at.query_params["rates"] in ("transferred", ["transferred"])
    at.sidebar.radio(key="rates").set_value("spec")
    ok(at.run())
    assert at.caption[0].value.endswith("**rates spec**: spec on h200"), at.caption[0].value


def test_url_restores_a_shared_view():
    at = ok(app(view="capacity", hw="a100_80gb", model="mistral-7b", schemes="fp16,xquant_gqa-3b-fused",
                batch="64", ctx="2k-256k", at="64k", budget="0"))
    assert at.subheader[0].value == "Capacity: mistral-7b, up to 64 sequences"
    assert sorted(curves(at)["label"].unique()) == ["fp16", "xquant_gqa-3b-fused"]
    assert at.sidebar.radio(key="strategy:xquant_gqa").value == "remat"
    assert "context 65,536:" in title(charts(at)[2][0])  # 64k = 2^16 is a point of the 2k..256k grid
    assert at.query_params["ctx"] == "2k-256k"
    at = ok(app(view="crossovers", metric="tokens"))
    assert title(charts(at)[0][0]).endswith("tokens/s per scheme (curves end at the memory wall)")
    at = ok(app(view="calibration", calhw="a100_80gb"))
    assert at.subheader[0].value.endswith("predicted by a100_80gb")
    assert at.query_params["calhw"] == "a100_80gb" and at.query_params["mset"] == "h100"


def test_compare_gpus():
    at = ok(app(view="compare", model="qwen2.5-7b", batch="128", ctx="1k-512k", spec="1"))  # ridge physics
    assert at.selectbox(key="cmp").value == XQ  # rematerializing schemes come first
    ridge = table(at, "ridge_flop_per_byte").set_index("hardware")
    assert len(ridge) == 8
    assert ridge.loc["h100_sxm", "ridge_flop_per_byte"] == round(989.4e12 / 3.35e12)  # bf16 peak / bandwidth
    # tests/test_crossover.py: XQuant-GQA-2 passes fp16 on an H100 within 10k tokens, never on an A100; README: nor
    # on an H200
    m = re.search(r"\*\*h100_sxm\*\* \(ridge 295 FLOP/B\): passes fp16 at \*\*([\d,]+) tokens", texts(at))
    assert m and 1024 < float(m.group(1).replace(",", "")) < 10_000, texts(at)
    assert "**a100_80gb** (ridge 153 FLOP/B): serves less than fp16 at every context in range" in texts(at)
    assert "**h200** (ridge 206 FLOP/B): serves less than fp16 at every context in range" in texts(at)
    gpus = charts(at)[0][1]["table"]["gpu"].unique()
    assert len(gpus) == 8 and "h100_sxm (ridge 295 FLOP/B)" in gpus
    at.selectbox(key="cmp").set_value("kivi-2b-fused")
    ok(at.run())
    assert at.subheader[0].value.startswith("kivi-2b-fused vs fp16 on every GPU")
    # no crossover where the scheme leads throughout: said so (it read "does not pass fp16 in this context range")
    assert "**l40s** (ridge 419 FLOP/B): serves more than fp16 at **every context in range**" in texts(at)


def test_calibration_view_spec_and_fitted():
    at = ok(app(view="calibration"))
    assert at.selectbox(key="mset").value == "h100"
    assert at.subheader[0].value.startswith("Calibration: 475 configurations measured on NVIDIA H100 80GB HBM3")
    m = re.search(r"\*\*spec rates\*\*: median \|error\| \*\*([\d.]+)%", texts(at))
    assert m and float(m.group(1)) == pytest.approx(64.4, abs=0.1)  # README: the spec roofline misses by 64%
    assert charts(at)[0][1]["table"].query("kind == 'point'").shape[0] == 2 * 475  # spec and fitted
    at.sidebar.file_uploader(key="uploads").set_value(
        ("h100_fixture.yaml", (DATA / "h100_fixture.yaml").read_bytes(), "application/x-yaml"))
    ok(at.run())
    at.selectbox(key="calhw").set_value("h100_fixture")
    ok(at.run())
    rates = charts(at)[0][1]["table"].query("kind == 'point'")["rates"].value_counts().to_dict()
    assert rates == {"spec": 475, "fitted": 475}
    assert "**fitted rates**: median |error|" in texts(at)


def test_calibration_without_measurements(tmp_path):
    at = ok(app(view="calibration", measurements=tmp_path))
    assert at.info[0].value.startswith("No measurements yet:")


def test_accuracy_view_and_its_empty_and_bad_states(tmp_path):
    at = ok(app(view="accuracy"))
    d = charts(at)[0][1]["table"]
    assert len(d) == 6
    front = d[d["pareto"]].sort_values("mem_ratio")["label"].tolist()
    assert front == ["xquant-2b", "xquant-4b-absorb_v", "fp16"], front
    assert texts(at).startswith("Pareto front: 3 of 6 results")
    at = ok(app(view="accuracy", accuracy=tmp_path))
    assert at.info[0].value.startswith(f"No accuracy results yet: {tmp_path} holds no CSV")
    at = ok(app(view="accuracy", accuracy=DATA / "accuracy_bad"))
    assert [e.value for e in at.error] == [
        f"{DATA / 'accuracy_bad' / 'no_delta.csv'}: field 'delta_ppl': column missing; expected columns model, "
        f"scheme, bits, strategy, mem_ratio, ppl, delta_ppl"]


def test_verdict_on_top_of_the_page():
    """The answer first, from the committed accuracy results: KIVI-2 fused where its quality is allowed (batch 16,
    32k), KIVI-4 fused under the default 5% limit, and fp16 where nothing beats it (batch 1, 1k)."""
    acc = ROOT / "measurements" / "accuracy"
    kw = {"hw": "h100_sxm", "spec": "1", "schemes": "fp16,kivi-2b-fused,kivi-4b-fused", "accuracy": acc}
    at = ok(app(batch="16", at="32k", dppl="50", **kw))
    v = at.success[0].value
    assert v.startswith("**Verdict** for llama-3.1-8b, up to 16 sequences of 32,768 tokens, perplexity increase at "
                        "most 50.0% (quality: smollm2-135m; rates spec, as the panel below says)"), v
    assert "- h100_sxm: serve with kivi-2b-fused: 1,659 tokens/s at batch 16 (2.89x fp16" in v, v
    v = ok(app(batch="16", at="32k", **kw)).success[0].value
    assert "- h100_sxm: serve with kivi-4b-fused: 1,311 tokens/s" in v and "runner-up fp16" in v, v
    v = ok(app(batch="1", at="1k", **kw)).success[0].value
    assert "- h100_sxm: serve with fp16: 155 tokens/s at batch 1 (the baseline" in v, v


def test_accuracy_view_draws_the_committed_results():
    """The shipped accuracy run (`xqsim accuracy`'s CSV, not the fixture's columns) is drawn, not refused."""
    at = ok(app(view="accuracy", accuracy=ROOT / "measurements" / "accuracy"))
    assert not at.error, [e.value for e in at.error]
    d = charts(at)[0][1]["table"]
    assert len(d) == 38 and "fp32 (reference)" in set(d["label"])
    assert texts(at).startswith(f"Pareto front: {int(d['pareto'].sum())} of 38 results")


def test_a_model_that_does_not_fit_is_said_so():
    at = ok(app(view="crossovers", model="llama-3.1-70b", hw="h100_sxm,b200", schemes="fp16"))  # 141 GB weights
    assert [i.value for i in at.info] == [
        "fp16 on h100_sxm does not fit 16 sequences of 1,024 tokens (longest context at this batch: 0 tokens)"]
    assert list(curves(at)["hardware"].unique()) == ["b200"]


def test_nothing_selected_is_a_warning_not_an_error():
    at = ok(app())
    at.sidebar.multiselect(key="schemes").set_value([])
    ok(at.run())
    assert at.warning[0].value == "Select at least one GPU and one scheme in the sidebar."


def test_xqsim_dashboard_runs_streamlit_on_the_shipped_app_py(monkeypatch):
    import subprocess
    import sys

    from xqsim.cli import main

    ran = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, cwd: ran.append((cmd, cwd)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(sys, "argv", ["xqsim", "dashboard", "--port", "8600", "--headless"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    shipped = ROOT / "xqsim" / "dashboard" / "app.py"
    assert ran == [([sys.executable, "-m", "streamlit", "run", str(shipped), "--server.port", "8600",
                     "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode",
                     "minimal"], Path.cwd())]
    assert shipped.read_text().split('"""')[-1] == (ROOT / "app.py").read_text().split('"""')[-1]  # the same page


def test_the_dashboard_never_imports_torch():
    """Every view drawn in a fresh interpreter: the dashboard, like the analytic half, runs without torch."""
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_dashboard_app as t\n"
              "for v in ('crossovers', 'capacity', 'roofline', 'compare', 'calibration', 'accuracy'):\n"
              "    t.ok(t.app(view=v))\n"
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_measured_steps_beside_the_curves():
    """The step-time and capacity views draw the committed H100 measurements of the model and schemes shown as
    points (kind 'measured', with the error for the tooltip) and say in a caption what they are; a GPU with no
    measurements says so."""
    at = ok(app(view="crossovers", hw="h100_sxm", model="llama-3.1-8b", schemes="fp16,kivi-2b", batch="16",
                ctx="1k-128k"))
    pts = charts(at)[0][1]["table"].query("kind == 'measured'")
    assert sorted(pts["context"].unique()) == [1024, 4096, 16384, 65536], pts  # fp16 at 64k: past its wall
    assert set(pts["label"]) == {"fp16", "kivi-2b"} and pts["error_pct"].abs().max() < 15, pts
    caption = next(c.value for c in at.caption if c.value.startswith("●"))
    assert "h100_sxm: 7 on NVIDIA H100 80GB HBM3 (torch engine, 2 of 32 layers)" in caption, caption
    at = ok(app(view="capacity", hw="a100_80gb", model="llama-3.1-8b", schemes="fp16", batch="16"))
    assert not len(charts(at)[0][1]["table"].query("kind == 'measured'"))
    assert any(c.value.startswith("●: no measured step of llama-3.1-8b") for c in at.caption)

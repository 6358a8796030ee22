"""The torch engine against the analytic model: identities, quantization error, bytes, ops."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from xqsim import loading, schemes, specs  # noqa: E402
from xqsim.capacity import memory  # noqa: E402
from xqsim.engine.model import Engine, Recorder  # noqa: E402
from xqsim.engine.quant import calibrate, dequantize, pack, quantize, unpack  # noqa: E402

STEPS = 20


@pytest.fixture(scope="module", params=["tiny", "tiny-gqa"])
def setup(request):
    m = loading.load_model(request.param)
    base = Engine(m, specs.SchemeConfig(scheme="fp16"), store_dtype=torch.float32, seed=1)
    tokens = torch.randint(0, m.vocab_size, (3, STEPS), generator=torch.Generator().manual_seed(2))
    return m, base, tokens, decode(base, tokens)


def decode(engine: Engine, tokens, rec=None):
    cache = engine.new_cache()
    return torch.stack([engine.step(tokens[:, t], cache, rec) for t in range(tokens.shape[1])], 1), cache


@pytest.mark.parametrize("scheme,kw", [
    ("kivi", {}), ("xquant", {}), ("xquant", {"strategy": "absorb_v"}), ("xquant_cl", {}),
    ("xquant_cl", {"first_layers": 2, "strategy": "absorb_v"}), ("xquant_gqa", {}),
    ("xquant_gqa", {"strategy": "absorb_v", "keep_first_channel": True}), ("xquant_cl_gqa", {}),
    ("xquant_yang", {}),
])
def test_unquantized_schemes_give_fp16_logits(setup, scheme, kw):
    m, base, tokens, (ref, _) = setup
    e = Engine(m, specs.SchemeConfig(scheme=scheme, bits=16, **kw), store_dtype=torch.float32, weights=base.w)
    out, _ = decode(e, tokens)
    err = (out - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"{scheme} {kw}: max |logit diff| {err:.2e} over {STEPS} steps"


def test_absorb_v_equals_remat_when_quantized(setup):
    m, base, tokens, _ = setup
    outs = [decode(Engine(m, specs.SchemeConfig(scheme="xquant", bits=3, group=16, strategy=st),
                          weights=base.w), tokens)[0] for st in ("remat", "absorb_v")]
    err = (outs[0] - outs[1]).abs().max().item()
    assert err < 1e-4 * outs[0].abs().max().item(), f"absorb_v vs remat at 3 bits: {err:.2e}"


@pytest.mark.parametrize("scheme,kw", [
    ("kivi", {"group": 16, "residual": 16}), ("xquant", {"group": 16}), ("xquant_cl", {"group": 16}),
    ("xquant_gqa", {"group": 16, "residual": 16}), ("xquant_cl_gqa", {"group": 16}),
])
def test_error_falls_as_bits_rise(setup, scheme, kw):
    m, base, tokens, (ref, _) = setup
    errs = []
    for b in (2, 3, 4, 8):
        out, _ = decode(Engine(m, specs.SchemeConfig(scheme=scheme, bits=b, **kw), weights=base.w), tokens)
        errs.append((out - ref).abs().mean().item())
    falling = all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert falling, f"{scheme}: mean |logit error| at 2/3/4/8 bits {errs}"


def test_yang_error_falls_as_bits_rise(setup):
    m, base, tokens, (ref, _) = setup
    errs = []
    for b in (1, 2, 4, 8):
        c = specs.SchemeConfig(scheme="xquant_yang", bits=b, v_bits=b, first_bits=b, group=16, residual=16)
        out, _ = decode(Engine(m, c, weights=base.w), tokens)
        errs.append((out - ref).abs().mean().item())
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), f"xquant_yang at K=V=1/2/4/8 bits: {errs}"


def test_quantizer_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 13.0]])  # groups of 4: [0..3], [10, 10, 13]
    codes, scale, zero = quantize(x, 2, 4)
    assert scale.tolist() == [[1.0, 1.0]] and zero.tolist() == [[0.0, 10.0]]
    assert codes.tolist() == [[0, 1, 2, 3, 0, 0, 3]]
    assert torch.equal(dequantize(codes, scale, zero, 4), x)
    # 7 codes at 2 bits -> 2 bytes, little-endian within a byte: 0 | 1<<2 | 2<<4 | 3<<6 = 228; 0|0|3<<4 = 48
    assert pack(codes, 2).tolist() == [[228, 48]]
    for b in (1, 2, 3, 4, 8):
        c = torch.randint(0, 2**b, (5, 37), dtype=torch.uint8)
        p = pack(c, b)
        assert p.shape[-1] == -(-37 * b // 8) and torch.equal(unpack(p, b, 37), c)


def test_yang_calibration_by_hand():
    # Yang et al.: z' = z + eta*s*(2^B - 1), s' = (1 - 2 eta) s; range [0, 3] at 1 bit: s = 3, z = 0
    s, z = calibrate(torch.tensor([3.0]), torch.tensor([0.0]), 1, 1 / 6)
    assert s.item() == pytest.approx(2.0) and z.item() == pytest.approx(0.5)  # levels 0.5 and 2.5
    s, z = calibrate(torch.tensor([1.0]), torch.tensor([-1.0]), 2, 0.045)
    assert s.item() == pytest.approx(0.91) and z.item() == pytest.approx(-1 + 0.135)
    codes, scale, zero = quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 1, 4, eta=1 / 6)
    assert dequantize(codes, scale, zero, 4).tolist() == [[0.5, 0.5, 2.5, 2.5]]


def test_yang_shared_layer_reuses_codes_keeps_own_scale(tiny):
    c = specs.SchemeConfig(scheme="xquant_yang", bits=2, group=16, residual=16)
    e = Engine(tiny, c, seed=3)
    tokens = torch.randint(0, tiny.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    _, cache = decode(e, tokens)
    k0, k1 = cache[0]["k"], cache[1]["k"]  # tiny: layer 1 shares layer 0's codes
    assert k1.t.shared and k1._codes.buf is None and k1.below is k0 and k1.n_quantized == k0.n_quantized == 32
    assert torch.equal(k1.codes, k0.codes) and k1.nbytes() < k0.nbytes()
    assert not torch.equal(k1.scale, k0.scale)


@pytest.mark.parametrize("scheme,kw", [
    ("fp16", {}), ("kivi", {"bits": 2, "group": 16, "residual": 32}), ("kivi", {"bits": 3, "group": 8, "residual": 8}),
    ("xquant", {"bits": 3, "group": 48}), ("xquant", {"bits": 4, "group": 16, "residual": 5}),
    ("xquant_cl", {"bits": 2, "group": 32}), ("xquant_gqa", {"bits": 3, "group": 16, "residual": 16, "rank_k": 5,
                                                              "rank_v": 7, "keep_first_channel": True}),
    ("xquant_cl_gqa", {"bits": 2, "group": 16}), ("xquant_yang", {"bits": 2, "group": 16, "residual": 16}),
])
def test_cache_bytes_allocated_equal_analytic(tiny_gqa, scheme, kw):
    c = specs.SchemeConfig(scheme=scheme, **kw)
    e = Engine(tiny_gqa, c, seed=5)
    B = 3
    tokens = torch.randint(0, tiny_gqa.vocab_size, (B, 45), generator=torch.Generator().manual_seed(6))
    cache = e.new_cache()
    for t in range(45):
        e.step(tokens[:, t], cache)
        if t + 1 in (1, 7, 16, 17, 31, 32, 33, 45):
            analytic = int(memory(tiny_gqa, c.resolved(tiny_gqa), B, np.array([t + 1]))["cache_bytes"][0])
            assert Engine.cache_bytes(cache) == analytic, f"{c.label} at T={t + 1}"


@pytest.mark.parametrize("scheme,kw", [
    ("fp16", {}), ("kivi", {"bits": 2, "group": 8, "residual": 8}), ("xquant", {"bits": 2}),
    ("xquant", {"bits": 2, "strategy": "absorb_v", "residual": 4}), ("xquant_cl", {"bits": 3}),
    ("xquant_gqa", {"bits": 2, "group": 8, "residual": 8, "keep_first_channel": True}),
    ("xquant_gqa", {"bits": 2, "group": 8, "residual": 8, "strategy": "absorb_v"}),
    ("xquant_cl_gqa", {"bits": 2, "strategy": "absorb_v"}), ("xquant_yang", {"bits": 2, "group": 8, "residual": 8}),
])
def test_engine_ops_equal_analytic_ops(tiny_gqa, scheme, kw):
    """The same ops (names and classes, each as often as the analytic layer counts say) and the same FLOPs,
    the engine's taken from the shapes it computed on. Per-channel quantization happens R tokens at a time
    (the analytic model amortizes it), so FLOPs are compared summed over a window of R steps."""
    c = specs.SchemeConfig(scheme=scheme, **kw).resolved(tiny_gqa)
    e = Engine(tiny_gqa, c, seed=7)
    B, R = 2, max(c.residual or 0, 1)
    tokens = torch.randint(0, tiny_gqa.vocab_size, (B, 24 + R), generator=torch.Generator().manual_seed(8))
    cache = e.new_cache()
    for t in range(24):
        e.step(tokens[:, t], cache)
    eng, ana = {}, {}
    for t in range(24, 24 + R):
        rec = Recorder()
        e.step(tokens[:, t], cache, rec)
        ops = schemes.step_ops(tiny_gqa, c, np.int64(B), np.int64(t + 1))
        expanded = [(op.name, op.cls) for op in ops for _ in range(op.layers)]
        assert sorted(expanded) == sorted((n, k) for n, k, _ in rec.ops), f"{c.label}: op names differ"
        for n, _, f in rec.ops:
            eng[n] = eng.get(n, 0) + f
        for op in ops:
            ana[op.name] = ana.get(op.name, 0) + float(op.flops) * op.layers
    for name in ana:
        assert eng[name] == pytest.approx(ana[name], rel=1e-12), f"{c.label} {name}: engine {eng[name]} vs {ana[name]}"


def run_cli(monkeypatch, *args):
    import sys

    from xqsim.cli import main
    monkeypatch.setattr(sys, "argv", ["xqsim", *args])
    main()


def test_measure_json_reports_allocated_bytes(monkeypatch, capsys):
    import json

    run_cli(monkeypatch, "measure", "--model", "tiny", "--scheme", "kivi", "--bits", "2", "--batch", "2",
            "--context", "300", "--repeats", "3", "--warmup", "1", "--json")
    r = json.loads(capsys.readouterr().out)
    m = loading.load_model("tiny")
    c = specs.SchemeConfig(scheme="kivi", bits=2).resolved(m)
    assert r["status"] == "ok" and r["device"]["device_name"] == "cpu" and r["step_time_s"] > 0
    assert r["cache_bytes_allocated"] == int(memory(m, c, 2, np.array([300]))["cache_bytes"][0])


@pytest.mark.parametrize("args,fragment", [
    (["--model", "tiny", "--scheme", "kivii"], "did you mean 'kivi'"),
    (["--model", "tiny", "--scheme", "kivi", "--device", "cuda"], "torch sees no CUDA device"),
    (["--model", "tiny", "--scheme", "kivi", "--dtype", "bf16"], "bf16 on cpu is not supported"),
    (["--model", "tiny", "--scheme", "kivi", "--bits", "5"], "bits=5 is not supported by kivi"),
    (["--model", "llama-3.1-70b", "--scheme", "fp16", "--batch", "64", "--context", "1M"], "GB free; use --layers"),
])
def test_measure_bad_input(monkeypatch, capsys, args, fragment):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "measure", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_measure_interrupted_keeps_rows(monkeypatch, tmp_path, capsys):
    import json

    from xqsim.engine import measure as m
    real, calls = m.measure_one, []

    def flaky(*a, **k):  # the third configuration is interrupted with Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(m, "measure_one", flaky)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmodels: [tiny]\nschemes: [{scheme: fp16}, {scheme: xquant, bits: 2}]\n"
                    "batch: [1]\ncontext: [64, 128]\nrepeats: 2\nwarmup: 0\ndtype: fp32\n")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "measure", "--grid", str(grid), "-o", str(tmp_path / "out"))
    assert e.value.code == 130 and "2 rows kept" in capsys.readouterr().err
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    # every scheme at the smaller context before the larger one: the cut keeps both schemes at 64 tokens
    assert [(r["label"], r["context"], r["status"]) for r in rows] == [("fp16", 64, "ok"), ("xquant-2b", 64, "ok")]


def test_measure_keeps_going_past_a_failing_configuration(monkeypatch, tmp_path, capsys):
    """A configuration that fails in the engine (a kernel that does not compile, a launch error) becomes a row with
    status 'error' and its message; the grid goes on, and the file reads back (calibrate skips the row)."""
    import json

    from xqsim import measurements
    from xqsim.engine import measure as m
    real = m.measure_one

    def broken(spec, cfg, *a, **k):
        if cfg.scheme == "xquant":
            raise RuntimeError("triton compile failed: out of resources\nsecond line")
        return real(spec, cfg, *a, **k)

    monkeypatch.setattr(m, "measure_one", broken)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmodels: [tiny]\nschemes: [{scheme: xquant, bits: 2}, {scheme: fp16}]\n"
                    "batch: [1]\ncontext: [64]\nrepeats: 2\nwarmup: 0\ndtype: fp32\n")
    run_cli(monkeypatch, "measure", "--grid", str(grid), "-o", str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "error (RuntimeError: triton compile failed: out of resources)" in out, out
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["label"], r["status"]) for r in rows] == [("xquant-2b", "error"), ("fp16", "ok")], rows
    assert rows[0]["error"] == "RuntimeError: triton compile failed: out of resources"
    _, ok = measurements.read_measurements([tmp_path / "out.json"])
    assert [r["label"] for r in ok] == ["fp16"]


def test_measure_interrupted_while_writing_keeps_both_files_equal(monkeypatch, tmp_path, capsys):
    """Ctrl-C while the CSV of the second row is written: both files keep the first row (the CSV held no rows in 7 of
    34 trials while the JSON held them), no temporary file is left, and the message counts exactly."""
    import json

    import pandas as pd

    real, calls = pd.DataFrame.to_csv, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", flaky)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmodels: [tiny]\nschemes: [{scheme: fp16}]\nbatch: [1]\ncontext: [64, 128, 256]\n"
                    "repeats: 2\nwarmup: 0\ndtype: fp32\n")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "measure", "--grid", str(grid), "-o", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted; 1 rows kept" in err, err
    assert len(json.loads((tmp_path / "out.json").read_text())["rows"]) == 1
    assert len(pd.read_csv(tmp_path / "out.csv")) == 1
    assert not list(tmp_path.glob(".*partial")), list(tmp_path.iterdir())


def test_measure_survives_ctrl_c_at_random_moments(tmp_path):
    """`xqsim measure` in its own process (the console script's entry), SIGINT at two random moments of its run
    (loading, measuring, writing or shutting down): it exits 0 with every row or 130 with one line, never a
    traceback; the JSON and the CSV hold the same rows, as many as the line says; no temporary file is left."""
    import json
    import random
    import re
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmodels: [tiny]\nschemes: [{scheme: fp16}, {scheme: kivi, bits: 2, group: 8, residual: 8}]"
                    "\nbatch: [1, 2]\ncontext: [64, 256, 1024]\nrepeats: 10\nwarmup: 0\ndtype: fp32\n")
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        delay = rng.uniform(0.0, 3.0)
        # the clock starts once the entry point is imported, as the console script's first line does (a Ctrl-C inside
        # Python's own startup, or while it reads entry.py's two imports, is Python's: seed 674776 drew 0.00 s)
        code = "from xqsim.entry import main; print('started', flush=True); main()"
        p = subprocess.Popen([sys.executable, "-c", code, "measure", "--grid", str(grid), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "started\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        what = f"seed {seed}, SIGINT {delay:.2f} s in: exit {p.returncode}, stderr {err!r}"
        assert p.returncode in (0, 130) and "Traceback" not in err, what
        rows = len(json.loads(out.with_suffix(".json").read_text())["rows"]) if out.with_suffix(".json").exists() else 0
        csv_rows = len(pd.read_csv(out.with_suffix(".csv"))) if out.with_suffix(".csv").exists() else 0
        assert rows == csv_rows, what + f"; {rows} rows in the JSON, {csv_rows} in the CSV"
        assert not list(tmp_path.glob(".*partial")), what
        if p.returncode == 0:
            assert rows == 12 and err == "", what
        else:
            assert len(err.strip().splitlines()) == 1 and err.startswith("xqsim: interrupted"), what
            kept = re.search(r"(\d+) rows kept", err)
            assert (int(kept.group(1)) if kept else 0) == rows, what


@pytest.mark.parametrize("scheme,kw", [
    ("kivi", {"bits": 3, "group": 8, "residual": 8}), ("xquant", {"bits": 3, "group": 16}),
    ("xquant", {"bits": 3, "group": 16, "strategy": "absorb_v"}), ("xquant_cl", {"bits": 3, "group": 16}),
    ("xquant_gqa", {"bits": 3, "group": 8, "residual": 8, "strategy": "absorb_v"}),
    ("xquant_cl_gqa", {"bits": 3, "group": 16}), ("xquant_yang", {"bits": 2, "group": 8, "residual": 8}),
])
def test_fused_tiles_equal_unfused(setup, scheme, kw):
    """Fused (tiles of 7 tokens, online softmax) decodes the same logits as unfused, with the same FLOPs."""
    m, base, tokens, _ = setup
    outs, flops = [], []
    for fused in (False, True):
        rec = Recorder()
        e = Engine(m, specs.SchemeConfig(scheme=scheme, fused=fused, **kw), weights=base.w, tile=7)
        outs.append(decode(e, tokens, rec)[0])
        flops.append(sum(f for _, _, f in rec.ops))
    err = (outs[0] - outs[1]).abs().max().item()
    assert err < 1e-4 * outs[0].abs().max().item(), f"{scheme} fused vs unfused: {err:.2e}"
    assert flops[0] == pytest.approx(flops[1], rel=1e-12)


def test_fused_ops_equal_analytic_flops(tiny_gqa):
    c = specs.SchemeConfig(scheme="xquant_gqa", bits=2, group=8, residual=8, fused=True).resolved(tiny_gqa)
    e = Engine(tiny_gqa, c, seed=7, tile=5)
    tokens = torch.randint(0, tiny_gqa.vocab_size, (2, 40), generator=torch.Generator().manual_seed(8))
    cache = e.new_cache()
    for t in range(32):
        e.step(tokens[:, t], cache)
    eng, ana = {}, {}
    for t in range(32, 40):  # one window of R = 8 steps
        rec = Recorder()
        e.step(tokens[:, t], cache, rec)
        for n, _, f in rec.ops:
            eng[n] = eng.get(n, 0) + f
        for op in schemes.step_ops(tiny_gqa, c, np.int64(2), np.int64(t + 1)):
            ana[op.name] = ana.get(op.name, 0) + float(op.flops) * op.layers
    assert eng.keys() == ana.keys()
    for name in ana:
        assert eng[name] == pytest.approx(ana[name], rel=1e-12), name


@pytest.mark.parametrize("scheme,kw", [
    ("fp16", {}), ("kivi", {"bits": 16}), ("xquant", {"bits": 16}), ("xquant_cl", {"bits": 16, "first_layers": 1}),
    ("xquant_gqa", {"bits": 16, "keep_first_channel": True}), ("xquant_cl_gqa", {"bits": 16}),
])
def test_prefill_then_decode_equals_decoding_from_scratch(setup, scheme, kw):
    """Unquantized, a prompt run in one pass leaves the cache that token-by-token decoding leaves."""
    m, base, tokens, (ref, _) = setup
    e = Engine(m, specs.SchemeConfig(scheme=scheme, **kw), store_dtype=torch.float32, weights=base.w)
    cache = e.new_cache()
    last = e.prefill(tokens[:, :12], cache)
    assert all(st.tokens == 12 for layer in cache for st in layer.values())
    out = torch.stack([last] + [e.step(tokens[:, t], cache) for t in range(12, STEPS)], 1)
    err = (out - ref[:, 11:]).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"{scheme}: {err:.2e}"


def test_prefill_fills_the_quantized_cache_exactly(tiny):
    c = specs.SchemeConfig(scheme="xquant_cl", bits=2, group=16, residual=8)
    e = Engine(tiny, c, seed=1)
    cache = e.new_cache()
    e.prefill(torch.randint(0, tiny.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0)), cache)
    assert Engine.cache_bytes(cache) == int(memory(tiny, c.resolved(tiny), 3, np.array([50]))["cache_bytes"][0])


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "field 'repeats': 0 is not allowed; at least 1"),
    (["--warmup", "-1"], "field 'warmup': -1 is not allowed; at least 0"),
    (["--layers", "0"], "field 'layers': 0 is not allowed; at least 1"),  # it ran the full model
    (["--layers", "-1"], "field 'layers': -1 is not allowed; at least 1"),  # it recorded negative bytes
    (["--device", "tpu"], "field 'device': 'tpu' is not allowed; allowed: cpu, cuda, cuda:N"),
])
def test_measure_options_out_of_range(monkeypatch, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "measure", "--model", "tiny", "--scheme", "fp16", "--context", "64", "--json", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"xqsim: error: command line: {message}", err


def test_kernels_are_given_to_the_op_whose_range_they_ran_in():
    """attribute(): device records (kernels, copies; Triton's among them, which the profiler ties to no op) go to
    the op range holding their midpoint, the innermost where ranges nest; an op that ran none counts 0; the total
    counts every device record once."""
    from types import SimpleNamespace as NS

    from xqsim.engine.measure import attribute

    def ev(name, t0, t1, dev="cpu"):
        return NS(name=name, device_type=dev, time_range=NS(start=t0, end=t1))

    events = [ev("xq:attention", 0, 100), ev("xq:dequant_k", 100, 101), ev("xq:lm_head", 110, 200),
              ev("xq:inner", 150, 160), ev("aten::mm", 111, 112),
              ev("_split_kernel", 10, 60, "cuda"), ev("_merge_kernel", 61, 95, "cuda"),  # Triton's, in attention
              ev("gemv", 120, 149, "cuda"), ev("copy", 152, 158, "cuda"),  # lm_head's; the nested range's
              ev("xq:attention", 300, 400), ev("_split_kernel", 310, 390, "cuda"),  # a second step
              ev("stray", 250, 260, "cuda")]  # between ranges: in the total only
    ops, total = attribute(events, "cpu")
    assert ops == {"attention": [50 + 34 + 80, 3], "dequant_k": [0.0, 0], "lm_head": [29, 1], "inner": [6, 1]}, ops
    assert total == [50 + 34 + 29 + 6 + 80 + 10, 6], total

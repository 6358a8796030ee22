"""The `xqsim` command line, driven in-process: estimate, sweep, hw/models list and one-line user errors."""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xqsim import loading, specs
from xqsim.cli import main

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny_scenario.yaml"
ROOT = Path(__file__).resolve().parent.parent


def run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["xqsim", *map(str, args)])
    main()


def fails(monkeypatch, capsys, *args: str) -> str:
    """Run the CLI expecting a user error: exit code 2, one line on stderr, no traceback; return that line."""
    with pytest.raises(SystemExit) as exc:
        run(monkeypatch, *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xqsim: error: ")
    return lines[0]


def estimate_json(monkeypatch, capsys, *args: str) -> dict:
    run(monkeypatch, "estimate", *args, "--json")
    return json.loads(capsys.readouterr().out)


def scenario_with(tmp_path: Path, old: str, new: str, name: str = "bad.yaml") -> Path:
    """tiny_scenario.yaml with one piece of text replaced, written to tmp_path."""
    text = TINY.read_text()
    assert old in text, old
    p = tmp_path / name
    p.write_text(text.replace(old, new, 1))
    return p


# ----------------------------------------------------------------------------- estimate


JSON_KEYS = ["hardware", "model", "scheme", "bits", "batch", "context", "weights_bytes", "cache_bytes",
             "cache_metadata_bytes", "transient_bytes", "total_bytes", "fits", "max_context", "max_batch", "flops",
             "bytes_moved", "step_time_s", "tokens_per_s", "bound", "ops"]


def test_estimate_json_keys_and_context_suffix(monkeypatch, capsys):
    r = estimate_json(monkeypatch, capsys, "--hardware", "h100_sxm", "--model", "tiny", "--scheme", "kivi",
                      "--bits", "2", "--batch", "8", "--context", "32k")
    assert [k for k in JSON_KEYS if k not in r] == []
    assert (r["hardware"], r["model"], r["scheme"], r["bits"]) == ("h100_sxm", "tiny", "kivi", 2)
    assert (r["batch"], r["context"]) == (8, 32768)
    assert r["fits"] is True and r["bound"] in ("memory", "compute", "overhead")
    assert r["total_bytes"] >= r["weights_bytes"] + r["cache_bytes"] > r["weights_bytes"] > 0
    assert r["cache_metadata_bytes"] > 0  # 2-bit KIVI stores scales and zeros
    assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(8 / r["step_time_s"])
    assert r["max_context"] >= 32768 and r["max_batch"] >= 8
    assert isinstance(r["ops"], list) and r["ops"] and {"name", "flops", "bound"} <= set(r["ops"][0])


def test_estimate_context_1m_and_fp16_default_bits(monkeypatch, capsys):
    r = estimate_json(monkeypatch, capsys, "--hardware", "h100_sxm", "--model", "tiny", "--scheme", "fp16",
                      "--context", "1M")
    assert (r["context"], r["bits"], r["cache_metadata_bytes"]) == (1048576, 16, 0)


def test_estimate_table_output(monkeypatch, capsys):
    run(monkeypatch, "estimate", "--hardware", "h100_sxm", "--model", "tiny-gqa", "--scheme", "xquant_gqa")
    out = capsys.readouterr().out
    assert "xquant_gqa-4b" in out and "tiny-gqa" in out and "tokens/s" in out and "max context" in out


def test_estimate_user_model_file(monkeypatch, capsys, tmp_path):
    spec = yaml.safe_load((ROOT / "models" / "tiny.yaml").read_text())
    spec.update(name="my-model", n_layers=4)
    path = tmp_path / "my-model.yaml"
    path.write_text(yaml.safe_dump(spec))
    mine = estimate_json(monkeypatch, capsys, "--hardware", "h100_sxm", "--model", str(path), "--scheme", "fp16")
    shipped = estimate_json(monkeypatch, capsys, "--hardware", "h100_sxm", "--model", "tiny", "--scheme", "fp16")
    assert mine["model"] == "my-model"
    assert mine["cache_bytes"] == 2 * shipped["cache_bytes"]  # twice the layers, twice the KV cache


def test_estimate_user_hardware_file_missing_source(monkeypatch, capsys, tmp_path):
    spec = yaml.safe_load((ROOT / "hardware" / "h100_sxm.yaml").read_text())
    del spec["mem_bytes_per_s"]["source"]
    path = tmp_path / "my_gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    line = fails(monkeypatch, capsys, "estimate", "--hardware", path, "--model", "tiny", "--scheme", "fp16")
    assert str(path) in line and "field 'mem_bytes_per_s.source'" in line and "required but missing" in line


@pytest.mark.parametrize("args, fragments", [
    (["--hardware", "h100"], ["field 'hardware'", "unknown hardware 'h100'", "did you mean 'h100_sxm'",
                              "known: a100_80gb, b200"]),
    (["--model", "tiny-gq"], ["field 'model'", "unknown model 'tiny-gq'", "did you mean 'tiny-gqa'", "llama-2-7b"]),
    (["--scheme", "xquant_gq"], ["field 'scheme'", "'xquant_gq' is not allowed", "did you mean 'xquant_gqa'",
                                 "'xquant_yang'"]),
    (["--scheme", "kivi", "--bits", "5"], ["field 'bits'", "bits=5 is not supported by kivi",
                                           "allowed: [2, 3, 4, 8, 16]"]),
    (["--scheme", "fp16", "--bits", "4"], ["field 'bits'", "bits=4 is not supported by fp16", "allowed: [16]"]),
    (["--scheme", "kivi", "--group", "32", "--residual", "48"], ["field 'residual'", "multiple of 32"]),
    (["--scheme", "xquant", "--strategy", "absorb"], ["field 'strategy'", "did you mean 'absorb_v'", "'remat'"]),
    (["--context", "abc"], ["field 'context'", "positive integer like 16, 32k or 1M", "'abc'"]),
    (["--context", "-5"], ["field 'context'", "positive integer", "'-5'"]),
    (["--batch", "0"], ["field 'batch'", "positive integer", "'0'"]),
    (["--scheme", "kivi", "--group", "0"], ["field 'group'", "greater than 0", "(got 0)"]),
    (["--model", "tiny-gqa", "--scheme", "xquant_gqa", "--rank-k", "999"], ["field 'rank_k'", "rank_k=999",
                                                                            "min(d_model, dkv)=32"]),
    (["--hardware", "nowhere.yaml"], ["field 'hardware'", "nowhere.yaml: file not found"]),
])
def test_estimate_bad_options(monkeypatch, capsys, args, fragments):
    opts = {"--hardware": "h100_sxm", "--model": "tiny", "--scheme": "fp16"}
    extra = []
    for i in range(0, len(args), 2):
        if args[i] in opts:
            opts[args[i]] = args[i + 1]
        else:
            extra += args[i:i + 2]
    line = fails(monkeypatch, capsys, "estimate", *[x for kv in opts.items() for x in kv], *extra)
    assert line.startswith("xqsim: error: command line: ")
    for f in fragments:
        assert f in line, (f, line)


def test_missing_and_malformed_options_are_one_line(monkeypatch, capsys):
    line = fails(monkeypatch, capsys, "estimate", "--hardware", "h100_sxm", "--model", "tiny")
    assert "--scheme" in line and "Missing" in line
    line = fails(monkeypatch, capsys, "estimate", "--hardware", "h100_sxm", "--model", "tiny", "--scheme", "kivi",
                 "--bits", "two")
    assert "--bits" in line and "integer" in line


# ----------------------------------------------------------------------------- listing


def test_hw_list(monkeypatch, capsys):
    run(monkeypatch, "hw", "list")
    out = capsys.readouterr().out
    names = sorted(p.stem for p in (ROOT / "hardware").glob("*.yaml"))
    assert len(names) >= 8
    for n in names:
        assert n in out
    assert "NVIDIA H100 SXM5 80GB" in out and "3.35 TB/s" in out and "989 TFLOP/s" in out


def test_models_list(monkeypatch, capsys):
    run(monkeypatch, "models", "list")
    out = capsys.readouterr().out
    names = sorted(p.stem for p in (ROOT / "models").glob("*.yaml"))
    assert "llama-3.1-8b" in names and "tiny" in names
    for n in names:
        assert n in out
    assert "Llama-3.1-8B" in out and "14336" in out and "128256" in out


# ----------------------------------------------------------------------------- bad scenarios


@pytest.mark.parametrize("old, new, fragments", [
    ("batch:", "batchs:", ["field 'batchs'", "unknown key", "did you mean 'batch'", "allowed: name,"]),
    ("batch: [1, 8, 64]", 'batch: "many"', ["field 'batch.0'", "valid integer", "(got 'many')"]),
    ("batch: [1, 8, 64]", "batch: 0", ["field 'batch.0'", "greater than 0", "(got 0)"]),
    ("batch: [1, 8, 64]", "batch: [1, -8]", ["field 'batch.1'", "greater than 0", "(got -8)"]),
    ("context: {start: 16, stop: 64k, num: 12}", "context: [16, -5]",
     ["field 'context.1'", "greater than 0", "(got -5)"]),
    ("start: 16", "start: -16", ["field 'context.start'", "greater than 0", "(got -16)"]),
    ("num: 12}", "num: 12, lg: true}", ["field 'context.lg'", "unknown key", "did you mean 'log'",
                                        "allowed: start, stop, num, log"]),
    ("start: 16, stop: 64k", "start: 64k, stop: 16", ["field 'context'", "stop (16) must be >= start (65536)"]),
    ("[h100_sxm, rtx_4090]", "[h100_sxm, h100]", ["field 'hardware.1'", "unknown hardware 'h100'",
                                                  "did you mean 'h100_sxm'", "known: a100_80gb"]),
    ("[tiny, tiny-gqa]", "[tiny, tiny-gq]", ["field 'models.1'", "unknown model 'tiny-gq'",
                                             "did you mean 'tiny-gqa'"]),
    ("[tiny, tiny-gqa]", "[tiny, nowhere.yaml]", ["field 'models.1'", "nowhere.yaml: file not found"]),
    ("scheme: xquant_gqa,", "scheme: xquant_gq,", ["field 'schemes.3.scheme'", "'xquant_gq' is not allowed",
                                                   "did you mean 'xquant_gqa'", "'fp16', 'kivi'"]),
    ("{scheme: fp16}", "{scheme: fp16, bitz: 16}", ["field 'schemes.0.bitz'", "unknown key", "did you mean 'bits'",
                                                    "allowed: scheme, bits"]),
    ("kivi, bits: [2, 4]", "kivi, bits: [2, 5]", ["field 'schemes.1.bits'", "bits=5 is not supported by kivi",
                                                  "allowed: [2, 3, 4, 8, 16]"]),
    ("{scheme: fp16}", "{scheme: fp16, bits: 4}", ["field 'schemes.0.bits'", "bits=4 is not supported by fp16",
                                                   "allowed: [16]"]),
    ("group: 16, residual: 32", "group: 16, residual: 24", ["field 'schemes.1.residual'", "residual=24",
                                                            "positive multiple of 16"]),
    ("strategy: [remat, absorb_v]", "strategy: [remat, absorb]", ["field 'schemes.2.strategy.1'",
                                                                  "did you mean 'absorb_v'"]),
    ("name: tiny_test", "name: tiny test", ["field 'name'", "should match pattern"]),
    ("models: [tiny, tiny-gqa]\n", "", ["field 'models'", "required but missing"]),
    ("batch: [1, 8, 64]", "batch: [1, 8, 64\n", ["is not valid YAML", "line "]),
])
def test_sweep_bad_scenario(monkeypatch, capsys, tmp_path, old, new, fragments):
    path = scenario_with(tmp_path, old, new)
    out = tmp_path / "out"
    line = fails(monkeypatch, capsys, "sweep", path, "-o", out)
    assert line.startswith(f"xqsim: error: {path}")
    for f in fragments:
        assert f in line, (f, line)
    assert not out.exists()  # nothing written for a bad scenario


def test_sweep_missing_and_empty_scenario(monkeypatch, capsys, tmp_path):
    line = fails(monkeypatch, capsys, "sweep", tmp_path / "nope.yaml", "-o", tmp_path / "out")
    assert line == f"xqsim: error: {tmp_path / 'nope.yaml'}: file not found"
    (tmp_path / "empty.yaml").write_text("")
    line = fails(monkeypatch, capsys, "sweep", tmp_path / "empty.yaml", "-o", tmp_path / "out")
    assert str(tmp_path / "empty.yaml") in line and "empty file" in line


def test_sweep_user_hardware_file_relative_to_scenario(monkeypatch, capsys, tmp_path):
    spec = yaml.safe_load((ROOT / "hardware" / "h100_sxm.yaml").read_text())
    spec["memory_bytes"] = {"value": 1, "sorce": "typo"}
    (tmp_path / "my_gpu.yaml").write_text(yaml.safe_dump(spec))
    scenario_with(tmp_path, "[h100_sxm, rtx_4090]", "[h100_sxm, my_gpu.yaml]")
    line = fails(monkeypatch, capsys, "sweep", tmp_path / "bad.yaml", "-o", tmp_path / "out")
    assert str(tmp_path / "my_gpu.yaml") in line and "field 'memory_bytes.sorce'" in line
    assert "did you mean 'source'" in line and "allowed: value, source" in line


# ----------------------------------------------------------------------------- a real sweep


PLOTS = ["step_time_vs_context", "memory_vs_context", "roofline", "throughput_cap_vs_context"]
FILES = (["results.parquet", "results.csv", "crossovers.csv", "memory_walls.csv", "inputs.json", "scenario.yaml"]
         + [f"{p}.{ext}" for p in PLOTS for ext in ("png", "svg")])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        run(mp, "sweep", TINY, "-o", out)  # returns normally: no SystemExit
    return out


def test_sweep_writes_every_file(swept):
    for name in FILES:
        assert (swept / name).is_file(), name
        assert (swept / name).stat().st_size > 0, name
    assert (swept / "scenario.yaml").read_text() == TINY.read_text()
    inputs = json.loads((swept / "inputs.json").read_text())
    assert inputs["scenario"]["name"] == "tiny_test"
    assert [h["name"] for h in inputs["hardware"]] == ["h100_sxm", "rtx_4090"]
    assert [m["name"] for m in inputs["models"]] == ["tiny", "tiny-gqa"]


def test_sweep_plots_state_the_sweeps_batch_limit(swept):
    """The plots are drawn from the rows kept at the plotted batch and the smallest, yet the throughput cap's
    title states the sweep's own limit (its largest batch, 64), not the largest batch kept (8)."""
    svg = (swept / "throughput_cap_vs_context.svg").read_text()
    assert "up to 64" in svg and "up to 8;" not in svg


def test_sweep_table(swept):
    df = pd.read_parquet(swept / "results.parquet")
    need = ["hardware", "model", "label", "batch", "context", "cache_bytes", "step_time_s", "bound", "fits",
            "max_context", "throughput_cap_tokens_per_s"]
    assert [c for c in need if c not in df.columns] == []
    sc = loading.load_scenario(TINY)
    configs = sc.scheme_configs()
    assert len(configs) == 11  # fp16 + kivi x2 bits + xquant x2 bits x2 strategies + 4 single entries
    models = [loading.load_model(m) for m in sc.models]
    accepted = 0
    for m in models:
        for c in configs:
            try:
                c.resolved(m)
                accepted += 1
            except specs.UserError:
                pass
    contexts = sc.contexts()
    assert contexts[0] == 16 and contexts[-1] == 65536 and len(contexts) == 12
    assert len(df) == len(sc.hardware) * accepted * len(sc.batch) * len(contexts) == 2 * 22 * 3 * 12
    assert set(df["hardware"]) == {"h100_sxm", "rtx_4090"} and set(df["model"]) == {"tiny", "tiny-gqa"}
    assert sorted(df["batch"].unique()) == [1, 8, 64] and sorted(df["context"].unique()) == contexts
    assert not df.duplicated(["hardware", "model", "label", "batch", "context"]).any()
    assert set(df["bound"].astype(str)) <= {"memory", "compute", "overhead"}
    assert (df["step_time_s"] > 0).all() and (df["cache_bytes"] > 0).all()
    csv = pd.read_csv(swept / "results.csv")
    assert len(csv) == len(df) and list(csv.columns) == list(df.columns)


def test_sweep_refuses_to_overwrite(monkeypatch, capsys, swept):
    before = {n: ((swept / n).read_bytes(), (swept / n).stat().st_mtime_ns) for n in ("results.csv", "roofline.svg")}
    line = fails(monkeypatch, capsys, "sweep", TINY, "-o", swept)
    assert "already exists" in line and "--force" in line and str(swept) in line
    for n, (data, mtime) in before.items():
        assert (swept / n).read_bytes() == data and (swept / n).stat().st_mtime_ns == mtime


def test_sweep_refuses_a_users_file_of_the_same_name(monkeypatch, capsys, tmp_path):
    (tmp_path / "results.csv").write_text("mine\n")
    small = scenario_with(tmp_path, "context: {start: 16, stop: 64k, num: 12}", "context: [16, 32]")
    line = fails(monkeypatch, capsys, "sweep", small, "-o", tmp_path)
    assert f"{tmp_path / 'results.csv'}: already exists" in line
    assert (tmp_path / "results.csv").read_text() == "mine\n"
    assert not (tmp_path / "results.parquet").exists()


def test_sweep_force_overwrites(monkeypatch, capsys, swept, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(swept, out)
    small = scenario_with(tmp_path, "context: {start: 16, stop: 64k, num: 12}", "context: [16, 32]", "small.yaml")
    run(monkeypatch, "sweep", small, "-o", out, "--force", "--no-csv", "--workers", "1")  # returns normally
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["context"].unique()) == [16, 32] and len(df) == 2 * 22 * 3 * 2
    assert (out / "scenario.yaml").read_text() == small.read_text()
    assert not (out / "results.csv").exists()  # the previous sweep's, which no longer matched the table
    assert "no results.csv: pass --csv to write it" in capsys.readouterr().out
    for name in FILES:
        assert name == "results.csv" or (out / name).stat().st_size > 0, name


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    import json

    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_even_for_zero_work_ops(monkeypatch, capsys):
    """KIVI-2 at context 1 quantizes and dequantizes nothing: those ops' intensity is 0/0. --json used to print
    NaN/Infinity; now null, and `non_finite` says which fields and what they were."""
    import sys

    from xqsim.cli import main
    monkeypatch.setattr(sys, "argv", ["xqsim", "estimate", "--hardware", "h100_sxm", "--model", "llama-3.1-8b",
                                      "--scheme", "kivi", "--bits", "2", "--batch", "1", "--context", "1", "--json"])
    main()
    r = _strict(capsys.readouterr().out)
    bad = r["non_finite"]
    assert bad and all(v in ("nan", "inf", "-inf") for v in bad.values()), bad
    for path in bad:  # each named field is null where it stands
        node = r
        for part in path.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node is None, path


def test_to_json_replaces_every_non_finite_number():
    import numpy as np

    from xqsim.loading import to_json
    r = _strict(to_json({"a": float("nan"), "b": [1.0, np.float64("inf"), {"c": -np.inf}], "d": np.int64(3)}))
    assert r == {"a": None, "b": [1.0, None, {"c": None}], "d": 3,
                 "non_finite": {"a": "nan", "b.1": "inf", "b.2.c": "-inf"}}


@pytest.mark.parametrize("value", ["1e30", "inf", "nan", "2**63", "10**30", "2.5", "3000000000", "-1"])
def test_counts_at_the_edges_are_one_line(monkeypatch, capsys, value):
    """Counts that are not whole, not finite or past the stated maximum: exit 2, one line, no traceback (they
    ended in OverflowError tracebacks or were truncated, 2.5 read as 2)."""
    import sys

    from xqsim.cli import main
    monkeypatch.setattr(sys, "argv", ["xqsim", "estimate", "--hardware", "h100_sxm", "--model", "llama-3.1-8b",
                                      "--scheme", "fp16", "--context", value])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("xqsim: error: command line: field 'context': expected a positive integer like 16, 32k "
                          f"or 1M, at most 2,147,483,648 (got '{value}')"), err


def test_step_totals_do_not_wrap(monkeypatch, capsys):
    """XQuant-2 on Llama-3.1-8B at batch 4,096 and 10M tokens: 2.3e19 FLOPs, past int64 (it printed -1.49e19)."""
    import json
    import sys

    from xqsim.cli import main
    monkeypatch.setattr(sys, "argv", ["xqsim", "estimate", "--hardware", "h100_sxm", "--model", "llama-3.1-8b",
                                      "--scheme", "xquant", "--bits", "2", "--batch", "4096", "--context", "10M",
                                      "--json"])
    main()
    r = json.loads(capsys.readouterr().out)
    assert r["flops"] == pytest.approx(2.3096e19, rel=1e-4) and all(op["flops"] >= 0 for op in r["ops"])


def test_cache_totals_do_not_wrap(monkeypatch, capsys):
    """Llama-3.1-70B's fp16 cache at batch 2^20 and 2^31 tokens: 7.4e20 B, past int64 (it printed 0)."""
    r = estimate_json(monkeypatch, capsys, "--hardware", "h100_sxm", "--model", "llama-3.1-70b", "--scheme", "fp16",
                      "--batch", "1M", "--context", str(2**31))
    assert r["cache_bytes"] == 2**20 * 2**31 * 80 * 2 * 1024 * 2 and r["total_bytes"] > r["cache_bytes"]


def test_a_huge_sweep_asks_first(monkeypatch, capsys, tmp_path):
    """Above 2,000,000 configurations a sweep states its size and stops before any work unless --yes (a sweep of
    10^7 took 5.6 GB and wrote a 4.9 GB CSV unasked; streamed, it takes about 0.4 GB and writes no CSV unless
    --csv)."""
    import sys

    from xqsim.cli import main
    sc = tmp_path / "big.yaml"
    sc.write_text("name: big\nhardware: [h100_sxm, h200, a100_80gb, b200]\nmodels: [llama-3.1-8b]\n"
                  "schemes:\n  - {scheme: kivi, bits: [2, 3, 4, 8], fused: [false, true]}\n"
                  "batch: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]\ncontext: [" + ", ".join(
                      str(1024 + i) for i in range(10_000)) + "]\n")
    monkeypatch.setattr(sys, "argv", ["xqsim", "sweep", str(sc), "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert ("3,200,000 configurations: about 0.3 GB of memory and 0.48 GB of files (no results.csv: pass --csv to "
            "write it)") in out.out, out.out
    assert e.value.code == 2 and out.err.strip() == (
        f"xqsim: error: {sc}: 3,200,000 configurations (about 0.3 GB of memory, 0.5 GB of files) is above "
        f"2,000,000; narrow its lists or pass --yes"), out.err
    assert not (tmp_path / "out").exists()


def test_sweep_never_writes_over_its_own_scenario(monkeypatch, capsys, tmp_path):
    """A scenario kept as DIR/scenario.yaml, swept into DIR with --force: refused before any work (it ended in a
    SameFileError traceback after the whole sweep)."""
    import shutil
    import sys

    from xqsim.cli import main
    from xqsim.loading import ROOT
    sc = tmp_path / "scenario.yaml"
    shutil.copyfile(ROOT / "tests" / "data" / "tiny_scenario.yaml", sc)
    before = sc.read_text()
    monkeypatch.setattr(sys, "argv", ["xqsim", "sweep", str(sc), "-o", str(tmp_path), "--force"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == (f"xqsim: error: {sc}: is an input of this sweep; the sweep would "
                                                 f"write over it: choose another -o DIR"), err
    assert sc.read_text() == before and not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("where", ["file", "under_file", "binary_scenario", "latin1_scenario"])
def test_sweep_paths_and_files_that_cannot_be_used(monkeypatch, capsys, tmp_path, where):
    """An output that is a file or under one, a scenario that is binary or not UTF-8: one line, exit 2 (they were
    FileExistsError, NotADirectoryError and UnicodeDecodeError tracebacks)."""
    import sys

    from xqsim.cli import main
    from xqsim.loading import ROOT
    f = tmp_path / "f"
    f.write_text("mine")
    sc, out = ROOT / "tests" / "data" / "tiny_scenario.yaml", tmp_path / "out"
    if where == "file":
        out, expect = f, f"xqsim: error: {f}: is a file, not a folder; choose another -o DIR"
    elif where == "under_file":
        out, expect = f / "sub", f"xqsim: error: {f}: is a file, not a folder; choose another -o DIR ({f / 'sub'} " \
                                 f"would be under it)"
    else:
        sc = tmp_path / "s.yaml"
        sc.write_bytes(b"\x00\x01binary" if where == "binary_scenario" else b"name: caf\xe9\n")
        expect = (f"xqsim: error: {sc}: a binary file, not text (a NUL byte near the start)"
                  if where == "binary_scenario" else f"xqsim: error: {sc}: not UTF-8 text (byte 9: 0xe9)")
    monkeypatch.setattr(sys, "argv", ["xqsim", "sweep", str(sc), "-o", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == expect, err
    assert f.read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["accuracy", "--schemes", "kivi", "--context", "1"], "field 'context': a window needs at least 2 tokens"),
    (["accuracy", "--schemes", "kivi", "--bits", ""], "field 'bits': expected comma-separated integers (got '')"),
    (["accuracy", "--schemes", "kivi", "--jobs", "-5"], "field 'jobs': -5 is not allowed; from 1 to 256"),
    (["accuracy", "--schemes", "kivi", "--tokens", "100", "--context", "512"],
     "field 'context': 512 is more than tokens=100"),
    (["dashboard", "--port", "-1"], "field 'port': -1 is not a TCP port (1 to 65535)"),
])
def test_accuracy_and_dashboard_options_before_any_work(monkeypatch, capsys, tmp_path, args, message):
    """Refused in one line before any work (accuracy --context 1 and --bits '' failed after a minute of work,
    --jobs -5 ran with 1, dashboard --port -1 reached streamlit)."""
    import sys

    from xqsim.cli import main
    monkeypatch.setattr(sys, "argv", ["xqsim", *args, *(["-o", str(tmp_path / "a")] if args[0] == "accuracy" else [])])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"xqsim: error: command line: {message}", err
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- issue 18's acceptance audit

HW_YAML = yaml.safe_load((ROOT / "hardware" / "h100_sxm.yaml").read_text())
MEASURED = ROOT / "measurements" / "h100" / "h100_llama2_7b.json"
MEASURED_ONE = {**json.loads(MEASURED.read_text()), "rows": json.loads(MEASURED.read_text())["rows"][:1]}


def _hw(path: str, value) -> str:
    """h100_sxm.yaml with one dotted field set."""
    d = json.loads(json.dumps(HW_YAML))
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[k]
    node[last] = value
    return yaml.safe_dump(d)


def _scenario(**fields) -> str:
    return yaml.safe_dump({"name": "s", "hardware": ["h100_sxm"], "models": ["tiny"], "schemes": [{"scheme": "fp16"}],
                           "batch": [1], "context": [16]} | fields)


def _grid(**fields) -> str:
    return yaml.safe_dump({"name": "g", "models": ["tiny"], "layers": 1, "schemes": [{"scheme": "fp16"}],
                           "batch": [1], "context": [16], "repeats": 1, "warmup": 0, "dtype": "fp32"} | fields)


E = ["estimate", "--hardware", "h100_sxm", "--model", "tiny", "--scheme"]
S = ["sweep", "{d}/s.yaml", "-o", "{d}/out"]
HWE = ["estimate", "--hardware", "{d}/hw.yaml", "--model", "tiny", "--scheme", "kivi"]
MOE = ["estimate", "--hardware", "h100_sxm", "--model", "{d}/m.yaml", "--scheme", "kivi"]
TINY_MODEL = (ROOT / "models" / "tiny.yaml").read_text()


@pytest.mark.parametrize("args,files,message", [
    # counts past their maximum (an OverflowError traceback) or 0 where 0 means nothing (silently accepted)
    (E + ["kivi", "--residual", "10" * 15], {}, "command line: field 'residual': Input should be less than 2147483648"),
    (E + ["kivi", "--share-from", "0"], {}, "command line: field 'share_from': share_from applies only to"),
    (E + ["fp16", "--group", "16"], {}, "command line: field 'group': group applies only to compressed caches: fp16"),
    (E + ["fp16", "--first-bits", "4"], {}, "command line: field 'first_bits': first_bits applies only to"),
    # hardware and model files: a key given twice, booleans and implausible or infinite figures
    (HWE, {"hw.yaml": "name: mine\nvendor: x\nname: typo\n"},
     "{d}/hw.yaml: line 3 is not valid YAML (key 'name' is given twice)"),
    (HWE, {"hw.yaml": _hw("usable_fraction.value", True)},
     "{d}/hw.yaml: field 'usable_fraction.value': Input should be a valid number (got True)"),
    (HWE, {"hw.yaml": _hw("l2_bytes.value", 1e-300)},
     "{d}/hw.yaml: field 'l2_bytes': l2_bytes=1e-300 is outside the plausible [1024,"),
    (HWE, {"hw.yaml": _hw("fitted.kernel_overhead_s", float("inf"))},
     "{d}/hw.yaml: field 'fitted.kernel_overhead_s': Input should be a finite number"),
    (HWE, {"hw.yaml": _hw("fitted.factors.channel", 1e-300)},
     "{d}/hw.yaml: field 'fitted.factors': factor 'channel' is 1e-300; allowed: a number from 0.1 to 10"),
    (HWE, {"hw.yaml": _hw("fitted.channel_factor", 2.0)},  # a block of an earlier version beside the new key
     "{d}/hw.yaml: field 'fitted': 'channel_factor' and 'factors.channel' are both given; keep 'factors'"),
    (MOE, {"m.yaml": TINY_MODEL.replace("n_layers: 2", "n_layers: 65537")},
     "{d}/m.yaml: field 'n_layers': Input should be less than or equal to 65536"),
    (MOE, {"m.yaml": TINY_MODEL.replace("n_layers: 2", "n_layers: 65536").replace("ffn_dim: 128", "ffn_dim: 2147483647")
           .replace("d_model: 64", "d_model: 2147483647")},  # an OverflowError traceback, or 65,536 layers' worth
     "{d}/m.yaml: field '(top level)': 9.07e+23 weights is past the plausible 9.01e+15"),
    (MOE, {"m.yaml": TINY_MODEL.replace("weight_bytes: 2", "weight_bytes: true")},
     "{d}/m.yaml: field 'weight_bytes': expected 1, 2 or 4 (a whole number of bytes) (got True)"),
    # scenarios: counts never truncated ('0.4k' ran at 409) nor infinite, ranges bounded, lists not empty, options
    # of other schemes refused, one GPU or model under two names, an empty -o
    (S, {"s.yaml": _scenario(context=["0.4k"])}, "{d}/s.yaml: field 'context.0': Input should be a valid integer"),
    (S, {"s.yaml": _scenario(context=["inf"])}, "{d}/s.yaml: field 'context.0': Input should be a valid integer"),
    (S, {"s.yaml": _scenario(context={"start": 16, "stop": 64, "num": 2**20 + 1})},
     "{d}/s.yaml: field 'context.num': Input should be less than or equal to 1048576"),
    (S, {"s.yaml": _scenario(schemes=[{"scheme": "kivi", "bits": []}])},
     "{d}/s.yaml: field 'schemes.0.bits': List should have at least 1 item"),
    (S, {"s.yaml": _scenario(schemes=[{"scheme": "kivi", "strategy": "absorb_v"}])},
     "{d}/s.yaml: field 'schemes.0.strategy': strategy absorb_v applies only to rematerializing schemes"),
    (S, {"s.yaml": _scenario(schemes=[{"scheme": "xquant_yang", "eta_k": False}])},
     "{d}/s.yaml: field 'schemes.0.eta_k': Input should be a valid number"),
    (S, {"s.yaml": _scenario(hardware=["h100_sxm", str(ROOT / "hardware" / "h100_sxm.yaml")])},
     "{d}/s.yaml: field 'hardware': 'h100_sxm' is listed twice (entries 0 and 1)"),
    (["sweep", "{d}/s.yaml", "-o", ""], {"s.yaml": _scenario()}, "Invalid value for '-o' / '--out': an empty path"),
    (["recommend", "--model", "tiny", "--hardware", "h100_sxm,h100_sxm"], {},
     "command line: field 'hardware': 'h100_sxm' is listed twice"),
    # measure: refused before any work (tracebacks, or a row measured first)
    (["measure", "--model", "tiny", "--scheme", "fp16", "--device", "cuda:x"], {},
     "command line: field 'device': 'cuda:x' is not allowed"),
    (["measure", "--model", "tiny", "--scheme", "fp16", "--dtype", ""], {}, "command line: field 'dtype': '' is not"),
    (["measure", "--model", "tiny", "--scheme", "fp16", "-o", "{d}/f/m"], {"f": "mine"},
     "{d}/f: is a file, not a folder; choose another -o OUT"),
    (["measure", "--grid", "{d}/g.json", "-o", "{d}/g", "--force"], {"g.json": json.dumps(yaml.safe_load(_grid()))},
     "{d}/g.json: is an input of this measurement; the measurement would write over it"),
    (["measure", "--grid", "{d}/g.yaml"], {"g.yaml": _grid(batch=[0])}, "{d}/g.yaml: field 'batch.0': Input should be"),
    (["measure", "--grid", "{d}/g.yaml"], {"g.yaml": _grid(context=[True])}, "{d}/g.yaml: field 'context.0': Input"),
    (["measure", "--grid", "{d}/g.yaml"], {"g.yaml": _grid(max_tokens=1, batch=[4])},
     "{d}/g.yaml: field 'max_tokens': every batch x context is above 1 tokens; nothing to measure"),
    (["measure", "--grid", "{d}/g.yaml"], {"g.yaml": _grid(models=["llama-3.1-8b"], context=[2**30], max_tokens=2**62)},
     "{d}/g.yaml: fp16 on llama-3.1-8b (1 layers) at batch 1, context 1073741824 needs about"),
    # calibrate and validate: output paths checked first, never an input, no fit that determines nothing
    (["calibrate", str(MEASURED), "--hardware", "h100_sxm", "-o", "{d}/f/o.yaml"], {"f": "mine"},
     "{d}/f: is a file, not a folder; choose another -o FILE"),
    (["calibrate", "{d}/m.json", "--hardware", "h100_sxm", "-o", "{d}/m.json", "--force"],
     {"m.json": MEASURED.read_text()}, "{d}/m.json: is an input of this calibration"),
    (["calibrate", "{d}/m.json", "--hardware", "h100_sxm", "-o", "{d}/o.yaml"], {"m.json": json.dumps(MEASURED_ONE)},
     "{d}/m.json: the 1 configurations determine none of the fit's parameters"),
    (["validate", str(MEASURED), "--hardware", "h100_sxm", "-o", "{d}/f"], {"f": "mine"},
     "{d}/f: is a file, not a folder; choose another -o DIR"),
    (["validate", "{d}/validation.csv", "--hardware", "h100_sxm", "-o", "{d}", "--force"],
     {"validation.csv": MEASURED.read_text()}, "{d}/validation.csv: is an input of this validation"),
    # accuracy: before the model loads
    (["accuracy", "--schemes", "kivi", "-o", "{d}/f"], {"f": "mine"}, "{d}/f: is a file, not a folder"),
    (["accuracy", "--schemes", "kivi", "--strategy", "remat", "-o", "{d}/a"], {},
     "command line: field 'strategy': applies only to rematerializing schemes"),
    (["accuracy", "--schemes", "kivi", "--jobs", "100000", "-o", "{d}/a"], {},
     "command line: field 'jobs': 100000 is not allowed; from 1 to 256"),
    (["accuracy", "--grid", "{d}/g.yaml", "-o", "{d}/a"],
     {"g.yaml": "name: g\ntokens: 64\ncontext: 128\nschemes: [{scheme: kivi}]\n"},
     "{d}/g.yaml: field 'context': context (128) is more than tokens=64"),
], ids=lambda x: None)
def test_audit_refusals(monkeypatch, capsys, tmp_path, args, files, message):
    """The cases the acceptance audit of issue 18 found tracebacks or silent acceptance in: exit 2, one line naming
    the file or option and the field, before any work, and every file the user had left as it was."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = fails(monkeypatch, capsys, *(a.replace("{d}", str(tmp_path)) for a in args))
    assert line.startswith(f"xqsim: error: {message.replace('{d}', str(tmp_path))}"), line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args", [[], ["hw"]])
def test_no_arguments_print_the_help(monkeypatch, capsys, args):
    """`xqsim` or `xqsim hw` alone: the help and exit 0 (it was the help, then 'xqsim: error: ' and exit 2)."""
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, *args)
    out = capsys.readouterr()
    assert e.value.code == 0 and "Usage:" in out.out and out.err == "", out


def test_a_panel_where_nothing_fits_is_drawn(tmp_path):
    """A sweep whose only batch fits nowhere (Llama-3.1-70B at batch 2^20) plots 'nothing fits' panels (a matplotlib
    traceback: 'Data cannot be log-scaled', after the table was written)."""
    from xqsim import plots, sweep
    df = sweep.run([loading.load_hardware("h100_sxm")], [loading.load_model("llama-3.1-70b")],
                   [specs.SchemeConfig(scheme="fp16")], [2**20], [16, 64], rate_mode="spec")
    assert not df["fits"].any()
    for fn in (lambda p: plots.step_time_vs_context(df, 2**20, p), lambda p: plots.throughput_cap_vs_context(df, p)):
        assert all(p.stat().st_size > 0 for p in fn(tmp_path / "plot"))


def test_an_output_folder_that_is_not_writable(tmp_path, monkeypatch):
    """A folder the user may not write to (or a read-only mount) is refused before any work, by name."""
    import os
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(specs.UserError, match=f"^{tmp_path}: not writable; choose another -o DIR$"):
        loading.check_folder(tmp_path / "out", [tmp_path / "out" / "a.csv"], force=False)


def test_scheme_options_are_schemeconfigs_fields(monkeypatch, capsys):
    """estimate and measure take every SchemeConfig option, declared once (cli.scheme_options), and pass what
    was given: --eta-k reaches the configuration."""
    import typer.main

    for scheme, opt, field, value in (("xquant_yang", ["--eta-k", "0.2"], "eta_k", 0.2),
                                      ("xquant_gqa", ["--keep-first-channel"], "keep_first_channel", True)):
        try:
            run(monkeypatch, "estimate", "--hardware", "h200", "--model", "llama-3.1-8b", "--scheme", scheme, *opt,
                "--json")
        except SystemExit as e:
            assert e.code in (0, None), capsys.readouterr().err
        cfg = json.loads(capsys.readouterr().out)["config"]
        assert cfg[field] == value and cfg["group"] == 128, cfg  # given: passed; left out: SchemeConfig's default

    from xqsim.cli import app

    cmds = typer.main.get_command(app).commands
    want = {n for n in specs.SchemeConfig.model_fields if n != "scheme"}
    for name in ("estimate", "measure"):
        have = {p.name for p in cmds[name].params}
        assert want <= have, f"{name} lacks {sorted(want - have)}"


def test_measure_interrupted_before_its_first_row(monkeypatch, capsys, tmp_path):
    """A Ctrl-C before any row is measured says that nothing was written (it said '0 rows kept in OUT.json and
    OUT.csv', files that do not exist)."""
    from xqsim.engine import measure

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure, "run_grid", interrupted)
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, "measure", "--model", "tiny", "--scheme", "fp16", "--context", "16", "-o", tmp_path / "m")
    assert e.value.code == 130
    assert capsys.readouterr().err == "xqsim: interrupted; no row measured yet, nothing written\n"
    assert not list(tmp_path.iterdir())


def test_an_io_error_during_work_is_one_line(monkeypatch, capsys, tmp_path):
    """A full disk (or a permission revoked after the checks) while a command writes: one line, exit 1."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "crossovers.csv"))

    (tmp_path / "s.yaml").write_text("name: s\nhardware: [h100_sxm]\nmodels: [tiny]\nschemes: [{scheme: fp16}]\n"
                                     "batch: [1]\ncontext: [64, 128]\n")
    monkeypatch.setattr("xqsim.stream.write_atomic", full)
    with pytest.raises(SystemExit) as exc:
        run(monkeypatch, "sweep", tmp_path / "s.yaml", "-o", tmp_path / "out")
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.strip() == \
        f"xqsim: error: {tmp_path / 'out' / 'crossovers.csv'}: No space left on device", err

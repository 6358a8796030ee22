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
    (["accuracy", "--schemes", "kivi", "--jobs", "-5"], "field 'jobs': -5 is not allowed; at least 1"),
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

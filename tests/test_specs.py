"""Loading specs: shipped profiles and models, scenarios, scheme options, and the one-line error messages."""

from pathlib import Path

import pytest
import yaml

from xqsim import loading, scenario, schemes, specs
from xqsim.specs import UserError

ROOT = Path(__file__).resolve().parent.parent
HW_FILES = sorted((ROOT / "hardware").glob("*.yaml"))
MODEL_FILES = sorted((ROOT / "models").glob("*.yaml"))


def figures(hw: specs.HardwareProfile) -> dict[str, specs.Figure]:
    """Every spec figure of a profile, by dotted field name."""
    out = {k: v for k in type(hw).model_fields if isinstance(v := getattr(hw, k), specs.Figure)}
    return out | {f"flops_per_s.{k}": v for k, v in hw.flops_per_s.items()}


# ----------------------------------------------------------------------------- shipped files


def test_shipped_files_are_there():
    assert {"h100_sxm", "h200", "a100_80gb", "b200", "rtx_4090"} <= {p.stem for p in HW_FILES}
    assert {"llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "tiny", "tiny-gqa"} <= {p.stem for p in MODEL_FILES}


@pytest.mark.parametrize("path", HW_FILES, ids=lambda p: p.stem)
def test_shipped_hardware_loads_with_sources(path):
    hw = loading.load_hardware(path.stem)
    assert hw == loading.load_hardware(path)  # by name or by path, the same profile
    assert hw.name == path.stem
    figs = figures(hw)
    assert {"memory_bytes", "usable_fraction", "mem_bytes_per_s", "l2_bytes", "kernel_overhead_s",
            "flops_per_s.bf16", "flops_per_s.fp32"} <= set(figs)
    for name, fig in figs.items():
        assert fig.source.strip(), f"{path.name}: {name} has no source"
        assert fig.value > 0
    assert hw.fitted is None or hw.fitted.source.strip()
    assert 0 < hw.capacity_bytes <= hw.memory_bytes.value
    assert hw.flops_per_s["bf16"].value >= hw.flops_per_s["fp32"].value


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_shipped_models_load_with_sources(path):
    m = loading.load_model(path.stem)
    assert m.name == path.stem and m.source.strip()
    assert m.n_heads % m.n_kv_heads == 0 and m.dq == m.n_heads * m.hd


def test_known_shapes():
    m = loading.load_model("llama-3.1-8b")
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.hd, m.dkv, m.is_gqa) == (32, 4096, 32, 8, 128, 1024,
                                                                                          True)
    assert not loading.load_model("llama-2-7b").is_gqa
    h100 = loading.load_hardware("h100_sxm")
    assert h100.mem_bytes_per_s.value == 3.35e12
    assert h100.ridge_flop_per_byte == pytest.approx(989.4e12 / 3.35e12)


def test_list_functions_cover_every_file():
    assert [h.name for h in loading.list_hardware()] == sorted(p.stem for p in HW_FILES)
    assert [m.name for m in loading.list_models()] == sorted(p.stem for p in MODEL_FILES)


# ----------------------------------------------------------------------------- scenarios


def expected_configs(path: Path) -> int:
    """Scheme configurations a scenario file asks for: the product of its list-valued options
    (strategies count only for rematerializing schemes)."""
    n = 0
    for entry in yaml.safe_load(path.read_text())["schemes"]:
        k = 1
        for key in ("bits", "strategy", "fused"):
            v = entry.get(key, [None])
            if key != "strategy" or schemes.SCHEMES[entry["scheme"]].rematerializes:
                k *= len(set(v)) if isinstance(v, list) else 1
        n += k
    return n


def test_long_ctx_scenario():
    path = ROOT / "scenarios" / "long_ctx.yaml"
    sc = loading.load_scenario(path)
    assert sc.name == "long_ctx"
    assert [loading.load_hardware(h).name for h in sc.hardware] == ["h100_sxm", "h200", "a100_80gb", "b200"]
    assert [loading.load_model(m).name for m in sc.models] == ["llama-2-7b", "llama-3.1-8b", "qwen2.5-7b"]
    ctx = sc.contexts()
    assert ctx[0] == 1024 and ctx[-1] == 1024**2 and len(ctx) == 48 and ctx == sorted(ctx)
    assert sc.plot_context == 32768 and sc.plot_batch == 16 and sc.batch[-1] == 256
    configs = sc.scheme_configs()
    labels = [c.label for c in configs]
    assert len(labels) == len(set(labels)) == expected_configs(path) >= 7
    assert {"fp16", "kivi-2b", "xquant-2b-absorb_v", "xquant_cl-2b-first3", "xquant_yang-2b-v1"} <= set(labels)
    assert set(specs.SCHEMES) == {c.scheme for c in configs}


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    sc = loading.load_scenario(path)
    models = [loading.load_model(m, path.parent) for m in sc.models]
    assert [loading.load_hardware(h, path.parent) for h in sc.hardware]
    configs = sc.scheme_configs()
    assert len(configs) == expected_configs(path)
    for c in configs:  # every configuration runs on at least one of the scenario's models
        ok = 0
        for m in models:
            try:
                c.resolved(m)
                ok += 1
            except UserError:
                pass
        assert ok, c.label


def test_tiny_scenario():
    sc = loading.load_scenario(ROOT / "tests" / "data" / "tiny_scenario.yaml")
    assert sc.batch == [1, 8, 64] and sc.hardware == ["h100_sxm", "rtx_4090"]
    assert sc.contexts()[0] == 16 and sc.contexts()[-1] == 65536
    kivi = [c for c in sc.scheme_configs() if c.scheme == "kivi"]
    assert [(c.bits, c.group, c.residual) for c in kivi] == [(2, 16, 32), (4, 16, 32)]
    fp16 = [c for c in sc.scheme_configs() if c.scheme == "fp16"]
    assert len(fp16) == 1 and fp16[0].strategy is None  # strategies only multiply rematerializing schemes


def test_scenario_scalars_become_lists_and_counts_parse():
    sc = loading.parse(scenario.Scenario, {"name": "s", "hardware": "h100_sxm", "models": "tiny",
                                      "schemes": [{"scheme": "kivi", "bits": 2}], "batch": 4,
                                      "context": ["1k", "32k", 16, "32k"]}, "s.yaml")
    assert sc.hardware == ["h100_sxm"] and sc.batch == [4]
    assert sc.contexts() == [16, 1024, 32768]


@pytest.mark.parametrize("value, expected", [("32k", 32768), ("1M", 1048576), ("1.5k", 1536), (" 64K ", 65536),
                                             ("16", 16), (16, 16), ("abc", "abc"), ("k", "k")])
def test_parse_count(value, expected):
    assert scenario.parse_count(value) == expected


# ----------------------------------------------------------------------------- suggestions


@pytest.mark.parametrize("typed, known, expected", [
    ("h100", ["a100_80gb", "h100_sxm", "h200"], "h100_sxm"),
    ("H100", ["a100_80gb", "h100_sxm", "h200"], "h100_sxm"),
    ("a100", ["a100_80gb", "h100_sxm", "h200"], "a100_80gb"),
    ("tiny-gq", ["tiny", "tiny-gqa"], "tiny-gqa"),
    ("llama_3.1_8b", ["llama-2-7b", "llama-3.1-8b"], "llama-3.1-8b"),
    ("xquant_gq", list(specs.SCHEMES), "xquant_gqa"),
    ("batchs", list(scenario.Scenario.model_fields), "batch"),
    ("kivy", list(specs.SCHEMES), "kivi"),
])
def test_suggest(typed, known, expected):
    assert loading.suggest(typed, known) == f" (did you mean '{expected}'?)"


def test_suggest_nothing_close():
    assert loading.suggest("zzzzzz", ["h100_sxm", "h200"]) == ""
    assert loading.suggest("", ["h100_sxm"]) == ""


# ----------------------------------------------------------------------------- scheme options


def test_bits_allowed_per_scheme():
    assert loading.scheme_config(scheme="xquant_yang", bits=1).bits == 1
    assert loading.scheme_config(scheme="kivi", bits=2, group=32, residual=64).residual == 64
    with pytest.raises(UserError) as e:
        loading.scheme_config(scheme="kivi", bits=1)
    assert str(e.value) == "command line: field 'bits': bits=1 is not supported by kivi; allowed: [2, 3, 4, 8, 16]"
    with pytest.raises(UserError) as e:
        loading.scheme_config("my.yaml", scheme="fp16", bits=8)
    assert str(e.value) == "my.yaml: field 'bits': bits=8 is not supported by fp16; allowed: [16]"


@pytest.mark.parametrize("fields, fragments", [
    ({"scheme": "kivi", "bits": 2, "group": 32, "residual": 40}, ["field 'residual'", "positive multiple of 32"]),
    ({"scheme": "kivi", "bits": 2, "residual": -1}, ["field 'residual'", "greater than or equal to 0", "(got -1)"]),
    ({"scheme": "fp16", "strategy": "absorb_v"}, ["field 'strategy'", "only to rematerializing schemes"]),
    ({"scheme": "kivi", "bits": 2, "rank_k": 8}, ["field 'rank_k'", "applies only to ['xquant_gqa'"]),
    ({"scheme": "xquant_cl", "bits": 2, "first_layers": 0}, ["field 'first_layers'", "first_layers >= 1"]),
    ({"scheme": "xquant_yang", "bits": 2, "v_bits": 5}, ["field 'v_bits'", "v_bits=5", "allowed: [1, 2, 3, 4"]),
    ({"scheme": "xquant", "bits": 2, "strategy": "absorbv"}, ["field 'strategy'", "did you mean 'absorb_v'"]),
    ({"scheme": "kivi", "bits": 2, "grup": 32}, ["field 'grup'", "unknown key", "did you mean 'group'",
                                                 "allowed: scheme, bits, group"]),
])
def test_scheme_config_errors(fields, fragments):
    with pytest.raises(UserError) as e:
        loading.scheme_config("cfg.yaml", **fields)
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: field '") and "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_resolved_checks_model_shapes(tiny_gqa):
    cfg = loading.scheme_config(scheme="xquant_gqa", bits=2, rank_k=64)
    with pytest.raises(UserError, match=r"rank_k=64 exceeds min\(d_model, dkv\)=32"):
        cfg.resolved(tiny_gqa)
    with pytest.raises(UserError, match="first_layers=3 exceeds tiny-gqa's 2 layers"):
        loading.scheme_config(scheme="xquant_cl", bits=2, first_layers=3).resolved(tiny_gqa)
    r = loading.scheme_config(scheme="kivi", bits=2).resolved(tiny_gqa)
    assert (r.residual, r.group, r.strategy) == (128, 128, None)  # K/V schemes have no strategy
    assert loading.scheme_config(scheme="xquant", bits=2).resolved(tiny_gqa).strategy == "remat"


@pytest.mark.parametrize("fields, fragment", [
    ({"scheme": "fp16", "strategy": "remat"}, "strategy remat applies only to rematerializing schemes"),
    ({"scheme": "kivi", "strategy": "remat"}, "kivi caches K and V"),
    ({"scheme": "fp16", "fused": True}, "fused applies only to compressed caches"),
    ({"scheme": "xquant_cl", "bits": 4, "first_bits": 2}, "first_bits=2 is below bits=4"),
])
def test_options_that_mean_nothing_for_a_scheme_are_refused(fields, fragment):
    with pytest.raises(UserError, match=fragment):
        loading.scheme_config(**fields)


def test_stored_configs_of_earlier_versions_still_read():
    """Measurement rows keep the resolved config of the version that wrote them: strategy 'remat' for every scheme,
    fused fp16 from the Triton engine, first_bits 4 under 8-bit XQuant-CL. They read as the same configuration."""
    old = specs.SchemeConfig.stored({"scheme": "kivi", "bits": 2, "strategy": "remat", "fused": True, "group": 128})
    assert (old.scheme, old.bits, old.strategy, old.fused) == ("kivi", 2, None, True)
    assert specs.SchemeConfig.stored({"scheme": "fp16", "bits": 16, "strategy": "remat", "fused": True}).fused is False
    cl = specs.SchemeConfig.stored({"scheme": "xquant_cl", "bits": 8, "first_bits": 4, "first_layers": 3})
    assert cl.first_bits is None and cl.first_layers == 3
    assert specs.SchemeConfig.stored({"scheme": "xquant", "bits": 2, "strategy": "absorb_v"}).strategy == "absorb_v"


# ----------------------------------------------------------------------------- files and their errors


def write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def shipped(folder: str, name: str) -> dict:
    return yaml.safe_load((ROOT / folder / f"{name}.yaml").read_text())


def test_user_files_by_path_and_relative_to_base(tmp_path):
    hw = shipped("hardware", "h100_sxm") | {"name": "my_gpu"}
    write(tmp_path, "my_gpu.yaml", hw)
    assert loading.load_hardware(tmp_path / "my_gpu.yaml").name == "my_gpu"
    assert loading.load_hardware("my_gpu.yaml", base=tmp_path).name == "my_gpu"
    m = shipped("models", "tiny") | {"name": "mine", "n_layers": 7}
    write(tmp_path, "mine.yml", m)
    assert loading.load_model("mine.yml", base=tmp_path).n_layers == 7


@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["memory_bytes"].pop("source"), ["field 'memory_bytes.source'", "required but missing"]),
    (lambda d: d["flops_per_s"]["bf16"].update(source=""), ["field 'flops_per_s.bf16.source'",
                                                            "at least 3 characters"]),
    (lambda d: d["flops_per_s"].pop("fp32"), ["field 'flops_per_s'", "missing fp32"]),
    (lambda d: d["flops_per_s"].update(bf17={"value": 1, "source": "xyz"}),
     ["field 'flops_per_s.bf17'", "'bf17' is not allowed", "did you mean 'bf16'"]),
    (lambda d: d["l2_bytes"].update(value=-1), ["field 'l2_bytes.value'", "greater than 0", "(got -1)"]),
    (lambda d: d["l2_bytes"].update(value="lots"), ["field 'l2_bytes.value'", "valid number", "(got 'lots')"]),
    (lambda d: d["usable_fraction"].update(value=1.5), ["field 'usable_fraction'", "must be in (0, 1]"]),
    (lambda d: d.update(memory_byte=d.pop("memory_bytes")), ["field 'memory_byte'", "unknown key",
                                                              "did you mean 'memory_bytes'", "allowed: name,"]),
    (lambda d: d["memory_bytes"].update(sorce="x"), ["field 'memory_bytes.sorce'", "did you mean 'source'",
                                                     "allowed: value, source"]),
    (lambda d: d.update(fitted={"source": "fit", "mem_eficiency": 0.9}),
     ["field 'fitted.mem_eficiency'", "did you mean 'mem_efficiency'", "allowed: source, mem_efficiency"]),
    (lambda d: d.update(fitted={"source": "fit", "compute_efficiency": {"matmull": 0.8}}),
     ["field 'fitted.compute_efficiency.matmull'", "did you mean 'matmul'"]),
    (lambda d: d["mem_bytes_per_s"].update(value=float("inf")), ["field 'mem_bytes_per_s.value'", "finite number"]),
    (lambda d: d["mem_bytes_per_s"].update(value=1e-300),
     ["field 'mem_bytes_per_s'", "mem_bytes_per_s=1e-300 is outside the plausible [1e+08, 1e+15] B/s"]),
    (lambda d: d["memory_bytes"].update(value=80), ["field 'memory_bytes'", "outside the plausible", " B"]),
    (lambda d: d["flops_per_s"]["bf16"].update(value=1e30), ["field 'flops_per_s'", "flops_per_s.bf16=1e+30"]),
    (lambda d: d["kernel_overhead_s"].update(value=4), ["field 'kernel_overhead_s'", "[1e-08, 0.1] s"]),
])
def test_bad_hardware_file(tmp_path, change, fragments):
    assert_bad_file(tmp_path, "hardware", "h100_sxm", loading.load_hardware, change, fragments)


@pytest.mark.parametrize("change, fragments", [
    (lambda d: d.update(n_layers=0), ["field 'n_layers'", "greater than 0", "(got 0)"]),
    (lambda d: d.update(d_model=-64), ["field 'd_model'", "greater than 0", "(got -64)"]),
    (lambda d: d.update(n_kv_heads=3), ["field 'n_heads'", "multiple of n_kv_heads (3)"]),
    (lambda d: d.update(weight_bytes=3), ["field 'weight_bytes'", "'3' is not allowed", "1, 2 or 4"]),
    (lambda d: d.update(n_layer=2), ["field 'n_layer'", "did you mean 'n_layers'"]),
    (lambda d: d.pop("source"), ["field 'source'", "required but missing"]),
    (lambda d: d.update(tie_embeddings="sometimes"), ["field 'tie_embeddings'", "valid boolean"]),
    (lambda d: d.update(n_layers=True), ["field 'n_layers'", "valid integer", "(got True)"]),
    (lambda d: d.update(d_model=64.0), ["field 'd_model'", "valid integer", "(got 64.0)"]),
    (lambda d: d.update(vocab_size=2**40), ["field 'vocab_size'", "less than 2147483648"]),
    (lambda d: d.update(rope_theta=float("nan")), ["field 'rope_theta'", "finite number"]),
])
def test_bad_model_file(tmp_path, change, fragments):
    assert_bad_file(tmp_path, "models", "tiny", loading.load_model, change, fragments)


def assert_bad_file(tmp_path, folder, name, load, change, fragments):
    """A shipped file with one field broken: one line naming the file and field, with every fragment."""
    data = shipped(folder, name)
    change(data)
    path = write(tmp_path, f"{name}.yaml", data)
    with pytest.raises(UserError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field '") and "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(UserError) as e:
        loading.load_hardware("h100")
    assert str(e.value).startswith("unknown hardware 'h100' (did you mean 'h100_sxm'?); known: a100_80gb, ")
    with pytest.raises(UserError) as e:
        loading.load_model("llama-3-8b", where="s.yaml: field 'models.0'")
    assert str(e.value).startswith("s.yaml: field 'models.0': unknown model 'llama-3-8b' "
                                   "(did you mean 'llama-3.1-8b'?)")
    with pytest.raises(UserError) as e:
        loading.load_model("gone.yaml", base=tmp_path)
    assert str(e.value) == f"{tmp_path / 'gone.yaml'}: file not found"
    with pytest.raises(UserError) as e:
        loading.load_scenario(tmp_path / "gone.yaml")
    assert str(e.value) == f"{tmp_path / 'gone.yaml'}: file not found"


def test_unreadable_yaml(tmp_path):
    bad = write(tmp_path, "bad.yaml", "name: x\nbatch: [1, 2\n")
    with pytest.raises(UserError) as e:
        loading.load_scenario(bad)
    assert str(e.value).startswith(f"{bad}: line 3 is not valid YAML (")
    for text, got in (("", "an empty file"), ("- 1\n- 2\n", "a list"), ("just words\n", "a str")):
        p = write(tmp_path, "odd.yaml", text)
        with pytest.raises(UserError) as e:
            loading.load_model(p)
        assert str(e.value) == f"{p}: expected a mapping of fields (name: value), got {got}"


def test_default_bits_are_one_table_everywhere(monkeypatch, capsys):
    """A scheme's bits left out are its paper's (each scheme module's DEFAULT_BITS) in SchemeConfig, a scenario entry
    and `estimate` (it used 4 in estimate, 16 in measure and scenarios, 2 in the dashboard)."""
    import json
    import sys

    from xqsim.cli import main

    default = {s: x.default_bits for s, x in schemes.SCHEMES.items()}
    assert default == {"fp16": 16, "kivi": 2, "xquant": 4, "xquant_cl": 3, "xquant_gqa": 4, "xquant_cl_gqa": 2,
                       "xquant_yang": 2}
    assert set(schemes.SCHEMES) == set(specs.SCHEMES)
    for s, b in default.items():
        assert specs.SchemeConfig(scheme=s).bits == b
        assert [c.bits for c in scenario.ScenarioScheme(scheme=s).expand()] == [b]
    monkeypatch.setattr(sys, "argv", ["xqsim", "estimate", "--hardware", "h100_sxm", "--model", "llama-3.1-8b",
                                      "--scheme", "xquant_yang", "--json"])
    main()
    r = json.loads(capsys.readouterr().out)
    assert r["bits"] == 2 and r["config"]["v_bits"] == 1  # Yang et al.'s 1.38-bit configuration


@pytest.mark.parametrize("body,message", [
    ("batch: [1, 2]\nplot_batch: 3\ncontext: [1024]", "field 'plot_batch': plot_batch=3 is not one of batch [1, 2]"),
    ("batch: [1]\ncontext: []", "field 'context': give at least one context (a list, or a range {start, stop, num})"),
])
def test_scenario_lists_that_cannot_be_swept(tmp_path, body, message):
    """plot_batch outside the batch list and an empty context list ended in ZeroDivisionError and ValueError
    tracebacks; a GPU listed twice in a Categorical error."""
    p = tmp_path / "s.yaml"
    p.write_text(f"name: t\nhardware: [h100_sxm]\nmodels: [tiny]\nschemes:\n  - {{scheme: fp16}}\n{body}\n")
    with pytest.raises(UserError) as e:
        loading.load_scenario(p)
    assert str(e.value) == f"{p}: {message}", str(e.value)
    p.write_text("name: t\nhardware: [h100_sxm, h100_sxm]\nmodels: [tiny]\nschemes:\n  - {scheme: fp16}\n"
                 "batch: [1]\ncontext: [1024]\n")
    with pytest.raises(UserError, match="field 'hardware': 'h100_sxm' is listed twice$"):
        loading.load_scenario(p)


def test_a_fitted_block_of_an_earlier_version_reads_as_today():
    """`bitplane_factor: x` and `channel_factor: y` in a fitted block (files written before the factors table) are
    factors {bitplane: x, channel: y}: the same rates."""
    from xqsim import loading

    hw = loading.load_hardware("h100_sxm")
    old = hw.fitted.model_dump(mode="json")
    factors = old.pop("factors")
    old |= {f"{k}_factor": v for k, v in factors.items()}
    legacy = hw.model_copy(update={"fitted": specs.Fitted.model_validate(old)})
    assert legacy.fitted.factors == factors == {"bitplane": 5.543844, "channel": 2.050266}
    assert legacy.rates() == hw.rates()

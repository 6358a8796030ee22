"""Property-based tests (Hypothesis) of everything a user feeds xqsim: random YAML trees as scenarios, hardware and
model files, random bytes as files, and numbers at the edges on the command line. Whatever comes in, the command
ends with exit 0 or with exit 2 and one line `xqsim: error: ...` naming where the problem is, never a traceback, and
no file the user wrote changes."""

import sys
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from xqsim.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

EDGE_NUMBERS = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, 2**63, -(2**63), 10**30, 0.5, 1.5, -0.0, 1e-300, 1e308,
                float("inf"), float("-inf"), float("nan"), True, False]
EDGE_TEXT = ["", " ", "1k", "0.4k", "1.5", "32k", "1M", "1e30", "inf", "nan", "-5", "0x10", "10**30", "2**63",
             "1_000", "abc", "h100_sxm", "llama-3.1-8b", "kivi", "remat", "absorb_v", "\x00", "ü", "1e-3"]
scalars = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_TEXT), st.none(),
                    st.text(max_size=12))


def trees(keys: list[str]):
    """YAML-able trees whose mapping keys are mostly the fields a file of this kind has."""
    key = st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=8))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(key, inner, max_size=6)), max_leaves=20)


def documents(keys: list[str], base: dict):
    """A valid file with some fields replaced by random trees, or a random tree."""
    patched = st.dictionaries(st.sampled_from(keys), trees(keys), max_size=3).map(lambda d: {**base, **d})
    return st.one_of(patched, trees(keys).map(lambda t: t))


def outcome(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["xqsim", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.err


def check(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xqsim: error: "), err


def dump(tree) -> str:
    try:
        return yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        return repr(tree)


SCENARIO = yaml.safe_load((ROOT / "tests" / "data" / "tiny_scenario.yaml").read_text())
SCENARIO_KEYS = ["name", "description", "hardware", "models", "schemes", "batch", "context", "plot_batch",
                 "plot_context", "fitted", "scheme", "bits", "group", "residual", "strategy", "fused", "start",
                 "stop", "num", "log", "first_layers", "first_bits", "rank_k", "rank_v", "v_bits", "share_from"]


@SETTINGS
@given(doc=documents(SCENARIO_KEYS, SCENARIO))
def test_random_scenarios(doc, tmp_path_factory, monkeypatch, capsys):
    """A random scenario, swept into a path that is a file: every check runs before any work, so the sweep ends
    with one line either way (the scenario's own error, or the path's), and the scenario file is unchanged."""
    d = tmp_path_factory.mktemp("sc")
    path, out = d / "s.yaml", d / "taken"
    path.write_text(dump(doc))
    out.write_text("mine")
    before = path.read_bytes()
    code, err = outcome(monkeypatch, capsys, "sweep", path, "-o", out)
    assert code == 2, err
    check(code, err)
    assert path.read_bytes() == before and out.read_text() == "mine"


HARDWARE = yaml.safe_load((ROOT / "hardware" / "h100_sxm.yaml").read_text())
MODEL = yaml.safe_load((ROOT / "models" / "tiny.yaml").read_text())


@SETTINGS
@given(doc=st.one_of(documents(list(HARDWARE), HARDWARE), documents(list(MODEL), MODEL)), which=st.booleans())
def test_random_hardware_and_model_files(doc, which, tmp_path_factory, monkeypatch, capsys):
    d = tmp_path_factory.mktemp("hw")
    path = d / "mine.yaml"
    path.write_text(dump(doc))
    before = path.read_bytes()
    args = ["--hardware", path, "--model", "tiny"] if which else ["--hardware", "h100_sxm", "--model", path]
    code, err = outcome(monkeypatch, capsys, "estimate", *args, "--scheme", "kivi", "--json")
    check(code, err)
    assert path.read_bytes() == before


@SETTINGS
@given(data=st.binary(max_size=200), kind=st.sampled_from(["scenario", "hardware", "model"]))
def test_random_bytes_as_files(data, kind, tmp_path_factory, monkeypatch, capsys):
    d = tmp_path_factory.mktemp("bytes")
    path = d / "f.yaml"
    path.write_bytes(data)
    if kind == "scenario":
        code, err = outcome(monkeypatch, capsys, "sweep", path, "-o", d / "out")
        assert code == 2 and not (d / "out").exists(), err  # bytes are never a scenario of anything to sweep
    else:
        args = ["--hardware", path, "--model", "tiny"] if kind == "hardware" else ["--hardware", "h100_sxm",
                                                                                  "--model", path]
        code, err = outcome(monkeypatch, capsys, "estimate", *args, "--scheme", "fp16")
    check(code, err)
    assert path.read_bytes() == data


cli_values = st.one_of(st.sampled_from(EDGE_TEXT), st.sampled_from([str(x) for x in EDGE_NUMBERS]),
                       st.integers(-10**40, 10**40).map(str), st.floats().map(repr), st.text(max_size=10))


@SETTINGS
@given(batch=cli_values, context=cli_values, bits=cli_values, scheme=st.sampled_from(
    ["fp16", "kivi", "xquant", "xquant_gqa", "xquant_cl", "xquant_cl_gqa", "xquant_yang", "kiwi", ""]),
    option=st.sampled_from(["--group", "--residual", "--first-layers", "--first-bits", "--rank-k", "--v-bits",
                            "--share-from", "--strategy"]), value=cli_values)
def test_numbers_at_the_edges_on_the_command_line(batch, context, bits, scheme, option, value, monkeypatch, capsys):
    code, err = outcome(monkeypatch, capsys, "estimate", "--hardware", "h100_sxm", "--model", "tiny", "--scheme",
                        scheme, "--batch", batch, "--context", context, "--bits", bits, option, value, "--json")
    check(code, err)

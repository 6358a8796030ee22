"""The papers' own numbers, reproduced under their accounting (codes + fp16 scale/zero per
128 values, first layers as configured, residual window and accumulator left out)."""

import pytest
from conftest import cfg

from xqsim import loading, schemes, specs
from xqsim.schemes.layout import equivalent_bits, fp16_kv_bytes_per_token, paper_bytes_per_token


def normalized(model_name: str, scheme: str, **kw) -> float:
    model = loading.load_model(model_name)
    c = cfg(scheme, model, **kw)
    return paper_bytes_per_token(schemes.layout(model, c), c) / fp16_kv_bytes_per_token(model)


# Tomar et al. (arXiv 2508.10395) Table 4, Llama-2-7B: "7.7x" / "10x" / "12.5x".
@pytest.mark.parametrize("scheme,kw,table,exact", [
    ("xquant", {"bits": 4}, 0.13, 4.25 / 32),
    ("xquant", {"bits": 3, "first_layers": 3}, 0.10, 107 / 1024),
    ("xquant_cl", {"bits": 3, "first_layers": 3}, 0.10, 107 / 1024),
    ("xquant_cl", {"bits": 2, "first_layers": 3}, 0.08, 78 / 1024),
])
def test_llama2_7b_mha(scheme, kw, table, exact):
    got = normalized("llama-2-7b", scheme, **kw)
    assert got == pytest.approx(exact, rel=1e-12), f"{scheme} {kw}: {got:.5f} vs hand {exact:.5f}"
    assert round(got, 2) == table, f"{scheme} {kw}: {got:.4f} rounds to {round(got, 2)}, table says {table}"


# GQA (Llama-3.1-8B, Mistral-7B): 0.27 / 0.20 / 0.14 at 4 / 3 / 2 bits, the same as KIVI* at equal bits;
# XQuant-CL-2 with its first 3 layers at 4 bits 0.15.
@pytest.mark.parametrize("model", ["llama-3.1-8b", "mistral-7b"])
@pytest.mark.parametrize("bits,table", [(4, 0.27), (3, 0.20), (2, 0.14)])
def test_gqa_svd_matches_table_and_kivi(model, bits, table):
    got = normalized(model, "xquant_gqa", bits=bits)
    assert round(got, 2) == table, f"{model} XQuant-GQA-{bits}: {got:.4f}, table {table}"
    assert got == pytest.approx(normalized(model, "kivi", bits=bits), rel=1e-12)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "mistral-7b"])
def test_gqa_cl2(model):
    got = normalized(model, "xquant_cl_gqa", bits=2, first_layers=3)
    assert round(got, 2) == 0.15, f"{model} XQuant-CL-GQA-2: {got:.4f}, table 0.15"
    assert got == pytest.approx(78 / 512, rel=1e-12)


def test_yang_equivalent_bits_138_on_32_layers():
    """Yang et al.'s 1.38: the authors' code config kq=32, vq=16, km=vm=16 on a 32-layer model:
    keys 2-bit everywhere, values 2-bit in layers 0-15 and 1-bit after, odd layers 17..31 share codes."""
    model = loading.load_model("llama-2-7b")
    c = cfg("xquant_yang", model, bits=2, v_bits=1, first_layers=16, first_bits=2, share_from=16)
    assert c == cfg("xquant_yang", model, bits=2)  # the default at 2 bits is that configuration
    bits = equivalent_bits(schemes.layout(model, c))
    assert bits == 88 / 64
    assert round(bits, 2) == 1.38


@pytest.mark.parametrize("kw,expected", [
    ({"bits": 2, "v_bits": 1, "first_layers": 20, "first_bits": 2, "share_from": 16}, 90 / 64),  # "1.4"
    ({"bits": 2, "v_bits": 1, "first_layers": 16, "first_bits": 2, "share_from": 26}, 103 / 64),  # 112 - 3 x (2 + 1)
    ({"bits": 2, "v_bits": 1, "first_layers": 0, "share_from": 1000}, 96 / 64),  # no sharing: (2 + 1) / 2
])
def test_yang_equivalent_bits_definition(kw, expected):
    model = loading.load_model("llama-2-7b")
    assert equivalent_bits(schemes.layout(model, cfg("xquant_yang", model, **kw))) == expected


def test_estimate_reports_both_accountings(h100):
    from xqsim.estimate import estimate

    model = loading.load_model("llama-2-7b")
    r = estimate(h100, model, specs.SchemeConfig(scheme="xquant", bits=4, residual=128), 4, 1000)
    paper, full = r["accounting"]["paper"], r["accounting"]["full"]
    assert round(paper["normalized_kv_size"], 2) == 0.13
    assert paper["cache_bytes"] == 4 * 1000 * 32 * 4096 * 4.25 / 8
    # full accounting keeps the last 128 tokens in fp16: more than the paper's figure
    assert full["cache_bytes"] == r["cache_bytes"] == 4 * 32 * (872 * (2048 + 32 * 4) + 128 * 4096 * 2)
    assert full["cache_bytes"] > paper["cache_bytes"]
    assert r["cache_metadata_bytes"] == 4 * 32 * 872 * 32 * 4

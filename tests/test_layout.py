"""Byte-exact cache memory of every scheme on hand-computed cases (xqsim.schemes.layout)."""

import numpy as np
import pytest
from conftest import arr, cfg

from xqsim import loading, schemes
from xqsim.capacity import memory, seq_memory
from xqsim.schemes.layout import cache_parts


def parts(model, c, T):
    p = cache_parts(schemes.layout(model, c), c, arr(T))
    return {k: int(v[0]) for k, v in p.items()}


def test_fp16_is_k_and_v_at_two_bytes(tiny_gqa):
    # 2 layers x (K + V) x dkv 32 x 2 bytes x 45 tokens
    assert parts(tiny_gqa, cfg("fp16", tiny_gqa), 45) == {"codes": 2 * 2 * 32 * 2 * 45, "metadata": 0, "residual": 0}


def test_kivi_2bit_context_not_a_multiple_of_group_or_residual(tiny):
    # tiny: dkv 64 (4 heads of 16). G=16, R=32, T=45 (45 % 16 = 13, 45 % 32 = 13).
    # K per channel: 45 - 45 % 32 = 32 tokens quantized = 2 groups per channel; 16 tokens x 2 bits = 4 B.
    k_codes, k_meta, k_res = 64 * 2 * 4, 64 * 2 * 4, (45 - 32) * 64 * 2
    # V per token, rows of one head (16 values): 45 - 32 = 13 tokens quantized, last 32 fp16.
    v_codes, v_meta, v_res = 13 * 4 * 4, 13 * 4 * 1 * 4, 32 * 64 * 2
    got = parts(tiny, cfg("kivi", tiny, bits=2, group=16, residual=32), 45)
    assert got == {"codes": 2 * (k_codes + v_codes), "metadata": 2 * (k_meta + v_meta),
                   "residual": 2 * (k_res + v_res)}
    assert (got["codes"], got["metadata"], got["residual"]) == (1440, 1440, 11520)


def test_kivi_3bit_packs_eight_codes_in_three_bytes(tiny):
    # G=16, R=16, T=20: K 16 tokens quantized (1 group/channel: 16*3/8 = 6 B), 4 fp16; V 4 quantized, 16 fp16.
    got = parts(tiny, cfg("kivi", tiny, bits=3, group=16, residual=16), 20)
    assert got["codes"] == 2 * (64 * 1 * 6 + 4 * 4 * 6)
    assert got["metadata"] == 2 * (64 * 1 * 4 + 4 * 4 * 4)
    assert got["residual"] == 2 * (4 * 64 * 2 + 16 * 64 * 2)


def test_kivi_before_first_block_is_all_fp16(tiny):
    got = parts(tiny, cfg("kivi", tiny, bits=2, group=16, residual=32), 31)
    assert got == {"codes": 0, "metadata": 0, "residual": 2 * 2 * 31 * 64 * 2}


def test_xquant_per_token_groups(tiny):
    # X: 64 values, 3 bits -> 24 B of codes per token; G=32 -> 2 groups -> 8 B of scale+zero; no residual.
    got = parts(tiny, cfg("xquant", tiny, bits=3, group=32), 45)
    assert got == {"codes": 2 * 45 * 24, "metadata": 2 * 45 * 8, "residual": 0}
    # A group larger than the row is one group per token; a partial group still carries its scale+zero.
    assert parts(tiny, cfg("xquant", tiny, bits=3, group=48), 45)["metadata"] == 2 * 45 * 2 * 4
    assert parts(tiny, cfg("xquant", tiny, bits=3, group=128), 45)["metadata"] == 2 * 45 * 4


def test_xquant_with_residual_window(tiny):
    # R=10: the last 10 tokens fp16 (64 x 2 B), 35 quantized at 4 bits (32 B + one group 4 B).
    got = parts(tiny, cfg("xquant", tiny, bits=4, group=64, residual=10), 45)
    assert got == {"codes": 2 * 35 * 32, "metadata": 2 * 35 * 4, "residual": 2 * 10 * 64 * 2}


def test_xquant_gqa_odd_widths_round_packed_rows_up(tiny_gqa):
    # rank_k 5 (per channel, G=16, R=16), rank_v 7 (per token); 3 bits; T=37.
    c = cfg("xquant_gqa", tiny_gqa, bits=3, group=16, residual=16, rank_k=5, rank_v=7)
    xk_codes, xk_meta, xk_res = 5 * 2 * 6, 5 * 2 * 4, (37 - 32) * 5 * 2
    xv_codes, xv_meta, xv_res = 21 * 3, 21 * 1 * 4, 16 * 7 * 2  # ceil(7*3/8) = 3 B per token
    assert parts(tiny_gqa, c, 37) == {"codes": 2 * (xk_codes + xv_codes), "metadata": 2 * (xk_meta + xv_meta),
                                      "residual": 2 * (xk_res + xv_res)}


def test_xquant_gqa_first_channel_kept_fp16(tiny_gqa):
    c = cfg("xquant_gqa", tiny_gqa, bits=3, group=16, residual=16, rank_k=5, rank_v=7, keep_first_channel=True)
    xk0 = 37 * 1 * 2  # one fp16 channel for every token (counted with the stored values)
    xk_codes, xk_meta, xk_res = 4 * 2 * 6, 4 * 2 * 4, 5 * 4 * 2
    xv_codes, xv_meta, xv_res = 21 * 3, 21 * 4, 16 * 7 * 2
    assert parts(tiny_gqa, c, 37) == {"codes": 2 * (xk0 + xk_codes + xv_codes), "metadata": 2 * (xk_meta + xv_meta),
                                      "residual": 2 * (xk_res + xv_res)}


def test_xquant_cl_base_at_4_bits_then_deltas(tiny):
    # layer 0 (base) X at 4 bits: 32 + 4 B per token; layer 1 delta at 2 bits: 16 + 4 B per token.
    c = cfg("xquant_cl", tiny, bits=2, group=64)
    assert [g.role for g in schemes.layout(tiny, c)] == ["base", "delta"]
    assert parts(tiny, c, 10) == {"codes": 10 * (32 + 16), "metadata": 10 * (4 + 4), "residual": 0}


def test_xquant_cl_gqa_latent_is_rank_wide(tiny_gqa):
    # [Wk | Wv] is 64 x 64: latent rank min(d, 2 dkv) = 64; 2 bits, first layer (base) 4 bits.
    c = cfg("xquant_cl_gqa", tiny_gqa, bits=2, group=64)
    assert c.rank_k + c.rank_v == 64
    assert parts(tiny_gqa, c, 7) == {"codes": 7 * (32 + 16), "metadata": 7 * (4 + 4), "residual": 0}


def test_yang_shared_layer_stores_metadata_only(tiny):
    # tiny has 2 layers: default first_layers = 1 (2 bits), share_from = 1 -> layer 1 reuses layer 0's codes.
    c = cfg("xquant_yang", tiny, bits=2, group=16, residual=16)
    groups = schemes.layout(tiny, c)
    assert sorted((g.count, tuple((t.bits, t.shared) for t in g.tensors)) for g in groups) == [
        (1, ((2, False), (2, False))), (1, ((2, True), (2, True)))]
    # T=20: K 16 tokens quantized, 4 fp16; V 4 quantized, 16 fp16.
    k_codes, v_codes = 64 * 1 * 4, 4 * 4 * 4
    k_meta, v_meta = 64 * 4, 4 * 4 * 4
    assert parts(tiny, c, 20) == {"codes": k_codes + v_codes, "metadata": 2 * (k_meta + v_meta),
                                  "residual": 2 * (4 * 64 * 2 + 16 * 64 * 2)}


def test_unquantized_xquant_caches_half_of_fp16_kv_on_mha():
    model = loading.load_model("llama-2-7b")
    T = arr(1, 127, 128, 4097, 131072)
    fp16 = cache_parts(schemes.layout(model, cfg("fp16", model)), cfg("fp16", model), T)["codes"]
    for scheme in ("xquant", "xquant_cl"):
        c = cfg(scheme, model, bits=16)
        p = cache_parts(schemes.layout(model, c), c, T)
        np.testing.assert_array_equal(2 * (p["codes"] + p["metadata"] + p["residual"]), fp16)


@pytest.mark.parametrize("scheme,kw", [
    ("fp16", {}), ("kivi", {"bits": 2}), ("kivi", {"bits": 3, "group": 32, "residual": 64}),
    ("xquant", {"bits": 2, "residual": 100}), ("xquant_cl", {"bits": 3, "first_layers": 3}),
    ("xquant_gqa", {"bits": 2, "keep_first_channel": True}), ("xquant_cl_gqa", {"bits": 2, "first_layers": 3}),
    ("xquant_yang", {"bits": 2}), ("xquant_yang", {"bits": 1, "v_bits": 1, "share_from": 0, "group": 32,
                                                    "residual": 64}),
])
@pytest.mark.parametrize("strategy,fused", [("remat", False), ("absorb_v", True)])
def test_linear_memory_form_matches_exact_bytes(scheme, kw, strategy, fused):
    """capacity.seq_memory (used for max batch/context) equals the exact breakdown at every context."""
    model = loading.load_model("llama-3.1-8b")
    strategy = strategy if schemes.SCHEMES[scheme].rematerializes else None
    c = cfg(scheme, model, strategy=strategy, fused=fused and scheme != "fp16", **kw)
    T = np.arange(0, 700, dtype=np.int64)
    exact = memory(model, c, 1, T)
    per_seq = exact["cache_bytes"] + exact["transient_bytes"]
    np.testing.assert_allclose(seq_memory(model, c, schemes.layout(model, c))(T), per_seq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme,kw", [("fp16", {}), ("kivi", {"bits": 2, "first_layers": 3}),
                                       ("xquant_cl", {"bits": 2, "first_layers": 3}), ("xquant_yang", {"bits": 2}),
                                       ("xquant_cl_gqa", {"bits": 2})])
def test_layer_groups_cover_every_layer_once(scheme, kw):
    m = loading.load_model("llama-2-7b")
    groups = schemes.layout(m, cfg(scheme, m, **kw))
    assert sorted(i for g in groups for i in g.layers) == list(range(m.n_layers))
    assert all(g.count == len(g.layers) for g in groups)

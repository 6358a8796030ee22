"""Memory, max batch, max context (the memory wall) and throughput under capacity."""

import numpy as np
import pytest
from conftest import cfg

from xqsim import loading, schemes, specs
from xqsim.capacity import max_batch, max_context, memory, seq_memory
from xqsim.sweep import evaluate


def test_weights_bytes_by_hand(tiny, tiny_gqa):
    # tiny: embedding + head 2*256*64, per layer Wq Wo 2*64*64, Wk Wv 2*64*64, MLP 3*64*128, norms 2*64; final 64
    per_layer = 2 * 64 * 64 + 2 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert schemes.weights_bytes(tiny, cfg("fp16", tiny)) == 2 * (2 * 256 * 64 + 2 * per_layer + 64)
    # xquant_gqa replaces Wk, Wv (2 x 64x32) by Uk, Uv (64 x r) and up factors (r x 32)
    c = cfg("xquant_gqa", tiny_gqa, bits=2, rank_k=8, rank_v=16)
    base = schemes.weights_bytes(tiny_gqa, cfg("fp16", tiny_gqa)) - 2 * 2 * (2 * 64 * 32)
    assert schemes.weights_bytes(tiny_gqa, c) == base + 2 * 2 * (64 * 24 + 24 * 32)


def test_transient_counts_remat_buffers_and_cl_accumulator(tiny):
    T = np.array([100])
    act = schemes.transient_bytes(tiny, cfg("fp16", tiny), T)[0]
    # xquant unfused: dequantized X, K and V of one layer (fp16) on top of the activations
    x = schemes.transient_bytes(tiny, cfg("xquant", tiny, bits=2), T)[0]
    assert x - act == 100 * (64 + 64 + 64) * 2
    # fused: no intermediates in memory
    assert schemes.transient_bytes(tiny, cfg("xquant", tiny, bits=2, fused=True), T)[0] == act
    # CL keeps the accumulator X^ (T x d fp16) even when fused (its deltas are dequantized as they are added)
    cl = schemes.transient_bytes(tiny, cfg("xquant_cl", tiny, bits=2, fused=True), T)[0]
    assert cl - act == 100 * 64 * 2


def small_gpu(capacity: float) -> specs.HardwareProfile:
    hw = loading.load_hardware("h100_sxm")
    return hw.model_copy(update={"memory_bytes": specs.Figure(value=capacity, source="test"),
                                 "usable_fraction": specs.Figure(value=1.0, source="test")})


@pytest.mark.parametrize("scheme,kw", [("fp16", {}), ("kivi", {"bits": 2, "group": 16, "residual": 32}),
                                       ("xquant_yang", {"bits": 2, "group": 16, "residual": 32}),
                                       ("xquant_cl", {"bits": 3})])
def test_max_context_and_batch_brute_force(tiny, scheme, kw):
    c = cfg(scheme, tiny, **kw)
    groups = schemes.layout(tiny, c)
    W = schemes.weights_bytes(tiny, c)
    T = np.arange(0, 3000, dtype=np.int64)
    for B in (1, 3):
        per_seq = memory(tiny, c, 1, T)
        need = W + B * (per_seq["cache_bytes"] + per_seq["transient_bytes"])
        running = np.maximum.accumulate(need)  # a sequence must have fit at every shorter context
        cap = float(running[1234]) + 1
        expect = int(np.nonzero(running <= cap)[0].max())
        assert max_context(cap, W, seq_memory(tiny, c, groups), B) == expect
    cap = W + 10_000_000.5
    mb = max_batch(cap, W, seq_memory(tiny, c, groups), T[1:])
    per = memory(tiny, c, 1, T[1:])
    env = np.maximum.accumulate(per["cache_bytes"] + per["transient_bytes"])
    assert np.all(W + mb * env <= cap) and np.all(W + (mb + 1) * env > cap)


def test_kivi_memory_drops_when_a_key_block_is_quantized(tiny):
    c = cfg("kivi", tiny, bits=2, group=16, residual=32)
    m = memory(tiny, c, 1, np.array([31, 32]))["cache_bytes"]
    assert m[1] < m[0]  # 31 fp16 keys -> one quantized block of 32
    env = seq_memory(tiny, c, schemes.layout(tiny, c)).envelope(np.array([32, 33]))
    assert env[0] >= m[0]


def test_evaluate_fits_and_throughput_under_capacity(tiny):
    hw = small_gpu(2e6)
    c = specs.SchemeConfig(scheme="fp16")
    out = evaluate([hw], tiny, c, [1, 4, 64], [100, 1000, 10000])
    W = schemes.weights_bytes(tiny, c)
    assert np.all(out["fits"] == (out["total_bytes"] <= 2e6))  # fp16 memory grows monotonically
    # at each context the throughput-limited batch is min(max batch, largest batch of the grid)
    assert np.all(out["batch_cap"] == np.minimum(out["max_batch"], 64))
    mb = out["max_batch"][0, 0]
    per = memory(tiny, c, 1, np.array([100, 1000, 10000]))
    assert np.all(mb == np.floor((2e6 - W) / (per["cache_bytes"] + per["transient_bytes"])))
    # where nothing fits, there is no throughput
    assert np.all((out["throughput_cap_tokens_per_s"][0, 0] > 0) == (out["max_batch"][0, 0] > 0))


def test_weights_that_do_not_fit():
    model = loading.load_model("llama-3.1-70b")
    out = evaluate([loading.load_hardware("rtx_4090")], model, specs.SchemeConfig(scheme="fp16"), [1], [1024])
    assert not out["fits"].any() and out["max_batch"].max() == 0 and out["max_context"].max() == 0
    assert out["throughput_cap_tokens_per_s"].max() == 0


def test_xquant_fits_longer_context_than_fp16_on_h100():
    model, hw = loading.load_model("llama-3.1-8b"), loading.load_hardware("h100_sxm")
    fp16 = evaluate([hw], model, specs.SchemeConfig(scheme="fp16"), [16], [1024])["max_context"].item()
    gqa2 = evaluate([hw], model, specs.SchemeConfig(scheme="xquant_gqa", bits=2, fused=True), [16],
                    [1024])["max_context"].item()
    # fp16: (77.3 GB usable - 16.1 GB weights) / (16 sequences x 128 KiB per token) = 29.2k tokens
    assert 29_000 < fp16 < 29_300
    # 2-bit latents cost 2.25/16 of that per token (codes + scale/zero), plus 128 fp16 residual tokens
    assert gqa2 / fp16 > 5, f"xquant_gqa-2b fits {gqa2} tokens vs fp16 {fp16}"

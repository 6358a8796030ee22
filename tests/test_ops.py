"""FLOP and byte counts of the decode-step op lists (xqsim.schemes.ops and the attention blocks)."""

import numpy as np
import pytest
from conftest import cfg

from xqsim import loading, schemes, specs
from xqsim.roofline import kernels


def ops_by_name(model, c, B, T):
    ops = schemes.step_ops(model, c, np.int64(B), np.int64(T))
    out = {}
    for op in ops:
        out.setdefault(op.name, []).append(op)
    return ops, out


def total(ops, field="flops", cls=None, name=None):
    return sum(getattr(o, field) * o.layers for o in ops
               if (cls is None or o.cls == cls) and (name is None or o.name == name))


def test_fp16_step_flops_by_hand(tiny):
    # tiny: n=2, d=64, H=Hkv=4, hd=16, ffn=128, vocab=256; B=3, T=40
    B, T, n, d, f, V = 3, 40, 2, 64, 128, 256
    ops, by = ops_by_name(tiny, cfg("fp16", tiny), B, T)
    assert [o.name for o in ops[:1]] == ["embedding"] and ops[-1].name == "lm_head"
    assert by["q_proj"][0].flops == 2 * B * d * 64
    assert by["kv_proj"][0].flops == 2 * B * d * 128
    assert by["attention"][0].flops == 4 * B * 4 * T * 16
    assert by["mlp_gate_up"][0].flops == 2 * B * d * 2 * f
    assert by["mlp_down"][0].flops == 2 * B * f * d
    assert by["lm_head"][0].flops == 2 * B * d * V
    matmul = n * (2 * B * d * 64 * 2 + 2 * B * d * 128 + 2 * B * d * 2 * f + 2 * B * f * d) + 2 * B * d * V
    assert total(ops, cls="matmul") == matmul
    assert total(ops, cls="attention") == n * 4 * B * 4 * T * 16
    assert total(ops, cls="remat") == 0 and total(ops, cls="dequant") == 0
    # elementwise: 2 norms (4/elem), residual adds (1), swiglu (5), final norm; rope on q and k (3/elem)
    assert total(ops, cls="elementwise") == n * (2 * 4 * B * d + 2 * B * d + 5 * B * f) + 4 * B * d
    assert total(ops, cls="rope") == n * 3 * B * 128
    # the cache read by attention: K and V of T tokens, fp16
    assert by["attention"][0].read == B * 64 * 2 + B * T * 2 * 64 * 2


def test_fp16_step_reads_every_weight_once(tiny_gqa):
    m = tiny_gqa
    ops, _ = ops_by_name(m, cfg("fp16", m), 1, 1)
    d, f, V = m.d_model, m.ffn_dim, m.vocab_size
    w_matmul = m.n_layers * (2 * d * m.dq + 2 * d * m.dkv + 3 * d * f) + V * d
    # a matmul (1, k) @ (k, n) reads its weight plus k fp16 inputs: k = flops / (2n), n = write / 2
    weight_reads = sum(o.layers * (o.read - 2 * o.flops / o.write) for o in ops if o.cls == "matmul")
    assert weight_reads == w_matmul * m.weight_bytes


def test_kivi_dequantizes_only_the_quantized_tokens(tiny):
    # G=16, R=32, T=45: K has 32 quantized tokens, V 13; 2 FLOPs per dequantized value.
    B, T = 2, 45
    _, by = ops_by_name(tiny, cfg("kivi", tiny, bits=2, group=16, residual=32), B, T)
    assert by["dequant_k"][0].flops == 2 * B * 32 * 64
    assert by["dequant_v"][0].flops == 2 * B * 13 * 64
    assert by["dequant_k"][0].read == B * (64 * 2 * 4 + 64 * 2 * 4)  # codes + scale/zero
    assert by["dequant_k"][0].write == B * 32 * 64 * 2  # unfused: fp16 written back
    assert by["quantize_k"][0].flops == 5 * B * 64 and by["append_k"][0].write == B * 64 * 2


def test_xquant_remat_flops_mha(tiny):
    B, T, d = 3, 40, 64
    ops, by = ops_by_name(tiny, cfg("xquant", tiny, bits=4), B, T)
    assert total(ops, cls="remat") == tiny.n_layers * 4 * B * T * d * tiny.dkv  # K and V: 2 x 2mnk (m = B*T)
    assert "kv_proj" not in by  # X itself is cached
    assert by["rope_k"][0].flops == 3 * B * T * tiny.dkv  # RoPE on every rematerialized key


def test_paper_remat_flops_per_layer():
    # Tomar et al.: 4*T*d^2 per layer per step (MHA); 4*T*dkv^2 (GQA, full-rank SVD factors)
    mha, gqa = loading.load_model("llama-2-7b"), loading.load_model("llama-3.1-8b")
    T = 32768
    _, by = ops_by_name(mha, cfg("xquant", mha, bits=2), 1, T)
    assert by["remat_k"][0].flops + by["remat_v"][0].flops == 4 * T * 4096**2
    _, by = ops_by_name(gqa, cfg("xquant_gqa", gqa, bits=2), 1, T)
    assert by["remat_k"][0].flops + by["remat_v"][0].flops == 4 * T * 1024**2
    assert by["down_proj"][0].flops == 2 * 4096 * 2048


def test_absorb_v_cuts_value_flops_by_head_dim(tiny):
    B, T = 2, 50
    _, remat = ops_by_name(tiny, cfg("xquant", tiny, bits=4), B, T)
    ops, absorb = ops_by_name(tiny, cfg("xquant", tiny, bits=4, strategy="absorb_v"), B, T)
    assert "remat_v" not in absorb and "attention" not in absorb
    assert absorb["attention_qk"][0].flops == 2 * B * 4 * T * 16
    assert absorb["attention_px"][0].flops == 2 * B * 4 * T * 64
    assert absorb["v_absorb"][0].flops == 2 * B * 4 * 64 * 16
    assert remat["remat_v"][0].flops / absorb["attention_px"][0].flops == tiny.hd  # MHA: exactly hd


def test_fused_drops_intermediate_traffic_only(tiny):
    B, T = 4, 300
    unf, u = ops_by_name(tiny, cfg("xquant", tiny, bits=2), B, T)
    fus, f = ops_by_name(tiny, cfg("xquant", tiny, bits=2, fused=True), B, T)
    assert total(unf) == total(fus)  # same FLOPs
    assert f["dequant_x"][0].write == 0 and f["remat_k"][0].write == 0 and f["rope_k"][0].read == 0
    assert f["dequant_x"][0].read == u["dequant_x"][0].read  # codes and metadata are still read
    # the fused block is one kernel per layer: dequant, remat_k, rope_k, remat_v, attention
    fused_kernel = [k for k in kernels(fus) if len(k) > 1]
    assert [[o.name for o in k] for k in fused_kernel] == [["dequant_x", "remat_k", "rope_k", "remat_v", "attention"]]
    # unfused moves every intermediate: X written once and read twice (K and V); K written, read and
    # written by RoPE, read by attention; V written and read. d = dkv = 64 here.
    inter = B * T * 64 * 2
    assert total(unf, "bytes") - total(fus, "bytes") == tiny.n_layers * (3 + 4 + 2) * inter


def test_cl_accumulator_read_and_written_every_delta_layer(tiny):
    B, T = 2, 30
    _, by = ops_by_name(tiny, cfg("xquant_cl", tiny, bits=2, group=64, fused=True), B, T)
    # even fused, X^ is built in memory before the attention kernel, by a kernel that dequantizes and adds (as the
    # Triton engine does): the base layer writes it from its codes; the delta layer reads X^ and writes it back
    base = next(o for o in by["accumulate"] if o.flops == 0)
    delta = next(o for o in by["accumulate"] if o.flops > 0)
    assert base.write == delta.write == B * T * 64 * 2
    assert base.read == 0  # its codes are the dequant op's read, in the same kernel
    assert delta.read == B * T * 64 * 2 and delta.flops == B * T * 64
    ops = ops_by_name(tiny, cfg("xquant_cl", tiny, bits=2, group=64, fused=True), B, T)[0]
    fused_acc = [[o.name for o in k] for k in kernels(ops) if k[0].kernel == "accumulate"]
    assert fused_acc == [["dequant_x", "accumulate"], ["dequant_dx", "accumulate"]], fused_acc
    assert all(o.write == 0 for o in by["dequant_dx"] + by["dequant_x"])
    # the fused kernel reads X^ once for K and V
    assert all(o.kernel == "attention" for o in by["remat_k"] + by["remat_v"] + by["attention"])
    assert [o.read - 64 * 64 * 2 for o in by["remat_k"]] == [B * T * 64 * 2] * 2
    assert [o.read - 64 * 64 * 2 for o in by["remat_v"]] == [0, 0]


def test_cl_gqa_up_projects_then_rematerializes(tiny_gqa):
    B, T = 2, 30
    c = cfg("xquant_cl_gqa", tiny_gqa, bits=2, group=64)
    _, by = ops_by_name(tiny_gqa, c, B, T)
    r = c.rank_k + c.rank_v
    assert by["down_proj"][0].flops == 2 * B * 64 * r
    assert all(o.flops == 2 * B * T * r * 64 for o in by["up_proj"])
    assert all(o.flops == 2 * B * T * 64 * tiny_gqa.dkv for o in by["remat_k"])


@pytest.mark.parametrize("scheme", specs.SCHEMES)
def test_every_scheme_has_one_embedding_layers_and_head(scheme):
    model = loading.load_model("llama-3.1-8b")
    c = cfg(scheme, model, bits=16 if scheme == "fp16" else 2)
    ops = schemes.step_ops(model, c, np.int64(1), np.int64(1000))
    assert sum(o.layers for o in ops if o.name == "q_proj") == model.n_layers
    assert sum(o.layers for o in ops if o.name in ("attention", "attention_qk")) == model.n_layers
    assert [o.name for o in ops if o.layers == 1 and o.name in ("embedding", "final_norm", "lm_head")] == [
        "embedding", "final_norm", "lm_head"]
    assert all(np.all(np.asarray(o.flops) >= 0) and np.all(np.asarray(o.read) >= 0) for o in ops)

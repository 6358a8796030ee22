"""The engine on a CUDA device: bf16 decode agrees with fp32, every scheme's step captures as a CUDA graph,
and replaying the captured step (with its rollback) leaves the cache as it was. Skipped without CUDA."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from xqsim import loading, specs  # noqa: E402
from xqsim.engine.measure import fill, measure_one, time_graph  # noqa: E402
from xqsim.engine.model import Engine, Recorder  # noqa: E402

CONFIGS = [("fp16", {}), ("kivi", {"bits": 2}), ("xquant", {"bits": 2}),
           ("xquant", {"bits": 4, "strategy": "absorb_v"}),
           ("xquant_cl", {"bits": 2}), ("xquant_gqa", {"bits": 2}), ("xquant_gqa", {"bits": 2, "strategy": "absorb_v"}),
           ("xquant_cl_gqa", {"bits": 2}), ("xquant_yang", {"bits": 2}), ("kivi", {"bits": 2, "fused": True}),
           ("xquant", {"bits": 2, "fused": True})]


@pytest.mark.parametrize("scheme,kw", CONFIGS)
def test_graph_replay_keeps_the_cache(scheme, kw):
    m = loading.load_model("tiny-gqa")
    e = Engine(m, specs.SchemeConfig(scheme=scheme, **kw), device="cuda", dtype=torch.bfloat16,
               store_dtype=torch.bfloat16, tile=64)
    cache = e.new_cache()
    fill(e, cache, 3, 299)
    before = [{n: st.read(torch.float32).clone() for n, st in layer.items()} for layer in cache]
    tokens = torch.randint(0, m.vocab_size, (3,), device="cuda")
    snaps = [[st.snapshot() for st in layer.values()] for layer in cache]

    def one():
        e.step(tokens, cache, Recorder())
        for layer, snap in zip(cache, snaps, strict=True):
            for st, s in zip(layer.values(), snap, strict=True):
                st.rollback(s)

    r = time_graph(one, repeats=5, warmup=1)
    assert r["graph"] == "ok", f"{scheme} {kw}: {r['graph']}"
    assert r["step_time_graph_s"] > 0
    for i, (layer, old) in enumerate(zip(cache, before, strict=True)):
        for n, st in layer.items():
            assert torch.equal(st.read(torch.float32), old[n]), f"{scheme} {kw}: layer {i} {n} changed by replays"


def test_measure_one_reports_both_timings_and_exact_bytes():
    m = loading.load_model("tiny")
    r = measure_one(m, specs.SchemeConfig(scheme="kivi", bits=2), 2, 333, "cuda", torch.bfloat16, repeats=5, warmup=1,
                    kernels="torch")
    assert r["engine"] == "torch" and not r["fused"], (r["engine"], r["fused"])
    assert r["graph"] == "ok", r["graph"]
    assert r["cache_bytes_allocated"] == r["cache_bytes_analytic"], (r["cache_bytes_allocated"],
                                                                     r["cache_bytes_analytic"])
    assert 0 < r["step_time_graph_s"] <= r["step_time_s"] * 1.5, (r["step_time_graph_s"], r["step_time_s"])
    # per-op GPU kernel times from the profiler: every op launched kernels; they add up to at most the step's
    # kernels (rollback copies are outside any op) and the step's kernels take no longer than the eager step
    ops = r["ops"]
    launched = {n for n, o in ops.items() if o["kernels"] >= 1 and o["kernel_time_s"] > 0}
    assert {"attention", "q_proj", "mlp_down", "lm_head", "dequant_k"} <= launched, ops
    in_ops = sum(o["kernel_time_s"] for o in ops.values())
    assert in_ops <= r["kernel_time_s"] * (1 + 1e-9) <= r["step_time_s"], (in_ops, r["kernel_time_s"], r["step_time_s"])
    assert sum(o["kernels"] for o in ops.values()) <= r["kernels"], r["kernels"]


@pytest.mark.parametrize("scheme,kw", [("fp16", {}), ("kivi", {"bits": 2}), ("kivi", {"bits": 4}),
                                       ("kivi", {"bits": 3}), ("xquant_yang", {"bits": 2})])
def test_triton_engine_measures_fused_attention(scheme, kw):
    """The default engine on CUDA is the Triton one: K/V schemes run fused (one attention kernel and its merge, no
    dequant kernels; fp16 has nothing to fuse and is not marked so), the step captures as a CUDA graph, and the
    cache holds exactly the analytic bytes."""
    m = loading.load_model("tiny-gqa")
    r = measure_one(m, specs.SchemeConfig(scheme=scheme, **kw), 3, 1000, "cuda", torch.bfloat16, repeats=5, warmup=1)
    assert r["engine"] == "triton" and r["fused"] == (scheme != "fp16"), (scheme, r["engine"], r["fused"])
    assert r["graph"] == "ok", r["graph"]
    assert r["cache_bytes_allocated"] == r["cache_bytes_analytic"]
    ops = r["ops"]
    # Triton's kernels are timed too: given to the op whose range (which waits for the GPU) they ran in
    att = ops["attention"]
    assert r["kernel_attribution"] == "time" and att["kernels"] >= 1, (r.get("kernel_attribution"), att)
    assert 0 < att["kernel_time_s"] <= 1.2 * att["time_s"], att
    if scheme != "fp16":  # dequantized inside the attention kernel: the dequant ops ran nothing
        assert ops["dequant_k"]["kernels"] == 0 and ops["dequant_k"]["kernel_time_s"] == 0, ops["dequant_k"]
    assert 0 < r["step_time_graph_s"] <= r["step_time_s"] * 1.5, (r["step_time_graph_s"], r["step_time_s"])


def test_decode_attention_does_not_copy_the_cache():
    """Unfused attention reads the cache where it lies: at batch 4 and 64k tokens, the fp16 cache's attention
    takes about the time of reading K and V once (it took 5x longer per byte than at batch 1 when torch.matmul
    copied the strided K/V views)."""
    m = loading.load_model("llama-3.1-8b").model_copy(update={"n_layers": 1})
    per_byte = []
    for b in (1, 4):
        r = measure_one(m, specs.SchemeConfig(scheme="fp16"), b, 65536, "cuda", torch.bfloat16, repeats=5, warmup=2,
                        kernels="torch")  # SDPA: its kernels are profiled per op
        kv_bytes = 2 * b * 65536 * m.dkv * 2
        per_byte.append(r["ops"]["attention"]["kernel_time_s"] / kv_bytes)
    assert per_byte[1] <= 1.5 * per_byte[0], f"attention s/byte at batch 1, 4: {per_byte}"
    assert per_byte[0] <= 1 / 1.5e12, f"attention at batch 1 reads K and V at {1 / per_byte[0] / 1e9:.0f} GB/s"


def test_bf16_on_gpu_agrees_with_fp32():
    m = loading.load_model("tiny-gqa")
    w = Engine(m, specs.SchemeConfig(scheme="fp16"), device="cuda", dtype=torch.float32).w
    tokens = torch.randint(0, m.vocab_size, (2, 12), device="cuda")
    outs = []
    for dt in (torch.float32, torch.bfloat16):
        e = Engine(m, specs.SchemeConfig(scheme="xquant", bits=16), device="cuda", dtype=dt, store_dtype=dt,
                   weights={k: v.to(dt) for k, v in w.items()})
        cache = e.new_cache()
        outs.append(torch.stack([e.step(tokens[:, t], cache).float() for t in range(12)], 1))
    rel = ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()
    assert rel < 0.05, f"bf16 vs fp32 logits: max diff {rel:.3f} of the largest logit"

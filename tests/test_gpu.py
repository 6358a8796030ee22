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
    r = measure_one(m, specs.SchemeConfig(scheme="kivi", bits=2), 2, 333, "cuda", torch.bfloat16, repeats=5, warmup=1)
    assert r["graph"] == "ok", r["graph"]
    assert r["cache_bytes_allocated"] == r["cache_bytes_analytic"], (r["cache_bytes_allocated"],
                                                                     r["cache_bytes_analytic"])
    assert 0 < r["step_time_graph_s"] <= r["step_time_s"] * 1.5, (r["step_time_graph_s"], r["step_time_s"])


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

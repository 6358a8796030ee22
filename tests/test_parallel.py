"""Tensor parallelism (xqsim.parallel): what one rank of tp holds, byte for byte, for every scheme, including tp
larger than the KV heads."""

import numpy as np
import pytest

from xqsim import loading, parallel
from xqsim.capacity import memory
from xqsim.specs import SchemeConfig, UserError

L31 = loading.load_model("llama-3.1-8b")  # 32 query heads, 8 KV heads, head dim 128, d 4096, ffn 14336
T = np.array([1000, 32768])


def cache(model, cfg, B=3):
    return memory(model, cfg, B, T)["cache_bytes"]


def per_rank(scheme, tp, svd="whole", **kw):
    rank, rc = parallel.rank_config(L31, SchemeConfig(scheme=scheme, **kw), tp, svd)
    return rank, rc, memory(rank, rc, 3, T)


@pytest.mark.parametrize("scheme,kw", [("fp16", {}), ("kivi", {"bits": 2}), ("kivi", {"bits": 3}),
                                       ("xquant_yang", {"bits": 2})])
def test_kv_caches_shard_with_their_heads_and_replicate_past_them(scheme, kw):
    """K/V caches: a rank holds 1/tp of them while tp divides the 8 KV heads, and one KV head's worth (1/8) at tp 16
    and 32, where each KV head is held by tp/8 ranks."""
    whole = cache(L31, SchemeConfig(scheme=scheme, **kw).resolved(L31))
    for tp in (1, 2, 4, 8, 16, 32):
        got = per_rank(scheme, tp, **kw)[2]["cache_bytes"]
        assert np.array_equal(got * min(tp, 8), whole), (scheme, tp, got, whole)


@pytest.mark.parametrize("scheme", ["xquant", "xquant_cl"])
def test_xquant_caches_x_whole_on_every_rank(scheme):
    """X is d values a token whatever the sharding: each rank caches all of it, so at tp 8 XQuant-2's cache a rank is
    larger than fp16's (the question tensor parallelism puts to XQuant)."""
    whole = cache(L31, SchemeConfig(scheme=scheme, bits=2).resolved(L31))
    for tp in (2, 8, 32):
        assert np.array_equal(per_rank(scheme, tp, bits=2)[2]["cache_bytes"], whole), (scheme, tp)
    assert (per_rank("xquant", 8, bits=2)[2]["cache_bytes"] > per_rank("fp16", 8)[2]["cache_bytes"]).all()


@pytest.mark.parametrize("scheme", ["xquant_gqa", "xquant_cl_gqa"])
def test_gqa_latents_whole_or_per_rank(scheme):
    """The whole-matrix SVD's latent is cached whole on every rank (ranks of the whole model); a per-rank SVD caches
    the latent of the rank's own shard of Wk and Wv, of rank dkv/tp: the cache of the whole model at that rank."""
    cfg = SchemeConfig(scheme=scheme, bits=2)
    whole = cache(L31, cfg.resolved(L31))
    for tp in (2, 4, 8):
        _, rc, mem = per_rank(scheme, tp, "whole", bits=2)
        assert (rc.rank_k, rc.rank_v) == (cfg.resolved(L31).rank_k, cfg.resolved(L31).rank_v) and \
            np.array_equal(mem["cache_bytes"], whole), (scheme, tp)
        _, rc, mem = per_rank(scheme, tp, "per_rank", bits=2)
        small = SchemeConfig(scheme=scheme, bits=2, rank_k=1024 // tp, rank_v=1024 // tp).resolved(L31)
        assert (rc.rank_k, rc.rank_v) == (1024 // tp, 1024 // tp), (rc.rank_k, rc.rank_v)
        assert np.array_equal(mem["cache_bytes"], cache(L31, small)), (scheme, tp)


def test_weights_of_a_rank_by_hand():
    """fp16 at tp 2 on Llama-3.1-8B: per layer Wq, Wk, Wv, Wo and the MLP halved, both norms whole; the embedding
    and the (untied) head halved by vocabulary; the final norm whole; 2 bytes each."""
    d, dq, dkv, ffn, V, n = 4096, 4096, 1024, 14336, 128256, 32
    layer = d * dq // 2 + 2 * d * dkv // 2 + dq // 2 * d + 3 * d * ffn // 2 + 2 * d
    assert per_rank("fp16", 2)[2]["weights_bytes"] == 2 * (n * layer + 2 * (V // 2) * d + d)


@pytest.mark.parametrize("tp,fragment", [(3, "does not split llama-3.1-8b's 32 query heads and 8 KV heads evenly; "
                                              "allowed: 1, 2, 4, 8, 16, 32"),
                                         (0, "0 is not allowed; allowed: a whole number from 1"),
                                         (True, "True is not allowed")])
def test_a_degree_that_does_not_split_the_heads_is_refused(tp, fragment):
    with pytest.raises(UserError) as e:
        parallel.rank_model(L31, tp)
    assert fragment in str(e.value), str(e.value)


def test_alpha_beta_fit_recovers_a_link():
    """benchmarks/allreduce.py's fit: times made from alpha 12 us and beta 400 GB/s on 8 ranks give them back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import allreduce

    sizes = [2**k for k in range(3, 29)]
    times = [12e-6 + allreduce.wire_bytes(s, 8) / 400e9 for s in sizes]
    alpha, beta = allreduce.fit_alpha_beta(sizes, times, 8)
    assert alpha == pytest.approx(12e-6, rel=1e-6) and beta == pytest.approx(400e9, rel=1e-6), (alpha, beta)
    assert allreduce.wire_bytes(1000, 2) == 1000 and allreduce.wire_bytes(1000, 8) == 1750


def test_allreduce_benchmark_runs_two_ranks_on_cpu(tmp_path):
    """The benchmark as a user runs it (its own process: its ranks are spawned from it), two gloo ranks on the CPU:
    it reduces messages of the sizes asked, times each, writes its JSON and CSV and ends with the fit."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "allreduce.py"
    p = subprocess.run([sys.executable, str(script), "--backend", "gloo", "--world", "2", "--sizes", "8,4k,16M",
                        "--repeats", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "allreduce.json").read_text())
    assert [r["bytes"] for r in res["rows"]] == [8, 4096, 16 << 20], res["rows"]  # 16 MiB: bandwidth-bound
    assert all(r["time_s"] > 0 for r in res["rows"]) and res["info"]["world"] == 2, res
    assert res["alpha_s"] >= 0 and 0 < res["beta_bytes_per_s"] < float("inf"), (res["alpha_s"], res["beta_bytes_per_s"])
    assert (tmp_path / "allreduce.csv").is_file() and p.stdout.splitlines()[-1].startswith("alpha_us: ")

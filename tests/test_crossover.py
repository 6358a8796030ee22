"""Crossovers and memory walls over a sweep (xqsim.crossover)."""

import numpy as np
import pandas as pd
import pytest

from xqsim import loading, specs, sweep
from xqsim.crossover import crossovers, memory_walls


def point(label, context, step, fits=True, tput=1.0, wall=10**6):
    return ("gpu", "m", label, 1, context, step, 1e3, fits, tput, wall)


def frame(rows):
    cols = ["hardware", "model", "label", "batch", "context", "step_time_s", "tokens_per_s", "fits",
            "throughput_cap_tokens_per_s", "max_context"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("hardware", "model", "label"):
        df[c] = df[c].astype("category")
    return df


def test_step_time_crossover_interpolated_in_log_context():
    # A: 1 ms then 3 ms; B: 2 ms flat. The difference is linear in log(context) between 500 and 2000,
    # so it crosses zero at the geometric mean, 1000.
    rows = [point("A", 500, 1e-3), point("A", 2000, 3e-3), point("B", 500, 2e-3), point("B", 2000, 2e-3)]
    cr = crossovers(frame(rows))
    st = cr[cr["metric"] == "step_time_s"]
    assert len(st) == 1
    hit = st.iloc[0]
    assert hit["crossover"] == pytest.approx(1000.0)
    assert (hit["scheme_a"], hit["scheme_b"], hit["winner"], hit["at"]) == ("A", "B", "B", "batch=1")


def test_no_crossover_where_a_scheme_does_not_fit():
    rows = [point("A", 500, 1e-3, tput=2.0), point("A", 2000, 3e-3, fits=False, tput=0.0),
            point("B", 500, 2e-3), point("B", 2000, 2e-3)]
    cr = crossovers(frame(rows))
    assert cr[cr["metric"] == "step_time_s"].empty
    # capacity-limited throughput counts running out of memory: B overtakes A between 500 and 2000
    tp = cr[cr["metric"] == "throughput_cap_tokens_per_s"]
    assert len(tp) == 1 and tp.iloc[0]["winner"] == "B"


def test_real_sweep_capacity_limited_throughput_crossovers():
    """Llama-3.1-8B on an H100, batch up to 256. KIVI-2 fused (dequantized in the attention kernel, as
    KIVI's own kernels do) reads 2.25/16 of fp16's cache bytes: it serves more tokens/s at every context
    from 1k on, no crossover. XQuant-GQA-2 (absorb_v, fused) rebuilds K at 512 FLOP per fp16 cache byte
    it replaces, above the H100's 295 FLOP/B ridge, so at the spec roofline it overtakes fp16 only where
    fp16 stops fitting a single sequence (its memory wall at batch 1)."""
    hw, model = loading.load_hardware("h100_sxm"), loading.load_model("llama-3.1-8b")
    xq = "xquant_gqa-2b-absorb_v-fused"
    configs = [specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2, fused=True),
               specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v", fused=True)]
    ctx = [int(x) for x in np.geomspace(1024, 2**20, 41)]
    df = sweep.run([hw], [model], configs, [1, 16, 64, 256], ctx, rate_mode="spec")  # the spec roofline
    cr = crossovers(df)
    tp = cr[cr["metric"] == "throughput_cap_tokens_per_s"].set_index(["scheme_a", "scheme_b"])
    assert ("fp16", "kivi-2b-fused") not in tp.index
    b1 = df[df["batch"] == 1].pivot_table(index="context", columns="label", values="throughput_cap_tokens_per_s",
                                          observed=True)
    assert (b1["kivi-2b-fused"] > b1["fp16"]).all()
    assert b1.loc[1024, "kivi-2b-fused"] / b1.loc[1024, "fp16"] > 1.5  # both at batch 256: less cache to read
    xquant = tp.loc[("fp16", xq)]
    wall = df[(df["label"] == "fp16") & (df["batch"] == 1)]["max_context"].iloc[0]
    assert xquant["winner"] == xq
    assert abs(np.log(xquant["crossover"] / wall)) < np.log(ctx[1] / ctx[0]), (xquant["crossover"], wall)
    big = df[(df["context"] == ctx[-1]) & (df["batch"] == 1)].set_index("label")
    assert big.loc[xq, "throughput_cap_tokens_per_s"] > 0
    assert big.loc["fp16", "throughput_cap_tokens_per_s"] == 0  # 1M tokens of fp16 KV do not fit at all


def test_crossover_at_a_memory_wall_is_the_wall():
    """H100, Llama-3.1-8B, the flagship's 48 contexts and batches up to 256: fp16's capacity-limited throughput
    leads XQuant-GQA-2 absorb_v fused until fp16 stops fitting one sequence. Interpolating between the grid points
    put the flip at 453,738 tokens, where fp16 still wins (41.4 vs 29.1 tok/s); solved on the model it is fp16's
    memory wall, 467,288."""
    from xqsim.sweep import solve_crossovers

    sc = loading.load_scenario(loading.ROOT / "scenarios" / "long_ctx.yaml")
    hw, model = loading.load_hardware("h100_sxm"), loading.load_model("llama-3.1-8b")
    xq = specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v", fused=True)
    configs = [specs.SchemeConfig(scheme="fp16"), xq]
    df = sweep.run([hw], [model], configs, sc.batch, sc.contexts(), rate_mode=sc.rates)  # at spec, as the sweep
    raw = crossovers(df, ("throughput_cap_tokens_per_s",))
    exact = solve_crossovers(raw, [hw], [model], configs, max(sc.batch), rate_mode=sc.rates)
    row = exact.set_index(["scheme_a", "scheme_b"]).loc[("fp16", xq.label)]
    wall = int(df[(df["label"] == "fp16") & (df["batch"] == 1)]["max_context"].iloc[0]) + 1
    assert wall == 467288 and row["winner"] == xq.label
    assert row["crossover"] == wall, (row["crossover"], raw["crossover"].tolist())
    assert abs(raw["crossover"].iloc[0] / wall - 1) > 0.02  # interpolation alone was 2.9% off
    at = sweep.evaluate([hw], model, configs[0], [1], [wall - 1, wall], rate_mode=sc.rates, batch_limit=max(sc.batch))
    assert at["throughput_cap_tokens_per_s"][0, 0, 0] > 0 == at["throughput_cap_tokens_per_s"][0, 0, 1]


def test_solved_crossover_is_the_first_point_the_winner_leads():
    """Step time at batch 16 on the spec roofline: XQuant-GQA-2 (remat) passes XQuant-2 absorb_v fused between 2k
    and 3k tokens. At the solved context the winner leads, one token before it does not, and the point lies inside
    its bracket of grid points."""
    from xqsim.sweep import solve_crossovers

    hw, model = loading.load_hardware("h100_sxm"), loading.load_model("llama-3.1-8b")
    configs = [specs.SchemeConfig(scheme="xquant", bits=2, strategy="absorb_v", fused=True),
               specs.SchemeConfig(scheme="xquant_gqa", bits=2)]
    ctx = [int(x) for x in np.geomspace(1024, 8192, 5)]
    df = sweep.run([hw], [model], configs, [16], ctx, rate_mode="spec")
    cr = solve_crossovers(crossovers(df, ("step_time_s",)), [hw], [model], configs, 16, rate_mode="spec")
    assert len(cr) >= 1, cr
    for r in cr.itertuples():
        x = int(r.crossover)
        assert r.lo < x <= r.hi
        t = {c.label: sweep.evaluate([hw], model, c, [16], [x - 1, x], rate_mode="spec")["step_time_s"][0, 0]
             for c in configs}
        loser = r.scheme_a if r.winner == r.scheme_b else r.scheme_b
        assert t[r.winner][1] < t[loser][1] and t[r.winner][0] >= t[loser][0], (x, t)


def test_memory_walls():
    rows = [point("A", 500, 1e-3, wall=1234), point("A", 2000, 3e-3, fits=False, tput=0.0, wall=1234)]
    w = memory_walls(frame(rows))
    assert w["memory_wall_context"].tolist() == [1235]


def test_ridge_point_decides_where_remat_pays():
    """Qwen2.5-7B (dkv 512): XQuant-GQA rebuilds K at rk/2 = 256 FLOP per fp16 cache byte. Below the H100's
    ridge (295 FLOP/B) it passes fp16 in capacity-limited throughput within the first few thousand tokens;
    above the A100's ridge (153 FLOP/B) it does not pass fp16 anywhere fp16 fits."""
    model = loading.load_model("qwen2.5-7b")
    configs = [specs.SchemeConfig(scheme="fp16"),
               specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v", fused=True)]
    ctx = [int(x) for x in np.geomspace(1024, 2**19, 37)]
    for gpu, expect in (("h100_sxm", (1024, 10_000)), ("a100_80gb", None)):
        df = sweep.run([loading.load_hardware(gpu)], [model], configs, [1, 256], ctx, rate_mode="spec")
        cr = crossovers(df)
        tp = cr[cr["metric"] == "throughput_cap_tokens_per_s"]
        if expect:
            assert len(tp) == 1 and expect[0] < tp["crossover"].iloc[0] < expect[1], tp.to_string()
            assert tp["winner"].iloc[0] == "xquant_gqa-2b-absorb_v-fused"
        else:
            assert tp.empty, tp.to_string()

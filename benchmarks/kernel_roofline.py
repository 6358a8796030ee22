"""The Triton decode kernels against the roofline (needs CUDA).

For each scheme variant and batch x context where it fits: the attention kernel's time (split-KV kernel and its
merge, captured in a CUDA graph over enough layers' caches that nothing is served from L2), the bytes and FLOPs
the analytic fused attention op says it must move (codes, scale/zero, residual window, q and the output), its
share of the GPU's spec bandwidth and peak, and its speedup over the fp16 kernel at the same shape; torch's
SDPA on the fp16 cache beside it. Then quantize-on-append and RoPE per layer, and the whole CUDA-graph decode
step of 2 layers and of the full model. Prints a table per part and, last, `min_pct_of_roofline: <number>`
(the worst attention kernel at context >= 8k). --tune times kernel variants instead (block, warps, conversion).
--remat times the fused rematerialization kernels of XQuant and XQuant-GQA instead (per layer: share of the bf16
tensor peak or of the bandwidth, whichever binds; `min_pct_of_remat_roofline`), XQuant-CL's accumulation kernel
(share of the bandwidth), then the full-model steps.

    python benchmarks/kernel_roofline.py [--out DIR] [--quick] [--tune] [--remat] [--remat-tune] [--paper] [--across]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import triton

from xqsim import loading, schemes, specs
from xqsim.engine.cache import Store
from xqsim.engine.kernels.attention import Source, decode_attention

WRONG = 2e-2  # relative error against float64 above which a kernel row is flagged wrong (bf16 lands near 4e-3)
L2_FLUSH_BYTES = 4 * 60e6  # rotate over caches of at least 4x the H200's 60 MB L2
SPEC = "h200"


def graph_time(fn, repeats: int = 20) -> float:
    """Median seconds of one replay of fn captured as a CUDA graph (the engine's own graph timer)."""
    from xqsim.engine.measure import time_graph

    r = time_graph(fn, repeats, warmup=1)
    if r["graph"] != "ok":
        raise RuntimeError(f"CUDA graph: {r['graph']}")
    return r["step_time_graph_s"]


def warm_up(seconds: float = 3.0) -> None:
    """Run matrix products until the clocks have ramped up (an idle H200 sits at 345 MHz)."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time.time()
    while time.time() - t < seconds:
        x @ x
        torch.cuda.synchronize()


def layer_stores(spec, cfg, B: int, T: int, dtype, seed: int, kernels: str = "triton") -> dict[str, Store]:
    """One layer's K and V stores holding T random tokens (unit-scale values), packed as `kernels`' engine packs."""
    from xqsim.engine.measure import fill

    group = schemes.layout(spec, cfg)[-1]
    stores = {t.name: Store(t, cfg.group, cfg.residual or 0, dtype, kernels=kernels) for t in group.tensors}
    fill(types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype), [stores], B, T, seed)
    return stores


def reference(q, k: Store, v: Store) -> torch.Tensor:
    """softmax(qK^T/sqrt(hd))V in fp32 over the dequantized cache: (B, H, hd)."""
    B, H, hd = q.shape
    K, V = k.read(torch.float32), v.read(torch.float32)  # (B, T, dkv)
    Hkv = K.shape[-1] // hd
    K = K.view(B, -1, Hkv, hd).transpose(1, 2)
    V = V.view(B, -1, Hkv, hd).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], K, V, enable_gqa=True)
    return o[:, :, 0]


def attention_cases(spec, configs, batches, contexts, variants, hw, out_rows, check: bool):
    dtype = torch.bfloat16
    H, hd = spec.n_heads, spec.hd
    for label, cfg in configs:
        cfg = cfg.resolved(spec)
        for B in batches:
            for T in contexts:
                nbytes, flops = kernel_op(spec, cfg, B, T)
                layers = max(1, min(32, math.ceil(L2_FLUSH_BYTES / nbytes)))
                free = torch.cuda.mem_get_info()[0]
                est = layers * B * T * (2 * spec.dkv * 2 if cfg.bits >= 16 else spec.dkv * 1.5)
                if est > 0.6 * free:
                    continue
                try:
                    caches = [layer_stores(spec, cfg, B, T, dtype, seed=i) for i in range(layers)]
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    continue
                q = torch.randn(B, H, hd, device="cuda", dtype=dtype)
                srcs = [(Source.of(c["k"]), Source.of(c["v"])) for c in caches]
                row0 = {"scheme": label, "batch": B, "context": T, "bytes": nbytes, "flops": flops, "layers": layers}
                ref = reference(q, caches[0]["k"], caches[0]["v"]) if check and B * T <= 2**19 else None
                for vname, kw in variants:
                    if len(variants) > 1:
                        print(f"{label} B{B} T{T} {vname} ...", flush=True)
                    try:
                        t = graph_time(lambda kw=kw, q=q, srcs=srcs: [decode_attention(q, k, v, **kw)
                                                                      for k, v in srcs]) / layers
                    except triton.runtime.errors.OutOfResources as err:
                        print(f"{label} B{B} T{T} {vname}: {str(err)[:80]}")
                        continue
                    if ref is not None:
                        got = decode_attention(q, *srcs[0], **kw).float()
                        row0 = row0 | {"rel_err": ((got - ref).norm() / ref.norm()).item()}
                    out_rows.append(row0 | {"kernel": vname, "time_s": t, "tb_s": nbytes / t / 1e12,
                                            "pct_bw": 100 * nbytes / t / hw.mem_bytes_per_s.value,
                                            "pct_peak": 100 * flops / t / hw.flops_per_s["bf16"].value})
                if cfg.bits >= 16:  # torch's SDPA (flash decoding) on the same fp16 cache
                    kv = [(c["k"].fp.view(B, T, -1, hd).transpose(1, 2), c["v"].fp.view(B, T, -1, hd).transpose(1, 2))
                          for c in caches]
                    qh = q[:, :, None]
                    t = graph_time(lambda qh=qh, kv=kv: [torch.nn.functional.scaled_dot_product_attention(
                        qh, k, v, enable_gqa=True) for k, v in kv]) / layers
                    out_rows.append(row0 | {"kernel": "sdpa", "time_s": t, "tb_s": nbytes / t / 1e12,
                                            "pct_bw": 100 * nbytes / t / hw.mem_bytes_per_s.value,
                                            "pct_peak": 100 * flops / t / hw.flops_per_s["bf16"].value})
                print(" | ".join(f"{r['scheme']} B{B} T{T} {r['kernel']}: {r['time_s'] * 1e6:.0f}us "
                                 f"{r['tb_s']:.2f}TB/s {r['pct_bw']:.0f}%"
                                 + (f" err {r['rel_err']:.0e}" if "rel_err" in r else "")
                                 for r in out_rows if r.get("batch") == B and r.get("context") == T
                                 and r.get("scheme") == label), flush=True)
                del caches, srcs
                torch.cuda.empty_cache()


def kernel_op(spec, cfg, B: int, T: int) -> tuple[float, float]:
    """Bytes and FLOPs of one layer's ops that the analytic fused model runs as its attention kernel."""
    ops = schemes.step_ops(spec, cfg.model_copy(update={"fused": True}), np.int64(B), np.int64(T))
    per_layer = {o.name: (float(o.bytes), float(o.flops)) for o in ops if o.kernel == "attention"}  # last group's
    return sum(b for b, _ in per_layer.values()), sum(f for _, f in per_layer.values())


def remat_sources(cfg, stores: dict[str, Store]) -> dict:
    """remat_attention's sources from one layer's stores: X, or the key latent (its fp16 first channel) and the
    value latent."""
    if cfg.scheme == "xquant_gqa":
        return dict(xk=Source.of(stores["xk"]), xv=Source.of(stores["xv"]),
                    x0=Source.of(stores["xk0"]) if "xk0" in stores else None)
    return dict(xk=Source.of(next(iter(stores.values()))), xv=None, x0=None)


def run_all(fns) -> list:
    return [f() for f in fns]


def remat_cases(spec, configs, points, hw, out_rows, check: bool, variants=(("triton", {}),)) -> None:
    """The fused rematerialization kernel per layer (xqsim.engine.kernels.remat): time (CUDA graph over enough
    layers' sources that they are not served from L2), the analytic fused op's bytes and FLOPs, its share of the
    spec bandwidth and of the bf16 tensor peak, and which of the two binds (`pct_roofline` is the binding one)."""
    from xqsim.engine.kernels.remat import remat_attention

    dtype = torch.bfloat16
    H, hd, dkv = spec.n_heads, spec.hd, spec.dkv
    for label, cfg in configs:
        cfg = cfg.resolved(spec)
        absorb = cfg.strategy == "absorb_v"
        for B, T in points:
            nbytes, flops = kernel_op(spec, cfg, B, T)
            code_bytes = B * T * sum(t.width * max(t.bits, 2) / 8 for t in schemes.layout(spec, cfg)[-1].tensors)
            layers = max(1, min(8, math.ceil(L2_FLUSH_BYTES / code_bytes)))
            try:
                caches = [layer_stores(spec, cfg, B, T, dtype, seed=i) for i in range(layers)]
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            g = torch.Generator(device="cuda").manual_seed(0)
            if cfg.scheme == "xquant_gqa":
                kw_rows, vw_rows = cfg.rank_k, cfg.rank_v
            else:
                kw_rows = vw_rows = spec.d_model
            wk = (torch.randn(kw_rows, dkv, generator=g, device="cuda") / kw_rows**0.5).to(dtype)
            wv = (torch.randn(vw_rows, dkv, generator=g, device="cuda") / vw_rows**0.5).to(dtype)
            q = torch.randn(B, H, hd, device="cuda", dtype=dtype)

            srcs = [remat_sources(cfg, c) for c in caches]
            for vname, kw in variants:
                call = [functools.partial(remat_attention, q, sr["xk"], wk, spec.rope_theta, x0=sr["x0"], xv=sr["xv"],
                                          wv=wv, absorb=absorb, **kw) for sr in srcs]
                row = {"part": "remat", "scheme": label, "batch": B, "context": T, "bytes": nbytes, "flops": flops,
                       "layers": layers, "kernel": vname}
                try:
                    t = graph_time(functools.partial(run_all, call)) / layers
                except (triton.runtime.errors.OutOfResources, RuntimeError) as err:
                    print(f"remat {label} B{B} T{T} {vname}: {str(err)[:120]}", flush=True)
                    continue
                if check and B * T <= 2**17:
                    ref = remat_reference(spec, cfg, caches[0], q, wk, wv)
                    row["rel_err"] = ((call[0]().double() - ref).norm() / ref.norm()).item()
                remat_row(row, t, hw, out_rows)
            del caches, srcs
            torch.cuda.empty_cache()


def remat_reference(spec, cfg, stores, q, wk, wv) -> torch.Tensor:
    """xqsim.engine.kernels.remat.reference over one layer's stores, in float64."""
    from xqsim.engine.kernels.remat import reference

    absorb = cfg.strategy == "absorb_v"
    if cfg.scheme == "xquant_gqa":
        x0 = stores["xk0"].read(torch.float64) if "xk0" in stores else None
        return reference(q, stores["xk"].read(torch.float64), wk, spec.rope_theta, stores["xv"].read(torch.float64), wv,
                         x0=x0, absorb=absorb)
    return reference(q, next(iter(stores.values())).read(torch.float64), wk, spec.rope_theta, wv=wv, absorb=absorb)


def remat_row(row: dict, t: float, hw, out_rows: list) -> None:
    """Time, throughput and share of the roofline (compute or memory, whichever binds) of one remat kernel row."""
    flops, nbytes = row["flops"], row["bytes"]
    t_peak, t_bw = flops / hw.flops_per_s["bf16"].value, nbytes / hw.mem_bytes_per_s.value
    row |= {"time_s": t, "tflops": flops / t / 1e12, "tb_s": nbytes / t / 1e12, "pct_peak": 100 * t_peak / t,
            "pct_bw": 100 * t_bw / t, "bound": "compute" if t_peak >= t_bw else "memory",
            "pct_roofline": 100 * max(t_peak, t_bw) / t}
    err = row.get("rel_err")
    if err is not None and not err < WRONG:  # NaN too
        row["wrong"] = True
    out_rows.append(row)
    print(("WRONG " if row.get("wrong") else "")
          + f"remat {row['scheme']} B{row['batch']} T{row['context']} {row['kernel']}: {t * 1e6:.0f} us/layer, "
          f"{row['tflops']:.0f} TFLOP/s ({row['pct_peak']:.1f}% of bf16 peak), {row['tb_s']:.2f} TB/s "
          f"({row['pct_bw']:.1f}% of bandwidth), {row['bound']}-bound: {row['pct_roofline']:.1f}% of roofline"
          + (f", err {row['rel_err']:.0e}" if "rel_err" in row else ""), flush=True)


def accumulate_cases(spec, points, hw, out_rows) -> None:
    """XQuant-CL's accumulation kernel per layer (kernels.remat.accumulate: X^ + deq(delta), 2-bit deltas): its
    time and share of the spec bandwidth, over the bytes the analytic fused model gives its kernel (the delta's
    codes and scale/zero, X^ read and written)."""
    from xqsim.engine.kernels.remat import accumulate

    cfg = specs.SchemeConfig(scheme="xquant_cl", bits=2, fused=True).resolved(spec)
    for B, T in points:
        ops = schemes.step_ops(spec, cfg, np.int64(B), np.int64(T))
        mine = {"accumulate"} | {f"dequant_{t.name}" for t in schemes.layout(spec, cfg)[-1].tensors}  # delta layer
        per_layer = {o.name: float(o.bytes) for o in ops if o.kernel == "accumulate" and o.name in mine}
        nbytes = sum(per_layer.values())
        stores = layer_stores(spec, cfg, B, T, torch.bfloat16, seed=0)  # the delta layer's store, `dx`
        acc = torch.randn(B, T, spec.d_model, device="cuda", dtype=torch.bfloat16)
        t = graph_time(functools.partial(accumulate, Source.of(stores["dx"]), acc))
        row = {"part": "accumulate", "scheme": "xquant_cl-2", "batch": B, "context": T, "bytes": nbytes,
               "time_s": t, "tb_s": nbytes / t / 1e12, "pct_bw": 100 * nbytes / t / hw.mem_bytes_per_s.value}
        out_rows.append(row)
        print(f"accumulate xquant_cl-2 B{B} T{T}: {t * 1e6:.0f} us/layer, {row['tb_s']:.2f} TB/s "
              f"({row['pct_bw']:.1f}% of bandwidth)", flush=True)
        del stores, acc
        torch.cuda.empty_cache()


ACROSS_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
ACROSS_CONFIGS = [(c.label, c) for c in (
    specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2),
    specs.SchemeConfig(scheme="xquant_yang", bits=2),
    specs.SchemeConfig(scheme="xquant", bits=2, strategy="remat"),
    specs.SchemeConfig(scheme="xquant", bits=2, strategy="absorb_v"),
    specs.SchemeConfig(scheme="xquant_cl", bits=2), specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="remat"),
    specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v"),
    specs.SchemeConfig(scheme="xquant_cl_gqa", bits=2))]
PAPER_CONTEXTS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def as_run(cfg):
    """The configuration the Triton engine runs for cfg: fused wherever there is something to fuse (what the
    model is asked for when it is set beside these steps)."""
    return cfg.model_copy(update={"fused": schemes.SCHEMES[cfg.scheme].compresses})
REMAT_CONFIGS = [("xquant-2 absorb", specs.SchemeConfig(scheme="xquant", bits=2, strategy="absorb_v")),
                 ("xquant-2 remat", specs.SchemeConfig(scheme="xquant", bits=2, strategy="remat")),
                 ("xquant_gqa-2 absorb", specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v")),
                 ("xquant_gqa-2 remat", specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="remat"))]
# --paper: fp16, XQuant-2 remat, XQuant-2 absorb_v
PAPER_CONFIGS = [("fp16", specs.SchemeConfig(scheme="fp16")), REMAT_CONFIGS[1], REMAT_CONFIGS[0]]


def maintenance_cases(spec, batches, out_rows) -> None:
    """Per layer: quantize-on-append of KIVI-2 (every step: V's token leaving the window, K's token into its
    window; every R steps: K's window of R tokens per channel) and RoPE of q and the new k, Triton vs torch."""
    from xqsim.engine.model import rope

    cfg = specs.SchemeConfig(scheme="kivi", bits=2).resolved(spec)
    R, dtype = cfg.residual, torch.bfloat16
    for B in batches:
        for kernels in ("triton", "torch"):
            for flush in (False, True):
                caches = []
                for i in range(16):  # rotate over 16 layers' stores
                    caches.append(layer_stores(spec, cfg, B, 8192 + (R - 1 if flush else 0), dtype, seed=i,
                                               kernels=kernels))
                new = torch.randn(B, 1, spec.dkv, device="cuda", dtype=dtype)
                snaps = [[x.snapshot() for x in st.values()] for st in caches]

                def step(caches=caches, new=new, snaps=snaps):
                    for st, sn in zip(caches, snaps, strict=True):
                        for x, s_ in zip(st.values(), sn, strict=True):
                            x.append(new)
                            x.rollback(s_)

                t = graph_time(step) / len(caches)
                out_rows.append({"part": "quantize", "kernel": kernels, "batch": B, "flush": flush, "time_s": t})
                del caches, snaps
        q = torch.randn(B, spec.n_heads, 1, spec.hd, device="cuda", dtype=dtype)
        k = torch.randn(B, spec.n_kv_heads, 1, spec.hd, device="cuda", dtype=dtype)
        pos = torch.tensor([8191], device="cuda")
        for kernels in ("triton", "torch"):
            t = graph_time(lambda kernels=kernels, q=q, k=k, pos=pos: (rope(q, pos, spec.rope_theta, kernels),
                                                                      rope(k, pos, spec.rope_theta, kernels)))
            out_rows.append({"part": "rope", "kernel": kernels, "batch": B, "time_s": t / 2})
        torch.cuda.empty_cache()
    for r in out_rows:
        if r.get("part") in ("quantize", "rope"):
            print(f"{r['part']} B{r['batch']} {r['kernel']}{' flush' if r.get('flush') else ''}: "
                  f"{r['time_s'] * 1e6:.1f} us per layer", flush=True)


STEP_CONFIGS = [("fp16", specs.SchemeConfig(scheme="fp16")), ("kivi-2", specs.SchemeConfig(scheme="kivi", bits=2)),
                ("kivi-4", specs.SchemeConfig(scheme="kivi", bits=4))]


def step_cases(spec, points, out_rows, on_row, configs=STEP_CONFIGS, torch_too: bool = True,
               full: bool = True) -> None:
    """Whole decode steps (CUDA graph) of 2 layers and (full) of the whole model: Triton engine and (2 layers,
    torch_too) the torch engine."""
    from xqsim.engine.measure import measure_one

    for label, cfg in configs:
        for B, T in points:
            for layers in (2, spec.n_layers) if full else (2,):
                m = spec.model_copy(update={"n_layers": layers})
                for kernels in ("triton", "torch") if layers == 2 and torch_too else ("triton",):
                    try:
                        r = measure_one(m, cfg, B, T, "cuda", torch.bfloat16, repeats=10, warmup=2, kernels=kernels)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        continue
                    except Exception as err:  # one configuration's failure is printed, the others still run
                        print(f"step {label} B{B} T{T} {layers} layers {kernels}: failed: {str(err)[:200]}",
                              flush=True)
                        continue
                    row = {"part": "step", "scheme": label, "kernel": kernels, "batch": B, "context": T,
                           "layers": layers, "step_time_graph_s": r.get("step_time_graph_s"),
                           "step_time_s": r["step_time_s"], "graph": r.get("graph"),
                           "attention_kernel_s": r["ops"].get("attention", r["ops"].get("attention_qk", {}))
                           .get("kernel_time_s"),
                           "bytes_exact": r["cache_bytes_allocated"] == r["cache_bytes_analytic"]}
                    out_rows.append(row)
                    print(f"step {label} B{B} T{T} {layers} layers {kernels}: graph "
                          f"{(row['step_time_graph_s'] or float('nan')) * 1e3:.2f} ms", flush=True)
                    on_row()
                    torch.cuda.empty_cache()


def save(out: Path | None, info: dict, rows: list[dict]) -> None:
    """The rows so far as OUT/kernel_roofline.json and .csv (rewritten after each part: a cut run keeps them)."""
    if out is None:
        return
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_roofline.json").write_text(json.dumps({"device": info, "rows": rows}, indent=1))
    pd.DataFrame(rows).assign(**info).to_csv(out / "kernel_roofline.csv", index=False)


def summary(rows: list[dict]) -> None:
    """The attention table: time, share of the spec bandwidth, speedup over the fp16 kernel at the same shape."""
    fp16 = {(r["batch"], r["context"]): r["time_s"] for r in rows if r.get("scheme") == "fp16"
            and r.get("kernel") == "triton"}
    print(f"{'scheme':8} {'B':>3} {'T':>7} {'kernel':>7} {'us':>8} {'TB/s':>6} {'%bw':>5} {'%peak':>6} {'x fp16':>7}")
    for r in rows:
        if "scheme" not in r or r.get("part"):
            continue
        ref = fp16.get((r["batch"], r["context"]))
        r["speedup_vs_fp16"] = ref / r["time_s"] if ref else None
        print(f"{r['scheme']:8} {r['batch']:>3} {r['context']:>7} {r['kernel']:>7} {r['time_s'] * 1e6:8.0f} "
              f"{r['tb_s']:6.2f} {r['pct_bw']:5.0f} {r['pct_peak']:6.1f} "
              f"{(r['speedup_vs_fp16'] or float('nan')):7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tune", action="store_true", help="time kernel variants instead")
    ap.add_argument("--quick", action="store_true", help="attention only")
    ap.add_argument("--remat", action="store_true", help="the fused rematerialization kernels and their steps only")
    ap.add_argument("--remat-tune", action="store_true", help="time remat kernel variants (tile, chunk, warps)")
    ap.add_argument("--across", action="store_true", help="2-layer steps of every scheme (2-bit) at batch 8 across "
                    "context (benchmarks/steps_across_context.py plots them)")
    ap.add_argument("--paper", action="store_true", help="2-layer steps of Llama-2-7B at batch 1 across context, "
                    "fp16 and XQuant-2 fused (benchmarks/paper_claim.py reads them)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_roofline: needs a CUDA device")

    import subprocess

    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    info = {"device": torch.cuda.get_device_name(), "driver": drv, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "engine": "triton",
            "date": time.strftime("%Y-%m-%d"), "spec_profile": SPEC}
    print(info, flush=True)
    warm_up()
    hw = loading.load_hardware(SPEC)
    spec = loading.load_model("llama-3.1-8b")
    rows: list[dict] = []
    configs = [("fp16", specs.SchemeConfig(scheme="fp16")),
               ("kivi-2", specs.SchemeConfig(scheme="kivi", bits=2)),
               ("kivi-3", specs.SchemeConfig(scheme="kivi", bits=3)),
               ("kivi-4", specs.SchemeConfig(scheme="kivi", bits=4)),
               ("kivi-8", specs.SchemeConfig(scheme="kivi", bits=8))]
    if a.across:
        step_cases(spec, [(8, T) for T in ACROSS_CONTEXTS], rows,
                   lambda: save(a.out, info | {"model": spec.name}, rows), configs=ACROSS_CONFIGS, torch_too=False,
                   full=False)
        save(a.out, info | {"model": spec.name}, rows)
        return
    if a.paper:
        l2 = loading.load_model("llama-2-7b")
        step_cases(l2, [(1, T) for T in PAPER_CONTEXTS], rows, lambda: save(a.out, info | {"model": l2.name}, rows),
                   configs=PAPER_CONFIGS, torch_too=False, full=False)
        save(a.out, info | {"model": l2.name}, rows)
        return
    if a.remat_tune:
        # the defaults first; 4 warps at 2 programs an SM let one program's dequantization overlap the other's
        # products (8 warps in one program meet at a barrier every step)
        common = [("default", {}), ("k32s3", {"block_k": 32}), ("k64s2", {"block_k": 64, "num_stages": 2})]
        absorb = [("w4ps2", {"num_warps": 4, "per_sm": 2}), ("k64w4ps2", {"block_k": 64, "num_warps": 4, "per_sm": 2}),
                  ("span512", {"span": 512})]
        remat = [("n64w4ps2", {"block_n": 64, "num_warps": 4, "per_sm": 2}),
                 ("n64k32w4ps2", {"block_n": 64, "block_k": 32, "num_warps": 4, "per_sm": 2})]
        for label, cfg in REMAT_CONFIGS:
            variants = common + (absorb if cfg.strategy == "absorb_v" else remat)
            remat_cases(spec, [(label, cfg)], [(8, 8192)], hw, rows, check=False, variants=variants)
    elif a.remat:
        remat_cases(spec, REMAT_CONFIGS, [(1, 8192), (8, 8192), (8, 24576), (1, 32768)], hw, rows, check=True)
        save(a.out, info, rows)
        accumulate_cases(spec, [(1, 32768), (8, 24576)], hw, rows)
        save(a.out, info, rows)
        step_cases(spec, [(8, 24576)], rows, lambda: save(a.out, info, rows), configs=REMAT_CONFIGS,
                   torch_too=False)
    elif a.tune:
        variants = [("default", {}), ("s2", {"num_stages": 2}), ("s3", {"num_stages": 3}), ("ps1", {"per_sm": 1}),
                    ("ps3", {"per_sm": 3}), ("unmixed", {"mixed": False})]
        attention_cases(spec, configs[1:2] + configs[3:5], [1, 8, 32], [32768], variants, hw, rows, check=True)
    else:
        attention_cases(spec, configs, [1, 8, 32], [8192, 32768, 131072], [("triton", {})], hw, rows, check=True)
        summary(rows)
        save(a.out, info, rows)
        if not a.quick:
            maintenance_cases(spec, [1, 8, 32], rows)
            save(a.out, info, rows)
            step_cases(spec, [(8, 24576), (1, 8192)], rows, lambda: save(a.out, info, rows))
    save(a.out, info, rows)
    att = [r for r in rows if r.get("kernel") == "triton" and "pct_bw" in r and r["context"] >= 8192
           and r.get("part") != "remat"]
    rem = [r for r in rows if r.get("part") == "remat" and r["context"] >= 8192]
    if rem:
        print(f"min_pct_of_remat_roofline: {min(r['pct_roofline'] for r in rem):.1f}")
        print(f"remat_rows_wrong: {sum(bool(r.get('wrong')) for r in rem)} of {len(rem)}")
    print(f"min_pct_of_roofline: {min(r['pct_bw'] for r in att):.1f}" if att else "min_pct_of_roofline: nan")


if __name__ == "__main__":
    main()

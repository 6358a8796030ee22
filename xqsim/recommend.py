"""The verdict: on each GPU, for a model at a batch and context, the KV-cache scheme that serves the most tokens/s
within the memory (the capacity-limited throughput: the largest batch up to the one asked for that fits), among
those whose quality cost is under a threshold, and the runner-up.

Quality comes from `xqsim accuracy` results (relative perplexity increase against an fp32 cache, measured on
the model named in the result): a candidate is matched to the result of the same quantization (scheme, bits,
group, residual window, leading layers, value bits and sharing), its execution (strategy, fused) aside, since
remat and absorb_v compute the same function and fusing changes no number.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import rates
from .loading import DATA, load_model
from .specs import HardwareProfile, ModelSpec, SchemeConfig, UserError
from .sweep import capped_point

ACCURACY_CSV = DATA / "accuracy" / "accuracy.csv"  # measurements/accuracy/accuracy.csv, shipped
QUALITY_FIELDS = ("scheme", "bits", "v_bits", "group", "residual", "first_layers", "first_bits", "rank_k", "rank_v",
                  "keep_first_channel", "share_from", "eta_k", "eta_v")


def quality_key(cfg: SchemeConfig, acc_model: ModelSpec) -> tuple:
    """What decides a config's quality, resolved on the model its accuracy was measured on."""
    c = cfg.model_copy(update={"strategy": None, "fused": False}).resolved(acc_model)
    return tuple(round(v, 6) if isinstance(v, float) else v for v in (getattr(c, f) for f in QUALITY_FIELDS))


def read_quality(path: Path = ACCURACY_CSV) -> tuple[dict[tuple, dict], ModelSpec | None]:
    """{quality_key: {delta_ppl_rel, accuracy_label}} from an `xqsim accuracy` CSV, and the model it was measured
    on."""
    if not path.is_file():
        return {}, None
    return _read_quality(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_quality(path: Path, mtime_ns: int) -> tuple[dict[tuple, dict], ModelSpec]:
    """read_quality, once per file version (the dashboard asks on every redraw)."""
    df = pd.read_csv(path)
    need = ("model", "scheme", "bits", "ppl", "delta_ppl")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{path}: field '{missing[0]}': column missing (expected an `xqsim accuracy` CSV)")
    models = df["model"].unique()
    if len(models) != 1:
        raise UserError(f"{path}: field 'model': results of {len(models)} models; give one model's results")
    acc_model = load_model(str(models[0]))
    ref = df[df["label"].astype(str).str.contains("reference")] if "label" in df.columns else df.iloc[:0]
    ppl_ref = float(ref["ppl"].iloc[0]) if len(ref) else float((df["ppl"] - df["delta_ppl"]).median())
    out = {}
    for r in df.itertuples(index=False):
        if "reference" in str(getattr(r, "label", "")):
            continue
        fields = {f: getattr(r, f) for f in QUALITY_FIELDS if hasattr(r, f)}
        fields = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in fields.items()}
        for k in ("bits", "v_bits", "group", "residual", "first_layers", "first_bits", "rank_k", "rank_v",
                  "share_from"):
            if fields.get(k) is not None:
                fields[k] = int(fields[k])
        if fields.get("keep_first_channel") is not None:
            fields["keep_first_channel"] = bool(fields["keep_first_channel"])
        try:
            key = quality_key(SchemeConfig.stored(fields), acc_model)  # as written: resolved defaults
        except (ValueError, UserError):  # a row this version cannot express: left out
            continue
        out[key] = {"delta_ppl_rel": float(r.delta_ppl) / ppl_ref, "accuracy_label": str(getattr(r, "label", ""))}
    return out, acc_model


def recommend(hws: list[HardwareProfile], model: ModelSpec, configs: list[SchemeConfig], batch: int, context: int,
              max_delta_ppl: float | None = None, rate_mode: str = "fitted",
              accuracy: Path = ACCURACY_CSV) -> pd.DataFrame:
    """Every candidate on every GPU, ranked per GPU: capacity-limited tokens/s at `context` with at most `batch`
    sequences, x fp16, the batch that fits, the cache it holds, the relative perplexity increase, and whether it
    is eligible (fits at least one sequence; quality known and under max_delta_ppl when one is given).
    `verdict` is 'best' and 'runner-up' for the two fastest eligible."""
    quality, acc_model = read_quality(accuracy)
    fp16 = SchemeConfig(scheme="fp16")
    cands = list(dict.fromkeys([fp16, *configs]))
    rows = []
    for cfg in cands:
        try:
            a = capped_point(hws, model, cfg, batch, context, rate_mode)
        except UserError:
            continue
        if cfg.scheme == "fp16":  # the baseline: the cache itself, no loss by construction
            q = {"delta_ppl_rel": 0.0, "accuracy_label": "fp16 (baseline)"}
        else:
            q = quality.get(quality_key(cfg, acc_model)) if acc_model else None
        for i, hw in enumerate(hws):
            b = int(a["batch_cap"][i])
            rows.append({"hardware": hw.name, "model": model.name, "label": cfg.label, "scheme": cfg.scheme,
                         "batch": b, "context": context,
                         "tokens_per_s": float(a["throughput_cap_tokens_per_s"][i]),
                         "cache_bytes": float(a["cache_bytes_per_seq"][i]) * b,
                         "delta_ppl_rel": q["delta_ppl_rel"] if q else math.nan,
                         "accuracy_result": q["accuracy_label"] if q else "",
                         "rates": rates.choose(hw, cfg, rate_mode)[1].label})
    df = pd.DataFrame(rows)
    base = df[df["label"] == fp16.label].set_index("hardware")["tokens_per_s"]
    df["x_fp16"] = df["tokens_per_s"] / df["hardware"].map(base).where(lambda s: s > 0)
    ok_quality = df["delta_ppl_rel"].le(max_delta_ppl) if max_delta_ppl is not None else pd.Series(True, df.index)
    df["eligible"] = (df["tokens_per_s"] > 0) & ok_quality
    df["hardware"] = pd.Categorical(df["hardware"], [hw.name for hw in hws])  # the order asked for
    df = df.sort_values(["hardware", "eligible", "tokens_per_s"], ascending=[True, False, False]).reset_index(drop=True)
    df["hardware"] = df["hardware"].astype(str)
    rank = df[df["eligible"]].groupby("hardware").cumcount()
    df["verdict"] = ""
    df.loc[rank.index[rank == 0], "verdict"] = "best"
    df.loc[rank.index[rank == 1], "verdict"] = "runner-up"
    df.attrs["accuracy_model"] = acc_model.name if acc_model else None
    return df


def verdict_lines(df: pd.DataFrame, max_delta_ppl: float | None) -> list[str]:
    """One sentence per GPU: what to serve with, how much faster than fp16, at what quality cost, and what is next."""
    lines = []
    for hw, g in df.groupby("hardware", sort=False):  # in the order asked for
        best, second = g[g["verdict"] == "best"], g[g["verdict"] == "runner-up"]
        if best.empty:
            limit = f" with a perplexity increase under {max_delta_ppl:.1%}" if max_delta_ppl is not None else ""
            lines.append(f"{hw}: no scheme fits one sequence of {g['context'].iloc[0]:,} tokens{limit}")
            continue
        b = best.iloc[0]
        speed = "the baseline" if b["scheme"] == "fp16" else (
            f"{b['x_fp16']:.2f}x fp16" if np.isfinite(b["x_fp16"]) else "fp16 does not fit")
        loss = f", perplexity +{b['delta_ppl_rel']:.1%}" if b["scheme"] != "fp16" else ""
        line = (f"{hw}: serve with {b['label']}: {b['tokens_per_s']:,.0f} tokens/s at batch {b['batch']} "
                f"({speed}{loss}, cache {b['cache_bytes'] / 1e9:,.1f} GB)")
        if not second.empty:
            s = second.iloc[0]
            line += f"; runner-up {s['label']} at {s['tokens_per_s']:,.0f} tokens/s"
        over = g[~g["eligible"] & (g["tokens_per_s"] > b["tokens_per_s"])]
        if len(over):  # what the quality limit costs
            o = over.iloc[0]
            known = np.isfinite(o["delta_ppl_rel"])
            loss = f"perplexity +{o['delta_ppl_rel']:.1%}" if known else "quality not measured"
            line += (f" (faster but over the quality limit: {o['label']} at {o['tokens_per_s']:,.0f} tokens/s, "
                     f"{loss})")
        lines.append(line)
    return lines


def fmt_threshold(v: float | None) -> str:
    return "no quality limit" if v is None else f"perplexity increase at most {v:.1%}"

"""One configuration, in full: every op, the memory breakdown in both accountings, the step's totals."""

from __future__ import annotations

import numpy as np

from . import rates, schemes
from .roofline import BOUNDS, op_table
from .schemes.layout import equivalent_bits, fp16_kv_bytes_per_token, paper_bytes_per_token
from .specs import HardwareProfile, ModelSpec, SchemeConfig
from .sweep import evaluate


def estimate(hw: HardwareProfile, model: ModelSpec, cfg: SchemeConfig, batch: int, context: int,
             rate_mode: str = "fitted") -> dict:
    """Everything about one (hardware, model, scheme, batch, context): JSON-ready. Rates by xqsim.rates' rule
    under rate_mode; `rates` says which were used."""
    label, cfg = cfg.label, cfg.resolved(model)
    a = {k: v.ravel()[0].item() for k, v in evaluate([hw], model, cfg, [batch], [context], rate_mode).items()}
    groups = schemes.layout(model, cfg)
    own, basis = rates.rates(hw, cfg, rate_mode)
    ops = op_table(schemes.step_ops(model, cfg, np.int64(batch), np.int64(context), groups), own)
    paper_per_token = paper_bytes_per_token(groups, cfg)
    fp16_per_token = fp16_kv_bytes_per_token(model)
    paper_cache = batch * context * paper_per_token
    return {
        "hardware": hw.name, "model": model.name, "scheme": cfg.scheme, "label": label,
        "bits": cfg.bits, "batch": batch, "context": context, "strategy": cfg.strategy, "fused": cfg.fused,
        "config": cfg.model_dump(mode="json"),
        "rates": basis.label, "rate_mode": rate_mode,
        "weights_bytes": a["weights_bytes"],
        "cache_bytes": a["cache_bytes"],
        "cache_codes_bytes": a["cache_codes_bytes"],
        "cache_metadata_bytes": a["cache_metadata_bytes"],
        "cache_residual_bytes": a["cache_residual_bytes"],
        "transient_bytes": a["transient_bytes"],
        "total_bytes": a["total_bytes"],
        "capacity_bytes": a["capacity_bytes"],
        "fits": bool(a["fits"]),
        "max_context": a["max_context"],
        "max_batch": a["max_batch"],
        "flops": a["flops"],
        "bytes_moved": a["bytes_moved"],
        "intensity_flop_per_byte": a["intensity_flop_per_byte"],
        "t_compute_s": a["t_compute_s"],
        "t_mem_s": a["t_mem_s"],
        "t_overhead_s": a["t_overhead_s"],
        "step_time_s": a["step_time_s"],
        "tpot_s": a["tpot_s"],
        "tokens_per_s": a["tokens_per_s"],
        "bound": BOUNDS[a["bound_code"]],
        "throughput_cap_tokens_per_s": a["throughput_cap_tokens_per_s"],
        "batch_cap": a["batch_cap"],
        "accounting": {
            "full": {
                "what": "codes + metadata + fp16 residual window, all layers and sequences; transient apart",
                "cache_bytes": a["cache_bytes"],
                "cache_plus_transient_bytes": a["cache_bytes"] + a["transient_bytes"],
                "ratio_vs_fp16_kv": a["cache_bytes"] / (batch * context * fp16_per_token),
            },
            "paper": {
                "what": "Tomar et al.: codes + fp16 scale/zero per group, every token quantized, "
                        "no residual window, no transient buffers or accumulator",
                "cache_bytes": paper_cache,
                "normalized_kv_size": paper_per_token / fp16_per_token,
                "compression_x": fp16_per_token / paper_per_token,
                "equivalent_bits": equivalent_bits(groups),
            },
        },
        "ops": ops,
    }

"""The KV-cache schemes: one module each for the cache layout; two attention blocks (stored K/V in
fp16.py, rematerialized K/V in xquant.py). Chosen by name in SCHEMES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..specs import ModelSpec, SchemeConfig
from . import fp16, kivi, xquant, xquant_cl, xquant_cl_gqa, xquant_gqa, xquant_yang
from .decoder import activation_bytes, dense_weight_elems
from .decoder import step_ops as _step_ops
from .layout import LayerGroup, cache_parts
from .ops import Op
from .xquant import RematPlan, remat_attention_ops, remat_transient_bytes


@dataclass(frozen=True)
class Scheme:
    layout: Callable  # (model, cfg) -> tuple[LayerGroup, ...]
    kv_weight_elems: Callable  # (model, cfg) -> int
    plan: Callable | None = None  # rematerializing schemes: (model, cfg, group) -> RematPlan
    compresses: bool = True  # False for the fp16 baseline: nothing to dequantize or rebuild, nothing to fuse


SCHEMES: dict[str, Scheme] = {
    "fp16": Scheme(fp16.layout, fp16.kv_weight_elems, compresses=False),
    "kivi": Scheme(kivi.layout, fp16.kv_weight_elems),
    "xquant": Scheme(xquant.layout, xquant.kv_weight_elems, xquant.plan),
    "xquant_cl": Scheme(xquant_cl.layout, xquant.kv_weight_elems, xquant_cl.plan),
    "xquant_gqa": Scheme(xquant_gqa.layout, xquant_gqa.kv_weight_elems, xquant_gqa.plan),
    "xquant_cl_gqa": Scheme(xquant_cl_gqa.layout, xquant_cl_gqa.kv_weight_elems, xquant_cl_gqa.plan),
    "xquant_yang": Scheme(xquant_yang.layout, fp16.kv_weight_elems),
}


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """The cache's layer groups for a resolved config."""
    return SCHEMES[cfg.scheme].layout(model, cfg)


def plan(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup) -> RematPlan | None:
    """Where a rematerializing scheme rebuilds a layer's K and V from; None for a scheme that caches K and V."""
    p = SCHEMES[cfg.scheme].plan
    return None if p is None else p(model, cfg, group)


def attention_ops(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup, B, T) -> list[Op]:
    """The scheme-specific ops of one layer (between q_proj and o_proj)."""
    s = SCHEMES[cfg.scheme]
    if s.plan is None:
        return fp16.attention_ops(model, cfg, group, B, T)
    return remat_attention_ops(model, cfg, group, s.plan(model, cfg, group), B, T)


def step_ops(model: ModelSpec, cfg: SchemeConfig, B, T, groups=None) -> list[Op]:
    """Every op of one decode step at batch B and context T (arrays broadcast). FLOPs and bytes are float64: a step's
    FLOP count passes int64 at sizes a user may ask for (XQuant-2 at batch 4,096 and 10M tokens: 2.2e22), where
    integers wrapped to negative totals; float64 is exact below 2^53 (9e15), so every realistic count stays exact."""
    groups = groups or layout(model, cfg)
    B, T = np.asarray(B, dtype=np.float64), np.asarray(T, dtype=np.float64)
    return _step_ops(model, groups, lambda g, b, t: attention_ops(model, cfg, g, b, t), B, T)


def weights_bytes(model: ModelSpec, cfg: SchemeConfig) -> int:
    """All weights the scheme keeps resident [B]."""
    return (dense_weight_elems(model) + SCHEMES[cfg.scheme].kv_weight_elems(model, cfg)) * model.weight_bytes


def transient_bytes(model: ModelSpec, cfg: SchemeConfig, T, groups=None) -> np.ndarray:
    """Peak transient bytes of one sequence: the largest layer's buffers plus activations [B]."""
    T = np.asarray(T, dtype=np.int64)
    groups = groups or layout(model, cfg)
    s = SCHEMES[cfg.scheme]
    peak = np.zeros_like(T)
    for g in groups:
        if s.plan is None:
            layer = fp16.transient_bytes(model, cfg, g, T)
        else:
            layer = remat_transient_bytes(model, cfg, g, s.plan(model, cfg, g), T)
        peak = np.maximum(peak, layer)
    return peak + activation_bytes(model)


__all__ = ["SCHEMES", "Op", "LayerGroup", "RematPlan", "layout", "plan", "step_ops", "weights_bytes",
           "transient_bytes", "cache_parts", "attention_ops"]

"""The KV-cache schemes: one module each for its cache layout, options and defaults; two attention blocks (stored
K/V in fp16.py, rematerialized K/V in xquant.py). Chosen by name in SCHEMES, which says what each scheme is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..specs import UNQUANTIZED, ModelSpec, SchemeConfig
from . import fp16, kivi, xquant, xquant_cl, xquant_cl_gqa, xquant_gqa, xquant_yang
from .decoder import activation_bytes, dense_weight_elems
from .decoder import step_ops as _step_ops
from .layout import LayerGroup, cache_parts
from .ops import Op
from .xquant import RematPlan, remat_attention_ops, remat_transient_bytes

ALL_BITS = (2, 3, 4, 8, UNQUANTIZED)


def _nothing(cfg: SchemeConfig, model: ModelSpec) -> dict:
    return {}


def _fits(cfg: SchemeConfig, model: ModelSpec) -> str | None:
    return None


@dataclass(frozen=True)
class Scheme:
    """What one scheme is: its cache layout and weights, where it rebuilds K and V from, and its options, bits and
    defaults (each scheme module states its own). SchemeConfig validates and resolves a config by asking this."""

    layout: Callable  # (model, cfg) -> tuple[LayerGroup, ...]
    kv_weight_elems: Callable  # (model, cfg) -> int
    default_bits: int  # bits left out: its paper's headline (the module cites it)
    plan: Callable | None = None  # rematerializing schemes: (model, cfg, group) -> RematPlan
    compresses: bool = True  # False for the fp16 baseline: nothing to dequantize or rebuild, nothing to fuse
    bits: tuple[int, ...] = ALL_BITS  # code bits it supports (16 = unquantized)
    options: tuple[str, ...] = ()  # option fields that only it (and schemes like it) takes
    keys_per_channel: bool = False  # keys quantized per channel in blocks of `group` tokens: the residual
    #                                 window is a multiple of the group, and a group by default
    cross_layer: bool = False  # a base layer, then deltas against the running X^: first_layers >= 1
    first_bits_floor: bool = True  # the leading layers keep max(first_bits, bits) (Yang et al.: its own setting)
    resolve: Callable = _nothing  # (cfg, model) -> its model-dependent defaults
    check_model: Callable = _fits  # (cfg, model) -> why the config does not fit the model, or None

    @property
    def rematerializes(self) -> bool:
        return self.plan is not None


SCHEMES: dict[str, Scheme] = {
    "fp16": Scheme(fp16.layout, fp16.kv_weight_elems, fp16.DEFAULT_BITS, compresses=False, bits=(fp16.BITS,)),
    "kivi": Scheme(kivi.layout, fp16.kv_weight_elems, kivi.DEFAULT_BITS, keys_per_channel=True),
    "xquant": Scheme(xquant.layout, xquant.kv_weight_elems, xquant.DEFAULT_BITS, xquant.plan),
    "xquant_cl": Scheme(xquant_cl.layout, xquant.kv_weight_elems, xquant_cl.DEFAULT_BITS, xquant_cl.plan,
                        cross_layer=True),
    "xquant_gqa": Scheme(xquant_gqa.layout, xquant_gqa.kv_weight_elems, xquant_gqa.DEFAULT_BITS, xquant_gqa.plan,
                         options=xquant_gqa.OPTIONS, keys_per_channel=True, resolve=xquant_gqa.resolve),
    "xquant_cl_gqa": Scheme(xquant_cl_gqa.layout, xquant_cl_gqa.kv_weight_elems, xquant_cl_gqa.DEFAULT_BITS,
                            xquant_cl_gqa.plan, options=xquant_cl_gqa.OPTIONS, cross_layer=True,
                            resolve=xquant_cl_gqa.resolve, check_model=xquant_cl_gqa.check_model),
    "xquant_yang": Scheme(xquant_yang.layout, fp16.kv_weight_elems, xquant_yang.DEFAULT_BITS, bits=xquant_yang.BITS,
                          options=xquant_yang.OPTIONS, keys_per_channel=True, first_bits_floor=False,
                          resolve=xquant_yang.resolve),
}


def rematerializing() -> list[str]:
    """The schemes that rebuild K and V from a cached source (XQuant's variants)."""
    return [n for n, x in SCHEMES.items() if x.rematerializes]


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
    """Peak transient bytes of one sequence: the largest layer's buffers plus activations [B], float64 as
    cache_parts."""
    T = np.asarray(T, dtype=np.float64)
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


__all__ = ["SCHEMES", "Scheme", "Op", "LayerGroup", "RematPlan", "layout", "plan", "rematerializing", "step_ops",
           "weights_bytes", "transient_bytes", "cache_parts", "attention_ops"]

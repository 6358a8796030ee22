"""KIVI (Liu et al., 2024): keys per channel in groups of G tokens, values per token in groups of G
channels within a head, b bits, fp16 scale+zero per group, an fp16 residual window of R tokens."""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import LayerGroup, split_layers, tensor

DEFAULT_BITS = 2  # Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """Per layer: K (dkv, per channel) and V (dkv in rows of one head, per token)."""
    return split_layers(model, cfg, lambda b: (tensor("k", model.dkv, b, axis="channel"),
                                               tensor("v", model.dkv, b, row=model.hd)))

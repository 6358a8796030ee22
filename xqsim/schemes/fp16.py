"""fp16 KV cache, the baseline: K and V of every token, 16-bit; and the attention block over stored K/V
that KIVI and Yang et al.'s XQuant share."""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import ELEM_BYTES, LayerGroup, tensor
from .ops import Op, dequant_ops, fp16_read, matmul, rope, store_ops

DEFAULT_BITS = BITS = 16  # the baseline: nothing quantized


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """K and V, dkv values each per token per layer, fp16."""
    n = model.n_layers
    return (LayerGroup(n, (tensor("k", model.dkv, 16), tensor("v", model.dkv, 16)), layers=tuple(range(n))),)


def kv_weight_elems(model: ModelSpec, cfg: SchemeConfig) -> int:
    """Wk and Wv of all layers [elements]."""
    return model.n_layers * 2 * model.d_model * model.dkv


def attention_ops(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup, B, T) -> list[Op]:
    """New token's K/V, RoPE, cache write, dequantize (quantized schemes), attention."""
    H, hd, dq = model.n_heads, model.hd, model.dq
    kern = "attention" if cfg.fused else ""
    return [
        matmul("kv_proj", B, 1, model.d_model, 2 * model.dkv, model.weight_bytes),
        rope("rope_q", B * dq),  # RoPE of the query heads and of the new key
        rope("rope_k", B * model.dkv),
        *store_ops(cfg, group, B, T),
        *dequant_ops(cfg, group, B, T, cfg.fused, kern),
        Op("attention", "attention",
           flops=4 * B * H * T * hd,  # q.K^T and P.V
           read=B * dq * ELEM_BYTES + fp16_read(group, ("k", "v"), cfg, B, T, cfg.fused),
           write=B * dq * ELEM_BYTES, kernel=kern),
    ]


def transient_bytes(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup, T):
    """Dequantized K and V of one layer (concatenated with the residual), unless fused [B per sequence]."""
    quantized = any(t.quantized for t in group.tensors)
    return (0 if cfg.fused or not quantized else 1) * T * 2 * model.dkv * ELEM_BYTES

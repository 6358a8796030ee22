"""The Llama decoder around every scheme's attention block: a layer's ops (norms, projections, MLP), a decode
step's (embedding, the layer groups, head), and what every scheme holds besides its cache (dense weights, live
activations)."""

from __future__ import annotations

from dataclasses import replace

from ..specs import ModelSpec
from .layout import ELEM_BYTES, LayerGroup
from .ops import ADD_FLOPS, NORM_FLOPS, SWIGLU_FLOPS, Op, elementwise, matmul


def layer_ops(model: ModelSpec, B, attention: list[Op]) -> list[Op]:
    """One layer: norm, q projection, the scheme's attention block, o projection, MLP."""
    d, f, w = model.d_model, model.ffn_dim, model.weight_bytes
    return [
        elementwise("attn_norm", B * d, NORM_FLOPS, extra_read=d * w),
        matmul("q_proj", B, 1, d, model.dq, w),
        *attention,
        matmul("o_proj", B, 1, model.dq, d, w),
        elementwise("attn_residual", B * d, ADD_FLOPS, n_in=2),
        elementwise("mlp_norm", B * d, NORM_FLOPS, extra_read=d * w),
        matmul("mlp_gate_up", B, 1, d, 2 * f, w),
        elementwise("mlp_act", B * f, SWIGLU_FLOPS, n_in=2),
        matmul("mlp_down", B, 1, f, d, w),
        elementwise("mlp_residual", B * d, ADD_FLOPS, n_in=2),
    ]


def step_ops(model: ModelSpec, groups: tuple[LayerGroup, ...], attention_block, B, T) -> list[Op]:
    """All ops of one decode step: embedding, each layer group's ops (with its layer count), head."""
    d, w = model.d_model, model.weight_bytes
    ops = [Op("embedding", "elementwise", flops=0, read=B * d * w, write=B * d * ELEM_BYTES)]
    for g in groups:
        ops += [replace(op, layers=g.count) for op in layer_ops(model, B, attention_block(g, B, T))]
    ops += [
        elementwise("final_norm", B * d, NORM_FLOPS, extra_read=d * w),
        matmul("lm_head", B, 1, d, model.vocab_size, w),
    ]
    return ops


def dense_weight_elems(model: ModelSpec) -> int:
    """Weights every scheme has: embedding, head, q/o, MLP and norms (K/V-side weights apart) [elements]."""
    d, n = model.d_model, model.n_layers
    per_layer = (2 * d * model.dq  # Wq, Wo
                 + 3 * d * model.ffn_dim  # gate, up, down
                 + 2 * d)  # two RMSNorm weights
    return (model.vocab_size * d * (1 if model.tie_embeddings else 2)  # embedding (+ untied head)
            + n * per_layer
            + d)  # final norm


def activation_bytes(model: ModelSpec) -> int:
    """Live activations of one sequence at the step's peak: layer buffers and fp32 logits [B]."""
    return ((3 * model.d_model + model.dq + 2 * model.dkv + 3 * model.ffn_dim) * ELEM_BYTES
            + model.vocab_size * 4)  # fp32 logits for sampling

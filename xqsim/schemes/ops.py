"""Decode-step ops: the layer skeleton every scheme shares, and the cache-maintenance ops.

FLOPs: 2mnk per matmul, attention 4*B*H*T*hd; elementwise, quantize and dequantize
FLOPs are counted apart, at the per-element costs below (vector units, not tensor cores).
Bytes: weights read + inputs read + outputs written. All quantities broadcast over numpy arrays
of batch B and context T (the context counts the token being decoded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..specs import ModelSpec, SchemeConfig
from .layout import (
    ELEM_BYTES,
    CacheTensor,
    LayerGroup,
    code_bytes_per_token,
    codes_bytes,
    fp_tokens,
    meta_bytes,
    meta_bytes_per_token,
    quantized_tokens,
)

# Per-element vector FLOPs (our operation counts, not from a paper):
NORM_FLOPS = 4  # RMSNorm: square, accumulate, scale by rsqrt, multiply by weight
ROPE_FLOPS = 3  # x*cos + rotate(x)*sin
SWIGLU_FLOPS = 5  # silu(g) = g*sigmoid(g) (~4) times u (1)
QUANT_FLOPS = 5  # min, max, subtract zero, scale, round
DEQUANT_FLOPS = 2  # code*scale + zero
ADD_FLOPS = 1


@dataclass(frozen=True, slots=True)
class Op:
    """One op of a decode step, per layer it runs in; arrays broadcast over (batch, context)."""

    name: str
    cls: str  # an OpClass
    flops: np.ndarray | float
    read: np.ndarray | float  # bytes read
    write: np.ndarray | float  # bytes written
    layers: int = 1  # times it runs per step
    kernel: str = ""  # ops of one layer with the same non-empty kernel run as one fused kernel
    bitplane: bool = False  # (de)quantization of codes whose width does not divide 8 (packed across bytes)
    channel: bool = False  # (de)quantization of per-channel codes (channel-major codes, token-major values)

    @property
    def bytes(self) -> np.ndarray | float:
        return self.read + self.write


def matmul(name: str, B, m_rows, k: int, n: int, wbytes: int, cls: str = "matmul",
           weights: bool = True, read_in=True, write_out=True, kernel: str = "") -> Op:
    """(B*m_rows, k) @ (k, n): 2mnk FLOPs; reads the (k, n) weight once if `weights`."""
    m = B * m_rows
    return Op(name, cls,
              flops=2 * m * k * n,
              read=(k * n * wbytes if weights else 0) + (m * k * ELEM_BYTES if read_in is True else read_in),
              write=m * n * ELEM_BYTES if write_out is True else write_out,
              kernel=kernel)


def elementwise(name: str, elems, flops_per_elem: float, n_in: int = 1, extra_read=0) -> Op:
    """An elementwise op over `elems` activations: reads n_in inputs, writes one output."""
    return Op(name, "elementwise", flops=flops_per_elem * elems,
              read=n_in * elems * ELEM_BYTES + extra_read, write=elems * ELEM_BYTES)


def rope(name: str, elems) -> Op:
    """Rotary embedding of `elems` activations: an elementwise op of its own class (position-dependent
    cos/sin tables; an unfused implementation takes several passes, so its efficiency is apart)."""
    return replace(elementwise(name, elems, ROPE_FLOPS), cls="rope")


# ----------------------------------------------------------------------------- cache maintenance


def store_ops(cfg: SchemeConfig, group: LayerGroup, B, T) -> list[Op]:
    """Write this step's token into each cached tensor: fp16 append and/or quantize (amortized)."""
    G, R = cfg.group, cfg.residual or 0
    ops = []
    for t in group.tensors:
        per_tok = code_bytes_per_token(t, G) + meta_bytes_per_token(t, G)
        if not t.quantized or R:
            ops.append(Op(f"append_{t.name}", "elementwise", flops=0,
                          read=B * t.width * ELEM_BYTES, write=B * t.width * ELEM_BYTES))
        if t.quantized:
            # Without a residual window the new token itself is quantized; per token with a window, the
            # token leaving it once T > R; per channel, R tokens every R steps once T >= R (amortized).
            active = 1 if not R else (T > R) if t.axis == "token" else (T >= R)
            ops.append(Op(f"quantize_{t.name}", "quant", flops=QUANT_FLOPS * B * t.width * active,
                          read=B * t.width * ELEM_BYTES * active, write=B * per_tok * active,
                          bitplane=t.bitplane, channel=t.axis == "channel"))
    return ops


def dequant_ops(cfg: SchemeConfig, group: LayerGroup, B, T, fused: bool, kernel: str) -> list[Op]:
    """Dequantize the quantized part of each tensor: codes + metadata in, fp16 out (unfused)."""
    G, R = cfg.group, cfg.residual or 0
    ops = []
    for t in group.tensors:
        if not t.quantized:
            continue
        q = quantized_tokens(t, T, R)
        ops.append(Op(f"dequant_{t.name}", "dequant", flops=DEQUANT_FLOPS * B * q * t.width,
                      read=B * (codes_bytes(t, T, G, R, stored=False) + meta_bytes(t, T, G, R)),
                      write=0 if fused else B * q * t.width * ELEM_BYTES, kernel=kernel,
                      bitplane=t.bitplane, channel=t.axis == "channel"))
    return ops


def fp16_read(group: LayerGroup, names: tuple[str, ...], cfg: SchemeConfig, B, T, fused: bool):
    """Bytes a consumer reads of tensors `names` as fp16: the residual, plus the dequantized part unfused."""
    R = cfg.residual or 0
    total = 0
    for t in group.tensors:
        if t.name in names:
            tokens = fp_tokens(t, T, R) + (0 if fused else quantized_tokens(t, T, R))
            total = total + B * tokens * t.width * ELEM_BYTES
    return total


# ----------------------------------------------------------------------------- one decode step


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


def tensor(name: str, width: int, bits: int, axis="token", row: int | None = None, shared=False) -> CacheTensor:
    return CacheTensor(name, width, row or width, axis, bits, shared)

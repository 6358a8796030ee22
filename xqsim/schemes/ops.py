"""Decode-step ops: the Op type and its builders (matmul, elementwise, RoPE), and the cache-maintenance ops
(append, quantize, dequantize, fp16 reads) every scheme's attention block is made of (schemes/decoder.py puts
the blocks in the Llama layer).

FLOPs: 2mnk per matmul, attention 4*B*H*T*hd; elementwise, quantize and dequantize
FLOPs are counted apart, at the per-element costs below (vector units, not tensor cores).
Bytes: weights read + inputs read + outputs written. All quantities broadcast over numpy arrays
of batch B and context T (the context counts the token being decoded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..specs import SchemeConfig
from .layout import (
    ELEM_BYTES,
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

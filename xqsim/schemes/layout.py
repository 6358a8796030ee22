"""What a cache stores per token and layer, and its exact bytes: codes, metadata, residual window.

A scheme's cache is a tuple of LayerGroups; each group is `count` consecutive layers that store the
same CacheTensors. Every formula here is per sequence and vectorised over the context T (numpy int64).

Byte layout, shared with the engine (xqsim.engine.cache), byte for byte:
- codes are bit-packed per row: a row of n values at b bits takes ceil(n*b/8) bytes;
- per-token tensors (values, X) are quantized per token in groups of G along a row of channels
  (a row is one head for KIVI values, the whole vector for X): ceil(row/G) groups per row;
- per-channel tensors (keys) are quantized per channel in groups of G tokens, packed along tokens;
- every group carries an fp16 scale and an fp16 zero point: 4 bytes;
- the fp16 residual window follows KIVI's code (jy-yuan/KIVI, models/llama_kivi.py): per-token
  tensors keep the last R tokens in fp16 (a sliding window: min(T, R) tokens); per-channel tensors
  keep T mod R tokens in fp16 and quantize R tokens at once when the window fills (R a multiple of G);
- bits = 16 means unquantized: all T tokens stored in fp16, no metadata;
- a shared tensor (Yang et al.'s cross-layer sharing) stores its own metadata and no codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..specs import UNQUANTIZED, ModelSpec, SchemeConfig

ELEM_BYTES = 2  # fp16 cache elements and activations
META_BYTES_PER_GROUP = 4  # fp16 scale + fp16 zero point per group (KIVI, XQuant, Yang et al.)


@dataclass(frozen=True, slots=True)
class CacheTensor:
    """One cached tensor of a layer: `width` values per token."""

    name: str  # k, v, x, dx, xk, xk0, xv
    width: int  # values per token
    row: int  # values per packed row (per-token layout); width is a multiple of row
    axis: Literal["token", "channel"]  # per-token groups along channels | per-channel groups along tokens
    bits: int
    shared: bool = False  # codes borrowed from the layer below

    @property
    def quantized(self) -> bool:
        return self.bits < UNQUANTIZED

    @property
    def bitplane(self) -> bool:
        """Codes whose width does not divide 8 pack across byte boundaries (unpacked through bit planes)."""
        return 8 % self.bits != 0


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """`count` consecutive layers storing the same tensors; `role` tells the CL schemes' layers apart."""

    count: int
    tensors: tuple[CacheTensor, ...]
    role: Literal["plain", "base", "delta"] = "plain"
    layers: tuple[int, ...] = ()  # which layers (the engine needs the order; costs only the count)


def quantized_tokens(t: CacheTensor, T: np.ndarray, R: int) -> np.ndarray:
    """Tokens held as codes (the rest are fp16) [tokens]."""
    if not t.quantized:
        return np.zeros_like(T)
    if t.axis == "token":
        return np.maximum(T - R, 0)  # sliding window: the last R tokens stay fp16
    return T - T % R  # blocks of R tokens are quantized when the window fills


def fp_tokens(t: CacheTensor, T: np.ndarray, R: int) -> np.ndarray:
    """Tokens held in fp16: the residual window, or all of them when unquantized [tokens]."""
    return T - quantized_tokens(t, T, R)


def _row_code_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)  # ceil(n*b/8): bit-packed row


def code_bytes_per_token(t: CacheTensor, G: int) -> float:
    """Codes of one quantized token, per-channel blocks amortized over G tokens [B]."""
    if t.shared:
        return 0.0
    if t.axis == "token":
        return (t.width // t.row) * _row_code_bytes(t.row, t.bits)
    return t.width * _row_code_bytes(G, t.bits) / G


def meta_bytes_per_token(t: CacheTensor, G: int) -> float:
    """Scale and zero of one quantized token, per-channel groups amortized over G tokens [B]."""
    if t.axis == "token":
        return (t.width // t.row) * -(-t.row // G) * META_BYTES_PER_GROUP
    return t.width * META_BYTES_PER_GROUP / G


def codes_bytes(t: CacheTensor, T: np.ndarray, G: int, R: int, *, stored: bool = True) -> np.ndarray:
    """Bytes of codes (or of the fp16 values when unquantized) for T tokens, one sequence [B].

    stored=False counts the codes a shared tensor reads from the layer below.
    """
    if not t.quantized:
        return T * t.width * ELEM_BYTES
    if t.shared and stored:
        return np.zeros_like(T)
    q = quantized_tokens(t, T, R)
    if t.axis == "token":
        return q * (t.width // t.row) * _row_code_bytes(t.row, t.bits)
    return t.width * (q // G) * _row_code_bytes(G, t.bits)


def meta_bytes(t: CacheTensor, T: np.ndarray, G: int, R: int) -> np.ndarray:
    """Bytes of fp16 scales and zeros for T tokens, one sequence [B]."""
    if not t.quantized:
        return np.zeros_like(T)
    q = quantized_tokens(t, T, R)
    if t.axis == "token":
        return q * (t.width // t.row) * -(-t.row // G) * META_BYTES_PER_GROUP
    return t.width * (q // G) * META_BYTES_PER_GROUP


def residual_bytes(t: CacheTensor, T: np.ndarray, R: int) -> np.ndarray:
    """Bytes of the fp16 residual window for T tokens, one sequence [B]."""
    if not t.quantized:
        return np.zeros_like(T)
    return fp_tokens(t, T, R) * t.width * ELEM_BYTES


def cache_parts(groups: tuple[LayerGroup, ...], cfg: SchemeConfig, T: np.ndarray) -> dict[str, np.ndarray]:
    """Codes, metadata and residual bytes of all layers for one sequence at context T [B]. float64, as step_ops: a
    cache of 2^31 tokens of a model of thousands of layers passes int64, where integers wrapped (silently, to 0 or
    negative); float64 is exact below 2^53 B (9 PB), so every realistic size stays exact."""
    T = np.asarray(T, dtype=np.float64)
    G, R = cfg.group, cfg.residual or 0
    out = {"codes": np.zeros_like(T), "metadata": np.zeros_like(T), "residual": np.zeros_like(T)}
    for g in groups:
        for t in g.tensors:
            out["codes"] = out["codes"] + g.count * codes_bytes(t, T, G, R)
            out["metadata"] = out["metadata"] + g.count * meta_bytes(t, T, G, R)
            out["residual"] = out["residual"] + g.count * residual_bytes(t, T, R)
    return out


def has_block_flush(groups: tuple[LayerGroup, ...]) -> bool:
    """True if some per-channel tensor is quantized in blocks (its memory drops when a block flushes)."""
    return any(t.quantized and t.axis == "channel" for g in groups for t in g.tensors)


# ----------------------------------------------------------------------------- paper accounting


def paper_bits_per_value(t: CacheTensor, G: int) -> float:
    """Tomar et al.'s accounting: code bits + fp16 scale and zero per G values; no residual [bit]."""
    if not t.quantized:
        return float(UNQUANTIZED)
    return (0 if t.shared else t.bits) + 8 * META_BYTES_PER_GROUP / G


def paper_bytes_per_token(groups: tuple[LayerGroup, ...], cfg: SchemeConfig) -> float:
    """Cache bytes per token, all layers, under the papers' accounting [B]."""
    return sum(g.count * t.width * paper_bits_per_value(t, cfg.group) / 8 for g in groups for t in g.tensors)


def fp16_kv_bytes_per_token(model: ModelSpec) -> int:
    """fp16 K and V of one token, all layers [B]."""
    return (model.n_layers
            * 2  # K and V
            * model.dkv
            * ELEM_BYTES)


def equivalent_bits(groups: tuple[LayerGroup, ...]) -> float:
    """Yang et al.'s equivalent bit-width: mean stored code bits over all K/V layer tensors [bit].

    Shared tensors count 0 bits; metadata and the residual window are left out. This is our reading
    of the paper's 1.38 / 1.4 / 1.15625 (= 88/64, 90/64, 74/64 on 32 layers).
    """
    bits = sum(g.count * (0 if t.shared else t.bits) for g in groups for t in g.tensors)
    count = sum(g.count * len(g.tensors) for g in groups)
    return bits / count


def split_layers(model: ModelSpec, cfg: SchemeConfig, make) -> tuple[LayerGroup, ...]:
    """Leading `first_layers` layers at max(first_bits, bits), the rest at `bits`; make(bits) -> tensors."""
    f, n = cfg.first_layers or 0, model.n_layers
    fb = max(cfg.first_bits or 0, cfg.bits)
    groups = (LayerGroup(f, make(fb), layers=tuple(range(f))),
              LayerGroup(n - f, make(cfg.bits), layers=tuple(range(f, n))))
    return tuple(g for g in groups if g.count)


def tensor(name: str, width: int, bits: int, axis="token", row: int | None = None, shared=False) -> CacheTensor:
    """A cached tensor of `width` values a token (per-token rows of `row` values, the whole width by default)."""
    return CacheTensor(name, width, row or width, axis, bits, shared)

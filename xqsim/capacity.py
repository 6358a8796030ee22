"""Memory of a deployment, and what fits: max batch at a context, max context at a batch (the memory
wall), and throughput under the capacity limit.

Memory = weights + batch x (cache + transient) of one sequence. A sequence that reaches context T has
held every shorter context too, and a per-channel cache shrinks when a block of R fp16 tokens is
quantized, so what must fit is the envelope max over T' <= T; `fits` and the maxima use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import schemes
from .schemes.layout import (
    ELEM_BYTES,
    LayerGroup,
    code_bytes_per_token,
    has_block_flush,
    meta_bytes_per_token,
)
from .specs import ModelSpec, SchemeConfig

MAX_CONTEXT = 2**31  # search ceiling [tokens]
SEARCH_WAYS = 64  # max_context's search: points per step


@dataclass(frozen=True)
class SeqMemory:
    """Bytes of one sequence at context T: fixed + per_token*T + token_q*q_tok(T) + channel_q*q_ch(T).

    q_tok(T) = max(T-R, 0) (sliding window) and q_ch(T) = T - T mod R (blocks): the tokens held as
    codes; each coefficient is the bytes a token saves (<0) or costs once quantized, vs fp16.
    """

    fixed: float  # activations [B]
    per_token: float  # every token at fp16, plus transient buffers [B/token]
    token_q: float  # change per token quantized per token [B/token]
    channel_q: float  # change per token quantized per channel (blocks of G) [B/token]
    R: int
    flush: bool  # some per-channel tensor is quantized in blocks

    def __call__(self, T):
        T = np.asarray(T, dtype=np.int64)
        R = max(self.R, 1)
        return (self.fixed + self.per_token * T + self.token_q * np.maximum(T - self.R, 0)
                + self.channel_q * (T - T % R))

    def envelope(self, T):
        """Most bytes the sequence held at any context <= T [B]."""
        T = np.asarray(T, dtype=np.int64)
        m = self(T)
        if not self.flush:
            return m
        before_flush = T - T % self.R - 1  # last context before the latest block was quantized
        return np.where(before_flush >= 0, np.maximum(m, self(np.maximum(before_flush, 0))), m)


def seq_memory(model: ModelSpec, cfg: SchemeConfig, groups: tuple[LayerGroup, ...]) -> SeqMemory:
    """Linear form of one sequence's bytes (cache + transient), from the per-token byte formulas."""
    G, R = cfg.group, cfg.residual or 0
    per_token = token_q = channel_q = 0.0
    for g in groups:
        for t in g.tensors:
            fp = t.width * ELEM_BYTES
            per_token += g.count * fp
            if t.quantized:
                delta = g.count * (code_bytes_per_token(t, G) + meta_bytes_per_token(t, G) - fp)
                if t.axis == "token":
                    token_q += delta
                else:
                    channel_q += delta
    probe = schemes.transient_bytes(model, cfg, np.array([0, 1]), groups)
    return SeqMemory(fixed=float(probe[0]), per_token=per_token + float(probe[1] - probe[0]),
                     token_q=token_q, channel_q=channel_q, R=R, flush=has_block_flush(groups))


def memory(model: ModelSpec, cfg: SchemeConfig, B, T, groups=None) -> dict[str, np.ndarray]:
    """Exact memory breakdown for batch B at context T [B]: weights, cache parts, transient, total."""
    groups = groups or schemes.layout(model, cfg)
    parts = schemes.cache_parts(groups, cfg, T)  # float64: times B, bytes pass int64 (batch 2^20 x 2^31 tokens)
    out = {"weights_bytes": schemes.weights_bytes(model, cfg)}
    out["cache_codes_bytes"] = B * parts["codes"]
    out["cache_metadata_bytes"] = B * parts["metadata"]
    out["cache_residual_bytes"] = B * parts["residual"]
    out["cache_bytes"] = out["cache_codes_bytes"] + out["cache_metadata_bytes"] + out["cache_residual_bytes"]
    out["transient_bytes"] = B * schemes.transient_bytes(model, cfg, T, groups)
    out["total_bytes"] = float(out["weights_bytes"]) + out["cache_bytes"] + out["transient_bytes"]
    return out


def max_batch(capacity, weights: float, mem: SeqMemory, T) -> np.ndarray:
    """Most sequences that fit at context T (0 if the weights alone do not) [sequences]."""
    free = np.asarray(capacity, dtype=float) - weights
    return np.maximum(np.floor(free / mem.envelope(T)), 0).astype(np.int64)


def max_context(capacity, weights: float, mem: SeqMemory, B) -> np.ndarray:
    """Longest context at which B sequences fit, capped at MAX_CONTEXT (0: not even one token) [tokens]."""
    budget = (np.asarray(capacity, dtype=float) - weights) / np.asarray(B, dtype=float)
    lo = np.zeros(np.shape(budget), dtype=np.int64)
    hi = np.full(np.shape(budget), MAX_CONTEXT, dtype=np.int64)
    steps = np.arange(1, SEARCH_WAYS, dtype=np.int64)
    while np.any(lo < hi):  # largest T with envelope(T) <= budget (envelope is non-decreasing): a 64-way search
        # SEARCH_WAYS - 1 points split (lo, hi] into parts; the largest that fits becomes lo, the next one hi + 1
        width = hi - lo
        pts = lo[..., None] + -(-(width[..., None] * steps) // SEARCH_WAYS)  # (..., ways - 1), non-decreasing
        ok = mem.envelope(pts) <= budget[..., None]
        n_ok = ok.sum(-1)  # points that fit: a prefix, envelope being non-decreasing
        fits = np.take_along_axis(pts, np.maximum(n_ok - 1, 0)[..., None], -1)[..., 0]
        fails = np.take_along_axis(pts, np.minimum(n_ok, SEARCH_WAYS - 2)[..., None], -1)[..., 0]
        lo = np.where(n_ok > 0, fits, lo)
        hi = np.where(n_ok < SEARCH_WAYS - 1, fails - 1, hi)
    return lo

"""Real caches: one Store per cached tensor per layer, holding exactly the bytes that
xqsim.schemes.layout counts (codes bit-packed, fp16 scale and zero, fp16 residual window).

Tensors grow with the context (torch.cat), so what a Store holds is what it needs: `nbytes` sums
the tensors it really holds.
"""

from __future__ import annotations

import torch

from ..schemes.layout import CacheTensor
from .quant import dequantize, pack, quantize, unpack


class Store:
    """One CacheTensor of one layer for a batch: append tokens, read them back as values."""

    def __init__(self, t: CacheTensor, group: int, residual: int, dtype: torch.dtype, eta: float = 0.0,
                 below: Store | None = None):
        self.t, self.G, self.R, self.dtype, self.eta = t, group, residual, dtype, eta
        self.below = below  # a shared store decodes the codes of the layer below
        self.fp: torch.Tensor | None = None  # (B, n, width): unquantized values or the residual window
        self.codes: torch.Tensor | None = None  # token: (B, Tq, rows, ceil(row*b/8)); channel: (B, width, nb, ·)
        self.scale: torch.Tensor | None = None  # token: (B, Tq, rows, ngroups); channel: (B, width, nb)
        self.zero: torch.Tensor | None = None
        self.n_quantized = 0

    def append(self, x: torch.Tensor) -> int:
        """Add n tokens (B, n, width); returns how many tokens were quantized now."""
        x = x.to(self.dtype)
        self.fp = x if self.fp is None else torch.cat([self.fp, x], dim=1)  # (B, n_fp, width)
        if not self.t.quantized:
            return 0
        n_fp = self.fp.shape[1]
        if self.t.axis == "token":
            k = max(n_fp - self.R, 0)  # sliding window: keep the last R tokens in fp16
        else:
            k = n_fp - n_fp % self.R  # per channel: quantize whole windows of R tokens
        if k:
            self._quantize(self.fp[:, :k])
            self.fp = self.fp[:, k:].contiguous()
        return k

    def _quantize(self, x: torch.Tensor) -> None:
        B, k, w = x.shape
        b, t = self.t.bits, self.t
        if t.axis == "token":
            rows = x.reshape(B, k, w // t.row, t.row)  # (B, k, rows, row)
            codes, scale, zero = quantize(rows, b, self.G, self.eta)
            dim = 1
        else:
            blocks = x.transpose(1, 2).reshape(B, w, k // self.G, self.G)  # (B, width, nb, G)
            codes, scale, zero = quantize(blocks, b, self.G, self.eta)
            scale, zero, dim = scale[..., 0], zero[..., 0], 2  # one group per block: (B, width, nb)
        packed = None if t.shared else pack(codes, b)
        self.codes = packed if self.codes is None or packed is None else torch.cat([self.codes, packed], dim=dim)
        self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=dim)
        self.zero = zero if self.zero is None else torch.cat([self.zero, zero], dim=dim)
        self.n_quantized += k

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """All tokens as values (B, T, width): the dequantized part, then the fp16 part."""
        parts = [self.read_quantized(dtype)] if self.n_quantized else []
        if self.fp is not None and self.fp.shape[1]:
            parts.append(self.fp.to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized tokens dequantized (B, Tq, width)."""
        t, codes = self.t, (self.below.codes if self.t.shared else self.codes)
        if t.axis == "token":
            c = unpack(codes, t.bits, t.row)  # (B, Tq, rows, row)
            return dequantize(c, self.scale, self.zero, self.G, dtype).flatten(2)
        c = unpack(codes, t.bits, self.G)  # (B, width, nb, G)
        v = dequantize(c, self.scale[..., None], self.zero[..., None], self.G, dtype)
        return v.flatten(2).transpose(1, 2)  # (B, Tq, width)

    @property
    def tokens(self) -> int:
        return self.n_quantized + (0 if self.fp is None else self.fp.shape[1])

    def nbytes(self) -> int:
        """Bytes of the tensors this store holds (a shared store holds no codes)."""
        held = [self.fp, self.scale, self.zero] + ([] if self.t.shared else [self.codes])
        return sum(x.numel() * x.element_size() for x in held if x is not None)

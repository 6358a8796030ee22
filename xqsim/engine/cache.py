"""Real caches: one Store per cached tensor per layer, holding exactly the bytes that
xqsim.schemes.layout counts (codes bit-packed, fp16 scale and zero, fp16 residual window).

Each tensor grows along its token axis inside a buffer with spare capacity (doubling, or reserved up
front for timing), so a decode step writes only its new token. `nbytes` counts the tokens held, the
bytes the analytic model counts; `reserved_bytes` counts the buffers, spare capacity included.
"""

from __future__ import annotations

import torch

from ..schemes.layout import CacheTensor
from .quant import dequantize, pack, quantize, unpack


class Growable:
    """A tensor that grows along one axis inside a larger buffer."""

    def __init__(self, dim: int):
        self.dim, self.buf, self.n = dim, None, 0

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.buf is None else self.buf.narrow(self.dim, 0, self.n)

    def reserve(self, like: torch.Tensor, capacity: int) -> None:
        """Make room for `capacity` entries along the axis, keeping what is held."""
        if self.buf is not None and self.buf.shape[self.dim] >= capacity:
            return
        shape = list(like.shape)
        shape[self.dim] = capacity
        buf = like.new_empty(shape)
        if self.n:
            buf.narrow(self.dim, 0, self.n).copy_(self.value)
        self.buf = buf

    def append(self, x: torch.Tensor) -> None:
        k = x.shape[self.dim]
        if self.buf is None or self.n + k > self.buf.shape[self.dim]:
            self.reserve(x, max(2 * (self.n + k), 16))
        self.buf.narrow(self.dim, self.n, k).copy_(x)
        self.n += k

    def drop_front(self, k: int) -> None:
        """Forget the first k entries (the rest move to the front)."""
        rest = self.n - k
        if rest:
            self.buf.narrow(self.dim, 0, rest).copy_(self.buf.narrow(self.dim, k, rest).clone())
        self.n = rest

    def nbytes(self) -> int:
        v = self.value
        return 0 if v is None else v.numel() * v.element_size()

    def reserved_bytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class Store:
    """One CacheTensor of one layer for a batch: append tokens, read them back as values."""

    def __init__(self, t: CacheTensor, group: int, residual: int, dtype: torch.dtype, eta: float = 0.0,
                 below: Store | None = None):
        self.t, self.G, self.R, self.dtype, self.eta = t, group, residual, dtype, eta
        self.below = below  # a shared store decodes the codes of the layer below
        dim = 1 if t.axis == "token" else 2
        self._fp = Growable(1)  # (B, n, width): unquantized values or the residual window
        self._codes = Growable(dim)  # token: (B, Tq, rows, ceil(row*b/8)); channel: (B, width, nb, ceil(G*b/8))
        self._scale = Growable(dim)  # token: (B, Tq, rows, ngroups); channel: (B, width, nb)
        self._zero = Growable(dim)
        self.n_quantized = 0

    fp = property(lambda self: self._fp.value)
    codes = property(lambda self: self.below.codes if self.t.shared else self._codes.value)
    scale = property(lambda self: self._scale.value)
    zero = property(lambda self: self._zero.value)

    def append(self, x: torch.Tensor) -> int:
        """Add n tokens (B, n, width); returns how many tokens were quantized now."""
        self.push(x)
        return self.flush()

    def push(self, x: torch.Tensor) -> None:
        """Write n tokens (B, n, width) into the fp16 part."""
        self._fp.append(x.to(self.dtype))

    def flush(self) -> int:
        """Quantize what leaves the residual window (per token) or fills it (per channel); returns the count."""
        k = self.pending()
        if k:
            self._quantize(self.fp[:, :k])
            self._fp.drop_front(k)
        return k

    def pending(self) -> int:
        """How many fp16 tokens the next flush quantizes."""
        if not self.t.quantized:
            return 0
        n_fp = self._fp.n
        if self.t.axis == "token":
            return max(n_fp - self.R, 0)  # sliding window: keep the last R tokens in fp16
        return n_fp - n_fp % self.R  # per channel: quantize whole windows of R tokens

    def _quantize(self, x: torch.Tensor) -> None:
        B, k, w = x.shape
        b, t = self.t.bits, self.t
        if t.axis == "token":
            rows = x.reshape(B, k, w // t.row, t.row)  # (B, k, rows, row)
            codes, scale, zero = quantize(rows, b, self.G, self.eta)
        else:
            blocks = x.transpose(1, 2).reshape(B, w, k // self.G, self.G)  # (B, width, nb, G)
            codes, scale, zero = quantize(blocks, b, self.G, self.eta)
            scale, zero = scale[..., 0], zero[..., 0]  # one group per block: (B, width, nb)
        if not t.shared:
            self._codes.append(pack(codes, b))
        self._scale.append(scale)
        self._zero.append(zero)
        self.n_quantized += k

    def reserve(self, tokens: int, batch: int, device) -> None:
        """Preallocate room for `tokens` tokens so that appending never reallocates (for timing)."""
        t = self.t
        self._fp.reserve(torch.empty(batch, 1, t.width, dtype=self.dtype, device=device),
                         tokens if not t.quantized else self.R + 1)
        if not t.quantized:
            return
        if t.axis == "token":
            rows, ng = t.width // t.row, -(-t.row // self.G)
            meta = torch.empty(batch, 1, rows, ng, dtype=torch.float16, device=device)
            if not t.shared:
                self._codes.reserve(torch.empty(batch, 1, rows, -(-t.row * t.bits // 8), dtype=torch.uint8,
                                                device=device), tokens)
            cap = tokens
        else:
            meta = torch.empty(batch, t.width, 1, dtype=torch.float16, device=device)
            if not t.shared:
                self._codes.reserve(torch.empty(batch, t.width, 1, -(-self.G * t.bits // 8), dtype=torch.uint8,
                                                device=device), -(-tokens // self.G))
            cap = -(-tokens // self.G)
        self._scale.reserve(meta, cap)
        self._zero.reserve(meta, cap)

    def snapshot(self) -> tuple:
        """What a rollback needs: the lengths (contents past them are overwritten by later appends)."""
        return (self._fp.n, self._codes.n, self._scale.n, self._zero.n, self.n_quantized,
                None if self._fp.buf is None else self._fp.value.clone() if self.t.quantized else None)

    def rollback(self, snap: tuple) -> None:
        self._fp.n, self._codes.n, self._scale.n, self._zero.n, self.n_quantized, fp = snap
        if fp is not None:  # the residual window may have slid: put it back
            self._fp.buf.narrow(1, 0, fp.shape[1]).copy_(fp)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """All tokens as values (B, T, width): the dequantized part, then the fp16 part."""
        parts = [self.read_quantized(dtype)] if self.n_quantized else []
        if self._fp.n:
            parts.append(self.fp.to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def read_range(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Tokens [start, end) as values (B, end-start, width), dequantizing only what they need."""
        nq, parts = self.n_quantized, []
        if start < nq:
            e = min(end, nq)
            t = self.t
            if t.axis == "token":
                c = unpack(self.codes[:, start:e], t.bits, t.row)  # (B, n, rows, row)
                parts.append(dequantize(c, self.scale[:, start:e], self.zero[:, start:e], self.G, dtype).flatten(2))
            else:
                b0, b1 = start // self.G, -(-e // self.G)
                c = unpack(self.codes[:, :, b0:b1], t.bits, self.G)  # (B, width, nb, G)
                v = dequantize(c, self.scale[:, :, b0:b1, None], self.zero[:, :, b0:b1, None], self.G, dtype)
                parts.append(v.flatten(2).transpose(1, 2)[:, start - b0 * self.G: e - b0 * self.G])
        if end > nq:
            parts.append(self.fp[:, max(start, nq) - nq: end - nq].to(dtype))
        if len(parts) > 1:
            return torch.cat(parts, dim=1)
        # per-channel codes dequantize channel-major: lay the values out token-major (dense channels), as
        # attention kernels read them; a plain view of the fp16 part stays a view
        return parts[0] if parts[0].stride(-1) == 1 else parts[0].contiguous()

    def quantized_in(self, start: int, end: int) -> int:
        """How many of tokens [start, end) are held as codes."""
        return max(0, min(end, self.n_quantized) - start)

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized tokens dequantized (B, Tq, width)."""
        t, codes = self.t, self.codes
        if t.axis == "token":
            c = unpack(codes, t.bits, t.row)  # (B, Tq, rows, row)
            return dequantize(c, self.scale, self.zero, self.G, dtype).flatten(2)
        c = unpack(codes, t.bits, self.G)  # (B, width, nb, G)
        v = dequantize(c, self.scale[..., None], self.zero[..., None], self.G, dtype)
        return v.flatten(2).transpose(1, 2)  # (B, Tq, width)

    @property
    def tokens(self) -> int:
        return self.n_quantized + self._fp.n

    def nbytes(self) -> int:
        """Bytes of the tokens this store holds (a shared store holds no codes)."""
        return self._fp.nbytes() + self._scale.nbytes() + self._zero.nbytes() + \
            (0 if self.t.shared else self._codes.nbytes())

    def reserved_bytes(self) -> int:
        return sum(g.reserved_bytes() for g in (self._fp, self._codes, self._scale, self._zero))

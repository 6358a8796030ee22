"""Real caches: one Store per cached tensor per layer, holding exactly the bytes that
xqsim.schemes.layout counts (codes bit-packed, fp16 scale and zero, fp16 residual window).

Codes are packed along the axis their groups run along (quant.pack's layout: per-token rows, per-channel blocks of
G tokens), except in the Triton engine's K and V stores at 2, 4 or 8 bits, which pack them along the axis the
attention products contract ("cross" packing): keys token by token along their channels (q.K^T sums over
channels), values channel by channel along their tokens (P.V sums over tokens). Each 32-bit word then holds codes
that one tensor-core operand fragment takes in the order it takes them, so the attention kernel unpacks them in
registers with no shared-memory transposition. The bits held are the same; only their order differs.

Each tensor grows along its token axis inside a buffer with spare capacity (doubling, or reserved up
front for timing), so a decode step writes only its new token; the residual window slides by an offset
and is copied to the front only when its buffer runs out of room. `nbytes` counts the tokens held, the
bytes the analytic model counts; `reserved_bytes` counts the buffers, spare capacity included.
"""

from __future__ import annotations

import torch

from ..schemes.layout import CacheTensor
from .kernels import check as check_kernels
from .quant import META_DTYPE, dequantize, pack, quantize, unpack

APPEND_PIECE_VALUES = 1 << 22  # a quantized store appends a long prompt in pieces: its fp16 window stays small


class Growable:
    """A tensor that grows along one axis inside a larger buffer: entries [start, start + n) are held.

    Dropping the front only advances `start`; the held entries move to the front (a compaction) only when an
    append finds no room after them. `moves` counts the times held entries moved (compaction, a new buffer),
    which is when a snapshot's copy of them is needed to roll back.
    """

    def __init__(self, dim: int, align: int = 1):
        self.dim, self.buf, self.start, self.n, self.moves = dim, None, 0, 0, 0
        self.align = align  # capacities are multiples of this (4: the buffer reads as 32-bit words)

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.buf is None else self.buf.narrow(self.dim, self.start, self.n)

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[self.dim]

    def reserve(self, like: torch.Tensor, capacity: int) -> None:
        """Make room for `capacity` entries along the axis, keeping what is held."""
        self.grow(like.shape, like.dtype, like.device, capacity)

    def grow(self, shape, dtype, device, capacity: int) -> None:
        """reserve() by shape (the axis' size in it is ignored), dtype and device."""
        if self.capacity >= capacity:
            return
        capacity = -(-capacity // self.align) * self.align
        shape = list(shape)
        shape[self.dim] = capacity
        buf = torch.empty(shape, dtype=dtype, device=device)
        if self.n:
            buf.narrow(self.dim, 0, self.n).copy_(self.value)
        self.buf, self.start = buf, 0
        self.moves += 1

    def _room(self, shape, dtype, device, k: int) -> None:
        """Make room for k entries after the held ones: compact to the front if that does, else grow."""
        if self.buf is not None and self.start + self.n + k <= self.capacity:
            return
        if self.buf is not None and self.n + k <= self.capacity:
            if self.n:  # overlapping source and destination go through a copy
                v = self.value
                self.buf.narrow(self.dim, 0, self.n).copy_(v.clone() if self.start < self.n else v)
            self.start = 0
            self.moves += 1
        else:
            self.grow(shape, dtype, device, max(2 * (self.n + k), 16))

    def append(self, x: torch.Tensor) -> None:
        k = x.shape[self.dim]
        self._room(x.shape, x.dtype, x.device, k)
        self.buf.narrow(self.dim, self.start + self.n, k).copy_(x)
        self.n += k

    def claim(self, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """The next shape[dim] entries, held from now on, as a view of the buffer to write into."""
        k = shape[self.dim]
        self._room(shape, dtype, device, k)
        view = self.buf.narrow(self.dim, self.start + self.n, k)
        self.n += k
        return view

    def drop_front(self, k: int) -> None:
        """Forget the first k entries (nothing moves)."""
        self.start += k
        self.n -= k

    def nbytes(self) -> int:
        v = self.value
        return 0 if v is None else v.numel() * v.element_size()

    def reserved_bytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


def cross_packing(t: CacheTensor, group: int, kernels: str) -> bool:
    """Whether a store packs its codes along the contracted axis (module docstring): the Triton engine's K and V
    at 2, 4 or 8 bits whose rows (channel axis: a token's channels; token axis: a row, and a block of G tokens)
    are whole bytes, and whose channel-axis rows are whole 32-bit words."""
    if kernels != "triton" or t.name not in ("k", "v") or t.bits not in (2, 4, 8):
        return False
    if t.axis == "channel":
        return t.width * t.bits % 32 == 0 and group * t.bits % 8 == 0
    return t.row * t.bits % 8 == 0


class Store:
    """One CacheTensor of one layer for a batch: append tokens, read them back as values.

    kernels='torch' quantizes with quant.quantize and quant.pack (the reference); 'triton' with one launch of
    kernels.quantize per flush, writing codes, scale and zero straight into the buffers (cross-packed where
    `cross_packing` says so)."""

    def __init__(self, t: CacheTensor, group: int, residual: int, dtype: torch.dtype, eta: float = 0.0,
                 below: Store | None = None, kernels: str = "torch"):
        self.t, self.G, self.R, self.dtype, self.eta = t, group, residual, dtype, eta
        self.kernels = check_kernels(kernels)
        self.below = below  # a shared store decodes the codes of the layer below
        self.cross = cross_packing(t, group, self.kernels)
        dim = 1 if t.axis == "token" else 2
        self._fp = Growable(1)  # (B, n, width): unquantized values or the residual window
        # token: (B, Tq, rows, ceil(row*b/8)); channel: (B, width, nb, ceil(G*b/8)); cross-packed: token axis
        # (B, width, ceil(Tq*b/8)) in buffers of whole 32-bit words, channel axis (B, Tq, width*b/8)
        self._codes = Growable(3 - dim, align=4) if self.cross else Growable(dim)
        self._scale = Growable(dim)  # token: (B, Tq, rows, ngroups); channel: (B, width, nb)
        self._zero = Growable(dim)
        self.n_quantized = 0

    fp = property(lambda self: self._fp.value)
    codes = property(lambda self: self.below.codes if self.t.shared else self._codes.value)

    @property
    def code_words(self) -> torch.Tensor:
        """Cross-packed codes as int32 words: token axis (B, width, words), channel axis (B, Tq, width*b/32)."""
        if self.t.shared:
            return self.below.code_words
        g = self._codes
        if self.t.axis == "channel":
            return g.value.view(torch.int32)
        return g.buf.narrow(2, 0, -(-g.n // 4) * 4).view(torch.int32)  # the last word may be partly held
    scale = property(lambda self: self._scale.value)
    zero = property(lambda self: self._zero.value)

    def append(self, x: torch.Tensor) -> int:
        """Add n tokens (B, n, width); returns how many tokens were quantized now."""
        B, n, w = x.shape
        if not self.t.quantized:
            self.push(x)
            return 0
        if self.kernels == "triton" and self.t.axis == "token" and not self.R and not self._fp.n:
            self._quantize(x.to(self.dtype))  # no residual window: codes straight from x
            return n
        step = max(self.R, 1) * max(1, APPEND_PIECE_VALUES // max(B * w * max(self.R, 1), 1))
        self._fp.grow(x.shape, self.dtype, x.device, self.R + min(step, n))  # the window and a piece, no doubling
        done = 0
        for i in range(0, n, step):  # the same codes as one append: groups never span tokens or blocks
            self.push(x[:, i:i + step])
            done += self.flush()
        return done

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
        """Quantize x (B, k, width) and append codes, scale and zero."""
        if self.kernels == "triton":
            return self._quantize_triton(x)
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

    def _quantize_triton(self, x: torch.Tensor) -> None:
        """One Triton launch writing into the next slots of the buffers (no allocation once reserved)."""
        from .kernels.quantize import quantize_channels, quantize_tokens

        B, k, w = x.shape
        t, dev, cross = self.t, x.device, self.cross
        if t.axis == "token":
            rows, ng, nbytes = w // t.row, -(-t.row // self.G), -(-t.row * t.bits // 8)
            if t.shared:
                codes = None
            elif cross:  # the bytes that tokens [0, Tq + k) reach along each channel, then all as words
                grow = -(-(self.n_quantized + k) * t.bits // 8) - self._codes.n
                if grow > 0:
                    self._codes.claim((B, w, grow), torch.uint8, dev)
                codes = self.code_words
            else:
                codes = self._codes.claim((B, k, rows, nbytes), torch.uint8, dev)
            scale = self._scale.claim((B, k, rows, ng), META_DTYPE, dev)  # (B, k, rows, ng) view
            zero = self._zero.claim((B, k, rows, ng), META_DTYPE, dev)
            quantize_tokens(x, t.row, t.bits, self.G, self.eta, codes, scale, zero, self.dtype,
                            first=self.n_quantized if cross else None)
        else:
            nb, nbytes = k // self.G, -(-self.G * t.bits // 8)
            shape = (B, k, w * t.bits // 8) if cross else (B, w, nb, nbytes)
            codes = None if t.shared else self._codes.claim(shape, torch.uint8, dev)
            scale = self._scale.claim((B, w, nb), META_DTYPE, dev)  # (B, width, nb) view
            zero = self._zero.claim((B, w, nb), META_DTYPE, dev)
            quantize_channels(x, t.bits, self.G, self.eta, codes, scale, zero, self.dtype, cross=cross)
        self.n_quantized += k

    def reserve(self, tokens: int, batch: int, device) -> None:
        """Preallocate room for `tokens` tokens so that appending never reallocates (for timing). A quantized
        store's fp16 window gets R + 1 tokens (a step's token before the flush) and R of slack: the window slides
        R steps before it is compacted to the front."""
        t = self.t
        self._fp.reserve(torch.empty(batch, 1, t.width, dtype=self.dtype, device=device),
                         tokens if not t.quantized else 2 * self.R + 1)
        if not t.quantized:
            return
        u8 = dict(dtype=torch.uint8, device=device)
        if t.axis == "token":
            rows, ng = t.width // t.row, -(-t.row // self.G)
            meta = torch.empty(batch, 1, rows, ng, dtype=torch.float16, device=device)
            if t.shared:
                pass
            elif self.cross:
                self._codes.reserve(torch.empty(batch, t.width, 1, **u8), -(-tokens * t.bits // 8))
            else:
                self._codes.reserve(torch.empty(batch, 1, rows, -(-t.row * t.bits // 8), **u8), tokens)
            cap = tokens
        else:
            meta = torch.empty(batch, t.width, 1, dtype=torch.float16, device=device)
            if t.shared:
                pass
            elif self.cross:
                self._codes.reserve(torch.empty(batch, 1, t.width * t.bits // 8, **u8), tokens)
            else:
                self._codes.reserve(torch.empty(batch, t.width, 1, -(-self.G * t.bits // 8), **u8),
                                    -(-tokens // self.G))
            cap = -(-tokens // self.G)
        self._scale.reserve(meta, cap)
        self._zero.reserve(meta, cap)

    def snapshot(self) -> tuple:
        """What a rollback needs: the lengths and where the window lies (contents past them are overwritten by
        later appends), and a copy of a quantized store's window, for when a compaction moves it."""
        fp = self._fp
        return (fp.start, fp.n, fp.moves, self._codes.n, self._scale.n, self._zero.n, self.n_quantized,
                fp.value.clone() if self.t.quantized and fp.buf is not None else None)

    def rollback(self, snap: tuple) -> None:
        """Back to the state of `snap`; copies the window back only if it moved since (same ops on every call
        from the same state, so a captured step and its rollback replay as they ran)."""
        fp = self._fp
        fp.start, fp.n, moves, self._codes.n, self._scale.n, self._zero.n, self.n_quantized, window = snap
        if window is not None and fp.moves != moves:  # compacted or regrown since: put the window back
            fp.buf.narrow(1, fp.start, fp.n).copy_(window)
            fp.moves = moves

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
            if self.cross:
                parts.append(self._dequantize_cross(start, e, dtype))
            elif t.axis == "token":
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

    def _cross_codes(self, start: int, end: int) -> torch.Tensor:
        """Codes of quantized tokens [start, end) of a cross-packed store, as (B, end - start, width) uint8."""
        t, codes = self.t, self.codes
        if t.axis == "channel":  # token rows packed along channels
            return unpack(codes[:, start:end], t.bits, t.width)
        b0, b1 = start * t.bits // 8, -(-end * t.bits // 8)  # channels packed along tokens: the bytes they reach
        c = unpack(codes[:, :, b0:b1], t.bits, (b1 - b0) * 8 // t.bits)  # (B, width, tokens from b0's first)
        off = start - b0 * 8 // t.bits
        return c[:, :, off:off + end - start].transpose(1, 2)

    def _dequantize_cross(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Quantized tokens [start, end) of a cross-packed store as values (B, end - start, width): the same
        operation, value for value, as the reference layout's dequantization."""
        t, c = self.t, self._cross_codes(start, end)
        if t.axis == "token":
            B, n, w = c.shape
            rows = c.reshape(B, n, w // t.row, t.row)
            return dequantize(rows, self.scale[:, start:end], self.zero[:, start:end], self.G, dtype).flatten(2)
        blk = torch.arange(start, end, device=c.device) // self.G
        s = self.scale[:, :, blk].transpose(1, 2).to(dtype)  # (B, n, width)
        z = self.zero[:, :, blk].transpose(1, 2).to(dtype)
        return torch.addcmul(z, c.to(dtype), s)

    def packed(self) -> torch.Tensor:
        """The codes in quant.pack's layout (the torch path's), whatever this store's packing."""
        if not self.cross:
            return self.codes
        t, c = self.t, self._cross_codes(0, self.n_quantized)  # (B, Tq, width)
        B, n, w = c.shape
        if t.axis == "token":
            return pack(c.reshape(B, n, w // t.row, t.row), t.bits)
        return pack(c.transpose(1, 2).reshape(B, w, n // self.G, self.G), t.bits)

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized tokens dequantized (B, Tq, width)."""
        t, codes = self.t, self.codes
        if self.cross:
            return self._dequantize_cross(0, self.n_quantized, dtype)
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
        return self._fp.nbytes() + self._scale.nbytes() + self._zero.nbytes() + self.code_bytes()

    def code_bytes(self) -> int:
        """Bytes of the codes held: a cross-packed token-axis store counts the bits of its tokens (its last byte
        per channel may be partly held, as the analytic layout's rows never are)."""
        if self.t.shared:
            return 0
        if self.cross and self.t.axis == "token" and self._codes.buf is not None:
            B, w = self._codes.buf.shape[:2]
            return B * w * self.n_quantized * self.t.bits // 8
        return self._codes.nbytes()

    def reserved_bytes(self) -> int:
        return sum(g.reserved_bytes() for g in (self._fp, self._codes, self._scale, self._zero))

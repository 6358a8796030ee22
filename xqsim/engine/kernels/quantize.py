"""Quantize-on-append in one Triton launch: min/max per group, fp16 scale and zero point, codes rounded half to
even and bit-packed, written straight into the cache's buffers (the byte layout of quant.pack and
xqsim.schemes.layout).

Bit-exact with quant.quantize + quant.pack: every step is the fp32 op torch does (IEEE division through
tl.div_rn, fp16 rounding of scale and zero before the codes use them, round half to even through the 1.5*2^23
trick), launched without fp contraction so that no multiply-add is fused. Codes pack in units of the
little-endian bit stream of pack: where b divides 32 and rows are whole 4-byte words (2, 4 and 8 bits in the
cache's buffers), 32/b codes a 32-bit word, stored as words; otherwise (3 bits: pack's bit planes) 8 codes a
unit, which is b bytes (codes 8c..8c+7 of a row are its bytes b*c..b*c+b-1).

Two layouts, one program each per (sequence, token, row) or per (sequence, block of G tokens, channels):
- per-token groups: x (B, k, width) as rows of `row` values, groups of G along the row (the last may be
  partial): codes (B, k, rows, ceil(row*b/8)), scale and zero (B, k, rows, ceil(row/G));
- per-channel blocks: k tokens (a multiple of G) of each channel: codes (B, width, k/G, ceil(G*b/8)),
  scale and zero (B, width, k/G).
Cross packing (xqsim.engine.cache; b = 2, 4, 8) puts the same codes along the other axis: per-token groups
write each channel's code of token `first + t` into the int32 words (B, width, words) packed along tokens (a
word's other tokens' bits are left as they are: two atomic operations a word, so the tokens of one launch
never race), per-channel blocks write token rows (B, k, width*b/8) packed along channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import META_DTYPE

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: y + MAGIC rounds y in [0, 2^22) to an integer, ties to even,
MAGIC_BITS = tl.constexpr(0x4B400000)  # and its bits are these plus that integer


@triton.jit
def _scale_zero(mn, mx, c1, eta, LEVELS: tl.constexpr, CALIB: tl.constexpr):
    """Group min/max (fp32) -> fp16 scale and zero, the fp32 ops of quant.quantize and quant.calibrate."""
    scale = tl.div_rn(mx - mn, tl.full(mn.shape, LEVELS, tl.float32))
    zero = mn
    if CALIB:  # Yang et al.: z' = z + eta*s*(2^b-1), s' = (1-2*eta)*s
        zero = mn + (eta * scale) * LEVELS
        scale = c1 * scale
    return scale.to(tl.float16), zero.to(tl.float16)


@triton.jit
def _codes(xf, s, z, LEVELS: tl.constexpr):
    """int32 codes in [0, LEVELS] of fp32 values with the fp16 scale s and zero z (as fp32): torch.round (half to
    even) of the IEEE quotient, clamped; clamping first gives the same (the bounds are integers)."""
    y = tl.minimum(tl.maximum(tl.div_rn(xf - z, tl.maximum(s, 1e-8)), 0.0), LEVELS * 1.0)
    return (y + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS


@triton.jit
def _store_units(ptr, sy, q, shifts, unit, um, AXIS: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr,
                 WORDS: tl.constexpr):
    """Pack int32 codes q along AXIS (PER codes a unit; shifts: their bit offsets) and store unit `unit`:
    WORDS: one int32 word a unit (ptr counts dense words); else 8 codes a unit, BITS bytes sy apart."""
    if WORDS:
        word = tl.sum(q.to(tl.uint32) << shifts, axis=AXIS)  # bits never overlap: the sum is their OR
        tl.store(ptr + unit, word.to(tl.int32, bitcast=True), mask=um)
    else:
        word = tl.sum(q.to(tl.int64) << shifts.to(tl.int64), axis=AXIS)  # 8*BITS bits a unit
        for k in tl.static_range(BITS):
            byte = unit * BITS + k
            tl.store(ptr + byte * sy, ((word >> (8 * k)) & 255).to(tl.uint8), mask=um & (byte < NBYTES))


@triton.jit
def _store_cross(ptrs, q, shift, mask, LEVELS: tl.constexpr):
    """Write codes q at bit `shift` of the words at ptrs, keeping the words' other bits: clear, then set."""
    tl.atomic_and(ptrs, ~(LEVELS << shift), mask=mask, sem="relaxed")
    tl.atomic_or(ptrs, q << shift, mask=mask, sem="relaxed")


@triton.jit
def _quantize_tokens_kernel(
        x_ptr, codes_ptr, scale_ptr, zero_ptr, c1, eta, K, ROWS,
        sx_b, sx_t, sx_w, sc_b, sc_t, sc_r, sc_y, sm_b, sm_t, sm_r, sm_g,
        ROW: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, NBYTES: tl.constexpr, BITS: tl.constexpr,
        LEVELS: tl.constexpr, PER: tl.constexpr, NGP: tl.constexpr, UPGP: tl.constexpr, NUP: tl.constexpr,
        STORE: tl.constexpr, CALIB: tl.constexpr, CODES: tl.constexpr, WORDS: tl.constexpr,
        ALIGNED: tl.constexpr, CROSS: tl.constexpr, first):
    """One program per (sequence, token, row): one row of ROW values in groups of G; codes in units of PER (CROSS:
    into the words along tokens, sc_t the stride of channels, sc_r unused)."""
    pid = tl.program_id(0)
    r = (pid % ROWS).to(tl.int64)
    t = ((pid // ROWS) % K).to(tl.int64)
    b = (pid // ROWS // K).to(tl.int64)
    x_row = x_ptr + b * sx_b + t * sx_t + r * ROW * sx_w
    if CROSS:
        tok = first + t  # this token's bits in each channel's words: word tok // (32/BITS)
        c_row = codes_ptr + b * sc_b + r * ROW * sc_t + tok // (32 // BITS)
        shift = ((tok % (32 // BITS)) * BITS).to(tl.int32)
    else:
        c_row = codes_ptr + b * sc_b + t * sc_t + r * sc_r
    m_off = b * sm_b + t * sm_t + r * sm_r
    gi = tl.arange(0, NGP)  # (NGP,)
    gm = gi < NG
    si = tl.arange(0, PER)
    if ALIGNED:  # G % PER == 0: every unit of PER codes lies in one group -> tile (group, unit, PER)
        j = tl.arange(0, UPGP)[None, :, None] * PER + si[None, None, :]  # (1, UPGP, PER): in group
        i = gi[:, None, None] * G + j  # (NGP, UPGP, PER): in row
        valid = (j < G) & (i < ROW)
        xf = tl.load(x_row + i * sx_w, mask=valid, other=0.0).to(STORE).to(tl.float32)
        mn = tl.min(tl.min(tl.where(valid, xf, float("inf")), axis=2), axis=1)  # (NGP,)
        mx = tl.max(tl.max(tl.where(valid, xf, float("-inf")), axis=2), axis=1)
        s16, z16 = _scale_zero(tl.where(gm, mn, 0.0), tl.where(gm, mx, 0.0), c1, eta, LEVELS, CALIB)
        tl.store(scale_ptr + m_off + gi * sm_g, s16, mask=gm)
        tl.store(zero_ptr + m_off + gi * sm_g, z16, mask=gm)
        if CODES and CROSS:
            q = _codes(xf, s16.to(tl.float32)[:, None, None], z16.to(tl.float32)[:, None, None], LEVELS)
            _store_cross(c_row + i * sc_t, q, shift, valid, LEVELS)
        elif CODES:
            q = _codes(xf, s16.to(tl.float32)[:, None, None], z16.to(tl.float32)[:, None, None], LEVELS)
            q = tl.where(valid, q, 0)  # (NGP, UPGP, PER); padding packs as zeros
            ui = tl.arange(0, UPGP)[None, :]
            unit = gi[:, None] * (G // PER) + ui  # (NGP, UPGP): unit in row
            _store_units(c_row, sc_y, q, (si * BITS)[None, None, :].to(tl.uint32), unit,
                         (ui < G // PER) & (unit * PER < ROW), 2, BITS, NBYTES, WORDS)
    else:  # groups straddle units: tile (unit, PER), group statistics through a one-hot (group, unit, PER)
        ui = tl.arange(0, NUP)
        i = ui[:, None] * PER + si[None, :]  # (NUP, PER)
        valid = i < ROW
        xf = tl.load(x_row + i * sx_w, mask=valid, other=0.0).to(STORE).to(tl.float32)
        member = ((i // G)[None, :, :] == gi[:, None, None]) & valid[None, :, :]  # (NGP, NUP, PER)
        mn = tl.min(tl.min(tl.where(member, xf[None, :, :], float("inf")), axis=2), axis=1)  # (NGP,)
        mx = tl.max(tl.max(tl.where(member, xf[None, :, :], float("-inf")), axis=2), axis=1)
        s16, z16 = _scale_zero(tl.where(gm, mn, 0.0), tl.where(gm, mx, 0.0), c1, eta, LEVELS, CALIB)
        tl.store(scale_ptr + m_off + gi * sm_g, s16, mask=gm)
        tl.store(zero_ptr + m_off + gi * sm_g, z16, mask=gm)
        if CODES:
            s = tl.sum(tl.where(member, s16.to(tl.float32)[:, None, None], 0.0), axis=0)  # (NUP, PER): exact
            z = tl.sum(tl.where(member, z16.to(tl.float32)[:, None, None], 0.0), axis=0)
            q = tl.where(valid, _codes(xf, s, z, LEVELS), 0)  # (NUP, PER)
            if CROSS:
                _store_cross(c_row + i * sc_t, q, shift, valid, LEVELS)
            else:
                _store_units(c_row, sc_y, q, (si * BITS)[None, :].to(tl.uint32), ui, ui * PER < ROW, 1, BITS,
                             NBYTES, WORDS)


@triton.jit
def _quantize_channels_kernel(
        x_ptr, codes_ptr, scale_ptr, zero_ptr, c1, eta, NB, W, NCB,
        sx_b, sx_t, sx_w, sc_b, sc_w, sc_n, sc_y, sm_b, sm_w, sm_n,
        G: tl.constexpr, NBYTES: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, PER: tl.constexpr,
        UPGP: tl.constexpr, CB: tl.constexpr, STORE: tl.constexpr, CALIB: tl.constexpr, CODES: tl.constexpr,
        WORDS: tl.constexpr, EVEN: tl.constexpr, CROSS: tl.constexpr):
    """One program per (sequence, block of G tokens, CB channels): tile (unit, PER, channel), coalesced along
    the channels of each token; EVEN: the tile is whole (no masks). CROSS: token rows of int32 words along the
    channels (sc_w the stride of tokens, 32/BITS channels a word; CB a multiple of it, W of CB)."""
    pid = tl.program_id(0)
    cb = pid % NCB
    n = ((pid // NCB) % NB).to(tl.int64)
    b = (pid // NCB // NB).to(tl.int64)
    ui = tl.arange(0, UPGP)
    si = tl.arange(0, PER)
    j = ui[:, None, None] * PER + si[None, :, None]  # (UPGP, PER, 1): token in block
    ch = cb * CB + tl.arange(0, CB)  # (CB,)
    ptrs = x_ptr + b * sx_b + (n * G + j) * sx_t + ch[None, None, :] * sx_w  # (UPGP, PER, CB)
    if EVEN:
        xf = tl.load(ptrs).to(STORE).to(tl.float32)
        mn = tl.min(tl.min(xf, axis=1), axis=0)  # (CB,)
        mx = tl.max(tl.max(xf, axis=1), axis=0)
        chm = ch >= 0
    else:
        chm = ch < W
        valid = (j < G) & chm[None, None, :]  # (UPGP, PER, CB)
        xf = tl.load(ptrs, mask=valid, other=0.0).to(STORE).to(tl.float32)
        mn = tl.where(chm, tl.min(tl.min(tl.where(valid, xf, float("inf")), axis=1), axis=0), 0.0)
        mx = tl.where(chm, tl.max(tl.max(tl.where(valid, xf, float("-inf")), axis=1), axis=0), 0.0)
    s16, z16 = _scale_zero(mn, mx, c1, eta, LEVELS, CALIB)
    m_off = b * sm_b + ch * sm_w + n * sm_n  # (CB,)
    tl.store(scale_ptr + m_off, s16, mask=chm)
    tl.store(zero_ptr + m_off, z16, mask=chm)
    if CODES and CROSS:
        PW: tl.constexpr = 32 // BITS
        q = _codes(xf, s16.to(tl.float32)[None, None, :], z16.to(tl.float32)[None, None, :], LEVELS)
        q = tl.reshape(q, (UPGP * PER, CB // PW, PW))  # (token in block, word, code in word)
        word = tl.sum(q.to(tl.uint32) << (tl.arange(0, PW) * BITS).to(tl.uint32)[None, None, :], axis=2)
        tk = tl.arange(0, UPGP * PER)[:, None]
        wi = cb * (CB // PW) + tl.arange(0, CB // PW)[None, :]
        tl.store(codes_ptr + b * sc_b + (n * G + tk) * sc_w + wi, word.to(tl.int32, bitcast=True),
                 mask=(tk < G) & (wi * PW < W))
    elif CODES:
        q = _codes(xf, s16.to(tl.float32)[None, None, :], z16.to(tl.float32)[None, None, :], LEVELS)
        if not EVEN:
            q = tl.where(valid, q, 0)  # (UPGP, PER, CB)
        c_ch = codes_ptr + b * sc_b + ch[None, :] * sc_w + n * sc_n  # (1, CB)
        unit = ui[:, None]  # (UPGP, 1)
        _store_units(c_ch, sc_y, q, (si * BITS)[None, :, None].to(tl.uint32), unit, (unit * PER < G) & chm[None, :],
                     1, BITS, NBYTES, WORDS)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 1024))


def _calibration(eta: float) -> tuple[float, float]:
    return 1.0 - 2.0 * eta, float(eta)


def _check(t: torch.Tensor | None, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if t is not None and (tuple(t.shape) != shape or t.dtype != dtype):
        raise ValueError(f"{what}: expected {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")


def _check_outputs(codes: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, codes_shape: tuple,
                   meta_shape: tuple) -> None:
    """The buffers a launch writes: codes uint8 (or None), scale and zero fp16 of one shape and one layout."""
    _check(codes, codes_shape, torch.uint8, "codes")
    _check(scale, meta_shape, META_DTYPE, "scale")
    _check(zero, meta_shape, META_DTYPE, "zero")
    if scale.stride() != zero.stride():
        raise ValueError("scale and zero must have the same strides")


def _units(codes: torch.Tensor | None, bits: int, n: int, scale: torch.Tensor):
    """How codes are stored: (pointer tensor, its 4 strides, codes a unit, WORDS). Whole 32-bit words (32/bits
    codes) where bits divides 32 and rows of n codes are whole, 4-byte aligned words (the cache's buffers);
    else 8 codes a unit, `bits` bytes."""
    if codes is None:  # shared store: no codes; an unused pointer
        return scale, (0, 0, 0, 0), 8, False
    words = (32 % bits == 0 and n * bits % 32 == 0 and codes.stride(-1) == 1 and codes.storage_offset() % 4 == 0
             and codes.untyped_storage().data_ptr() % 4 == 0 and all(s % 4 == 0 for s in codes.stride()[:-1]))
    if words:
        w = codes.view(torch.int32)  # (..., nbytes/4)
        return w, w.stride(), 32 // bits, True
    return codes, codes.stride(), 8, False


def quantize_tokens(x: torch.Tensor, row: int, bits: int, group: int, eta: float, codes: torch.Tensor | None,
                    scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype | None = None,
                    first: int | None = None) -> None:
    """Per-token groups, in place: x (B, k, width) as rows of `row` values -> codes (B, k, rows, ceil(row*bits/8))
    uint8 (None for a shared store: no codes), scale and zero (B, k, rows, ceil(row/group)) fp16. x's values are
    taken in `dtype` (the store's element type; default x.dtype). Any strides; one launch. With `first` (cross
    packing, bits 2, 4 or 8), codes are int32 words (B, width, words) along tokens, x's tokens being tokens
    first .. first + k - 1 of them."""
    B, K, W = x.shape
    rows, ng, nbytes = W // row, -(-row // group), -(-row * bits // 8)
    if rows * row != W or not 1 <= bits <= 8:
        raise ValueError(f"width {W} is not a multiple of row {row}, or bits {bits} not in 1..8")
    cross = first is not None
    if cross:
        if bits not in (2, 4, 8):
            raise ValueError(f"cross packing takes 2, 4 or 8 bits, not {bits}")
        need = -(-(first + K) * bits // 32)
        if codes is not None and (codes.dtype != torch.int32 or tuple(codes.shape[:2]) != (B, W)
                                  or codes.shape[2] < need):
            raise ValueError(f"codes: expected int32 words ({B}, {W}, >= {need}), "
                             f"got {tuple(codes.shape)} {codes.dtype}")
        _check_outputs(None, scale, zero, (), (B, K, rows, ng))
    else:
        _check_outputs(codes, scale, zero, (B, K, rows, nbytes), (B, K, rows, ng))
    if B * K * rows == 0:
        return
    c1, e = _calibration(eta)
    if cross and codes is not None:
        cz, cs, per, words = codes, (codes.stride(0), codes.stride(1), 0, 0), 32 // bits, True
    else:
        cz, cs, per, words = _units(codes, bits, row, scale)
    aligned = group % per == 0
    ngp, upgp, nup = _p2(ng), _p2(-(-group // per)), _p2(-(-row // per))
    tile = ngp * upgp * per if aligned else ngp * nup * per
    _quantize_tokens_kernel[(B * K * rows,)](
        x, cz, scale, zero, c1, e, K, rows, *x.stride(), *cs, *scale.stride(),
        ROW=row, G=group, NG=ng, NBYTES=nbytes, BITS=bits, LEVELS=2**bits - 1, PER=per, NGP=ngp, UPGP=upgp,
        NUP=nup, STORE=_TL[dtype or x.dtype], CALIB=eta != 0, CODES=codes is not None, WORDS=words,
        ALIGNED=aligned, CROSS=cross, first=first or 0, num_warps=_warps(tile), enable_fp_fusion=False)


def quantize_channels(x: torch.Tensor, bits: int, group: int, eta: float, codes: torch.Tensor | None,
                      scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype | None = None,
                      cross: bool = False) -> None:
    """Per-channel blocks, in place: x (B, k, width), k a multiple of `group` -> codes (B, width, k/group,
    ceil(group*bits/8)) uint8 packed along tokens (None for a shared store), scale and zero (B, width, k/group)
    fp16. x's values are taken in `dtype` (default x.dtype). Any strides; one launch. cross: codes are token rows
    (B, k, width*bits/8) packed along channels (bits 2, 4 or 8; width*bits a multiple of 32)."""
    B, K, W = x.shape
    nb, nbytes = K // group, -(-group * bits // 8)
    if nb * group != K or not 1 <= bits <= 8:
        raise ValueError(f"{K} tokens are not whole blocks of {group}, or bits {bits} not in 1..8")
    if cross and (bits not in (2, 4, 8) or W * bits % 32):
        raise ValueError(f"cross packing takes 2, 4 or 8 bits and rows of whole words, not {bits} bits x {W}")
    _check_outputs(codes, scale, zero, (B, K, W * bits // 8) if cross else (B, W, nb, nbytes), (B, W, nb))
    if B * nb * W == 0:
        return
    c1, e = _calibration(eta)
    if cross and codes is not None:
        w = codes.view(torch.int32)
        cz, cs, per, words = w, (w.stride(0), w.stride(1), 0, 0), 32 // bits, True
    else:
        cz, cs, per, words = _units(codes, bits, group, scale)
    upgp = _p2(-(-group // per))
    # small programs (each thread's serial work sets the time): ~1024 values, 2048 where that still leaves
    # plenty of programs; 2 warps only when there are few (H200, G 128: 3.5 / 5.4 / 10.2 us at batch 1 / 8 / 32)
    cb = max(1, 1024 // (upgp * per))
    if B * nb * -(-W // (2 * cb)) >= 1024:
        cb *= 2
    cb = min(cb, _p2(W))
    if cross:  # whole words of channels, and W whole programs of them
        cb = max(cb, 32 // bits)
        while W % cb:
            cb //= 2
    ncb = -(-W // cb)
    warps = 2 if B * nb * ncb < 264 else 1
    _quantize_channels_kernel[(B * nb * ncb,)](
        x, cz, scale, zero, c1, e, nb, W, ncb, *x.stride(), *cs, *scale.stride(),
        G=group, NBYTES=nbytes, BITS=bits, LEVELS=2**bits - 1, PER=per, UPGP=upgp, CB=cb,
        STORE=_TL[dtype or x.dtype], CALIB=eta != 0, CODES=codes is not None, WORDS=words,
        EVEN=upgp * per == group and W % cb == 0, CROSS=cross, num_warps=warps, enable_fp_fusion=False)

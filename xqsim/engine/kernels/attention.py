"""Split-KV decode attention (flash decoding) over a cache as it is stored: fp16/bf16 K and V, or KIVI's bit-packed
codes (keys per channel in blocks of G tokens, values per token) with their fp16 scale and zero and the fp16
residual window, dequantized in registers. The tiles that reach into the fp16 windows are a split of their own.

One program per (sequence, KV head, context split) holds all g query heads of its KV head (GQA), walks its tokens in
tiles of BLOCK_N with an online softmax and writes its partial output, max and sum; a second kernel merges the
splits. The context is split so that the grid's last wave of programs is nearly full (n_splits), batch 1 included.

Fast tiles read cross-packed codes (xqsim.engine.cache: 2, 4 or 8 bits; keys packed along channels, values along
tokens), whole tiles of key codes inside one key block with one value group per head row (KIVI's and Yang et al.'s
defaults); a fast tile's values may reach into the fp16 window (KIVI's values slide out of it token by token while
keys leave it a block at a time). A tile never dequantizes a value: the key scale and zero fold into the query,
q.(s*c + z) = (q*s).c + q.z, the value scale and zero into the probabilities, P.(s*c + z) = (P*s).c + P.z. Codes
become fp16 two at a time (two codes OR-ed into the mantissas of a pair of 1024.0, one paired subtraction of 1024),
and in the order of the tensor cores' register fragments: both products take the unpacked codes as their register
operand (scores^T = K.(q*s)^T with the tile's tokens as rows, out^T = V^T.(P*s)^T with the head's channels as rows),
so no code goes through shared memory. _cross_unpack's column order is what makes that so: each 32-bit word's codes
land in the registers of the thread that loaded it. Other tiles (the residual window, 3-bit codes, other groups, the
reference packing) dequantize in fp32, code by code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...schemes.layout import CacheTensor
from . import interpreted

LOG2E = 1.4426950408889634



@dataclass(frozen=True)
class Source:
    """One cached tensor of one layer as the kernel reads it: tokens [0, tq) as codes, [tq, T) in `fp`."""

    fp: torch.Tensor | None  # (B, T - tq, width) fp16/bf16, the residual window or the whole unquantized tensor
    width: int  # values per token (Hkv * hd)
    tq: int  # tokens held as codes
    bits: int  # 16: unquantized
    group: int
    # reference packing: channel (B, width, nb, ceil(G*b/8)), token (B, tq, rows, ceil(row*b/8)) uint8;
    # cross packing: channel (B, tq, width*b/32), token (B, width, words) int32 words
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # channel: (B, width, nb); token: (B, tq, rows, ngroups)
    zero: torch.Tensor | None = None
    cross: bool = False

    @property
    def tokens(self) -> int:
        """Tokens held: the codes' and the fp16 tail's."""
        return self.tq + (self.fp.shape[1] if self.fp is not None else 0)

    @staticmethod
    def of(store) -> Source:
        """The Source of an engine Store (xqsim.engine.cache.Store)."""
        t: CacheTensor = store.t
        if not t.quantized or store.n_quantized == 0:
            return Source(store.fp, t.width, 0, 16, store.G)
        codes = store.code_words if store.cross else store.codes
        return Source(store.fp, t.width, store.n_quantized, t.bits, store.G, codes, store.scale, store.zero,
                      store.cross)


def _empty_like_fp(B: int, width: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(B, 1, width, dtype=like.dtype, device=like.device)


def n_splits(batch_heads: int, T: int, block_n: int, slots: int) -> int:
    """Context splits: the count (at most one tile each, at most two waves) whose grid fills the `slots` programs
    the GPU runs at once best in its last wave (a grid of 1.3 waves leaves most SMs idle for its last third); of
    equally good counts (within 2%), the fewest."""
    most = max(1, min(triton.cdiv(T, block_n), triton.cdiv(2 * slots, batch_heads)))
    best, best_eff = 1, 0.0
    for s in range(1, most + 1):
        n = batch_heads * s
        eff = n / (triton.cdiv(n, slots) * slots)
        if eff > best_eff + 0.02:
            best, best_eff = s, eff
    return best


def split_plan(batch_heads: int, main: int, T: int, block_n: int, slots: int) -> tuple[int, int, int]:
    """(split_len, n_main, splits): [0, main) in n_main even splits of whole tiles (n_splits), and [main, T), where
    it is not empty, a split of its own (the tiles a launch of their own reads: fp16 windows, a partial tile)."""
    n = n_splits(batch_heads, main, block_n, slots) if main else 0
    split_len = triton.cdiv(triton.cdiv(main, n), block_n) * block_n if main else block_n
    n_main = triton.cdiv(main, split_len)
    return split_len, n_main, n_main + (main < T)


def fast_tiles(k: Source, v: Source, hd: int, block_n: int) -> bool:
    """Whether tiles of block_n tokens take the fast path: cross-packed codes of both K and V, tiles inside one key
    block, one value group per head row (value rows of one head), and at least 4 words a row of either unpacked
    tile (hd * bits and block_n * bits >= 128: _cross_unpack's order)."""
    if k.bits >= 16 or v.bits >= 16 or not (k.cross and v.cross):
        return False
    words = min(hd, block_n) * min(k.bits, v.bits) // 32 >= 4
    return words and k.group % block_n == 0 and tuple(v.scale.shape[2:]) == (v.width // hd, 1)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention(q: torch.Tensor, k: Source, v: Source, *, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int | None = None, per_sm: int | None = None, fast: bool = True,
                     conv: int | None = None, tail_n: int = 16, mixed: bool = True) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V for one decode token: q (B, H, hd) -> (B, H, hd) in q's dtype.

    k and v are the layer's K and V Sources (KIVI layout: K per channel, V per token in rows of one head);
    T = k.tq + k.fp tokens. conv picks how fast tiles turn codes into fp16: 3 (the default on a GPU) two codes
    per instruction in inline PTX, 0 (the default under Triton's interpreter, which runs no PTX) shift, mask and
    convert one by one. fast=False sends every tile through the general (dequantizing) path, which
    walks tiles of tail_n tokens (it gathers codes byte by byte: smaller tiles keep its registers in bounds).
    Fast tiles need cross-packed Sources (Source.cross); others take the general path. mixed=False leaves the
    tiles whose values reach into the fp16 window to the general path too.
    """
    B, H, hd = q.shape
    q = q.contiguous()
    if conv is None:
        conv = 0 if interpreted() else 3
    # defaults measured on the H200 (benchmarks/kernel_roofline.py --tune): 3 stages and 3 programs an SM for bf16
    # tiles, 2 programs where codes are unpacked in registers, with 3 stages for 2-bit codes and 2 for wider ones
    # (whose third stage spills); 64-token bf16 tiles where the sequences' KV heads alone fill less than half the
    # GPU (batch 1: more, shorter splits); 128-token code tiles at every batch
    quantized = k.bits < 16 or v.bits < 16
    if num_stages is None:
        num_stages = 3 if max(k.bits, v.bits) <= 2 or not quantized else 2
    if per_sm is None:
        per_sm = 2 if quantized else 3
    Hkv = k.width // hd
    if block_n is None:
        block_n = 128 if quantized or q.shape[0] * Hkv >= per_sm * _sm_count(q.device) // 2 else 64
    fp_k = k.fp if k.fp is not None else _empty_like_fp(B, k.width, q)
    fp_v = v.fp if v.fp is not None else _empty_like_fp(B, v.width, q)
    g = H // Hkv
    T = k.tokens
    assert T == v.tokens, "K and V hold different token counts"
    block_g = max(16, triton.next_power_of_2(g))
    fast = fast and fast_tiles(k, v, hd, block_n)
    fast_end = (k.tq // block_n) * block_n if fast else 0  # value tiles may reach into the fp16 window
    if fast and not mixed:
        fast_end = min(fast_end, (v.tq // block_n) * block_n)
    # fast kernels split [0, main) into even splits of whole tiles of codes; the rest (tiles reaching into the
    # values' fp16 window, then the keys' window) is a split of its own, so no split carries both
    main = min(fast_end, (v.tq // block_n) * block_n) if fast else T
    split_len, n_main, splits = split_plan(B * Hkv, main, T, block_n, per_sm * _sm_count(q.device))
    o_part = torch.empty(B * Hkv, splits, g, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * Hkv, splits, g, 2, dtype=torch.float32, device=q.device)
    dummy8 = torch.empty(1, dtype=torch.uint8, device=q.device)  # never read: no kernel to fill it
    dummy16 = torch.empty(1, dtype=torch.float16, device=q.device)

    def meta(s: Source):
        """(bytes, words, scale, zero, code strides (3), scale strides (3)); cross codes are strided as words."""
        if s.bits >= 16:
            return dummy8, dummy8, dummy16, dummy16, (0, 0, 0), (0, 0, 0)
        c8 = s.codes.view(torch.uint8) if s.cross else s.codes
        c32 = s.codes if s.cross else dummy8
        cs = tuple(s.codes.stride()[:2]) + (0,) if s.cross else tuple(s.codes.stride()[:3])
        return c8, c32, s.scale, s.zero, cs, tuple(s.scale.stride()[:3])

    kc8, kc32, ks, kz, kcs, kss = meta(k)
    vc8, vc32, vs, vz, vcs, vss = meta(v)
    sm_scale = LOG2E / hd**0.5
    args = (q, o_part, ml, kc8, kc32, ks, kz, fp_k, vc8, vc32, vs, vz, fp_v,
            T, k.tq, v.tq, fast_end, main, split_len, splits, sm_scale,
            q.stride(0), q.stride(1),
            *kcs, *kss, fp_k.stride(0), fp_k.stride(1),
            vcs[0], vcs[1], vcs[2], vss[0], vss[1], vss[2], fp_v.stride(0), fp_v.stride(1))
    consts = dict(HKV=Hkv, G=g, BLOCK_G=block_g, HD=hd, BLOCK_N=block_n, KB=k.bits, VB=v.bits, GK=k.group,
                  GV=v.group, KX=k.cross, VX=v.cross, CONV=conv, TAIL_N=min(block_n, tail_n) if quantized else block_n,
                  num_warps=num_warps, num_stages=num_stages)
    # the fast splits and the split past `main` are two launches of two compilations: the tiles that reach into the
    # fp16 window take registers that would make the fast loop spill (H200: 16% slower at batch 32, 128k)
    if n_main:  # main == T unless fast
        _split_kernel[(B * Hkv, n_main)](*args, 0, FAST=fast, MIXED=False, **consts)
    if n_main < splits:
        _split_kernel[(B * Hkv, 1)](*args, n_main, FAST=fast, MIXED=mixed, **consts)
    out = torch.empty(B, H, hd, dtype=q.dtype, device=q.device)
    _merge_kernel[(B * H,)](o_part, ml, out, splits, out.stride(0), out.stride(1), hd,
                            HKV=Hkv, G=g, HD=hd, num_warps=4)
    return out


# ----------------------------------------------------------------------------- device code


def _pair_asm(bits: int, j: int) -> str:
    """PTX: codes j and j + 16/bits of a word into one fp16x2 register: a shift, one LOP3 that masks the two codes
    into the mantissas of (1024, 1024) and ORs in its exponent, one HSUB2 of (1024, 1024)."""
    mask = {2: "0x00030003", 4: "0x000F000F", 8: "0x00FF00FF"}[bits]
    shift = f"shr.u32 t, $1, {bits * j}; " if j else "mov.b32 t, $1; "
    return ("{ .reg .b32 t, k; mov.b32 k, 0x64006400; " + shift
            + f"lop3.b32 $0, t, {mask}, 0x64006400, 0xea; sub.f16x2 $0, $0, k; }}")


for _b in (2, 4, 8):
    for _j in range(16 // _b):
        globals()[f"_ASM_{_b}_{_j}"] = tl.constexpr(_pair_asm(_b, _j))


@triton.jit
def _pair(w, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _code(w, BITS: tl.constexpr, j: tl.constexpr):
    """Code j of each int32 word (plain Triton: shift and mask; Triton's interpreter runs it)."""
    return (w >> (BITS * j)) & ((1 << BITS) - 1)


@triton.jit
def _tree(x0, x1, x2, x3, x4, x5, x6, x7):
    """Eight (R, NW) tensors -> (R, NW, 2, 2, 2) with x_m at m: each join adds a minor axis held in registers."""
    return tl.join(tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5), tl.join(x3, x7)))


@triton.jit
def _cross_unpack(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words (R, NW) of codes packed along a row -> fp16 codes (R, NW * 32/BITS); column j holds code
    _cross_pos(j) of the row. One fp16x2 register holds codes m and m + PER/2 of a word (PER = 32/BITS codes a
    word); the columns are ordered [word // 4, m, word bit 1, word bit 0, half], so that, taken as the register
    operand of a tensor-core product (the row a row of A, the column its k), each thread's fragment is made of
    the words it loaded itself: the two low bits of the word index are the lanes of a fragment's quad, the rest
    registers. Triton then loads the words straight into that layout. ASM: the two-codes-per-instruction
    conversion in PTX; else plain Triton (the interpreter's path), in the same order."""
    R: tl.constexpr = w.shape[0]
    NW: tl.constexpr = w.shape[1]
    PER: tl.constexpr = 32 // BITS
    if BITS == 8:
        if ASM:
            p = tl.join(_pair(w, _ASM_8_0), _pair(w, _ASM_8_1))  # noqa: F821
        else:
            p = tl.join(_code(w, 8, 0) | (_code(w, 8, 2) << 16), _code(w, 8, 1) | (_code(w, 8, 3) << 16))
    elif BITS == 4:
        if ASM:
            p = tl.join(tl.join(_pair(w, _ASM_4_0), _pair(w, _ASM_4_2)),  # noqa: F821
                        tl.join(_pair(w, _ASM_4_1), _pair(w, _ASM_4_3)))  # noqa: F821
        else:
            p = tl.join(tl.join(_code(w, 4, 0) | (_code(w, 4, 4) << 16), _code(w, 4, 2) | (_code(w, 4, 6) << 16)),
                        tl.join(_code(w, 4, 1) | (_code(w, 4, 5) << 16), _code(w, 4, 3) | (_code(w, 4, 7) << 16)))
    else:
        if ASM:
            p = _tree(_pair(w, _ASM_2_0), _pair(w, _ASM_2_1), _pair(w, _ASM_2_2), _pair(w, _ASM_2_3),  # noqa: F821
                      _pair(w, _ASM_2_4), _pair(w, _ASM_2_5), _pair(w, _ASM_2_6), _pair(w, _ASM_2_7))  # noqa: F821
        else:
            p = _tree(_code(w, 2, 0) | (_code(w, 2, 8) << 16), _code(w, 2, 1) | (_code(w, 2, 9) << 16),
                      _code(w, 2, 2) | (_code(w, 2, 10) << 16), _code(w, 2, 3) | (_code(w, 2, 11) << 16),
                      _code(w, 2, 4) | (_code(w, 2, 12) << 16), _code(w, 2, 5) | (_code(w, 2, 13) << 16),
                      _code(w, 2, 6) | (_code(w, 2, 14) << 16), _code(w, 2, 7) | (_code(w, 2, 15) << 16))
    if ASM:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    else:
        lo, hi = (p & 0xFFFF).to(tl.float16), (p >> 16).to(tl.float16)
    u = tl.reshape(tl.join(lo, hi), (R, NW // 4, 2, 2, PER // 2, 2))  # [row, word // 4, word bit 1, bit 0, m, half]
    return tl.reshape(tl.permute(u, (0, 1, 4, 2, 3, 5)), (R, NW * PER))


@triton.jit
def _cross_pos(j, BITS: tl.constexpr):
    """Which code of its row column j of _cross_unpack holds (a channel of a key row, a token of a value row)."""
    PER: tl.constexpr = 32 // BITS
    NP: tl.constexpr = PER // 2
    word = (j // (8 * NP)) * 4 + ((j >> 2) & 1) * 2 + ((j >> 1) & 1)
    return PER * word + (j // 8) % NP + NP * (j & 1)


@triton.jit
def _split_range(pid_s, split_len, main, T):
    """Tokens [start, end) of split pid_s: the splits of split_len tokens cover [0, main), the one after them
    [main, T) (the tiles that reach into fp16 windows, a launch of their own)."""
    start = pid_s * split_len
    end = tl.minimum(start + split_len, main)
    if start >= main:
        start = main
        end = T
    return start, end


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One tile of scores s (rows, n), log2 domain, into the running max m_i and sum l_i: (p, alpha, m, l), with
    p = 2^(s - m) and alpha the factor that rescales what was accumulated before."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _code_at(ptr, row_off, i, BITS: tl.constexpr, mask):
    """Code i of the bit-packed rows at ptr + row_off (any width: a code may straddle two bytes)."""
    bit = i * BITS
    byte = bit >> 3
    sh = bit & 7
    lo = tl.load(ptr + row_off + byte, mask=mask, other=0).to(tl.int32)
    if (8 % BITS) != 0:
        hi = tl.load(ptr + row_off + byte + 1, mask=mask & (sh + BITS > 8), other=0).to(tl.int32)
        lo = lo | (hi << 8)
    return (lo >> sh) & ((1 << BITS) - 1)


@triton.jit
def _p_scale(VB: tl.constexpr):
    """The factor fast tiles scale P*s by before rounding it to fp16: 2^(6 + VB). A value scale s is the range of a
    token's row over 2^VB - 1, so P*s*2^(6 + VB) stays below fp16's largest (65504) for rows of a range up to 1023,
    and above its smallest normal (6.1e-5) down to p*range = 1e-6 (a uniform 1M-token softmax over unit ranges)."""
    return (1 << (6 + VB)) * 1.0


@triton.jit
def _tile_meta(t0, b, h, ck, tk, Ks, Kz, Vs, Vz, sks_b, sks_c, sks_n, svs_b, svs_t, svs_r, ok, v_ok,
               HD: tl.constexpr, GK: tl.constexpr):
    """The fast tile at t0's key scale and zero (HD,) and value scale and zero (BLOCK_N,), as stored (fp16); the
    keys' read if ok, the values' if ok and v_ok. The loop over whole tiles loads the next tile's while it computes
    this one's: Triton's pipeliner leaves loads this small alone, and loaded where they are used they cost a round
    trip to memory a tile (H200, KIVI-2 at batch 32, context 32k: 983 us a layer, 724 us with them loaded ahead)."""
    kp = b * sks_b + (h * HD + ck) * sks_c + (t0 // GK) * sks_n
    vp = b * svs_b + (t0 + tk) * svs_t + h * svs_r
    return (tl.load(Ks + kp, mask=ok, other=0.0), tl.load(Kz + kp, mask=ok, other=0.0),
            tl.load(Vs + vp, mask=ok & v_ok, other=0.0), tl.load(Vz + vp, mask=ok & v_ok, other=0.0))


@triton.jit
def _fast_tile(t0, b, h, qt, tk, chan, wk, wv, m_i, l_n, z_n, acc_t, ks, kz, vs, vz,
               Kc32, Vs, Vz, Vc32, Vf, TQV, skc_b, skc_c, svs_b, svs_t, svs_r, svc_b, svc_t, svf_b, svf_t,
               HD: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
               CONV: tl.constexpr, MIXED: tl.constexpr):
    """One fast tile of tokens [t0, t0 + BLOCK_N) into the running state (max, deferred sums, out^T), with its
    scales and zeros (_tile_meta). MIXED: the values' fp16 window starts inside the tile (its tokens read from Vf
    with scale 1 and zero 0; the tile reads its own value scales and zeros)."""
    # K: the block's per-channel scale and zero fold into the query
    ks = ks.to(tl.float32)  # (HD,)
    kz = kz.to(tl.float32)
    qs = (qt * ks[:, None]).to(tl.float16)
    qz = tl.sum(qt * kz[:, None], axis=0)  # (BLOCK_G,)
    kw = tl.load(Kc32 + b * skc_b + (t0 + tk)[:, None] * skc_c + h * (HD * KB // 32) + wk[None, :])
    s_t = tl.dot(_cross_unpack(kw, KB, CONV == 3), qs) + qz[None, :]  # (BLOCK_N, BLOCK_G)
    m_new = tl.maximum(m_i, tl.max(s_t, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s_t - m_new[None, :])
    # V: the per-token scale and zero fold into the probabilities
    vp = Vc32 + b * svc_b + chan[:, None] * svc_t + t0 * VB // 32 + wv[None, :]  # (HD, words)
    if MIXED:
        sz = b * svs_b + (t0 + tk) * svs_t + h * svs_r  # (BLOCK_N,)
        coded = t0 + tk < TQV
        vs = tl.load(Vs + sz, mask=coded, other=1.0).to(tl.float32)
        vz = tl.load(Vz + sz, mask=coded, other=0.0).to(tl.float32)
        vw = tl.load(vp, mask=(t0 * VB // 32 + wv < tl.cdiv(TQV * VB, 32))[None, :], other=0)
        vf = tl.load(Vf + b * svf_b + (t0 + tk - TQV)[None, :] * svf_t + chan[:, None], mask=(~coded)[None, :],
                     other=0.0)  # (HD, BLOCK_N)
        vc = tl.where(coded[None, :], _cross_unpack(vw, VB, CONV == 3), vf.to(tl.float16))
    else:
        vs = vs.to(tl.float32)  # (BLOCK_N,)
        vz = vz.to(tl.float32)
        vc = _cross_unpack(tl.load(vp), VB, CONV == 3)
    # P*s is taken in fp16 scaled by 2^(6 + VB) (_p_scale): unscaled, a long context's small probabilities times
    # small value scales fall below fp16's normal range (H200, 8 bits, 128k tokens: 1e-2 relative error at 2^8)
    ps = (p * (vs * _p_scale(VB))[:, None]).to(tl.float16)
    l_n = l_n * alpha[None, :] + p
    z_n = z_n * alpha[None, :] + p * vz[:, None]
    zero = tl.zeros_like(ps)
    ps4 = tl.reshape(tl.join(tl.join(ps, zero), tl.join(zero, zero)), (BLOCK_N, 4 * ps.shape[1]))
    a4 = tl.reshape(tl.join(tl.join(alpha, alpha), tl.join(alpha, alpha)), (4 * ps.shape[1],))
    return m_new, l_n, z_n, acc_t * a4[None, :] + tl.dot(vc, ps4)


@triton.jit
def _split_kernel(Q, O_part, ML, Kc8, Kc32, Ks, Kz, Kf, Vc8, Vc32, Vs, Vz, Vf,
                  T, TQK, TQV, fast_end, main, split_len, n_splits, sm_scale,
                  sq_b, sq_h,
                  skc_b, skc_c, skc_n, sks_b, sks_c, sks_n, skf_b, skf_t,
                  svc_b, svc_t, svc_r, svs_b, svs_t, svs_r, svf_b, svf_t, split0,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                  BLOCK_N: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
                  FAST: tl.constexpr, MIXED: tl.constexpr, KX: tl.constexpr, VX: tl.constexpr, CONV: tl.constexpr,
                  TAIL_N: tl.constexpr):
    """Code strides: reference packing (bytes) K (b, channel, block), V (b, token, row); cross packing (KX, VX:
    int32 words) K (b, token, -), V (b, channel, -)."""
    pid_bh = tl.program_id(0)  # b * HKV + h: the KV heads of one sequence run side by side
    pid_s = tl.program_id(1) + split0  # this launch's first split
    b = (pid_bh // HKV).to(tl.int64)  # batch offsets pass 2^31 elements (batch 32 x 128k tokens x 1024 channels)
    h = pid_bh % HKV
    rows = tl.arange(0, BLOCK_G)  # query heads h*G + r of this KV head, padded to BLOCK_G rows
    cols = tl.arange(0, HD)
    row_ok = rows < G
    chan = h * HD + cols  # this head's channels in the (B, T, HKV*HD) layout

    start, end = _split_range(pid_s, split_len, main, T)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HD], tl.float32)

    if FAST:
        # products transposed (tokens, then channels, as the rows of the register operand): scores^T (BLOCK_N,
        # BLOCK_G) and out^T (HD, 4 * BLOCK_G). The second product's N is padded to 64 columns, head r in
        # column 4r: Triton 3.6 reads out of bounds of shared memory on an H200 (compute-sanitizer) when a
        # kernel's second product takes a 16-column operand from shared memory, and gets wrong sums at 32.
        ck = _cross_pos(cols, KB)  # the key tile's column order: channel of column j
        qt = tl.load(Q + b * sq_b + (h * G + rows)[None, :] * sq_h + ck[:, None], mask=row_ok[None, :], other=0.0)
        qt = qt.to(tl.float32) * sm_scale  # (HD, BLOCK_G): q^T in the key tile's column order, log2 domain
        jt = tl.arange(0, BLOCK_N)
        tk = _cross_pos(jt, VB)  # token (in the tile) of key row j and value column j alike
        wk = tl.arange(0, HD * KB // 32)
        wv = tl.arange(0, BLOCK_N * VB // 32)
        acc_t = tl.zeros([HD, 4 * BLOCK_G], tl.float32)
        l_n = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)  # sums of p and of p * value zero, reduced after the loop
        z_n = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
        fast_stop = end
        if fast_stop > fast_end:
            fast_stop = fast_end
        whole = fast_stop  # tiles of value codes only run in the first loop, the (at most two) others after it
        if whole > TQV // BLOCK_N * BLOCK_N:
            whole = TQV // BLOCK_N * BLOCK_N
        if whole < start:
            whole = start
        if MIXED:  # the launch past `main`: the (at most two) tiles whose values reach into the fp16 window
            for t0 in range(whole, fast_stop, BLOCK_N):
                mk_s, mk_z, mv_s, mv_z = _tile_meta(t0, b, h, ck, tk, Ks, Kz, Vs, Vz, sks_b, sks_c, sks_n,
                                                    svs_b, svs_t, svs_r, True, False, HD, GK)  # values: the tile's
                m_i, l_n, z_n, acc_t = _fast_tile(t0, b, h, qt, tk, chan, wk, wv, m_i, l_n, z_n, acc_t,
                                                  mk_s, mk_z, mv_s, mv_z, Kc32, Vs, Vz, Vc32, Vf, TQV, skc_b, skc_c,
                                                  svs_b, svs_t, svs_r, svc_b, svc_t, svf_b, svf_t,
                                                  HD, BLOCK_N, KB, VB, CONV, True)
        else:  # whole tiles of value codes, each tile's scales and zeros loaded while the one before computes
            mk_s, mk_z, mv_s, mv_z = _tile_meta(start, b, h, ck, tk, Ks, Kz, Vs, Vz, sks_b, sks_c, sks_n,
                                                svs_b, svs_t, svs_r, start < whole, True, HD, GK)
            for t0 in range(start, whole, BLOCK_N):
                nk_s, nk_z, nv_s, nv_z = _tile_meta(t0 + BLOCK_N, b, h, ck, tk, Ks, Kz, Vs, Vz, sks_b, sks_c,
                                                    sks_n, svs_b, svs_t, svs_r, t0 + BLOCK_N < whole, True, HD, GK)
                m_i, l_n, z_n, acc_t = _fast_tile(t0, b, h, qt, tk, chan, wk, wv, m_i, l_n, z_n, acc_t,
                                                  mk_s, mk_z, mv_s, mv_z, Kc32, Vs, Vz, Vc32, Vf, TQV, skc_b, skc_c,
                                                  svs_b, svs_t, svs_r, svc_b, svc_t, svf_b, svf_t,
                                                  HD, BLOCK_N, KB, VB, CONV, False)
                mk_s, mk_z, mv_s, mv_z = nk_s, nk_z, nv_s, nv_z
        # an empty loop leaves m -inf and zeros: the state every split starts from
        acc_t = acc_t * (1.0 / _p_scale(VB))
        acc = tl.trans(tl.sum(tl.reshape(acc_t, (HD, BLOCK_G, 4)), axis=2) + tl.sum(z_n, axis=0)[None, :])
        l_i = tl.sum(l_n, axis=0)
        if start < fast_stop:
            start = fast_stop

    q = tl.load(Q + b * sq_b + (h * G + rows)[:, None] * sq_h + cols[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * sm_scale  # (BLOCK_G, HD), log2 domain
    dt = Kf.dtype.element_ty  # dot operand type of the general path (the cache's fp dtype)
    for t0 in range(start, end, TAIL_N):
        tok = t0 + tl.arange(0, TAIL_N)
        ok = tok < end
        # K^T tile (HD, TAIL_N): codes where tok < TQK, the fp16 part after
        kt = tl.load(Kf + b * skf_b + (tok - TQK)[None, :] * skf_t + chan[:, None],
                     mask=(ok & (tok >= TQK))[None, :], other=0.0).to(tl.float32)
        if KB < 16:
            if t0 < TQK:  # tiles past the key codes gather none
                inq = (ok & (tok < TQK))[None, :]
                blk = tok // GK
                if KX:  # token rows along channels (word strides, read as bytes)
                    c = _code_at(Kc8, b * skc_b * 4 + tok[None, :] * (skc_c * 4), chan[:, None], KB, inq)
                else:
                    c = _code_at(Kc8, b * skc_b + chan[:, None] * skc_c + blk[None, :] * skc_n,
                                 (tok % GK)[None, :], KB, inq)
                sz = b * sks_b + chan[:, None] * sks_c + blk[None, :] * sks_n
                ks = tl.load(Ks + sz, mask=inq, other=0.0)
                kz = tl.load(Kz + sz, mask=inq, other=0.0)
                kt = tl.where(inq, c.to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32), kt)
        s = tl.dot(q.to(dt), kt.to(dt))  # (BLOCK_G, TAIL_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        vt = tl.load(Vf + b * svf_b + (tok - TQV)[:, None] * svf_t + chan[None, :],
                     mask=(ok & (tok >= TQV))[:, None], other=0.0).to(tl.float32)  # (TAIL_N, HD)
        if VB < 16:
            if t0 < TQV:
                inq = (ok & (tok < TQV))[:, None]
                grp = cols // GV
                if VX:  # channel rows along tokens (word strides, read as bytes)
                    c = _code_at(Vc8, b * svc_b * 4 + chan[None, :] * (svc_t * 4), tok[:, None], VB, inq)
                else:
                    c = _code_at(Vc8, b * svc_b + tok[:, None] * svc_t + h * svc_r, cols[None, :], VB, inq)
                sz = b * svs_b + tok[:, None] * svs_t + h * svs_r + grp[None, :]
                vs = tl.load(Vs + sz, mask=inq, other=0.0)
                vz = tl.load(Vz + sz, mask=inq, other=0.0)
                vt = tl.where(inq, c.to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32), vt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), vt.to(dt))

    out = (pid_bh * n_splits + pid_s).to(tl.int64)
    tl.store(O_part + (out * G + rows)[:, None] * HD + cols[None, :], acc, mask=row_ok[:, None])
    tl.store(ML + (out * G + rows) * 2, m_i, mask=row_ok)
    tl.store(ML + (out * G + rows) * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(O_part, ML, Out, n_splits, so_b, so_h, width, HKV: tl.constexpr, G: tl.constexpr,
                  HD: tl.constexpr):
    """Out[b, head, :width] from the splits' partial outputs (rows of HD >= width values), maxima and sums."""
    pid = tl.program_id(0)  # b * H + head
    H: tl.constexpr = HKV * G
    b = (pid // H).to(tl.int64)
    hq = pid % H
    bh = b * HKV + hq // G
    r = hq % G
    cols = tl.arange(0, HD)
    m = tl.full([1], float("-inf"), tl.float32)
    l_acc = tl.zeros([1], tl.float32)
    acc = tl.zeros([HD], tl.float32)
    for s in range(0, n_splits):
        i = ((bh * n_splits + s) * G + r).to(tl.int64)
        m_s = tl.load(ML + i * 2 + tl.arange(0, 1))
        l_s = tl.load(ML + i * 2 + 1 + tl.arange(0, 1))
        o_s = tl.load(O_part + i * HD + cols)
        m_new = tl.maximum(m, m_s)
        a = tl.exp2(m - m_new)
        w = tl.exp2(m_s - m_new)
        l_acc = l_acc * a + l_s * w
        acc = acc * a + o_s * w
        m = m_new
    tl.store(Out + b * so_b + hq * so_h + cols, (acc / l_acc).to(Out.dtype.element_ty), mask=cols < width)

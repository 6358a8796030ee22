"""Split-KV decode attention (flash decoding) over a cache as it is stored: fp16/bf16 K and V, or KIVI's
bit-packed codes (keys per channel in blocks of G tokens, values per token) with their fp16 scale and zero and
the fp16 residual window, dequantized in registers.

One program per (sequence, KV head, context split) holds all g query heads of its KV head (GQA) as the rows of
its tiles, walks its tokens in tiles of BLOCK_N with an online softmax and writes its partial output, max and
sum; a second kernel merges the splits. The context is split so that the grid's last wave of programs is nearly
full (n_splits), batch 1 included.

Where the layout allows it (codes of 2, 4 or 8 bits packed in whole 32-bit words, a tile inside one key block,
one value group per head row: KIVI's and Yang et al.'s defaults), a tile never dequantizes a value: the key
scale and zero fold into the query, q.(s*c + z) = (q*s).c + q.z, the value scale and zero into the
probabilities, P.(s*c + z) = (P*s).c + P.z, and codes become fp16 two at a time without a conversion
instruction (two codes OR-ed into the mantissas of a pair of 1024.0, then one paired subtraction of 1024); both
products run on the tensor cores. Other tiles (the residual window, 3-bit codes, other groups) dequantize in fp32.
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
    codes: torch.Tensor | None = None  # channel: (B, width, nb, ceil(G*b/8)); token: (B, tq, rows, ceil(row*b/8))
    scale: torch.Tensor | None = None  # channel: (B, width, nb); token: (B, tq, rows, ngroups)
    zero: torch.Tensor | None = None

    @staticmethod
    def of(store) -> Source:
        """The Source of an engine Store (xqsim.engine.cache.Store)."""
        t: CacheTensor = store.t
        if not t.quantized or store.n_quantized == 0:
            return Source(store.fp, t.width, 0, 16, store.G)
        return Source(store.fp, t.width, store.n_quantized, t.bits, store.G, store.codes, store.scale, store.zero)

    @property
    def packed_words(self) -> bool:
        """Codes of 2, 4 or 8 bits whose rows are whole 32-bit words (read as int32, unpacked by shifts)."""
        return self.bits in (2, 4, 8) and self.codes is not None and self.codes.shape[-1] % 4 == 0


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


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention(q: torch.Tensor, k: Source, v: Source, *, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int | None = None, per_sm: int | None = None, fast: bool = True,
                     conv: int | None = None, tail_n: int = 16) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V for one decode token: q (B, H, hd) -> (B, H, hd) in q's dtype.

    k and v are the layer's K and V Sources (KIVI layout: K per channel, V per token in rows of one head);
    T = k.tq + k.fp tokens. conv picks how fast tiles turn codes into fp16: 3 (the default on a GPU) two codes
    per instruction in inline PTX, 0 (the default under Triton's interpreter, which runs no PTX) shift, mask and
    convert one by one. fast=False sends every tile through the general (dequantizing) path, which
    walks tiles of tail_n tokens (it gathers codes byte by byte: smaller tiles keep its registers in bounds).
    """
    B, H, hd = q.shape
    q = q.contiguous()
    if conv is None:
        conv = 0 if interpreted() else 3
    # defaults measured on the H200 (benchmarks/kernel_roofline.py --tune): 3 stages and 3 programs an SM for bf16
    # tiles, 2 and 2 where codes are unpacked in registers (168 registers a thread); 64-token tiles where the
    # sequences' KV heads alone fill less than half the GPU (batch 1: more, shorter splits)
    quantized = k.bits < 16 or v.bits < 16
    if num_stages is None:
        num_stages = 2 if quantized else 3
    if per_sm is None:
        per_sm = 2 if quantized else 3
    if block_n is None:
        block_n = 64 if q.shape[0] * (k.width // hd) < per_sm * _sm_count(q.device) // 2 else 128
    fp_k = k.fp if k.fp is not None else _empty_like_fp(B, k.width, q)
    fp_v = v.fp if v.fp is not None else _empty_like_fp(B, v.width, q)
    Hkv = k.width // hd
    g = H // Hkv
    T = k.tq + (k.fp.shape[1] if k.fp is not None else 0)
    assert T == v.tq + (v.fp.shape[1] if v.fp is not None else 0), "K and V hold different token counts"
    block_g = max(16, triton.next_power_of_2(g))
    # fast tiles: whole tiles of codes of both K and V, inside one key block, one value group per head row
    fast_k = fast and k.bits < 16 and k.packed_words and k.group % block_n == 0
    fast_v = fast and v.bits < 16 and v.packed_words and v.group >= hd
    fast_end = (min(k.tq, v.tq) // block_n) * block_n if (fast_k and fast_v) else 0
    splits = n_splits(B * Hkv, T, block_n, per_sm * _sm_count(q.device))
    split_len = triton.cdiv(triton.cdiv(T, splits), block_n) * block_n
    splits = triton.cdiv(T, split_len)
    o_part = torch.empty(B * Hkv, splits, g, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * Hkv, splits, g, 2, dtype=torch.float32, device=q.device)
    dummy8 = torch.empty(1, dtype=torch.uint8, device=q.device)  # never read: no kernel to fill it
    dummy16 = torch.empty(1, dtype=torch.float16, device=q.device)

    def meta(s: Source):
        if s.bits >= 16:
            return dummy8, dummy8, dummy16, dummy16, (0, 0, 0), (0, 0, 0)
        c = s.codes.view(torch.int32) if s.packed_words else s.codes
        return s.codes, c, s.scale, s.zero, tuple(s.codes.stride()[:3]), tuple(s.scale.stride()[:3])

    kc8, kc32, ks, kz, kcs, kss = meta(k)
    vc8, vc32, vs, vz, vcs, vss = meta(v)
    sm_scale = LOG2E / hd**0.5
    _split_kernel[(B * Hkv, splits)](
        q, o_part, ml, kc8, kc32, ks, kz, fp_k, vc8, vc32, vs, vz, fp_v,
        T, k.tq, v.tq, fast_end, split_len, sm_scale,
        q.stride(0), q.stride(1),
        *kcs, *kss, fp_k.stride(0), fp_k.stride(1),
        vcs[0], vcs[1], vcs[2], vss[0], vss[1], vss[2], fp_v.stride(0), fp_v.stride(1),
        HKV=Hkv, G=g, BLOCK_G=block_g, HD=hd, BLOCK_N=block_n,
        KB=k.bits, VB=v.bits, GK=k.group, GV=v.group, FAST_K=fast_k, FAST_V=fast_v, CONV=conv,
        TAIL_N=min(block_n, tail_n) if quantized else block_n,
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(B, H, hd, dtype=q.dtype, device=q.device)
    _merge_kernel[(B * H,)](o_part, ml, out, splits, out.stride(0), out.stride(1),
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
def _unpack_words(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words (R, NW) of packed codes -> fp16 codes (R, NW * 32/BITS), each word's codes in the order
    perm(e) = e // 2 + (16/BITS) * (e % 2) (see _word_order): one fp16x2 register holds codes m and m + 16/BITS,
    and lies at elements 2m, 2m + 1, so no instruction moves a half. ASM: the two-codes-per-instruction
    conversion in PTX; else plain Triton (the interpreter's path), in the same order."""
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
    return tl.reshape(tl.join(lo, hi), (w.shape[0], w.shape[1] * (32 // BITS)))


@triton.jit
def _word_order(i, BITS: tl.constexpr):
    """Which code of its word element i of an unpacked tile holds (the order of _unpack_words)."""
    PER: tl.constexpr = 32 // BITS
    e = i % PER
    return i - e + e // 2 + (PER // 2) * (e % 2)


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
def _split_kernel(Q, O_part, ML, Kc8, Kc32, Ks, Kz, Kf, Vc8, Vc32, Vs, Vz, Vf,
                  T, TQK, TQV, fast_end, split_len, sm_scale,
                  sq_b, sq_h,
                  skc_b, skc_c, skc_n, sks_b, sks_c, sks_n, skf_b, skf_t,
                  svc_b, svc_t, svc_r, svs_b, svs_t, svs_r, svf_b, svf_t,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                  BLOCK_N: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
                  FAST_K: tl.constexpr, FAST_V: tl.constexpr, CONV: tl.constexpr, TAIL_N: tl.constexpr):
    pid_bh = tl.program_id(0)  # b * HKV + h: the KV heads of one sequence run side by side
    pid_s = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # batch offsets pass 2^31 elements (batch 32 x 128k tokens x 1024 channels)
    h = pid_bh % HKV
    n_splits = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_G)  # query heads h*G + r of this KV head, padded to BLOCK_G rows
    cols = tl.arange(0, HD)
    row_ok = rows < G
    q = tl.load(Q + b * sq_b + (h * G + rows)[:, None] * sq_h + cols[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * sm_scale  # (BLOCK_G, HD), log2 domain
    dt = Kf.dtype.element_ty  # dot operand type of the general path (the cache's fp dtype)
    chan = h * HD + cols  # this head's channels in the (B, T, HKV*HD) layout
    if FAST_K and FAST_V:
        vcol = _word_order(cols, VB)  # the accumulator's columns: the order fast tiles unpack value codes in
    else:
        vcol = cols
    chan_v = h * HD + vcol

    start = pid_s * split_len
    end = start + split_len
    if end > T:
        end = T
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HD], tl.float32)

    if FAST_K and FAST_V:
        NWK: tl.constexpr = BLOCK_N * KB // 32  # int32 words of one channel's codes in a tile
        NWV: tl.constexpr = HD * VB // 32  # int32 words of one token's head row
        wk = tl.arange(0, NWK)
        wv = tl.arange(0, NWV)
        fast_stop = end
        if fast_stop > fast_end:
            fast_stop = fast_end
        for t0 in range(start, fast_stop, BLOCK_N):
            blk = t0 // GK
            # K: fold the per-channel scale and zero of this block into the query
            ks = tl.load(Ks + b * sks_b + chan * sks_c + blk * sks_n).to(tl.float32)  # (HD,)
            kz = tl.load(Kz + b * sks_b + chan * sks_c + blk * sks_n).to(tl.float32)
            qs = (q * ks[None, :]).to(tl.float16)  # (BLOCK_G, HD)
            qz = tl.sum(q * kz[None, :], axis=1)
            w0 = (t0 % GK) * KB // 32
            kw = tl.load(Kc32 + b * (skc_b // 4) + chan[:, None] * (skc_c // 4) + blk * (skc_n // 4)
                         + w0 + wk[None, :])  # (HD, NWK)
            kc = _unpack_words(kw, KB, CONV == 3)  # (HD, BLOCK_N)
            s = tl.dot(qs, kc) + qz[:, None]  # (BLOCK_G, BLOCK_N)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            # V: fold the per-token scale and zero into the probabilities
            tok = t0 + _word_order(tl.arange(0, BLOCK_N), KB)  # the scores' columns: key codes' unpack order
            vs = tl.load(Vs + b * svs_b + tok * svs_t + h * svs_r).to(tl.float32)  # (BLOCK_N,)
            vz = tl.load(Vz + b * svs_b + tok * svs_t + h * svs_r).to(tl.float32)
            ps = (p * vs[None, :]).to(tl.float16)
            pz = tl.sum(p * vz[None, :], axis=1)
            vw = tl.load(Vc32 + b * (svc_b // 4) + tok[:, None] * (svc_t // 4) + h * (svc_r // 4)
                         + wv[None, :])  # (BLOCK_N, NWV)
            vc = _unpack_words(vw, VB, CONV == 3)  # (BLOCK_N, HD)
            acc = acc * alpha[:, None] + tl.dot(ps, vc) + pz[:, None]
        if start < fast_stop:
            start = fast_stop

    for t0 in range(start, end, TAIL_N):
        tok = t0 + tl.arange(0, TAIL_N)
        ok = tok < end
        # K^T tile (HD, TAIL_N): codes where tok < TQK, the fp16 part after
        kt = tl.load(Kf + b * skf_b + (tok - TQK)[None, :] * skf_t + chan[:, None],
                     mask=(ok & (tok >= TQK))[None, :], other=0.0).to(tl.float32)
        if KB < 16:
            inq = (ok & (tok < TQK))[None, :]
            blk = tok // GK
            c = _code_at(Kc8, b * skc_b + chan[:, None] * skc_c + blk[None, :] * skc_n, (tok % GK)[None, :],
                         KB, inq)
            ks = tl.load(Ks + b * sks_b + chan[:, None] * sks_c + blk[None, :] * sks_n, mask=inq, other=0.0)
            kz = tl.load(Kz + b * sks_b + chan[:, None] * sks_c + blk[None, :] * sks_n, mask=inq, other=0.0)
            kt = tl.where(inq, c.to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32), kt)
        s = tl.dot(q.to(dt), kt.to(dt))  # (BLOCK_G, TAIL_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        vt = tl.load(Vf + b * svf_b + (tok - TQV)[:, None] * svf_t + chan_v[None, :],
                     mask=(ok & (tok >= TQV))[:, None], other=0.0).to(tl.float32)  # (TAIL_N, HD)
        if VB < 16:
            inq = (ok & (tok < TQV))[:, None]
            grp = vcol // GV
            c = _code_at(Vc8, b * svc_b + tok[:, None] * svc_t + h * svc_r, vcol[None, :], VB, inq)
            vs = tl.load(Vs + b * svs_b + tok[:, None] * svs_t + h * svs_r + grp[None, :], mask=inq, other=0.0)
            vz = tl.load(Vz + b * svs_b + tok[:, None] * svs_t + h * svs_r + grp[None, :], mask=inq, other=0.0)
            vt = tl.where(inq, c.to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32), vt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), vt.to(dt))

    out = (pid_bh * n_splits + pid_s).to(tl.int64)
    tl.store(O_part + (out * G + rows)[:, None] * HD + vcol[None, :], acc, mask=row_ok[:, None])
    tl.store(ML + (out * G + rows) * 2, m_i, mask=row_ok)
    tl.store(ML + (out * G + rows) * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(O_part, ML, Out, n_splits, so_b, so_h, HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr):
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
    tl.store(Out + b * so_b + hq * so_h + cols, (acc / l_acc).to(Out.dtype.element_ty))

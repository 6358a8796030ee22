"""Fused rematerialization: decode attention over K and V rebuilt from a cached source, tile by tile, in one kernel
(XQuant and its variants). K never goes to memory: each tile of tokens is dequantized, multiplied by the head's
slice of the key weight with the tensor cores, rotated (RoPE at the tokens' positions) and used at once for q.K^T
under an online softmax.

One program per (sequence, KV head, context split), all g query heads of that KV head in it (GQA), as in the
split-KV attention kernels (xqsim.engine.kernels.attention), whose merge it shares. Sources are attention.Source:
codes in the reference packing (per-token groups along a row of channels, as X and the value latent are stored,
or per-channel blocks of G tokens, as the key latent is), their fp16 scale and zero, and an fp16 tail (the
residual window, or the whole source when it is unquantized, as the cross-layer accumulator X^ is).

K = [x0 | x_k] W_k: x_k the key source (width KW), x0 an optional unquantized first channel (XQuant-GQA keeps the
key latent's outlier channel in fp16) that multiplies W_k's first row. V either:
- remat: V = x_v W_v in the same tile (x_v the key source itself, read once for both products, or a source of its
  own), then P.V;
- absorb_v: softmax(q K^T) (x_v W_v) = (softmax(q K^T) x_v) W_v (no RoPE acts on V): the kernel accumulates
  P.x_v (g rows of the source's width per program, kept in the program's slot of the partial output, to which
  each span of 1,024 tokens adds its sum once, rescaled) and the caller multiplies the merged result by W_v once.

The weights' head columns are loaded as they lie (contiguous, so the loads are 16-byte copies the compiler can
pipeline); the halves that RoPE pairs are split in registers once a tile, after the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .attention import LOG2E, Source, _code_at, _merge_kernel, _online_softmax, _sm_count, _split_range, split_plan
from .rope import inv_freq

# On an H200 (Triton 3.6) the kernel matched float64 torch to 3e-3..4e-3 at Llama-3.1-8B's head dim of 128, and gave a
# relative error of 2.1 at head dim 16 (the tests' tiny shapes, 16-token tiles): products with 16-column operands,
# which kernels.attention pads to 64 columns for the same Triton, are the suspects. On a GPU it runs from 64 up.
MIN_GPU_HEAD_DIM = 64


def supported(hd: int, device: torch.device) -> bool:
    """Whether remat_attention runs for this head dim on this device (any under Triton's interpreter)."""
    return interpreted() or device.type != "cuda" or hd >= MIN_GPU_HEAD_DIM


def _strides(s: Source, dummy8: torch.Tensor, dummy16: torch.Tensor):
    """(codes, scale, zero, fp, code strides (3), scale strides (3), fp strides (2)) of a source in the reference
    packing; an unquantized source passes dummies for what it lacks."""
    fp = s.fp if s.fp is not None else dummy16
    fps = (fp.stride(0), fp.stride(1)) if s.fp is not None else (0, 0)
    if s.bits >= 16:
        return dummy8, dummy16, dummy16, fp, (0, 0, 0), (0, 0, 0), fps
    if s.cross:
        raise ValueError("remat_attention reads codes in the reference packing (cross-packed codes are K/V stores')")
    return s.codes, s.scale, s.zero, fp, tuple(s.codes.stride()[:3]), tuple(s.scale.stride()[:3]), fps


def _consts(s: Source, prefix: str) -> dict:
    """The compile-time description of a source: width, bits, group and axis (per-token sources are one row of
    channels a token, as X and the latents are)."""
    channel = s.bits < 16 and s.scale.dim() == 3
    if s.bits < 16 and not channel and s.codes.shape[2] != 1:
        raise ValueError(f"remat_attention: a per-token source of {s.codes.shape[2]} rows a token (one expected)")
    return {f"{prefix}W": s.width, f"{prefix}B": min(s.bits, 16), f"{prefix}G": s.group, f"{prefix}CH": channel}


def _fast(s: Source, block_n: int, bk: int) -> bool:
    """Whether whole tiles of s's codes dequantize whole bytes with one scale a token or a channel (_deq): 2, 4 or
    8 bits and one group per tile of block_n tokens (per channel) or per chunk of bk channels (per token); or s is
    unquantized."""
    if s.bits >= 16:
        return True
    if s.bits not in (2, 4, 8):
        return False
    return s.group % (block_n if s.scale.dim() == 3 else bk) == 0


def remat_attention(q: torch.Tensor, xk: Source, wk: torch.Tensor, theta: float, *, x0: Source | None = None,
                    xv: Source | None = None, wv: torch.Tensor | None = None, absorb: bool = False,
                    block_n: int = 128, block_k: int | None = None, num_warps: int = 8, num_stages: int = 3,
                    per_sm: float = 1, block_v: int | None = None, span: int = 1024) -> torch.Tensor:
    """Attention of one decode token over K and V rebuilt from cached sources: q (B, H, hd), post-RoPE.

    xk: the key source (B, T, KW); wk: ((1 if x0 else 0) + KW, Hkv*hd), K = [x0 | xk] wk, rotated at positions
    0..T-1 with base theta. xv: the value source (None: xk itself); wv: (VW, Hkv*hd). Returns (B, H, hd) in q's
    dtype, or with absorb=True softmax(q K^T / sqrt(hd)) x_v per query head, (B, H, VW) fp32, for the caller's
    product by wv (wv is not read then).

    The defaults are the fastest variants measured correct on an H200 at Llama-3.1-8B's shapes (2-bit;
    measurements/h200/remat): 128-token tiles (a tile's FLOPs per byte of weight read from L2 double over 64), 8
    warps (one program an SM), 3 pipeline stages and steps of 64 channels (block_k), 1.2-1.6x faster than 32
    channels or 2 stages. Except absorb_v over a per-channel key source (XQuant-GQA's latent), which steps by 32:
    in 64-channel steps Triton 3.6 summed it wrongly there (relative error 7e-2 to 1e-1). 4 warps at two programs
    an SM ran absorb_v 1.4-1.6x faster but gave NaN or wrong sums at those shapes (not at the tests' shapes).
    per_sm: programs an SM the split plan aims at (a fraction: fewer, longer splits)."""
    B, H, hd = q.shape
    if not supported(hd, q.device):
        raise ValueError(f"remat_attention: head dim {hd} on a GPU: at least {MIN_GPU_HEAD_DIM} (see MIN_GPU_HEAD_DIM)")
    if block_k is None:
        block_k = 32 if absorb and xk.bits < 16 and xk.scale.dim() == 3 else 64
    dkv = wk.shape[1]
    Hkv, g = dkv // hd, H // (dkv // hd)
    same = xv is None
    xv = xk if same else xv
    T = xk.tokens
    for name, s in (("x0", x0), ("xv", xv)):
        if s is not None and s.tokens != T:
            raise ValueError(f"remat_attention: {name} holds other tokens than xk ({T})")
    if wk.shape[0] != xk.width + (x0 is not None) or (not absorb and (wv is None or wv.shape[0] != xv.width)):
        shapes = f"{tuple(wk.shape)}, {None if wv is None else tuple(wv.shape)}"
        raise ValueError(f"remat_attention: weights {shapes} do not match sources of width {xk.width} and {xv.width}")
    q, wk = q.contiguous(), wk.contiguous()
    wv = wk if absorb else wv.contiguous()  # absorb: a pointer the kernel never reads
    # [0, main): whole tiles of codes in every quantized source (all of T if none is), split evenly; [main, T): the
    # tiles that reach into a residual window or past T, one split of its own
    coded = min([s.tq for s in (xk, xv) if s.bits < 16] or [T])
    main = coded // block_n * block_n
    split_len, n_main, splits = split_plan(B * Hkv, main, T, block_n, max(1, round(per_sm * _sm_count(q.device))))
    width = xv.width if absorb else hd  # what a split accumulates per query head
    wp = triton.next_power_of_2(width)
    o_part = torch.empty(B * Hkv, splits, g, wp if absorb else hd, dtype=torch.float32, device=q.device)
    # absorb_v's scratch: a span's scores (fp32) and softmax weights (q's dtype), BLOCK_G rows a program
    block_g = max(16, triton.next_power_of_2(g))
    span = max(block_n, span // block_n * block_n) if absorb else block_n
    n_scratch = B * Hkv * splits * block_g * span if absorb else 1
    sc = torch.empty(n_scratch, dtype=torch.float32, device=q.device)
    pc = torch.empty(n_scratch, dtype=q.dtype, device=q.device)
    ml = torch.empty(B * Hkv, splits, g, 2, dtype=torch.float32, device=q.device)
    d8 = torch.empty(1, dtype=torch.uint8, device=q.device)
    d16 = torch.empty(1, dtype=q.dtype, device=q.device)
    kc, ks, kz, kf, kcs, kss, kfs = _strides(xk, d8, d16)
    vc, vs, vz, vf, vcs, vss, vfs = _strides(xv, d8, d16)
    f0 = x0.fp if x0 is not None else d16
    f0s = (f0.stride(0), f0.stride(1)) if x0 is not None else (0, 0)
    inv = inv_freq(hd, theta, q.device)
    # channels a step of the key projection takes (block_k), and of the value side's product (block_v: the
    # rebuild of V from its own source, or absorb_v's P.x_v, one chunk of the span's sum in registers)
    bk = min(block_k, triton.next_power_of_2(xk.width))
    bkv = min(block_v or block_k, triton.next_power_of_2(xv.width))
    args = (q, o_part, ml, sc, pc, inv, kc, ks, kz, kf, f0, wk, vc, vs, vz, vf, wv,
            T, xk.tq, xv.tq, main, split_len, splits)
    rest = (LOG2E / hd**0.5, q.stride(0), q.stride(1),
            *kcs, *kss, *kfs, *f0s, wk.stride(0), *vcs, *vss, *vfs, wv.stride(0))
    consts = dict(HKV=Hkv, G=g, BLOCK_G=block_g, HD=hd, BLOCK_N=block_n, BK=bk, BKV=bkv, SPAN=span,
                  FIRST=x0 is not None, SAME=same, ABSORB=absorb, WP=wp, **_consts(xk, "K"),
                  **_consts(xv, "V"), TRIG=not interpreted(), num_warps=num_warps, num_stages=num_stages)
    if n_main:
        _remat_kernel[(B * Hkv, n_main)](*args, 0, *rest, KFAST=_fast(xk, block_n, bk),
                                         VFAST=_fast(xv, block_n, bkv), **consts)
    if n_main < splits:
        _remat_kernel[(B * Hkv, 1)](*args, n_main, *rest, KFAST=False, VFAST=False, **consts)
    out = torch.empty(B, H, width, dtype=torch.float32 if absorb else q.dtype, device=q.device)
    _merge_kernel[(B * H,)](o_part, ml, out, splits, out.stride(0), out.stride(1), width,
                            HKV=Hkv, G=g, HD=wp if absorb else hd, num_warps=4)
    return out


def accumulate(x: Source, acc: torch.Tensor | None, dtype: torch.dtype | None = None, block_t: int = 32,
               block_d: int = 128) -> torch.Tensor:
    """XQuant-CL's running reconstruction in one pass: acc + deq(x), or deq(x) where acc is None (the base layer):
    (B, T, W) in acc's dtype, else `dtype`. x: a layer's cached X or delta (per-token codes and their fp16 tail).
    Dequantization and addition in one kernel: the dequantized delta never reaches memory."""
    held = x.fp if x.fp is not None else x.codes
    B, T = held.shape[0], x.tokens
    out = torch.empty(B, T, x.width, dtype=acc.dtype if acc is not None else dtype, device=held.device)
    if T == 0:
        return out
    d8 = torch.empty(1, dtype=torch.uint8, device=out.device)
    d16 = torch.empty(1, dtype=out.dtype, device=out.device)
    c, sc, z, f, cs, ss, fs = _strides(x, d8, d16)
    a, sa = (acc, acc.stride()[:2]) if acc is not None else (d16, (0, 0))
    args = (c, sc, z, f, a, out, T, x.tq, *cs, *ss, *fs, *sa, *out.stride()[:2])
    consts = dict(ADD=acc is not None, BLOCK_T=block_t, BLOCK_D=block_d, **_consts(x, "V"), num_warps=4)
    main = (x.tq if x.bits < 16 else T) // block_t * block_t  # whole tiles of codes: whole bytes, one scale a token
    chunks = triton.cdiv(x.width, block_d)
    if main:
        _accumulate_kernel[(B, main // block_t, chunks)](*args, 0, FAST=_fast(x, block_t, block_d), **consts)
    if main < T:
        _accumulate_kernel[(B, triton.cdiv(T - main, block_t), chunks)](*args, main, FAST=False, **consts)
    return out


def reference(q: torch.Tensor, xk: torch.Tensor, wk: torch.Tensor, theta: float, xv: torch.Tensor | None = None,
              wv: torch.Tensor | None = None, x0: torch.Tensor | None = None, absorb: bool = False,
              dtype=torch.float64) -> torch.Tensor:
    """What remat_attention computes, in torch at `dtype` from the sources' values: q (B, H, hd), xk (B, T, KW),
    x0 (B, T, 1) or None, xv (B, T, VW) (None: xk). K = [x0 | xk] wk rotated at positions 0..T-1, V = xv wv;
    softmax(q K^T / sqrt(hd)) V (B, H, hd), or with absorb softmax(q K^T / sqrt(hd)) xv (B, H, VW)."""
    from ..model import rope

    B, H, hd = q.shape
    T, Hkv = xk.shape[1], wk.shape[1] // hd
    xv = xk if xv is None else xv
    src = torch.cat([x0, xk], -1) if x0 is not None else xk
    K = (src.to(dtype) @ wk.to(dtype)).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    K = rope(K, torch.arange(T, device=q.device), theta).repeat_interleave(H // Hkv, 1)  # (B, H, T, hd)
    p = ((q.to(dtype)[:, :, None] @ K.transpose(-1, -2)) / hd**0.5).softmax(-1)  # (B, H, 1, T)
    if absorb:
        return p[:, :, 0] @ xv.to(dtype)  # (B, H, VW)
    V = (xv.to(dtype) @ wv.to(dtype)).view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    return (p @ V)[:, :, 0]


# ----------------------------------------------------------------------------- device code


@triton.jit
def _unpack_bytes(c, BITS: tl.constexpr):
    """Bytes (R, NB) of codes packed little-endian, 8/BITS a byte -> codes (R, NB * 8/BITS), in order."""
    R: tl.constexpr = c.shape[0]
    NB: tl.constexpr = c.shape[1]
    c = c.to(tl.int32)
    if BITS == 8:
        return c
    elif BITS == 4:
        return tl.reshape(tl.join(c & 15, c >> 4), (R, NB * 2))
    else:
        # each join adds a minor axis: [m, n] holds code 2m + n
        u = tl.join(tl.join(c & 3, (c >> 4) & 3), tl.join((c >> 2) & 3, c >> 6))  # (R, NB, 2, 2)
        return tl.reshape(u, (R, NB * 4))


@triton.jit
def _sz(S, Z, t0, c0, ss_1, ss_2, W: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr, CH: tl.constexpr,
        BLOCK_N: tl.constexpr, BK: tl.constexpr, FAST: tl.constexpr):
    """The fp32 scale and zero a FAST tile of codes at (t0, c0) dequantizes with, shaped to broadcast over
    (BLOCK_N, BK): per token (BLOCK_N, 1) or per channel (1, BK); (1, 1) zeros where _deq takes none (unquantized
    or gathered tiles). Loading them a step ahead of their use (loop-carried) did not change the time on an H200
    and gave wrong sums there for 4-bit codes (Triton 3.6), so each step loads its own."""
    if FAST and BITS < 16:
        if CH:
            ch = c0 + tl.arange(0, BK)
            sz = ch * ss_1 + (t0 // GRP) * ss_2
            s = tl.load(S + sz, mask=ch < W, other=0.0).to(tl.float32)[None, :]
            z = tl.load(Z + sz, mask=ch < W, other=0.0).to(tl.float32)[None, :]
        else:
            sz = (t0 + tl.arange(0, BLOCK_N)) * ss_1 + c0 // GRP
            s = tl.load(S + sz).to(tl.float32)[:, None]
            z = tl.load(Z + sz).to(tl.float32)[:, None]
    else:
        s = tl.zeros([1, 1], tl.float32)
        z = tl.zeros([1, 1], tl.float32)
    return s, z


@triton.jit
def _deq(C, S, Z, F, t0, c0, TQ, T, sc_1, sc_2, ss_1, ss_2, sf_t, s, z,
         W: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr, CH: tl.constexpr, BLOCK_N: tl.constexpr,
         BK: tl.constexpr, FAST: tl.constexpr):
    """Values (BLOCK_N, BK) fp32 of one sequence's source (C, S, Z, F: its codes, scale, zero and fp16 tail) at
    tokens [t0, t0 + BLOCK_N) and channels [c0, c0 + BK), zero outside [0, T) x [0, W): codes * scale + zero below
    TQ, the tail from TQ on. Codes: per-token (CH False: one row of W channels a token, groups of GRP along it) or
    per-channel (CH: blocks of GRP tokens a channel). Offsets within a sequence are 32-bit.

    FAST (whole tiles wholly of codes, 2, 4 or 8 bits, one group per tile and channel chunk; or of an unquantized
    source): whole bytes are loaded and unpacked in registers, with the scale s and zero z that _sz loaded for
    (t0, c0); else every value gathers its byte, scale and zero, and the tail is read where the tile reaches into it
    (a launch of its own: its registers would slow the fast tiles down)."""
    tok = t0 + tl.arange(0, BLOCK_N)
    ch = c0 + tl.arange(0, BK)
    if FAST:
        if BITS >= 16:  # whole tiles of unquantized values
            x = tl.load(F + tok[:, None] * sf_t + ch[None, :], mask=(ch < W)[None, :], other=0.0).to(tl.float32)
        else:
            PER: tl.constexpr = 8 // BITS
            if CH:  # bytes (channel, tokens of the block): unpacked along tokens, then transposed
                by = (t0 % GRP) // PER + tl.arange(0, BLOCK_N // PER)
                c = tl.load(C + ch[:, None] * sc_1 + (t0 // GRP) * sc_2 + by[None, :], mask=(ch < W)[:, None],
                            other=0)
                c = tl.trans(_unpack_bytes(c, BITS))  # (BLOCK_N, BK)
            else:  # bytes (token, channels of the row)
                by = c0 // PER + tl.arange(0, BK // PER)
                c = tl.load(C + tok[:, None] * sc_1 + by[None, :], mask=(by < tl.cdiv(W, PER))[None, :], other=0)
                c = _unpack_bytes(c, BITS)  # (BLOCK_N, BK)
            x = tl.where((ch < W)[None, :], c.to(tl.float32) * s + z, 0.0)
    else:
        ok = (tok < T)[:, None] & (ch < W)[None, :]
        x = tl.load(F + (tok - TQ)[:, None] * sf_t + ch[None, :], mask=ok & (tok >= TQ)[:, None], other=0.0)
        x = x.to(tl.float32)
        if BITS < 16:
            inq = ok & (tok < TQ)[:, None]
            if CH:
                blk = (tok // GRP)[:, None]
                c = _code_at(C, ch[None, :] * sc_1 + blk * sc_2, (tok % GRP)[:, None], BITS, inq)
                sz = ch[None, :] * ss_1 + blk * ss_2
            else:
                c = _code_at(C, tok[:, None] * sc_1, ch[None, :], BITS, inq)
                sz = tok[:, None] * ss_1 + (ch // GRP)[None, :]
            sc = tl.load(S + sz, mask=inq, other=0.0).to(tl.float32)
            ze = tl.load(Z + sz, mask=inq, other=0.0).to(tl.float32)
            x = tl.where(inq, c.to(tl.float32) * sc + ze, x)
    return x


@triton.jit
def _cos_sin(ang, FAST: tl.constexpr):
    """cos and sin of fp32 angles. FAST (a GPU): the angle reduced to [-pi, pi] (Cody-Waite, 2 pi in three
    parts: |error| < 1e-6 below 2^17 rad) and the hardware's approximations (|error| < 1e-6 there), which keeps
    the accurate functions' slow path for huge arguments (local memory) out of the kernel."""
    if FAST:
        n = tl.floor(ang * 0.15915494309189535 + 0.5)
        r = ang - n * 6.28125  # 2 pi = 6.28125 + 1.93500518798828125e-3 + 3.0199159819e-7 (+ 1e-15)
        r = r - n * 1.93500518798828125e-3
        r = r - n * 3.0199159819e-7
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        return c, s
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _project(X, t0, c0, TQ, end, W, sw, col, s, z, sc_1, sc_2, ss_1, ss_2, sf_t, XW: tl.constexpr,
             XB: tl.constexpr, XG: tl.constexpr, XCH: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
             FIRST: tl.constexpr, FAST: tl.constexpr):
    """One step of a source's product by a weight's head columns: (BLOCK_N, BK) dequantized values (dot dtype)
    and the (BK, HD) rows of W they multiply (after FIRST rows of an unquantized channel). X: (codes, scale, zero,
    fp16 tail) of the sequence."""
    x = _deq(X[0], X[1], X[2], X[3], t0, c0, TQ, end, sc_1, sc_2, ss_1, ss_2, sf_t, s, z,
             XW, XB, XG, XCH, BLOCK_N, BK, FAST).to(W.dtype.element_ty)
    ck = c0 + tl.arange(0, BK)
    return x, tl.load(W + (FIRST + ck)[:, None] * sw + col[None, :], mask=(ck < XW)[:, None], other=0.0)


@triton.jit
def _rebuild(t0, end, inv, K, V, F0, Wk, Wv, TQK, TQV, kcol, vcol,
             skc_1, skc_2, sks_1, sks_2, skf_t, sf0_t, swk, svc_1, svc_2, svs_1, svs_2, svf_t, swv,
             HD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BKV: tl.constexpr,
             FIRST: tl.constexpr, SAME: tl.constexpr, WANT_V: tl.constexpr,
             KW: tl.constexpr, KB: tl.constexpr, KG: tl.constexpr, KCH: tl.constexpr,
             VW: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, VCH: tl.constexpr,
             KFAST: tl.constexpr, VFAST: tl.constexpr, TRIG: tl.constexpr):
    """K (rotated at the tokens' positions) and, WANT_V, V of tokens [t0, t0 + BLOCK_N), fp32 (BLOCK_N, HD) each,
    from the sources K and V (tuples of codes, scale, zero, tail); V from K's own chunks when SAME."""
    HALF: tl.constexpr = HD // 2
    tok = t0 + tl.arange(0, BLOCK_N)
    k = tl.zeros([BLOCK_N, HD], tl.float32)
    v = tl.zeros([BLOCK_N, HD], tl.float32)
    for c0 in range(0, KW, BK):  # K (and, from the same source, V): one chunk of the source at a time
        s, z = _sz(K[1], K[2], t0, c0, sks_1, sks_2, KW, KB, KG, KCH, BLOCK_N, BK, KFAST)
        x, w = _project(K, t0, c0, TQK, end, Wk, swk, kcol, s, z, skc_1, skc_2, sks_1, sks_2, skf_t,
                        KW, KB, KG, KCH, BLOCK_N, BK, FIRST, KFAST)
        k += tl.dot(x, w)
        if SAME and WANT_V:
            ck = c0 + tl.arange(0, BK)
            v += tl.dot(x, tl.load(Wv + ck[:, None] * swv + vcol[None, :], mask=(ck < KW)[:, None], other=0.0))
    if FIRST:  # the unquantized first channel times the weight's first row
        x0 = tl.load(F0 + tok * sf0_t, mask=tok < end, other=0.0).to(tl.float32)
        k += x0[:, None] * tl.load(Wk + kcol).to(tl.float32)[None, :]
    if WANT_V and not SAME:
        for c0 in range(0, VW, BKV):
            s, z = _sz(V[1], V[2], t0, c0, svs_1, svs_2, VW, VB, VG, VCH, BLOCK_N, BKV, VFAST)
            x, w = _project(V, t0, c0, TQV, end, Wv, swv, vcol, s, z, svc_1, svc_2, svs_1, svs_2, svf_t,
                            VW, VB, VG, VCH, BLOCK_N, BKV, False, VFAST)
            v += tl.dot(x, w)
    # RoPE at the tokens' positions: the halves it pairs, split in registers, rotated, joined back
    k1, k2 = tl.split(tl.permute(tl.reshape(k, (BLOCK_N, 2, HALF)), (0, 2, 1)))  # (BLOCK_N, HALF) each
    cos, sin = _cos_sin(tok.to(tl.float32)[:, None] * inv[None, :], TRIG)  # (BLOCK_N, HALF)
    k = tl.reshape(tl.permute(tl.join(k1 * cos - k2 * sin, k1 * sin + k2 * cos), (0, 2, 1)), (BLOCK_N, HD))
    return k, v


@triton.jit
def _absorb_span(s0, s1, start, q, inv, m_i, l_i, out, rows, row_ok, kcol, O_part, Sc, Pc, K, V, F0, Wk, TQK, TQV,
                 skc_1, skc_2, sks_1, sks_2, skf_t, sf0_t, swk, svc_1, svc_2, svs_1, svs_2, svf_t, end,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BK: tl.constexpr, BKV: tl.constexpr, SPAN: tl.constexpr, FIRST: tl.constexpr, WP: tl.constexpr,
                 KW: tl.constexpr, KB: tl.constexpr, KG: tl.constexpr, KCH: tl.constexpr,
                 VW: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, VCH: tl.constexpr,
                 KFAST: tl.constexpr, VFAST: tl.constexpr, TRIG: tl.constexpr):
    """absorb_v over tokens [s0, s1) (at most SPAN): the tiles' scores to the program's scratch (Sc, fp32), their
    softmax weights P under the span's maximum (Pc, the dot dtype), then P.x_v chunk by chunk of x_v's channels,
    each chunk summed over all the span's tiles in registers and added to the program's slot of the partial output
    once (one read-modify-write a chunk and span, where a tile-by-tile sum needs one a chunk and tile). The scratch
    is SPAN tokens of BLOCK_G rows a program, read back at once: it stays in the caches."""
    dt = Wk.dtype.element_ty
    n = tl.arange(0, BLOCK_N)
    slot = (out * BLOCK_G + rows)[:, None] * SPAN  # this program's rows of the scratch
    m_new = m_i
    for t0 in range(s0, s1, BLOCK_N):
        k, _ = _rebuild(t0, end, inv, K, V, F0, Wk, Wk, TQK, TQV, kcol, kcol,
                        skc_1, skc_2, sks_1, sks_2, skf_t, sf0_t, swk, svc_1, svc_2, svs_1, svs_2, svf_t, 0,
                        HD, BLOCK_N, BK, BKV, FIRST, False, False, KW, KB, KG, KCH, VW, VB, VG, VCH,
                        KFAST, VFAST, TRIG)
        s = tl.dot(q, tl.trans(k.to(dt)))  # (BLOCK_G, BLOCK_N)
        s = tl.where((t0 + n < end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_new, tl.max(s, axis=1))
        tl.store(Sc + slot + (t0 - s0 + n)[None, :], s, mask=row_ok[:, None])
    tl.debug_barrier()  # every thread reads scores other threads stored
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha
    for t0 in range(s0, s1, BLOCK_N):
        p = tl.exp2(tl.load(Sc + slot + (t0 - s0 + n)[None, :], mask=row_ok[:, None], other=float("-inf"))
                    - m_new[:, None])
        l_i += tl.sum(p, axis=1)
        tl.store(Pc + slot + (t0 - s0 + n)[None, :], p.to(dt), mask=row_ok[:, None])
    tl.debug_barrier()
    cv = tl.arange(0, BKV)
    for c0 in range(0, VW, BKV):
        o_ptr = O_part + (out * G + rows)[:, None] * WP + (c0 + cv)[None, :]
        o = tl.load(o_ptr, mask=row_ok[:, None] & (s0 > start), other=0.0) * alpha[:, None]
        for t0 in range(s0, s1, BLOCK_N):
            s, z = _sz(V[1], V[2], t0, c0, svs_1, svs_2, VW, VB, VG, VCH, BLOCK_N, BKV, VFAST)
            xv = _deq(V[0], V[1], V[2], V[3], t0, c0, TQV, end, svc_1, svc_2, svs_1, svs_2, svf_t, s, z,
                      VW, VB, VG, VCH, BLOCK_N, BKV, VFAST).to(dt)  # (BLOCK_N, BKV)
            p = tl.load(Pc + slot + (t0 - s0 + n)[None, :], mask=row_ok[:, None], other=0.0)
            o += tl.dot(p, xv)
        tl.store(o_ptr, o, mask=row_ok[:, None])
    tl.debug_barrier()  # the next span's reads of the slot and the scratch follow every thread's stores
    return m_new, l_i


@triton.jit
def _remat_kernel(Q, O_part, ML, Sc, Pc, Inv, Kc, Ks, Kz, Kf, F0, Wk, Vc, Vs, Vz, Vf, Wv,
                  T, TQK, TQV, main, split_len, n_splits, split0, sm_scale, sq_b, sq_h,
                  skc_b, skc_1, skc_2, sks_b, sks_1, sks_2, skf_b, skf_t, sf0_b, sf0_t, swk,
                  svc_b, svc_1, svc_2, svs_b, svs_1, svs_2, svf_b, svf_t, swv,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                  BLOCK_N: tl.constexpr, BK: tl.constexpr, BKV: tl.constexpr, SPAN: tl.constexpr,
                  FIRST: tl.constexpr, SAME: tl.constexpr, ABSORB: tl.constexpr, WP: tl.constexpr,
                  KW: tl.constexpr, KB: tl.constexpr, KG: tl.constexpr, KCH: tl.constexpr,
                  VW: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, VCH: tl.constexpr,
                  KFAST: tl.constexpr, VFAST: tl.constexpr, TRIG: tl.constexpr):
    """One (sequence, KV head, split) of the launch that starts at split split0. KFAST/VFAST: its tiles are whole
    and wholly codes (or unquantized values) of every source (the launch over [0, main))."""
    pid_bh = tl.program_id(0)  # b * HKV + h
    pid_s = tl.program_id(1) + split0
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    HALF: tl.constexpr = HD // 2
    rows = tl.arange(0, BLOCK_G)  # query heads h*G + r, padded
    row_ok = rows < G
    j = tl.arange(0, HD)
    dt = Wk.dtype.element_ty
    q = tl.load(Q + b * sq_b + (h * G + rows)[:, None] * sq_h + j[None, :], mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * sm_scale).to(dt)  # (BLOCK_G, HD), log2 domain
    inv = tl.load(Inv + tl.arange(0, HALF))  # (HALF,) fp32 inverse frequencies
    kcol = h * HD + j  # the head's columns of the key and value weights (contiguous: loaded in 16-byte pieces)
    out = (pid_bh * n_splits + pid_s).to(tl.int64)  # this program's slot of the partial outputs
    # this sequence's sources (codes, scale, zero, tail): 32-bit offsets from here on
    K = (Kc + b * skc_b, Ks + b * sks_b, Kz + b * sks_b, Kf + b * skf_b)
    V = (Vc + b * svc_b, Vs + b * svs_b, Vz + b * svs_b, Vf + b * svf_b)
    F0 += b * sf0_b

    start, end = _split_range(pid_s, split_len, main, T)  # [0, main): whole tiles, codes only
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if ABSORB:
        for s0 in range(start, end, SPAN):
            m_i, l_i = _absorb_span(s0, tl.minimum(s0 + SPAN, end), start, q, inv, m_i, l_i, out, rows, row_ok,
                                    kcol, O_part, Sc, Pc, K, V, F0, Wk, TQK, TQV,
                                    skc_1, skc_2, sks_1, sks_2, skf_t, sf0_t, swk, svc_1, svc_2, svs_1, svs_2,
                                    svf_t, end, G, BLOCK_G, HD, BLOCK_N, BK, BKV, SPAN, FIRST, WP,
                                    KW, KB, KG, KCH, VW, VB, VG, VCH, KFAST, VFAST, TRIG)
    else:
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for t0 in range(start, end, BLOCK_N):
            k, v = _rebuild(t0, end, inv, K, V, F0, Wk, Wv, TQK, TQV, kcol, kcol,
                            skc_1, skc_2, sks_1, sks_2, skf_t, sf0_t, swk, svc_1, svc_2, svs_1, svs_2, svf_t, swv,
                            HD, BLOCK_N, BK, BKV, FIRST, SAME, True, KW, KB, KG, KCH, VW, VB, VG, VCH,
                            KFAST, VFAST, TRIG)
            s = tl.dot(q, tl.trans(k.to(dt)))  # (BLOCK_G, BLOCK_N)
            s = tl.where((t0 + n < end)[None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt))
        tl.store(O_part + (out * G + rows)[:, None] * HD + j[None, :], acc, mask=row_ok[:, None])
    tl.store(ML + (out * G + rows) * 2, m_i, mask=row_ok)
    tl.store(ML + (out * G + rows) * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _accumulate_kernel(C, S, Z, F, Acc, Out, T, TQ, sc_b, sc_1, sc_2, ss_b, ss_1, ss_2, sf_b, sf_t, sa_b, sa_t,
                       so_b, so_t, T0, ADD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       VW: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, VCH: tl.constexpr, FAST: tl.constexpr):
    """One (sequence, tile of tokens from T0, chunk of channels) of accumulate(): Out = Acc + deq(X). FAST: the
    launch's tiles are whole and wholly codes (_deq)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = T0 + tl.program_id(1) * BLOCK_T
    c0 = tl.program_id(2) * BLOCK_D
    s, z = _sz(S + b * ss_b, Z + b * ss_b, t0, c0, ss_1, ss_2, VW, VB, VG, VCH, BLOCK_T, BLOCK_D, FAST)
    x = _deq(C + b * sc_b, S + b * ss_b, Z + b * ss_b, F + b * sf_b, t0, c0, TQ, T, sc_1, sc_2, ss_1, ss_2, sf_t,
             s, z, VW, VB, VG, VCH, BLOCK_T, BLOCK_D, FAST)  # (BLOCK_T, BLOCK_D), zero outside
    tok = t0 + tl.arange(0, BLOCK_T)
    ch = c0 + tl.arange(0, BLOCK_D)
    ok = (tok < T)[:, None] & (ch < VW)[None, :]
    if ADD:
        x += tl.load(Acc + b * sa_b + tok[:, None] * sa_t + ch[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + b * so_b + tok[:, None] * so_t + ch[None, :], x.to(Out.dtype.element_ty), mask=ok)

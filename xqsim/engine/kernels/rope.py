"""RoPE in one Triton launch: the math of xqsim.engine.model.rope (rotate the first half of the last axis against
the second, angles pos * theta^(-2i/hd)), reading x where it lies (any strides) and writing a new dense tensor.

The inverse frequencies theta^(-2i/hd) are the fp32 values torch computes (one small table per head dim, theta
and device, made on first use); angles, cos and sin are computed in fp32 in the kernel. As in torch, cos and sin
are rounded to x's dtype and every product and difference is rounded to it (16-bit types round to nearest even
by hand, so that the interpreter does too); launched without fp contraction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_INV: dict[tuple, torch.Tensor] = {}  # (hd, theta, device) -> inverse frequencies (hd/2,) fp32


@triton.jit
def _rounded(v, DT: tl.constexpr):
    """fp32 v rounded to DT (nearest, ties to even), back in fp32."""
    if DT == tl.bfloat16:  # by hand: the interpreter truncates fp32 -> bf16
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, inv_ptr, out_ptr, N, L1, T, sx0, sx1, sxt, sxd, sp,
                 HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    """One program per BLOCK rows (l0, l1, t) of x viewed as (L0, L1, T, hd)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    rm = rows < N
    t = rows % T
    l1 = (rows // T) % L1
    l0 = rows // T // L1
    base = l0.to(tl.int64) * sx0 + l1.to(tl.int64) * sx1 + t.to(tl.int64) * sxt  # (BLOCK,)
    j = tl.arange(0, HALFP)  # (HALFP,)
    jm = j < HALF
    m = rm[:, None] & jm[None, :]  # (BLOCK, HALFP)
    inv = tl.load(inv_ptr + j, mask=jm, other=0.0)
    p = tl.load(pos_ptr + t.to(tl.int64) * sp, mask=rm, other=0).to(tl.float32)
    ang = p[:, None] * inv[None, :]  # (BLOCK, HALFP) fp32, as torch
    c = _rounded(tl.cos(ang), DT)
    s = _rounded(tl.sin(ang), DT)
    ptr = x_ptr + base[:, None] + j[None, :].to(tl.int64) * sxd
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF * sxd, mask=m, other=0.0).to(tl.float32)
    o1 = _rounded(_rounded(x1 * c, DT) - _rounded(x2 * s, DT), DT)
    o2 = _rounded(_rounded(x1 * s, DT) + _rounded(x2 * c, DT), DT)
    out = out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]  # dense (N, hd)
    tl.store(out, o1.to(DT), mask=m)
    tl.store(out + HALF, o2.to(DT), mask=m)


def inv_freq(hd: int, theta: float, device) -> torch.Tensor:
    """theta^(-2i/hd) for i < hd/2 (hd/2,) fp32: the very values model.rope computes; cached."""
    key = (hd, float(theta), torch.device(device))
    if key not in _INV:
        _INV[key] = theta ** (-torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    return _INV[key]


def _lead(shape: tuple, strides: tuple) -> list[tuple[int, int]] | None:
    """The leading dims of x as (size, stride) pairs, merged where they are one strided dim; None past two."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:  # the outer dim steps over exactly this one
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:
        return None
    return [(1, 0)] * (2 - len(merged)) + merged


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (..., T, hd) at positions pos (T,) -> rotated (..., T, hd), dense, in x's dtype; x may be any view."""
    *lead_shape, T, hd = x.shape
    if hd % 2 or pos.shape != (T,):
        raise ValueError(f"rope: x {tuple(x.shape)} needs an even head dim and pos of shape ({T},)")
    lead = _lead(tuple(lead_shape), x.stride()[:-2])
    if lead is None:  # leading dims that no two strides describe: read a dense copy
        x = x.contiguous()
        lead = _lead(tuple(lead_shape), x.stride()[:-2])
    (L0, sx0), (L1, sx1) = lead
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = L0 * L1 * T
    if N == 0:
        return out
    half = hd // 2
    halfp = triton.next_power_of_2(half)
    block = max(1, min(64, 2048 // halfp, triton.next_power_of_2(N)))
    _rope_kernel[(triton.cdiv(N, block),)](
        x, pos, inv_freq(hd, theta, x.device), out, N, L1, T, sx0, sx1, x.stride(-2), x.stride(-1), pos.stride(0),
        HALF=half, HALFP=halfp, BLOCK=block, DT=_TL[x.dtype], num_warps=4, enable_fp_fusion=False)
    return out

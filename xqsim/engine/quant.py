"""Asymmetric uniform quantization in groups along the last axis, bit-packing, and Yang et al.'s
data-free calibration. Scale and zero point are stored in fp16 (4 bytes a group), codes bit-packed
per row: the byte layout of xqsim.schemes.layout, for real.
"""

from __future__ import annotations

import torch

META_DTYPE = torch.float16  # scale and zero point


def quantize(x: torch.Tensor, bits: int, group: int, eta: float = 0.0):
    """Quantize x (..., n) in groups of `group` along the last axis (the last group may be partial).

    Returns codes (..., n) uint8, scale and zero (..., ceil(n/group)) fp16. eta is Yang et al.'s
    calibration (arXiv 2510.11236): z' = z + eta*s*(2^b-1), s' = (1-2*eta)*s.
    """
    n = x.shape[-1]
    ng = -(-n // group)
    xf = x.float()
    pad = ng * group - n
    if pad:  # repeat the last value: min and max of the partial group are unchanged
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1)
    g = xf.view(*xf.shape[:-1], ng, group)  # (..., ng, G)
    mn, mx = g.amin(dim=-1), g.amax(dim=-1)  # (..., ng)
    levels = 2**bits - 1
    scale, zero = calibrate((mx - mn) / levels, mn, bits, eta)
    scale = scale.to(META_DTYPE)
    zero = zero.to(META_DTYPE)
    s = scale.float().clamp_min(1e-8)[..., None]
    codes = torch.round((g - zero.float()[..., None]) / s).clamp_(0, levels)
    return codes.view(*xf.shape[:-1], ng * group)[..., :n].to(torch.uint8), scale, zero


def calibrate(scale: torch.Tensor, zero: torch.Tensor, bits: int, eta: float):
    """Yang et al.'s data-free calibration: the end levels move inward by eta of the range."""
    if eta == 0:
        return scale, zero
    return (1 - 2 * eta) * scale, zero + eta * scale * (2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype=torch.float32):
    """codes (..., n) uint8 with scale/zero (..., ceil(n/group)) -> values (..., n) in dtype."""
    n = codes.shape[-1]
    if n % group == 0:  # whole groups: broadcast (..., ng, 1) over (..., ng, G), no expanded copies
        g = codes.view(*codes.shape[:-1], n // group, group).to(dtype)
        return torch.addcmul(zero.to(dtype)[..., None], g, scale.to(dtype)[..., None]).view(codes.shape)
    s = scale.to(dtype).repeat_interleave(group, dim=-1)[..., :n]
    z = zero.to(dtype).repeat_interleave(group, dim=-1)[..., :n]
    return codes.to(dtype) * s + z


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 codes < 2^bits -> (..., ceil(n*bits/8)) uint8, little-endian bit order."""
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    if 8 % bits == 0:  # whole codes per byte: no bit planes
        per = 8 // bits
        pad = -n % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
        c = codes.view(*codes.shape[:-1], -1, per)  # (..., nbytes, per)
        out = c[..., 0].clone()
        for j in range(1, per):
            out |= c[..., j] << (j * bits)
        return out
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bitplane = (codes[..., None] >> shifts) & 1  # (..., n, b)
    flat = bitplane.reshape(*codes.shape[:-1], n * bits)
    nbytes = -(-n * bits // 8)
    if nbytes * 8 > n * bits:
        flat = torch.cat([flat, flat.new_zeros(*flat.shape[:-1], nbytes * 8 - n * bits)], dim=-1)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (flat.view(*flat.shape[:-1], nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack: (..., ceil(n*bits/8)) uint8 -> (..., n) uint8 codes."""
    if bits == 8:
        return packed[..., :n]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        vals = (packed[..., None] >> shifts) & (2**bits - 1)  # (..., nbytes, 8/b)
        return vals.reshape(*packed.shape[:-1], -1)[..., :n]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    flat = ((packed[..., None] >> shifts) & 1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., : n * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (flat.reshape(*packed.shape[:-1], n, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)

"""XQuant of Yang et al. (EMNLP 2025, arXiv 2510.11236): KIVI's layout (keys per channel, values per
token, fp16 scale and zero, fp16 residual window) at ultra-low bits (K 2, V 1 by default), data-free
calibration of scale and zero (eta: accuracy only, no bytes), and cross-layer sharing: from layer
`share_from` on, each odd layer stores no codes and reuses layer i-1's, keeping its own scale and zero.

The default mirrors the authors' code configuration "kq=32, vq=16, km=vm=16" (models/qwen2_xquant.py
of brinenick511/XQuant) scaled to the model: all keys 2-bit, values 2-bit in the first half and 1-bit
after, odd layers of the second half shared: 88 stored code bits over 64 tensors on 32 layers = 1.375,
the paper's "1.38". Note: the authors' key sharing slices packed words correctly only at G=32.
"""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import LayerGroup, tensor

DEFAULT_BITS = 2  # Yang et al., arXiv 2510.11236: keys 2-bit, values 2 then 1-bit, 1.38 equivalent bits
BITS = (1, 2, 3, 4, 8, 16)
OPTIONS = ("v_bits", "share_from", "eta_k", "eta_v")


def resolve(cfg: SchemeConfig, model: ModelSpec) -> dict:
    """Model-dependent defaults: the authors' code configuration "kq=32, vq=16, km=vm=16" scaled to the model
    (the first half of the layers at 2 bits, odd layers of the second half sharing codes; values 1-bit after the
    first half), and the calibration eta of their code (1/6 at 1 bit, else 0.045)."""
    quant = cfg.bits < 16
    vb = cfg.v_bits if cfg.v_bits is not None else (1 if quant else 16)
    out = {"first_layers": model.n_layers // 2 if cfg.first_layers is None else cfg.first_layers,
           "first_bits": 2 if cfg.first_bits is None else cfg.first_bits, "v_bits": vb,
           "eta_k": cfg.eta_k if cfg.eta_k is not None else (1 / 6 if cfg.bits == 1 else 0.045),
           "eta_v": cfg.eta_v if cfg.eta_v is not None else (1 / 6 if vb == 1 else 0.045)}
    if cfg.share_from is None and quant:
        out["share_from"] = model.n_layers // 2
    return out


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """Per layer K (per channel) and V (per token), bits and sharing set per layer."""
    f, fb = cfg.first_layers or 0, cfg.first_bits or 0
    share = cfg.share_from if cfg.share_from is not None else model.n_layers

    def bits(i: int) -> tuple[int, int]:
        return (max(fb, cfg.bits), max(fb, cfg.v_bits)) if i < f else (cfg.bits, cfg.v_bits)

    layers: dict[tuple, list[int]] = {}  # identical layers merge into one group (a step's cost is a sum)
    for i in range(model.n_layers):
        shared = i % 2 == 1 and i >= share
        kb, vb = bits(i - 1 if shared else i)  # a shared layer decodes the codes of layer i-1
        key = (tensor("k", model.dkv, kb, axis="channel", shared=shared and kb < 16),
               tensor("v", model.dkv, vb, row=model.hd, shared=shared and vb < 16))
        layers.setdefault(key, []).append(i)
    return tuple(LayerGroup(len(idx), tensors, layers=tuple(idx)) for tensors, idx in layers.items())

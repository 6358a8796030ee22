"""XQuant (Tomar et al., arXiv 2508.10395): cache the post-norm layer input X (d values per token,
b bits, per-token groups) and rematerialize K = XWk (+RoPE), V = XWv at every step.

The rematerializing attention block here serves all four XQuant variants; each describes where its
K and V come from with a RematPlan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..specs import ModelSpec, SchemeConfig
from .layout import ELEM_BYTES, LayerGroup, split_layers, tensor
from .ops import ADD_FLOPS, ROPE_FLOPS, Op, dequant_ops, fp16_read, matmul, rope, store_ops

# Tomar et al., arXiv 2508.10395, abstract: "~7.7x memory savings with <0.1 perplexity degradation" (Table 4:
# 4-bit X, normalized KV size 0.13)
DEFAULT_BITS = 4


@dataclass(frozen=True, slots=True)
class RematPlan:
    """Where one layer's K and V are rebuilt from."""

    k_src: tuple[str, ...]  # cached tensors K is rebuilt from (ignored when acc is set)
    k_width: int  # contracting width of the K rematerialization (d, or the key latent rank)
    v_src: tuple[str, ...]
    v_width: int
    down: int = 0  # width of the new token's down-projection (GQA latents); 0: X is cached as is
    up: int = 0  # CL-GQA: latent width up-projected to d, then K and V are rebuilt from X; 0: none
    acc: Literal["", "init", "add"] = ""  # CL: the accumulator X^ is (re)built here and K, V read it

    @property
    def split_latents(self) -> bool:
        """K and V are rebuilt from latents of their own (XQuant-GQA: the token down-projected by the SVDs of Wk
        and of Wv), not from X or one joint latent."""
        return bool(self.down) and not self.up


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """Per layer: X, d values per token, per-token groups along d."""
    return split_layers(model, cfg, lambda b: (tensor("x", model.d_model, b),))


def plan(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup) -> RematPlan:
    d = model.d_model
    return RematPlan(("x",), d, ("x",), d)


def kv_weight_elems(model: ModelSpec, cfg: SchemeConfig) -> int:
    """Wk and Wv of all layers [elements]."""
    return model.n_layers * 2 * model.d_model * model.dkv


def remat_attention_ops(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup, p: RematPlan, B, T) -> list[Op]:
    """Store the token, dequantize, (up-project, accumulate), rebuild K (+RoPE) and V or absorb Wv, attend.

    Fused is what the Triton engine's kernel does (xqsim/engine/kernels/remat.py): it dequantizes the sources,
    rebuilds K, rotates it and attends, and rebuilds V (remat) or sums P.X (absorb_v) in the same pass, so K, V and
    P never reach memory. X of the cross-layer schemes (the accumulator X^, CL-GQA's up-projection) is built
    before it, in memory, by kernels of their own (XQuant-CL's dequantizes and adds in one), and the kernel reads
    it (absorb_v: twice, for K and for P.X; a tile of fp16 X^ does not stay in L2). Weights are counted once a
    layer: the kernel's programs re-read their head's slice from L2, one sequence and context split each."""
    d, dkv, H, hd, dq, w = model.d_model, model.dkv, model.n_heads, model.hd, model.dq, model.weight_bytes
    E, fused, absorb = ELEM_BYTES, cfg.fused, cfg.strategy == "absorb_v"
    kern = "attention" if fused else ""
    inter = 0 if fused else 1  # K, V, P: written and read back only when unfused
    rebuilt = bool(p.acc or p.up)  # X built in this layer (accumulator or up-projection): d wide, in memory
    pre_fused = fused and not rebuilt  # the dequantization is inside the attention kernel
    acc_fused = fused and bool(p.acc) and not p.up  # XQuant-CL: dequantized and added to X^ in one kernel
    deq_kern = kern if pre_fused else ("accumulate" if acc_fused else "")
    all_src = tuple(t.name for t in group.tensors)

    def src_read(names: tuple[str, ...], again: bool = False):
        """What rebuilding K (V: again, from the same source) reads of its source."""
        if rebuilt:
            return 0 if (fused and again and not absorb) else B * T * d * E
        return 0 if (again and fused) else fp16_read(group, names, cfg, B, T, fused)

    ops = []
    if p.down:
        ops.append(matmul("down_proj", B, 1, d, p.down, w))
    ops.append(rope("rope_q", B * dq))
    ops += store_ops(cfg, group, B, T)
    ops += dequant_ops(cfg, group, B, T, pre_fused or acc_fused, deq_kern)
    if p.up:
        ops.append(matmul("up_proj", B, T, p.up, d, w, cls="remat",
                          read_in=fp16_read(group, all_src, cfg, B, T, pre_fused), write_out=B * T * d * E))
    if p.acc:
        src = B * T * d * E if p.up else fp16_read(group, all_src, cfg, B, T, pre_fused or acc_fused)
        ops.append(Op("accumulate", "elementwise", flops=ADD_FLOPS * B * T * d * (p.acc == "add"),
                      read=src + (B * T * d * E if p.acc == "add" else 0),
                      write=B * T * d * E, kernel=deq_kern if acc_fused else ""))  # X^ persists for the next layer
    ops.append(matmul("remat_k", B, T, p.k_width, dkv, w, cls="remat", read_in=src_read(p.k_src),
                      write_out=inter * B * T * dkv * E, kernel=kern))
    ops.append(Op("rope_k", "rope", flops=ROPE_FLOPS * B * T * dkv,
                  read=inter * B * T * dkv * E, write=inter * B * T * dkv * E, kernel=kern))
    v_again = p.v_src == p.k_src
    if absorb:
        # softmax(qK^T) (X Wv) = (softmax(qK^T) X) Wv: no RoPE acts on V (Tomar et al. 2025).
        ops += [
            Op("attention_qk", "attention", flops=2 * B * H * T * hd,
               read=B * dq * E + inter * B * T * dkv * E, write=inter * B * H * T * E, kernel=kern),
            Op("attention_px", "attention", flops=2 * B * H * T * p.v_width,
               read=inter * B * H * T * E + src_read(p.v_src, again=v_again),
               write=B * H * p.v_width * E, kernel=kern),
            Op("v_absorb", "matmul", flops=2 * B * H * p.v_width * hd,
               read=p.v_width * dkv * w + B * H * p.v_width * E, write=B * dq * E),
        ]
    else:
        ops += [
            matmul("remat_v", B, T, p.v_width, dkv, w, cls="remat", read_in=src_read(p.v_src, again=v_again),
                   write_out=inter * B * T * dkv * E, kernel=kern),
            Op("attention", "attention", flops=4 * B * H * T * hd,
               read=B * dq * E + inter * 2 * B * T * dkv * E, write=B * dq * E, kernel=kern),
        ]
    return ops


def remat_transient_bytes(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup, p: RematPlan, T):
    """Peak buffers of one layer [B per sequence]: the CL accumulator (always); unfused, the dequantized sources,
    the up-projection, K, and V or P; fused, CL-GQA's inputs of the X it rebuilds in memory (dequantized latent,
    up-projection: remat_attention_ops)."""
    E, d, dkv = ELEM_BYTES, model.d_model, model.dkv
    acc = T * d * E if p.acc else 0
    deq = sum(T * t.width * E for t in group.tensors if t.quantized)
    up = T * d * E if p.up else 0
    if cfg.fused:  # XQuant-CL dequantizes inside its accumulation (no dequantized copy)
        return acc + ((0 if p.acc and not p.up else deq) + up if (p.acc or p.up) else 0)
    v_or_p = T * model.n_heads * E if cfg.strategy == "absorb_v" else T * dkv * E
    return acc + deq + up + T * dkv * E + v_or_p

"""XQuant-CL (Tomar et al., arXiv 2508.10395, cross-layer): the leading layers keep their own X (the
last of them is the base, 4 bits in the paper); every later layer i caches the quantized delta
Q(X_i - X^_{i-1}) against the running reconstruction X^ = base + earlier deltas, which an
accumulator (B*T*d, fp16) holds while the layers are processed."""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import LayerGroup, tensor
from .xquant import RematPlan

# Tomar et al., arXiv 2508.10395, abstract: XQuant-CL "10x memory savings ... with only 0.01 perplexity
# degradation" (Table 4: 3-bit deltas, the first 3 layers at 4 bits, 0.10)
DEFAULT_BITS = 3


def cl_layout(model: ModelSpec, cfg: SchemeConfig, width: int) -> tuple[LayerGroup, ...]:
    """first_layers-1 plain layers, the base layer (both at max(first_bits, bits)), then delta layers."""
    f, n = cfg.first_layers or 1, model.n_layers
    fb = max(cfg.first_bits or 0, cfg.bits)
    groups = (LayerGroup(f - 1, (tensor("x", width, fb),), "plain", tuple(range(f - 1))),
              LayerGroup(1, (tensor("x", width, fb),), "base", (f - 1,)),
              LayerGroup(n - f, (tensor("dx", width, cfg.bits),), "delta", tuple(range(f, n))))
    return tuple(g for g in groups if g.count)


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    return cl_layout(model, cfg, model.d_model)


def plan(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup) -> RematPlan:
    d = model.d_model
    src = tuple(t.name for t in group.tensors)
    acc = {"plain": "", "base": "init", "delta": "add"}[group.role]
    return RematPlan(src, d, src, d, acc=acc)

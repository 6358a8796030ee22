"""XQuant-GQA (Tomar et al., arXiv 2508.10395, GQA section): X is down-projected offline by the SVD of
Wk and of Wv (ranks rk, rv; default dkv each). The key-side latent X.Uk is quantized per channel
(its outliers sit in the first channel, optionally kept in fp16), the value-side X.Uv per token;
K and V are rebuilt with the fused rank x dkv factors."""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import LayerGroup, split_layers, tensor
from .xquant import RematPlan

DEFAULT_BITS = 4  # Tomar et al.'s GQA rows report 4, 3 and 2 bits with no headline: XQuant's 4
OPTIONS = ("rank_k", "rank_v", "keep_first_channel")


def resolve(cfg: SchemeConfig, model: ModelSpec) -> dict:
    """Model-dependent defaults: both latents of rank dkv (the SVD keeps all of Wk and Wv)."""
    return {"rank_k": cfg.rank_k or model.dkv, "rank_v": cfg.rank_v or model.dkv}


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    """Per layer: key latent (rk, per channel; first channel fp16 if kept) and value latent (rv, per token)."""
    rk, rv = cfg.rank_k, cfg.rank_v

    def make(b: int):
        first = (tensor("xk0", 1, 16, axis="channel"),) if cfg.keep_first_channel else ()
        return first + (tensor("xk", rk - len(first), b, axis="channel"), tensor("xv", rv, b))

    return split_layers(model, cfg, make)


def plan(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup) -> RematPlan:
    return RematPlan(("xk0", "xk"), cfg.rank_k, ("xv",), cfg.rank_v, down=cfg.rank_k + cfg.rank_v)


def kv_weight_elems(model: ModelSpec, cfg: SchemeConfig) -> int:
    """Down-projections Uk, Uv (d x r) and up factors (r x dkv), replacing Wk and Wv [elements]."""
    r = cfg.rank_k + cfg.rank_v
    return model.n_layers * (model.d_model * r + r * model.dkv)

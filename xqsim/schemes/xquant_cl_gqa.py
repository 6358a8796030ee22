"""XQuant-CL for GQA (Tomar et al., arXiv 2508.10395): as XQuant-CL, but each layer's delta is
down-projected by the SVD of [Wk | Wv] (rank rk + rv) before quantization and up-projected to d
before it is added to the accumulator; K and V are then rebuilt from X^ with Wk and Wv."""

from __future__ import annotations

from ..specs import ModelSpec, SchemeConfig
from .layout import LayerGroup
from .xquant import RematPlan
from .xquant_cl import cl_layout

DEFAULT_BITS = 2  # Tomar et al.: the one CL-GQA configuration of their GQA table, 2-bit (0.15)
OPTIONS = ("rank_k", "rank_v")


def resolve(cfg: SchemeConfig, model: ModelSpec) -> dict:
    """Model-dependent defaults: one SVD of [Wk | Wv] (d x 2dkv), of rank at most min(d, 2dkv), split in two."""
    r = min(model.d_model, 2 * model.dkv)
    return {"rank_k": cfg.rank_k or r // 2, "rank_v": cfg.rank_v or r - r // 2}


def check_model(cfg: SchemeConfig, model: ModelSpec) -> str | None:
    """Why the ranks do not fit the model, or None."""
    if cfg.rank_k + cfg.rank_v > model.d_model:
        return f"rank_k+rank_v={cfg.rank_k + cfg.rank_v} exceeds d_model={model.d_model}"
    return None


def layout(model: ModelSpec, cfg: SchemeConfig) -> tuple[LayerGroup, ...]:
    return cl_layout(model, cfg, cfg.rank_k + cfg.rank_v)


def plan(model: ModelSpec, cfg: SchemeConfig, group: LayerGroup) -> RematPlan:
    d, r = model.d_model, cfg.rank_k + cfg.rank_v
    acc = {"plain": "", "base": "init", "delta": "add"}[group.role]
    return RematPlan((), d, (), d, down=r, up=r, acc=acc)


def kv_weight_elems(model: ModelSpec, cfg: SchemeConfig) -> int:
    """U (d x r, used to project down and up) plus Wk and Wv [elements]."""
    r = cfg.rank_k + cfg.rank_v
    return model.n_layers * (model.d_model * r + 2 * model.d_model * model.dkv)

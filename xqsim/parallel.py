"""Tensor parallelism: what one of `tp` ranks holds and runs, as a model of its own.

Megatron-style sharding: Q, K, V and O by heads, the MLP by columns then rows, the embedding and the head by
vocabulary; d_model, the layers and the norms stay whole. KV heads split tp ways, or, when tp exceeds them, each
rank holds one (replicated, as serving engines do). A rank is then a decoder of H/tp query heads, max(Hkv/tp, 1) KV
heads of the same head dimension, ffn/tp MLP columns and vocab/tp rows, and every per-rank byte and FLOP follows
from the analytic model run on it:

- K/V caches (fp16, KIVI, Yang et al.) shard with their heads;
- XQuant's X (d values a token) is whole on every rank, each rank rebuilding its own heads' K and V from it;
- XQuant-GQA's latents: with the SVD of the whole Wk and Wv (`svd="whole"`) every rank caches the whole latent
  (rank rk, rv of the whole model) and up-projects it by its heads' slice; with a per-rank SVD (`svd="per_rank"`)
  each rank caches the latent of its own shard of Wk and Wv, of rank dkv/tp by default.
"""

from __future__ import annotations

import math
from typing import Literal

from .specs import ModelSpec, SchemeConfig, UserError

SVD = ("whole", "per_rank")


def check_tp(model: ModelSpec, tp: int, where: str = "command line") -> None:
    """A UserError unless tp splits the model's query heads evenly and its KV heads either way."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UserError(f"{where}: field 'tp': {tp!r} is not allowed; allowed: a whole number from 1")
    H, Hkv = model.n_heads, model.n_kv_heads
    if H % tp or (Hkv % tp and tp % Hkv):
        raise UserError(f"{where}: field 'tp': {tp} does not split {model.name}'s {H} query heads and {Hkv} KV "
                        f"heads evenly; allowed: {', '.join(str(t) for t in divisors(model))}")


def divisors(model: ModelSpec) -> list[int]:
    """The tensor-parallel degrees the model takes: those that split its query heads and its KV heads either way."""
    H, Hkv = model.n_heads, model.n_kv_heads
    return [t for t in range(1, H + 1) if H % t == 0 and (Hkv % t == 0 or t % Hkv == 0)]


def rank_model(model: ModelSpec, tp: int) -> ModelSpec:
    """One rank's share of the model (the module's docstring); the model itself at tp 1."""
    check_tp(model, tp)
    if tp == 1:
        return model
    return model.model_copy(update={
        "name": f"{model.name}/tp{tp}", "n_heads": model.n_heads // tp,
        "n_kv_heads": max(model.n_kv_heads // tp, 1),  # one a rank, replicated, when tp exceeds the KV heads
        "head_dim": model.hd, "ffn_dim": math.ceil(model.ffn_dim / tp), "vocab_size": math.ceil(model.vocab_size / tp)})


def rank_config(model: ModelSpec, cfg: SchemeConfig, tp: int,
                svd: Literal["whole", "per_rank"] = "whole") -> tuple[ModelSpec, SchemeConfig]:
    """(one rank's model, the configuration resolved for it): the SVD latents of XQuant-GQA and CL-GQA are the whole
    model's (their ranks resolved on it) unless `svd` is per_rank, when each rank's come from its own shard."""
    if svd not in SVD:
        raise UserError(f"command line: field 'svd': '{svd}' is not allowed; allowed: {', '.join(SVD)}")
    rank = rank_model(model, tp)
    if svd == "whole" and tp > 1:
        whole = cfg.resolved(model)  # rk, rv of the whole Wk, Wv: every rank caches the whole latent
        return rank, whole.model_copy(update={k: v for k, v in whole.resolved(model).model_dump().items()
                                              if k in ("rank_k", "rank_v")})
    return rank, cfg.resolved(rank)

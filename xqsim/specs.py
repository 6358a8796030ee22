"""Specs: hardware profiles, model shapes, scheme configurations and scenarios, loaded from YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SchemeName = Literal["fp16", "kivi", "xquant", "xquant_cl", "xquant_gqa", "xquant_cl_gqa", "xquant_yang"]
SCHEMES: tuple[str, ...] = SchemeName.__args__  # what each one is: xqsim.schemes.SCHEMES
Strategy = Literal["remat", "absorb_v"]
OpClass = Literal["matmul", "attention", "remat", "dequant", "quant", "rope", "elementwise"]
OP_CLASSES: tuple[str, ...] = OpClass.__args__
# Which peak an op class runs against: tensor cores (bf16) or the vector units (fp32 non-tensor).
TENSOR_CLASSES = ("matmul", "attention", "remat")

UNQUANTIZED = 16

MAX_COUNT = 2**31  # every count a spec holds (layers, widths, heads, vocabulary, group, rank, batch, context)
# whole numbers, not booleans or floats, in [1, MAX_COUNT)
Positive = Annotated[int, Field(gt=0, lt=MAX_COUNT, strict=True)]
# the same in [0, MAX_COUNT): residual windows, leading layers, the first shared layer
Count = Annotated[int, Field(ge=0, lt=MAX_COUNT, strict=True)]
# code bits: a whole number (a scheme states which it supports)
Bits = Annotated[int, Field(strict=True)]
MAX_LAYERS = 2**16  # a model's layers: far past any model (Llama 3.1 405B has 126); the layout lists every layer
MAX_WEIGHTS = 2**53  # a model's weights: 4,500 times today's largest, and byte counts stay within int64
Frozen = ConfigDict(frozen=True, extra="forbid")


class UserError(Exception):
    """Bad input from a user: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- hardware


class Figure(BaseModel):
    """A spec figure with where it comes from."""

    model_config = Frozen
    value: float = Field(gt=0, allow_inf_nan=False, strict=True, description="the figure, SI base units")
    source: str = Field(min_length=3, description="datasheet, paper or measurement it comes from")


# Time factors a fit may hold: each multiplies the memory time of the ops that carry the flag of its name
# (schemes.ops.Op), and its fitted block holds it as `factors: {name: value}`. A new factor is an entry here and
# its flag on the ops it applies to; the roofline, the fit and the CLI take it from here.
FACTORS = {  # name -> (what it stands for, the range a fit may find)
    "bitplane": ("(de)quantization of codes whose width does not divide 8 (bit planes)", (1.0, 100.0)),
    "channel": ("(de)quantization of per-channel codes (laid out channel-major, values token-major)", (0.1, 10.0)),
}
# what a fit may find (xqsim calibrate's bounds) and a fitted block may hold: (low, high) per kind
FIT_RANGES = {"overhead": (1e-8, 1e-2), "efficiency": (1e-3, 1.5)} | {k: r for k, (_, r) in FACTORS.items()}
FactorName = Literal[tuple(FACTORS)]


def _fitted(kind: str, zero: bool = False) -> Any:
    """A finite number in FIT_RANGES[kind] (an overhead may also be 0: none)."""
    lo, hi = FIT_RANGES[kind]
    return Annotated[float, Field(ge=0 if zero else lo, le=hi, allow_inf_nan=False, strict=True)]


class Fitted(BaseModel):
    """Efficiencies fitted by calibration against measurements; absent means the spec roofline (1.0)."""

    model_config = Frozen
    source: str = Field(description="measurements and date the fit comes from")
    mem_efficiency: dict[OpClass, _fitted("efficiency")] = Field(
        default_factory=dict, description="achieved / spec bandwidth per op class")
    compute_efficiency: dict[OpClass, _fitted("efficiency")] = Field(
        default_factory=dict, description="achieved / spec FLOP rate per op class")
    kernel_overhead_s: _fitted("overhead", zero=True) | None = Field(None, description="fitted per-kernel overhead [s]")
    overhead_s: dict[OpClass, _fitted("overhead", zero=True)] = Field(
        default_factory=dict, description="fitted overhead of a kernel per op class (else kernel_overhead_s) [s]")
    factors: dict[FactorName, float] = Field(default_factory=dict, description="time multipliers of the ops "
                                             "each names (FACTORS); absent: 1")
    target: Literal["graph", "eager"] = Field("graph", description="what the fit predicts: the GPU time of a "
                                                                   "CUDA-graph step, or an eager step")
    engine: Literal["torch", "triton"] = Field("torch", description="the engine the fit describes: torch (unfused "
                                               "configurations) or triton, the kernel engine (fused ones)")
    schemes: list[SchemeName] | None = Field(None, min_length=1, description="the schemes its measurements held "
                                                                            "(left out: every scheme)")

    @model_validator(mode="before")
    @classmethod
    def _named_factors(cls, data: Any) -> Any:
        """Blocks of earlier versions hold `bitplane_factor` and `channel_factor`: the same as factors' entries."""
        if isinstance(data, dict) and any(f"{k}_factor" in data for k in FACTORS):
            old = {k: data[f"{k}_factor"] for k in FACTORS if data.get(f"{k}_factor") is not None}
            new = data.get("factors") if isinstance(data.get("factors"), dict) else {}
            if both := sorted(set(old) & set(new)):
                raise ValueError(f"'{both[0]}_factor' and 'factors.{both[0]}' are both given; keep 'factors'")
            data = {k: v for k, v in data.items() if not (k.endswith("_factor") and k[:-7] in FACTORS)}
            data["factors"] = old | new
        return data

    @field_validator("factors")
    @classmethod
    def _factor_ranges(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            lo, hi = FACTORS[k][1]
            if not (isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi):
                raise ValueError(f"factor '{k}' is {x!r}; allowed: a number from {lo:g} to {hi:g}")
        return v


FlopKey = Literal["bf16", "fp16", "fp8", "int8", "tf32", "fp32"]
# plausible ranges of hardware figures: from an embedded accelerator to well past today's largest parts
FIGURE_RANGES = {
    "memory_bytes": (2**20, 2**50, "B"),  # 1 MiB .. 1 PiB
    "mem_bytes_per_s": (1e8, 1e15, "B/s"),  # 0.1 GB/s .. 1 PB/s
    "flops_per_s": (1e8, 1e18, "FLOP/s"),  # 0.1 GFLOP/s .. 1 EFLOP/s
    "l2_bytes": (2**10, 2**40, "B"),  # 1 KiB .. 1 TiB
    "interconnect_bytes_per_s": (1e6, 1e15, "B/s"),
    "kernel_overhead_s": (1e-8, 1e-1, "s"),  # 10 ns .. 100 ms
}


@dataclass(frozen=True)
class Rates:
    """The achieved rates a roofline runs on: the spec bandwidth (the plots' roof) [B/s], and per op class the FLOP
    rate [FLOP/s], the bandwidth [B/s] and a kernel's overhead [s]; per FACTORS name its factor. Each value is a
    number, or an array whose leading axis is the GPU (Rates.stack)."""

    mem_bytes_per_s: Any
    flops_per_s: dict[str, Any]
    bytes_per_s: dict[str, Any]
    overhead_s: dict[str, Any]
    factors: dict[str, Any]

    def map(self, f) -> Rates:
        """The rates with f applied to every value (the sweep takes each point's GPU: f = lambda v: v[index])."""
        return Rates(f(self.mem_bytes_per_s), *({k: f(v) for k, v in d.items()}
                                                 for d in (self.flops_per_s, self.bytes_per_s, self.overhead_s,
                                                           self.factors)))

    @staticmethod
    def stack(rows: list[Rates]) -> Rates:
        """Several GPUs' rates along a leading axis, shaped (nH, 1, 1) to broadcast over (batch, context)."""
        def col(get) -> Any:
            return np.array([get(r) for r in rows], dtype=float)[:, None, None]

        return Rates(col(lambda r: r.mem_bytes_per_s),
                     *({k: col(lambda r, a=a, k=k: getattr(r, a)[k]) for k in getattr(rows[0], a)}
                       for a in ("flops_per_s", "bytes_per_s", "overhead_s", "factors")))


class HardwareProfile(BaseModel):
    """One accelerator: spec figures with sources, and a separate fitted block."""

    model_config = Frozen
    name: str
    display_name: str
    vendor: str
    memory_bytes: Figure = Field(description="device memory [B]")
    usable_fraction: Figure = Field(description="fraction of memory a serving engine may plan for")
    mem_bytes_per_s: Figure = Field(description="peak memory bandwidth [B/s]")
    flops_per_s: dict[FlopKey, Figure] = Field(description="dense peak FLOP/s per dtype; fp32 = vector units")
    l2_bytes: Figure = Field(description="last-level on-chip cache [B]")
    interconnect_bytes_per_s: Figure | None = Field(None, description="device-to-device link [B/s]")
    kernel_overhead_s: Figure = Field(description="per-kernel launch and tail overhead [s]")
    fitted: Fitted | None = None

    @field_validator("flops_per_s")
    @classmethod
    def _needs_bf16_fp32(cls, v: dict) -> dict:
        missing = [k for k in ("bf16", "fp32") if k not in v]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (bf16 for tensor ops, fp32 for vector ops)")
        return v

    @field_validator("usable_fraction")
    @classmethod
    def _fraction(cls, v: Figure) -> Figure:
        if not 0 < v.value <= 1:
            raise ValueError(f"value must be in (0, 1], got {v.value}")
        return v

    @model_validator(mode="after")
    def _plausible(self) -> HardwareProfile:
        """Each figure inside what any accelerator has or will soon have (FIGURE_RANGES): a unit slip (GB for B,
        TB/s for B/s) or a typo is an error, not a GPU a million times off."""
        figures = {k: getattr(self, k) for k in FIGURE_RANGES if k != "flops_per_s"}
        figures |= {f"flops_per_s.{k}": v for k, v in self.flops_per_s.items()}
        for name, fig in figures.items():
            if fig is None:
                continue
            lo, hi, unit = FIGURE_RANGES[name.split(".")[0]]
            if not lo <= fig.value <= hi:
                raise ValueError(f"{name}={fig.value:g} is outside the plausible [{lo:g}, {hi:g}] {unit}")
        return self

    @property
    def capacity_bytes(self) -> float:
        """Memory a deployment may fill [B]."""
        return self.memory_bytes.value * self.usable_fraction.value

    @property
    def ridge_flop_per_byte(self) -> float:
        """bf16 peak / bandwidth [FLOP/B]."""
        return self.flops_per_s["bf16"].value / self.mem_bytes_per_s.value

    def peak_flops(self, cls: str) -> float:
        """Spec FLOP/s an op class runs against: the bf16 tensor peak (TENSOR_CLASSES), else the fp32 vector peak."""
        return self.flops_per_s["bf16" if cls in TENSOR_CLASSES else "fp32"].value

    def rates(self, fitted: bool = True) -> Rates:
        """Achieved rates used by the roofline: bandwidth, per-class FLOP/s and overhead, the factors."""
        fit = self.fitted if fitted else None
        eff = fit.compute_efficiency if fit else {}
        mem = fit.mem_efficiency if fit else {}
        overhead = fit.kernel_overhead_s if fit and fit.kernel_overhead_s is not None else self.kernel_overhead_s.value
        return Rates(
            mem_bytes_per_s=self.mem_bytes_per_s.value,
            flops_per_s={c: self.peak_flops(c) * eff.get(c, 1.0) for c in OP_CLASSES},
            bytes_per_s={c: self.mem_bytes_per_s.value * mem.get(c, 1.0) for c in OP_CLASSES},
            overhead_s={c: (fit.overhead_s if fit else {}).get(c, overhead) for c in OP_CLASSES},
            factors={k: fit.factors.get(k, 1.0) if fit else 1.0 for k in FACTORS})


# ----------------------------------------------------------------------------- model


class ModelSpec(BaseModel):
    """A Llama-style decoder's shapes."""

    model_config = Frozen
    name: str
    display_name: str
    source: str = Field(min_length=3)
    n_layers: Annotated[int, Field(gt=0, le=MAX_LAYERS, strict=True)]
    d_model: Positive
    n_heads: Positive
    n_kv_heads: Positive
    head_dim: Positive | None = Field(None, description="defaults to d_model / n_heads")
    ffn_dim: Positive
    vocab_size: Positive
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0, allow_inf_nan=False)
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    weight_bytes: Literal[1, 2, 4] = Field(2, description="bytes per weight element")

    @field_validator("weight_bytes", mode="before")
    @classmethod
    def _whole_bytes(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):  # 2.0 or true would be read as 2 or 1
            raise ValueError("expected 1, 2 or 4 (a whole number of bytes)")
        return v

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) is not a multiple of n_heads; set head_dim")
        from .schemes.decoder import dense_weight_elems

        weights = dense_weight_elems(self) + 2 * self.n_layers * self.d_model * self.dkv  # with Wk and Wv
        if weights > MAX_WEIGHTS:
            raise ValueError(f"{weights:.3g} weights is past the plausible {MAX_WEIGHTS:.3g} (the largest models "
                             f"have about 2e12); check its sizes")
        return self

    @property
    def hd(self) -> int:
        """Head dimension."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def dq(self) -> int:
        """Query width H*hd."""
        return self.n_heads * self.hd

    @property
    def dkv(self) -> int:
        """Key (or value) width Hkv*hd."""
        return self.n_kv_heads * self.hd

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads


# ----------------------------------------------------------------------------- scheme


def _scheme(name: str):
    """What scheme `name` is (xqsim.schemes.Scheme: its bits, defaults, options), imported when first asked: the
    scheme modules import this one."""
    from .schemes import SCHEMES as registry

    return registry[name]


def _first_bits_below(scheme: str, bits: int, first_bits: int | None) -> bool:
    """Leading layers asked at fewer bits than the rest (they are kept at max(first_bits, bits), except where
    first_bits is the scheme's own setting: Yang et al.)."""
    return (first_bits is not None and _scheme(scheme).first_bits_floor and bits < UNQUANTIZED
            and first_bits < bits)


# options an uncompressed cache (fp16) has no use for: set to anything but their defaults, they are an error
UNCOMPRESSED_UNUSED = ("group", "residual", "first_layers", "first_bits")


class SchemeConfig(BaseModel):
    """One KV-cache scheme with its options; model-dependent defaults are resolved by `resolved`."""

    model_config = Frozen
    scheme: SchemeName
    bits: Bits = Field(UNQUANTIZED, description="code bits of the cached tensors; 16 = unquantized; left out: the "
                      "scheme's default (its paper's headline)")
    group: Positive = Field(128, description="quantization group size [elements]")
    residual: Count | None = Field(None, description="fp16 residual window [tokens]")
    strategy: Strategy | None = Field(None, description="remat or absorb_v (rematerializing schemes)")
    fused: bool = Field(False, description="dequant/remat fused into attention: no intermediates in memory")
    first_layers: Count | None = Field(None, description="leading layers kept at first_bits")
    first_bits: Bits | None = Field(None, description="bits of the leading layers, at least `bits` (default 4; "
                                   "xquant_yang 2)")
    rank_k: Positive | None = Field(None, description="SVD rank of the key-side latent (GQA variants)")
    rank_v: Positive | None = Field(None, description="SVD rank of the value-side latent (GQA variants)")
    keep_first_channel: bool = Field(False, description="xquant_gqa: first key-latent channel in fp16")
    v_bits: Bits | None = Field(None, description="xquant_yang: value bits (default 1)")
    share_from: Count | None = Field(None, description="xquant_yang: odd layers >= this share the codes of "
                                   "the layer below (default n_layers/2; n_layers or more: no sharing)")
    eta_k: float | None = Field(None, ge=0, lt=0.5, strict=True, description="xquant_yang: key calibration eta")
    eta_v: float | None = Field(None, ge=0, lt=0.5, strict=True, description="xquant_yang: value calibration eta")

    @model_validator(mode="before")
    @classmethod
    def _default_bits(cls, data: Any) -> Any:
        """bits left out: the scheme's default."""
        if isinstance(data, dict) and data.get("bits") is None and data.get("scheme") in SCHEMES:
            data = {**data, "bits": _scheme(data["scheme"]).default_bits}
        return data

    @model_validator(mode="after")
    def _check(self) -> SchemeConfig:
        from .schemes import SCHEMES as registry
        from .schemes import rematerializing

        s, sch = self.scheme, _scheme(self.scheme)
        if not sch.compresses:
            fields = type(self).model_fields
            unused = [f for f in UNCOMPRESSED_UNUSED if getattr(self, f) not in (None, fields[f].default)]
            if unused:
                raise ValueError(f"{unused[0]} applies only to compressed caches: {s} keeps K and V unquantized")
        for field in ("bits", "first_bits") + (("v_bits",) if "v_bits" in sch.options else ()):
            v = getattr(self, field)
            if v is not None and v not in sch.bits:
                raise ValueError(f"{field}={v} is not supported by {s}; allowed: {list(sch.bits)}")
        if self.strategy is not None and not sch.rematerializes:
            raise ValueError(f"strategy {self.strategy} applies only to rematerializing schemes {rematerializing()}; "
                             f"{s} caches K and V")
        if self.fused and not sch.compresses:
            raise ValueError(f"fused applies only to compressed caches: {s} has nothing to dequantize or rebuild")
        if _first_bits_below(s, self.bits, self.first_bits):
            raise ValueError(f"first_bits={self.first_bits} is below bits={self.bits}: the leading layers are kept "
                             f"at first_bits or more, never fewer")
        for field in dict.fromkeys(f for x in registry.values() for f in x.options):
            v = getattr(self, field)  # 0 is a setting (share_from: 0, eta_k: 0), False is not
            if v is not None and v is not False and field not in sch.options:
                raise ValueError(f"{field} applies only to {[n for n, x in registry.items() if field in x.options]}")
        r, g = self.residual, self.group
        quantized = self.bits < UNQUANTIZED or (self.v_bits or UNQUANTIZED) < UNQUANTIZED
        if sch.keys_per_channel and quantized and r is not None and (r < g or r % g):
            raise ValueError(f"residual={r}: {s} quantizes keys per channel in blocks of group={g} tokens, "
                             f"so residual must be a positive multiple of {g}")
        if sch.cross_layer and self.first_layers == 0:
            raise ValueError(f"{s} needs first_layers >= 1 (the last of them is the base layer)")
        return self

    @classmethod
    def stored(cls, data: dict) -> SchemeConfig:
        """A config as xqsim wrote it into a file (a measurement row's `config`), read by today's rules: options
        that earlier versions filled in although they mean nothing for the scheme (strategy for K/V schemes,
        fused for fp16 under the Triton engine, a default first_bits below bits) are left out."""
        d = {k: v for k, v in data.items() if v is not None}
        s = d.get("scheme")
        if s not in SCHEMES:
            return cls(**d)  # the error names it
        sch = _scheme(s)
        if not sch.rematerializes:
            d.pop("strategy", None)
        if not sch.compresses:
            for f in ("fused", *UNCOMPRESSED_UNUSED):
                d.pop(f, None)
        if _first_bits_below(s, d.get("bits", sch.default_bits), d.get("first_bits")):
            d.pop("first_bits")
        return cls(**d)

    def resolved(self, model: ModelSpec) -> SchemeConfig:
        """Fill model-dependent defaults (the common ones here, the scheme's own from its module) and check the
        options against the model's shapes."""
        sch, upd = _scheme(self.scheme), {}
        quant = self.bits < UNQUANTIZED
        if self.strategy is None and sch.rematerializes:
            upd["strategy"] = "remat"
        if self.residual is None:
            # KIVI's code keeps R=128 fp16 tokens; per-channel layouts need R to be a multiple of G.
            upd["residual"] = self.group if sch.keys_per_channel and quant else 0
        if self.first_layers is None:
            upd["first_layers"] = 1 if sch.cross_layer else 0
        if self.first_bits is None:
            upd["first_bits"] = 4
        upd |= sch.resolve(self, model)
        out = self.model_copy(update=upd)
        out._check_model(model)
        return out

    def _check_model(self, model: ModelSpec) -> None:
        if self.first_layers and self.first_layers > model.n_layers:
            raise UserError(f"first_layers={self.first_layers} exceeds {model.name}'s {model.n_layers} layers")
        if self.rank_k and self.rank_k > min(model.d_model, model.dkv):
            raise UserError(f"rank_k={self.rank_k} exceeds min(d_model, dkv)={min(model.d_model, model.dkv)}")
        if self.rank_v and self.rank_v > min(model.d_model, model.dkv):
            raise UserError(f"rank_v={self.rank_v} exceeds min(d_model, dkv)={min(model.d_model, model.dkv)}")
        why = _scheme(self.scheme).check_model(self, model)
        if why:
            raise UserError(why)

    @property
    def label(self) -> str:
        """Short name of what was asked for (defaults left out), e.g. 'xquant_gqa-2b-absorb_v-fused'."""
        parts = [self.scheme] + ([f"{self.bits}b"] if self.scheme != "fp16" else [])
        extras = (("v_bits", "v{}"), ("group", "g{}"), ("residual", "r{}"), ("first_layers", "first{}"),
                  ("first_bits", "@{}b"), ("rank_k", "rk{}"), ("rank_v", "rv{}"), ("share_from", "share{}"),
                  ("eta_k", "etak{:.3g}"), ("eta_v", "etav{:.3g}"))
        for field, fmt in extras:
            v = getattr(self, field)
            if v is not None and not (field == "group" and v == 128):
                parts.append(fmt.format(v))
        if self.strategy == "absorb_v":
            parts.append("absorb_v")
        if self.keep_first_channel:
            parts.append("fp16ch0")
        if self.fused:
            parts.append("fused")
        return "-".join(parts)

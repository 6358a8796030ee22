"""Which rates a prediction uses: one rule for every GPU, command and view, and the words that say which.

A profile's fitted block describes one engine on that GPU (`Fitted.engine`): the torch engine, which runs every
dequantization and rematerialization as kernels of their own (the model's unfused configurations), or the kernel
engine (`triton`), which runs them inside its attention kernels (the fused configurations). A configuration is
predicted for the engine that runs it; fp16, with nothing to fuse, runs alike on both, so a fit of either applies
to it. Modes:

- `spec`: the datasheet roofline, everywhere;
- `fitted` (the default): the GPU's own fit for that engine; where it has none, spec rates, and the basis says why
  (a stated fallback, never a silent one);
- `transferred`: as `fitted`, and where the GPU has no fit of its own for that engine, another GPU's fit for it:
  its efficiencies applied to this GPU's spec figures, its overheads as they are, named in the basis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .schemes import SCHEMES
from .specs import HardwareProfile, SchemeConfig

MODES = ("spec", "fitted", "transferred")


def engine(cfg: SchemeConfig) -> str:
    """The engine that runs a configuration: `triton` (the kernel engine) when it is fused, else `torch`."""
    return "triton" if cfg.fused else "torch"


def runs(scheme: str, fused: bool, eng: str) -> bool:
    """Whether engine `eng` runs a scheme as the model describes it: the torch engine unfused, the kernel engine
    fused; a scheme with nothing to fuse (fp16: attention over fp16 K and V) on both alike."""
    return not SCHEMES[scheme].compresses or fused == (eng == "triton")


def covers(fit, cfg: SchemeConfig) -> bool:
    """Whether a fitted block describes how cfg runs: it saw the scheme, and its engine runs cfg."""
    return (fit is not None and (fit.schemes is None or cfg.scheme in fit.schemes)
            and runs(cfg.scheme, cfg.fused, fit.engine))


@dataclass(frozen=True)
class Basis:
    """What one (GPU, configuration) is predicted with."""

    kind: str  # spec | fitted | transferred: what is applied
    fit: str = ""  # the profile whose fitted block is applied
    engine: str = ""  # the engine that fit describes
    fallback: str = ""  # where a fit was asked for and spec rates stand in: why

    @property
    def label(self) -> str:
        """The `rates` column's value: 'spec', 'fitted (h100_sxm, torch engine)', 'spec (no triton-engine fit)'."""
        if self.kind == "spec":
            return f"spec ({self.fallback})" if self.fallback else "spec"
        return f"{self.kind} ({self.fit}, {self.engine} engine)"


def check(mode: str, where: str = "--rates") -> str:
    """mode, or a ValueError naming where it came from (if given) and what is allowed."""
    if mode not in MODES:
        raise ValueError(f"{where}: " * bool(where) + f"'{mode}' is not allowed; allowed: {', '.join(MODES)}")
    return mode


def choose(hw: HardwareProfile, cfg: SchemeConfig, mode: str = "fitted",
           donors: tuple[HardwareProfile, ...] = ()) -> tuple[HardwareProfile, Basis]:
    """The profile to take rates from (hw, with the fitted block that applies or none) and its basis. donors: the
    profiles whose fits `transferred` may lend (the first, by name, with a fit for the engine; default: the
    shipped ones)."""
    check(mode)
    spec = hw.model_copy(update={"fitted": None}) if hw.fitted else hw
    if mode == "spec":
        return spec, Basis("spec")
    eng = engine(cfg)
    if covers(hw.fitted, cfg):
        return hw, Basis("fitted", hw.name, hw.fitted.engine)
    if mode == "transferred":
        lender = next((d for d in sorted(donors or shipped_fits(), key=lambda d: d.name)
                       if covers(d.fitted, cfg) and d.name != hw.name), None)
        if lender is not None:
            return lend(hw, lender), Basis("transferred", lender.name, lender.fitted.engine)
    if hw.fitted and hw.fitted.engine == eng:  # a fit of this engine that never saw the scheme
        return spec, Basis("spec", fallback=f"the {eng}-engine fit saw no {cfg.scheme}")
    return spec, Basis("spec", fallback=f"no {eng}-engine fit")


def lend(hw: HardwareProfile, src: HardwareProfile) -> HardwareProfile:
    """hw's spec figures with src's fitted block (its efficiencies, overheads and factors), labelled as lent."""
    return hw.model_copy(update={"fitted": src.fitted.model_copy(
        update={"source": f"transferred from {src.name}: {src.fitted.source}"})})


@functools.cache
def shipped_fits() -> tuple[HardwareProfile, ...]:
    """The shipped profiles that carry a fitted block: what `transferred` may lend."""
    from .loading import list_hardware

    return tuple(hw for hw in list_hardware() if hw.fitted)


def rates(hw: HardwareProfile, cfg: SchemeConfig, mode: str = "fitted",
          donors: tuple[HardwareProfile, ...] = ()) -> tuple[dict[str, float], Basis]:
    """The achieved rates the roofline uses for (hw, cfg) under `mode`, and their basis."""
    prof, basis = choose(hw, cfg, mode, donors)
    return prof.rates(), basis  # prof carries the fitted block that applies, or none


def summary(hws: list[HardwareProfile], configs: list[SchemeConfig], mode: str,
            donors: tuple[HardwareProfile, ...] = ()) -> str:
    """One line for a console header or a plot title: 'rates MODE: ' and applied()."""
    return f"rates {mode}: " + applied(hws, configs, mode, donors)


def applied(hws: list[HardwareProfile], configs: list[SchemeConfig], mode: str,
            donors: tuple[HardwareProfile, ...] = ()) -> str:
    """Each distinct basis and where it applies (GPUs, and which configurations where not all: 'fused',
    'unfused' or their labels)."""
    seen: dict[str, dict[str, list[SchemeConfig]]] = {}
    for hw in hws:
        for cfg in configs:
            seen.setdefault(choose(hw, cfg, mode, donors)[1].label, {}).setdefault(hw.name, []).append(cfg)
    parts = []
    for lab, per_hw in seen.items():
        groups: dict[str, list[str]] = {}
        for h, cs in per_hw.items():
            groups.setdefault(_which(cs, configs), []).append(h)
        parts.append(f"{lab} on " + "; ".join(", ".join(h) + (f" ({w})" if w else "") for w, h in groups.items()))
    return " | ".join(parts)


def _which(cs: list[SchemeConfig], configs: list[SchemeConfig]) -> str:
    """'' when cs are all the configurations, 'fused' or 'unfused' when they are exactly those, else the labels."""
    if len(cs) == len(configs):
        return ""
    for word, flag in (("fused", True), ("unfused", False)):
        if {c.label for c in cs} == {c.label for c in configs if c.fused == flag}:
            return f"{word} configurations"
    return ", ".join(c.label for c in cs)

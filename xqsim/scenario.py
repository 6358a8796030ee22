"""Scenarios: a sweep's grid (hardware x models x scheme entries x batch x context) as its YAML says it, the
entries' list-valued options expanded into SchemeConfigs, and the counts ('32k', '1M') users write."""

from __future__ import annotations

import copy
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from .schemes import SCHEMES
from .specs import Frozen, Positive, SchemeConfig, UserError


def _listify(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


def count_value(v: str) -> float:
    """The number a count spells: '32k' -> 32768.0, '1.5M' -> 1572864.0; nan where it spells none."""
    s = v.strip().lower()
    mult = {"k": 1024, "m": 1024**2}.get(s[-1:], 1)
    try:
        return float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        return float("nan")


def parse_count(v: Any) -> Any:
    """'32k' -> 32768, '1M' -> 1048576; other values, and strings that spell no whole number ('0.4k', 'inf'), pass
    through for the field's own check to refuse (never truncated: '0.4k' is not 409)."""
    if isinstance(v, str):
        x = count_value(v)
        return int(x) if math.isfinite(x) and x == int(x) else v
    return v


# the options a scenario entry may list (the grid takes their product), with an entry's default: bits None is the
# scheme's own default
LISTED = {"bits": None, "strategy": [None], "fused": [False]}


class _Entry(BaseModel):
    model_config = Frozen

    _lists = field_validator(*LISTED, mode="before", check_fields=False)(classmethod(lambda c, v: _listify(v)))

    def expand(self) -> list[SchemeConfig]:
        """One SchemeConfig per combination of the list-valued options."""
        base = self.model_dump(exclude=set(LISTED))
        bits = self.bits or [SCHEMES[self.scheme].default_bits]  # a strategy for a K/V scheme: SchemeConfig's error
        return [SchemeConfig(**base, bits=b, strategy=st, fused=f)
                for b, st, f in itertools.product(bits, dict.fromkeys(self.strategy), self.fused)]


def _entry_fields() -> dict:
    """SchemeConfig's options as a scenario entry declares them: the same fields, types, bounds and descriptions,
    the LISTED ones as lists (declared once, in SchemeConfig)."""
    out = {}
    for name, f in SchemeConfig.model_fields.items():
        if name in LISTED:
            ann = list[f.annotation]
            out[name] = (ann | None if LISTED[name] is None else ann,  # a list given is never empty
                         Field(LISTED[name], min_length=1, description=f.description))
        else:
            out[name] = (f.annotation, copy.copy(f))
    return out


ScenarioScheme = create_model("ScenarioScheme", __base__=_Entry, __module__=__name__, **_entry_fields())
ScenarioScheme.__doc__ = "A scheme entry of a scenario: SchemeConfig's options, bits, strategy and fused as lists."


MAX_RANGE = 2**20  # points of a context range: 1,048,576 contexts is past any plot or crossover search


class ContextRange(BaseModel):
    model_config = Frozen
    start: Positive
    stop: Positive
    num: Annotated[int, Field(gt=0, le=MAX_RANGE, strict=True)] = 64
    log: bool = True

    _counts = field_validator("start", "stop", mode="before")(classmethod(lambda c, v: parse_count(v)))

    @model_validator(mode="after")
    def _order(self) -> ContextRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must be >= start ({self.start})")
        return self

    def values(self) -> list[int]:
        f = np.geomspace if self.log else np.linspace
        return np.unique(np.round(f(self.start, self.stop, self.num)).astype(np.int64)).tolist()


class Scenario(BaseModel):
    """A sweep: the Cartesian product of hardware x models x schemes x batch x context."""

    model_config = Frozen
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    hardware: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    schemes: list[ScenarioScheme] = Field(min_length=1)
    batch: list[Positive] = Field(min_length=1)
    context: list[Positive] | ContextRange
    plot_batch: Positive | None = Field(None, description="batch shown in per-batch plots (default: nearest 16)")
    plot_context: Positive | None = Field(None, description="context of the roofline plot (default: nearest 32k)")
    rates: Literal["spec", "fitted", "transferred"] = Field(
        "fitted", description="the rates each GPU predicts with (xqsim.rates): spec, fitted (its own fit for the "
                              "engine a configuration runs on, else spec) or transferred (else another GPU's fit)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_fitted(cls, data: Any) -> Any:
        """Files of earlier versions say `fitted: true|false`: the same as `rates: fitted|spec`."""
        if isinstance(data, dict) and "fitted" in data and "rates" not in data and isinstance(data["fitted"], bool):
            data = {k: v for k, v in data.items() if k != "fitted"} | {"rates": "fitted" if data["fitted"] else "spec"}
        return data

    _hw = field_validator("hardware", "models", "batch", mode="before")(classmethod(lambda c, v: _listify(v)))

    @field_validator("context", mode="before")
    @classmethod
    def _ctx(cls, v: Any) -> Any:
        return [parse_count(x) for x in _listify(v)] if not isinstance(v, dict) else v

    @field_validator("plot_context", mode="before")
    @classmethod
    def _pctx(cls, v: Any) -> Any:
        return parse_count(v)

    @field_validator("context")
    @classmethod
    def _ctx_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one context (a list, or a range {start, stop, num})")
        return v

    @field_validator("hardware", "models")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        twice = next((x for i, x in enumerate(v) if x in v[:i]), None)
        if twice is not None:
            raise ValueError(f"'{twice}' is listed twice")
        return v

    @model_validator(mode="after")
    def _plot_batch_in_batch(self) -> Scenario:
        if self.plot_batch is not None and self.plot_batch not in self.batch:
            raise ValueError(f"plot_batch={self.plot_batch} is not one of batch {self.batch}")
        return self

    def contexts(self) -> list[int]:
        return self.context.values() if isinstance(self.context, ContextRange) else sorted(set(self.context))

    def scheme_configs(self, where: str | Path | None = None) -> list[SchemeConfig]:
        return scheme_configs(self.schemes, where)


def scheme_configs(entries, where: str | Path | None = None) -> list[SchemeConfig]:
    """The configurations of scheme entries (a scenario's, a measurement or accuracy grid's), in order, each once.
    With `where` (the file) a bad entry is a UserError naming the file and field ('schemes.N.bits'), not a
    ValidationError."""
    out: list[SchemeConfig] = []
    for i, entry in enumerate(entries):
        try:
            out += entry.expand()
        except ValidationError as err:
            if where is None:
                raise
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise UserError(f"{where}: {named_field(msg, f'schemes.{i}')}{msg}") from None
    return list(dict.fromkeys(out))


def named_field(msg: str, prefix: str = "") -> str:
    """"field 'PREFIX.NAME': " for the first scheme option a check's message mentions, e.g. 'bits=5 ...'."""
    names = [w for w in re.findall(r"[A-Za-z_]\w*", msg) if w in SchemeConfig.model_fields]
    field = ".".join(x for x in (prefix, names[0] if names else "") if x)
    return f"field '{field}': " if field else ""

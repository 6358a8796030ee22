"""The sidebar's controls, uploaded YAML files, and the page state kept in the URL query so a view can be shared.

Every widget keeps its value in st.session_state under its key; the keys are filled once per session from the
URL (or the defaults) before the widgets are drawn, and the URL is rewritten from them after every run."""

from __future__ import annotations

from dataclasses import dataclass, field

import streamlit as st

from .. import loading, rates, specs
from ..scenario import parse_count
from ..schemes import SCHEMES
from ..specs import HardwareProfile, ModelSpec, SchemeConfig, UserError
from .data import with_budget

VIEWS = {"crossovers": "Crossovers", "capacity": "Capacity", "roofline": "Roofline", "compare": "Compare GPUs",
         "calibration": "Calibration", "accuracy": "Accuracy"}
CONTEXTS = [2**k for k in range(8, 23)]  # 256 .. 4M tokens: the context slider's stops
MAX_BATCH = 1 << 16
DEFAULTS = {"view": "capacity", "hw": ["h100_sxm", "b200"], "model": "llama-3.1-8b",
            "schemes": ["fp16", "kivi-2b-fused", "xquant_gqa-2b-absorb_v-fused"], "batch": 16,
            "ctx": (1024, 2**20), "at": 32768, "budget": 0.0, "rates": "fitted", "dppl": 5.0}
# spec: the key of older links (spec=1 is rates=spec)
URL_KEYS = ("view", "hw", "model", "schemes", "batch", "ctx", "at", "budget", "rates", "spec", "dppl")
VIEW_KEYS = ("metric", "cmp", "mset", "calhw")  # the views' own controls, in the URL while their view is shown


def tokens(v: int) -> str:
    """32768 -> '32k', 1048576 -> '1M' (binary, as contexts are written in scenarios)."""
    return f"{v // 2**20}M" if v >= 2**20 and v % 2**20 == 0 else f"{v // 1024}k" if v % 1024 == 0 else str(v)


@dataclass(frozen=True)
class Controls:
    """What the sidebar asks for, resolved to specs."""

    view: str
    hws: tuple[HardwareProfile, ...]  # selected, memory budget applied
    all_hws: tuple[HardwareProfile, ...]  # shipped and uploaded, budget applied
    model: ModelSpec | None
    configs: tuple[SchemeConfig, ...]
    batch: int
    contexts: tuple[int, int]  # context range [tokens]
    at: int  # context of the memory breakdown and the roofline [tokens]
    budget_gb: float
    max_delta_ppl: float = 0.05  # the verdict's quality limit: relative perplexity increase
    rate_mode: str = "fitted"  # xqsim.rates: spec, fitted or transferred
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- labels <-> per-scheme widgets


def parse_label(label: str) -> tuple[str, int, str | None, bool]:
    """'xquant_gqa-2b-absorb_v-fused' -> (scheme, bits, strategy, fused); the labels the controls make."""
    scheme, *rest = label.split("-")
    if scheme not in specs.SCHEMES:
        raise UserError(f"unknown scheme '{scheme}'{loading.suggest(scheme, list(specs.SCHEMES))}")
    bits, strategy, fused = specs.UNQUANTIZED, None, False
    for part in rest:
        if part.endswith("b") and part[:-1].isdigit():
            bits = int(part[:-1])
        elif part in ("remat", "absorb_v"):
            strategy = part
        elif part == "fused":
            fused = True
        else:
            raise UserError(f"'{part}' in '{label}': expected <bits>b, absorb_v or fused")
    return scheme, bits, strategy, fused


def _scheme_state(labels: list[str]) -> dict:
    """Session-state values of the scheme widgets for a list of labels."""
    out: dict = {"schemes": []}
    for lab in labels:
        s, b, strategy, fused = parse_label(lab)
        if s not in out["schemes"]:
            out["schemes"].append(s)
            out[f"bits:{s}"] = []
            out[f"strategy:{s}"] = strategy or ("remat" if SCHEMES[s].rematerializes else None)
            out[f"fused:{s}"] = fused
        if b not in out[f"bits:{s}"]:
            out[f"bits:{s}"].append(b)
    return out


def _labels(state) -> list[str]:
    """The SchemeConfig labels the scheme widgets ask for."""
    out = []
    for s in state["schemes"]:
        for b in state.get(f"bits:{s}", []):
            out.append(SchemeConfig(scheme=s, bits=b, strategy=state.get(f"strategy:{s}"),
                                    fused=state.get(f"fused:{s}", False)).label)
    return out


# ----------------------------------------------------------------------------- URL


def _from_url(qp: dict[str, str]) -> tuple[dict, list[str]]:
    """Session-state values from URL query parameters, and one warning per value that was not usable."""
    warnings = []
    state = {k: qp[k] for k in VIEW_KEYS if qp.get(k)}  # checked against their options when drawn (keep_valid)
    for key in URL_KEYS:
        raw = qp.get(key)
        if raw is None:
            continue
        try:
            if key == "view":
                if raw not in VIEWS:
                    raise UserError(f"'{raw}' is not allowed; allowed: {', '.join(VIEWS)}")
                state[key] = raw
            elif key == "hw":
                state[key] = [x for x in raw.split(",") if x]
            elif key == "model":
                state[key] = raw
            elif key == "schemes":
                state |= _scheme_state([x for x in raw.split(",") if x])
            elif key in ("batch", "at"):
                v = parse_count(raw)
                if not isinstance(v, int) or not 0 < v <= MAX_BATCH:
                    raise UserError(f"'{raw}' is not a count from 1 to {MAX_BATCH:,} like 16, 32k or 1M")
                state[key] = v if key == "batch" else min(CONTEXTS, key=lambda c: abs(c - v))
            elif key == "ctx":
                lo, _, hi = raw.partition("-")
                lo, hi = parse_count(lo), parse_count(hi)
                if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo < hi):
                    raise UserError(f"'{raw}' is not a range like 1k-1M")
                state[key] = tuple(min(CONTEXTS, key=lambda c, v=v: abs(c - v)) for v in (lo, hi))
            elif key == "rates":
                state[key] = rates.check(raw, "")
            elif key == "spec":  # links of earlier versions: spec=1 is rates=spec, spec=0 rates=fitted
                if raw not in ("0", "1"):
                    raise UserError(f"'{raw}' is not allowed; allowed: 0 (rates=fitted), 1 (rates=spec)")
                state.setdefault("rates", "spec" if raw == "1" else "fitted")
            elif key == "budget":
                state[key] = float(raw)
                if not 0 <= state[key] < float("inf"):
                    raise UserError(f"'{raw}' is not a size in GB; 0 means each GPU's usable memory")
            elif key == "dppl":
                state[key] = float(raw)
                if not 0 <= state[key] <= 1000:
                    raise UserError(f"'{raw}' is not a percentage from 0 to 1000")
        except (UserError, ValueError) as err:
            state.pop(key, None)
            warnings.append(f"URL: field '{key}': {err}; using the default")
    return state, warnings


def _to_url(state, ctx: tuple[int, int]) -> dict[str, str]:
    lo, hi = ctx
    return {"view": state["view"], "hw": ",".join(state["hw"]), "model": state["model"],
            "schemes": ",".join(_labels(state)), "batch": str(state["batch"]), "ctx": f"{tokens(lo)}-{tokens(hi)}",
            "at": tokens(state["at"]), "budget": f"{state['budget']:g}", "rates": state["rates"],
            "dppl": f"{state['dppl']:g}",
            **{k: state[k] for k in VIEW_KEYS if k in state}}


def init_state() -> list[str]:
    """Fill the session state once per session: defaults, then what the URL says. Returns URL warnings."""
    ss = st.session_state
    if "_init" not in ss:
        state = dict(DEFAULTS) | _scheme_state(DEFAULTS["schemes"])
        url, warnings = _from_url({k: st.query_params.get(k) for k in st.query_params})
        if "schemes" in url:  # the URL's schemes replace the default ones and their options
            state = {k: v for k, v in state.items() if ":" not in k}
        for k, v in (state | url).items():
            ss["_ctx_default" if k == "ctx" else k] = v  # a range slider learns it is one from its value=
        ss["_init"], ss["_url_warnings"], ss["_uploads_seen"] = True, warnings, set()
    return ss["_url_warnings"]


def keep_valid(key: str, options: list[str]) -> None:
    """Before a view's widget is drawn: drop a value (from the URL) that is not one of its options, saying so."""
    ss = st.session_state
    if key in ss and ss[key] not in options:
        st.error(f"URL: field '{key}': '{ss[key]}' is not allowed; allowed: {', '.join(options)}")
        del ss[key]


def write_url(c: Controls) -> None:
    """Put the page state into the URL query (when it changed)."""
    want = _to_url(st.session_state, c.contexts)
    if {k: st.query_params.get(k) for k in want} != want:
        st.query_params.from_dict(want)


# ----------------------------------------------------------------------------- the sidebar


@st.cache_resource(show_spinner=False)
def shipped() -> tuple[dict[str, HardwareProfile], dict[str, ModelSpec]]:
    """The shipped hardware profiles and models by name (read once per server)."""
    return {h.name: h for h in loading.list_hardware()}, {m.name: m for m in loading.list_models()}


def _uploads(box, taken: set[str]) -> tuple[list, list[str]]:
    """Validated specs of the uploaded YAML files (renamed if a shipped one has their name), and one error
    line per file that is not valid."""
    files = box.file_uploader("Your own GPU or model (YAML in the format of hardware/h100_sxm.yaml or "
                              "models/llama-3.1-8b.yaml)", type=["yaml", "yml"], accept_multiple_files=True,
                              key="uploads", help="validated like the CLI's files; not part of the shared URL")
    out, errors = [], []
    for f in files or []:
        try:
            spec = loading.parse_upload(f.name, f.getvalue())
        except UserError as err:
            errors.append(str(err))
            continue
        out.append(spec.model_copy(update={"name": f"{spec.name} (upload)"}) if spec.name in taken else spec)
    return out, errors


def _scheme_widgets(box) -> None:
    """Bits, strategy and fusion of each selected scheme."""
    ss = st.session_state
    for s in ss["schemes"]:
        allowed = list(SCHEMES[s].bits)
        ss.setdefault(f"bits:{s}", [SCHEMES[s].default_bits])
        ss[f"bits:{s}"] = [b for b in ss[f"bits:{s}"] if b in allowed]
        if not SCHEMES[s].compresses:
            continue
        box.multiselect(f"{s}: bits (16 = unquantized)", allowed, key=f"bits:{s}")
        if SCHEMES[s].rematerializes:
            ss.setdefault(f"strategy:{s}", "absorb_v")
            box.radio(f"{s}: strategy", ["remat", "absorb_v"], key=f"strategy:{s}", horizontal=True,
                      help="remat rebuilds K and V; absorb_v never rebuilds V: softmax(qK^T)(X Wv) = "
                           "(softmax(qK^T) X) Wv")
        ss.setdefault(f"fused:{s}", True)
        box.checkbox(f"{s}: fused (dequantize and rematerialize inside the attention kernel)", key=f"fused:{s}")


def view_picker() -> str:
    return st.radio("View", list(VIEWS), format_func=VIEWS.get, key="view", horizontal=True,
                    label_visibility="collapsed")


def _known_specs(upload_box, errors: list[str]) -> tuple[dict, dict]:
    """The shipped hardware and models plus the user's uploads (a new one selected at once), by name; a name in the
    URL that none of them has is an error line, and dropped."""
    ss = st.session_state
    hw_by_name, model_by_name = (dict(d) for d in shipped())
    uploaded, bad = _uploads(upload_box, set(hw_by_name) | set(model_by_name))
    errors += bad
    for spec in uploaded:
        (hw_by_name if isinstance(spec, HardwareProfile) else model_by_name)[spec.name] = spec
        if spec.name not in ss["_uploads_seen"]:  # show a new upload at once
            ss["_uploads_seen"].add(spec.name)
            if isinstance(spec, HardwareProfile):
                ss["hw"] = [*ss["hw"], spec.name]
            else:
                ss["model"] = spec.name
    unknown = [h for h in ss["hw"] if h not in hw_by_name]
    if unknown:
        errors.append(f"URL: field 'hw': unknown hardware '{unknown[0]}'{loading.suggest(unknown[0], list(hw_by_name))}"
                      f"; known: {', '.join(hw_by_name)}")
        ss["hw"] = [h for h in ss["hw"] if h in hw_by_name]
    if ss["model"] not in model_by_name:
        errors.append(f"URL: field 'model': unknown model '{ss['model']}'"
                      f"{loading.suggest(ss['model'], list(model_by_name))}; known: {', '.join(model_by_name)}; "
                      f"using {DEFAULTS['model']}")
        ss["model"] = DEFAULTS["model"]
    return hw_by_name, model_by_name


def sidebar() -> Controls:
    """Draw the sidebar; the selection resolved to specs, with one error line per thing that is not usable."""
    ss = st.session_state
    errors = list(init_state())
    box, upload_box = st.sidebar.container(), st.sidebar.container()
    hw_by_name, model_by_name = _known_specs(upload_box, errors)
    box.multiselect("GPUs", list(hw_by_name), key="hw",  # short names: a chip cuts "h100_sxm: NVIDIA H100..."
                    help="; ".join(f"{n}: {h.display_name}" for n, h in hw_by_name.items()))
    box.selectbox("Model", list(model_by_name), key="model",
                  format_func=lambda n: f"{n}: {model_by_name[n].display_name}")
    box.multiselect("Schemes", list(specs.SCHEMES), key="schemes")
    _scheme_widgets(box.expander("Bits, strategy and fusion per scheme", expanded=True))
    box.number_input("Batch [sequences]", min_value=1, max_value=MAX_BATCH, step=1, key="batch",
                     help="step time is at this batch; the capacity views run the largest batch that fits, up to it")
    ctx = box.select_slider("Context range [tokens]", options=CONTEXTS, value=ss["_ctx_default"], key="ctx",
                            format_func=tokens)
    box.select_slider("Context of the memory breakdown and roofline [tokens]", options=CONTEXTS, key="at",
                      format_func=tokens)
    box.number_input("Memory budget per GPU [GB] (0: 90% of its memory, as vLLM plans)", min_value=0.0,
                     step=8.0, key="budget")
    box.number_input("Verdict: largest perplexity increase [%]", min_value=0.0, max_value=1000.0, step=1.0,
                     key="dppl", help="relative to an fp16 cache, from the committed accuracy results "
                                      "(measurements/accuracy/, SmolLM2-135M)")
    box.radio("Rates", rates.MODES, key="rates", horizontal=True,
              help="spec: the datasheet roofline; fitted: a GPU's own fit for the engine a scheme runs on (h100_sxm "
                   "ships one of the torch engine, which runs unfused configurations), else spec, said on each "
                   "panel; transferred: else another GPU's fit for that engine")
    model = model_by_name[ss["model"]]
    configs = []
    for lab in _labels(ss):
        cfg = SchemeConfig(**dict(zip(("scheme", "bits", "strategy", "fused"), parse_label(lab), strict=True)))
        try:
            loading.resolve_for(cfg, model)
            configs.append(cfg)
        except UserError as err:
            errors.append(f"controls: field 'schemes': {err}")
    budget = float(ss["budget"]) * 1e9
    hws = with_budget([hw_by_name[h] for h in ss["hw"]], budget)
    all_hws = with_budget(list(hw_by_name.values()), budget)
    return Controls(view=ss["view"], hws=tuple(hws), all_hws=tuple(all_hws),
                    model=model, configs=tuple(configs), batch=int(ss["batch"]), contexts=tuple(ctx),
                    at=int(ss["at"]), budget_gb=float(ss["budget"]), max_delta_ppl=float(ss["dppl"]) / 100,
                    rate_mode=ss["rates"], errors=errors)

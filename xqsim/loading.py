"""Loading specs from YAML, and bad input as one line naming the file, the field and what is allowed."""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .scenario import ContextRange, Scenario, ScenarioScheme
from .specs import Figure, Fitted, HardwareProfile, ModelSpec, SchemeConfig, UserError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (its measurements, the dashboard's app.py)
DATA = Path(__file__).resolve().parent / "data"  # shipped with the package (in a checkout: links to its folders)
HARDWARE_DIR = DATA / "hardware"
MODELS_DIR = DATA / "models"
SCENARIOS_DIR = DATA / "scenarios"


def suggest(name: str, known: list[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''.

    A known name that starts with (or contains) what was typed wins over a merely similar one,
    so 'h100' suggests 'h100_sxm' rather than 'h200'; '-' and '_' and case are not told apart."""
    def norm(x: str) -> str:
        return x.lower().replace("-", "_")

    typed = norm(name)
    pool = [k for k in known if typed and norm(k).startswith(typed)] or \
        [k for k in known if len(typed) >= 3 and typed in norm(k)]
    by_norm = {norm(k): k for k in pool or known}
    close = difflib.get_close_matches(typed, list(by_norm), n=1, cutoff=0.0 if pool else 0.4)
    return f" (did you mean '{by_norm[close[0]]}'?)" if close else ""


def _members(tp: Any) -> list[Any]:
    """The alternatives of an annotation: Annotated and Optional/Union unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(tp) for m in _members(a)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_tag(part: Any) -> bool:
    """pydantic's union-branch and key markers in an error location, e.g. 'list[constrained-int]'."""
    return isinstance(part, str) and any(c in part for c in "[]()")


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that the error location `loc` (from root) points into, if it is one."""
    cands: list[Any] = [root]
    for part in loc:
        if _is_tag(part):
            named = [c for c in cands if _is_model(c) and re.search(rf"\b{c.__name__}\b", part)]
            cands = named or [c for c in cands if not _is_model(c)]
            continue
        nxt: list[Any] = []
        for c in cands:
            if _is_model(c):
                if isinstance(part, str) and part in c.model_fields:
                    nxt += _members(c.model_fields[part].annotation)
            elif get_origin(c) in (list, tuple) and isinstance(part, int):
                nxt += _members(get_args(c)[0])
            elif get_origin(c) is dict:
                nxt += _members(get_args(c)[1])
        cands = nxt
    models = [c for c in cands if _is_model(c)]
    return models[0] if len(models) == 1 else None


# Errors of a union branch that the input was not meant for ("should be a valid list" for a mapping).
_WRONG_BRANCH = ("list_type", "dict_type", "model_type", "model_attributes_type", "tuple_type")


def _pick_error(errors: list[dict]) -> dict:
    """The most useful of pydantic's errors: an unknown key first (a typo also reports the right key as
    missing), and never the complaint of a union branch that does not apply when another error is there."""
    useful = [e for e in errors if not (e["type"] in _WRONG_BRANCH and any(_is_tag(p) for p in e["loc"]))]
    useful = useful or errors
    return next((e for e in useful if e["type"] == "extra_forbidden"), useful[0])


_ROOTS: dict[str, type[BaseModel]] = {c.__name__: c for c in (HardwareProfile, ModelSpec, Scenario, SchemeConfig,
                                                             ScenarioScheme, ContextRange, Figure, Fitted)}


def _format_validation(path: Path | str, err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """One line: '<file>: field '<dotted.field>': <what is wrong and what is allowed>'."""
    root = root or _ROOTS.get(err.title)
    e = _pick_error(err.errors())
    parts = tuple(p for p in e["loc"] if not _is_tag(p))
    msg = e["msg"].removeprefix("Value error, ")
    if not parts and root is not None and e["type"] == "value_error":
        # a model-level check: name the first field its message mentions, e.g. 'bits=5 is not supported'
        fields = [w for w in re.findall(r"[A-Za-z_]\w*", msg) if w in root.model_fields]
        parts = tuple(fields[:1])
    loc = ".".join(str(p) for p in parts) or "(top level)"
    if e["type"] == "extra_forbidden":
        model = _model_at(root, e["loc"][:-1]) if root is not None else None
        allowed = ""
        if model is not None:
            known = list(model.model_fields)
            allowed = f"{suggest(str(e['loc'][-1]), known)}; allowed: {', '.join(known)}"
        return f"{path}: field '{loc}': unknown key{allowed}"
    if e["type"] == "literal_error":
        bad = e.get("input")
        exp = e.get("ctx", {}).get("expected", "")
        names = [x.strip().strip("'") for x in exp.replace(" or ", ", ").split(",")]
        return f"{path}: field '{loc}': '{bad}' is not allowed{suggest(str(bad), names)}; allowed: {exp}"
    if e["type"] == "missing":
        return f"{path}: field '{loc}': required but missing"
    if "input" in e and not isinstance(e["input"], dict | list):
        msg = f"{msg} (got {e['input']!r})"
    return f"{path}: field '{loc}': {msg}"


def read_yaml(path: Path) -> Any:
    """Parse one YAML file, or raise UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return parse_yaml_text(read_text(path), path)


def read_text(path: Path) -> str:
    """A text file's content, or a UserError naming it when it is not UTF-8 text (binary, another encoding)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise UserError(f"{path}: a binary file, not text (a NUL byte near the start)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: 0x{raw[err.start]:02x})") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one without a word, so a
    pasted second `memory_bytes:` would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):  # an unhashable key: SafeLoader's own error says so
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml_text(text: str, name: Path | str) -> Any:
    """Parse YAML text (a file's or an upload's), or raise UserError naming it."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{name}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def parse(cls: type[BaseModel], data: Any, path: Path | str) -> Any:
    """Validate data as cls, or raise UserError naming the file and field."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise UserError(f"{path}: expected a mapping of fields (name: value), got {got}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_validation(path, err, cls)) from None


def _known(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _resolve(ref: str | Path, folder: Path, what: str, base: Path | None, where: str = "") -> Path:
    """The file a name or path refers to; errors start with `where` (e.g. "scenario.yaml: field 'models.1'")."""
    prefix = f"{where}: " if where else ""
    p = Path(ref)
    for cand in ([base / p] if base and not p.is_absolute() else []) + [p]:
        if cand.suffix in (".yaml", ".yml") and cand.is_file():
            return cand
    if p.suffix in (".yaml", ".yml"):
        tried = base / p if base and not p.is_absolute() else p
        raise UserError(f"{prefix}{tried}: file not found")
    cand = folder / f"{ref}.yaml"
    if cand.is_file():
        return cand
    known = _known(folder)
    raise UserError(f"{prefix}unknown {what} '{ref}'{suggest(str(ref), known)}; known: {', '.join(known)} "
                    f"(or give a path to your own .yaml)")


def find_scenario(ref: Path) -> Path:
    """A scenario file as given, or, where no such file exists, the shipped scenario of that name (`long_ctx`)."""
    shipped = SCENARIOS_DIR / f"{Path(ref).stem}.yaml"
    if not Path(ref).exists() and Path(ref).name in (shipped.stem, shipped.name) and shipped.is_file():
        return shipped
    return Path(ref)


def load_hardware(ref: str | Path, base: Path | None = None, where: str = "") -> HardwareProfile:
    """A shipped profile by name (hardware/<name>.yaml) or a user's YAML file; `where` names the reference."""
    path = _resolve(ref, HARDWARE_DIR, "hardware", base, where)
    return parse(HardwareProfile, read_yaml(path), path)


def load_model(ref: str | Path, base: Path | None = None, where: str = "") -> ModelSpec:
    """A shipped model by name (models/<name>.yaml) or a user's YAML file; `where` names the reference."""
    path = _resolve(ref, MODELS_DIR, "model", base, where)
    return parse(ModelSpec, read_yaml(path), path)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    return parse(Scenario, read_yaml(path), path)


def parse_upload(name: str, data: bytes) -> HardwareProfile | ModelSpec:
    """A user's hardware profile or model from an uploaded YAML file, told apart by its keys."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name}: not a UTF-8 text file; upload a hardware or model .yaml") from None
    raw = parse_yaml_text(text, name)
    if isinstance(raw, dict) and "n_layers" in raw and "memory_bytes" not in raw:
        return parse(ModelSpec, raw, name)
    if isinstance(raw, dict) and "memory_bytes" not in raw:
        raise UserError(f"{name}: neither a hardware profile nor a model: expected the key 'memory_bytes' (as in "
                        f"hardware/h100_sxm.yaml) or 'n_layers' (as in models/llama-3.1-8b.yaml)")
    return parse(HardwareProfile, raw, name)


def list_hardware() -> list[HardwareProfile]:
    return [load_hardware(n) for n in _known(HARDWARE_DIR)]


def list_models() -> list[ModelSpec]:
    return [load_model(n) for n in _known(MODELS_DIR)]


def scheme_config(path: Path | str = "command line", **fields: Any) -> SchemeConfig:
    """Build a SchemeConfig from keyword fields, errors phrased for `path`."""
    return parse(SchemeConfig, {k: v for k, v in fields.items() if v is not None}, path)


def resolve_for(cfg: SchemeConfig, model: ModelSpec) -> SchemeConfig:
    """cfg with the model's defaults filled, or a UserError naming the model."""
    try:
        return cfg.resolved(model)
    except UserError as err:
        raise UserError(f"{cfg.label} on {model.name}: {err}") from None


# ----------------------------------------------------------------------------- output paths


def check_folder(out: Path, files: list[Path], force: bool, inputs=(), what: str = "command",
                 option: str = "-o DIR") -> None:
    """Before any work, that a command may write `files` into the folder `out`: the nearest part of `out` that
    exists is a writable folder, none of the files is one of the command's `inputs` (ever, --force or not), and
    none is there already unless `force`; else a UserError naming the path."""
    there = next(p for p in [out, *out.parents] if p.exists())  # the nearest part of the path that exists
    if not there.is_dir():
        raise UserError(f"{there}: is a file, not a folder; choose another {option}"
                        + (f" ({out} would be under it)" if there != out else ""))
    if not os.access(there, os.W_OK | os.X_OK):
        raise UserError(f"{there}: not writable; choose another {option}")
    mine = {Path(p).resolve() for p in inputs}
    own = [p for p in files if p.resolve() in mine]
    if own:
        raise UserError(f"{own[0]}: is an input of this {what}; the {what} would write over it: choose another "
                        f"{option}")
    folders = [p for p in files if p.is_dir()]
    if folders:
        raise UserError(f"{folders[0]}: is a folder; choose another {option}")
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists; choose another {option} or pass --force to overwrite")


def check_files(files: list[Path], force: bool, inputs=(), what: str = "command", option: str = "-o") -> None:
    """check_folder for files a command writes beside one another (OUT.json and OUT.csv, a profile YAML)."""
    check_folder(files[0].parent, files, force, inputs, what, option)


# ----------------------------------------------------------------------------- JSON out


def partial(path: Path) -> Path:
    """The temporary name a file is written under before it becomes `path` (hidden, beside it)."""
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, write) -> None:
    """write(tmp) under partial(path), then rename it over path: neither a reader nor an interruption ever finds a
    half-written file, and a failed write leaves the old file (if any) as it was and no temporary one."""
    tmp = partial(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_json(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON (no NaN or Infinity, which strict parsers reject): a non-finite number becomes null, and where
    the top level is an object its `non_finite` field names each such path and what it was ('inf', 'nan')."""
    import json
    import math

    replaced: dict[str, str] = {}

    def clean(x: Any, path: str) -> Any:
        if isinstance(x, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v, f"{path}.{i}") for i, v in enumerate(x)]
        if hasattr(x, "item") and not isinstance(x, str | bytes):  # numpy scalars
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            replaced[path] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
            return None
        return x

    out = clean(obj, "")
    if replaced and isinstance(out, dict):
        out["non_finite"] = replaced
    return json.dumps(out, indent=indent, allow_nan=False, default=str)

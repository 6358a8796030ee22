"""The `xqsim measure` file: its schema, read and checked row by row (for the calibration, validation and the
dashboard) and written (by the engine). A file is one JSON object: `device` (the GPU, driver and software, the
engine) and `rows`, one a measured configuration; beside it a flat CSV of the same rows. Analytic: no torch."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pandas as pd

from . import loading
from .loading import partial, read_text, to_json
from .specs import MAX_COUNT, SchemeConfig, UserError

# the measured step time a fit or a prediction is judged against: the replayed CUDA graph's, or the eager step's
TARGETS = {"graph": "step_time_graph_s", "eager": "step_time_s"}


def row_model_config(r: dict) -> tuple:
    """The (model with the measured number of layers, resolved SchemeConfig) a measured row ran."""
    return config_of(r["model"], r["layers"], json.dumps(r["config"], sort_keys=True))


@functools.cache
def config_of(name: str, layers: int, config: str):
    """row_model_config's value, cached by the row's (model, layers, config as sorted JSON)."""
    model = loading.load_model(name).model_copy(update={"n_layers": layers})
    cfg = SchemeConfig.stored(json.loads(config)).resolved(model)
    return model, cfg


REQUIRED = ("model", "layers", "config", "batch", "context", "status", "step_time_s", "ops")
STATUSES = ("ok", "oom", "invalid", "error")  # what `xqsim measure` writes: measured, out of memory, refused by the
# engine, failed in it (its error's first line kept, the grid going on)
# measured op names of files from before the analytic model named K/V schemes' two RoPE ops apart: the measured op
# is their sum
LEGACY_OPS = {"rope": ("rope_q", "rope_k")}


@functools.cache
def op_names(name: str, layers: int, config: str) -> frozenset[str]:
    """The names a measured row's ops may have: the analytic step's, and the LEGACY_OPS names standing for them."""
    from . import schemes

    model, cfg = config_of(name, layers, config)
    return frozenset({op.name for op in schemes.step_ops(model, cfg, 1, 1)} | set(LEGACY_OPS))


def read_measurements(paths: list[Path], device: str | None = None) -> tuple[list[dict], list[dict]]:
    """(device info per file, rows with status 'ok') from `xqsim measure` JSON files, all of one device and one
    engine (a row's `engine`: 'torch' for files measured before the Triton kernels, which name none); a file that
    is missing, not a measurement file, empty, of another device or of another engine is a UserError."""
    infos, rows, engine = [], [], None
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: file not found")
        try:
            data = json.loads(read_text(p))
        except json.JSONDecodeError as err:
            raise UserError(f"{p}: not a JSON measurement file ({err.msg} at line {err.lineno})") from None
        except ValueError as err:  # an integer of more than 4,300 digits
            raise UserError(f"{p}: not a JSON measurement file ({err})") from None
        if not is_measurement(data):
            raise UserError(f"{p}: not an `xqsim measure` file: expected keys 'device' and 'rows'")
        if not isinstance(data["rows"], list):
            raise UserError(f"{p}: field 'rows': expected a list of rows")
        if not isinstance(data["device"], dict):
            raise UserError(f"{p}: field 'device': expected an object")
        for i, r in enumerate(data["rows"]):
            if not isinstance(r, dict):
                raise UserError(f"{p}: field 'rows.{i}': expected an object")
        ok = [(i, r) for i, r in enumerate(data["rows"]) if r.get("status") == "ok"]
        if not ok:
            raise UserError(f"{p}: no measured rows (status 'ok')")
        for i, r in enumerate(data["rows"]):  # a row of no known status is not silently passed over
            if r.get("status") not in STATUSES:
                raise UserError(f"{p}: field 'rows.{i}.status': {r.get('status')!r} is not allowed; allowed: "
                                f"{', '.join(STATUSES)}")
        for i, r in ok:
            _check_row(p, i, r)
        for k in ("device_name", "engine"):
            if not isinstance(data["device"].get(k, ""), str):
                raise UserError(f"{p}: field 'device.{k}': expected a name (got {data['device'][k]!r})")
        name = data["device"].get("device_name", "?")
        if device and name != device:
            raise UserError(f"{p}: field 'device.device_name': '{name}', but the other files are from '{device}'; "
                            f"calibrate one device at a time")
        device = name
        eng = data["device"].get("engine", "torch")
        if engine and eng != engine:
            raise UserError(f"{p}: field 'device.engine': '{eng}', but the other files are from the '{engine}' "
                            f"engine; calibrate one engine at a time")
        engine = eng
        infos.append(data["device"])
        rows += [{"engine": eng} | r | {"file": p.name} for _, r in ok]
    return infos, rows


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_row(p: Path, i: int, r: dict) -> None:
    """A measured row (status 'ok') as the fit and the predictions read it, or a UserError naming its field: the
    keys a row has, a model this xqsim knows with its layers, a configuration valid for it, whole positive batch
    and context, and times that are finite and positive (a step) or finite and not negative (an op)."""
    where = f"{p}: field 'rows.{i}"
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise UserError(f"{where}': missing {', '.join(missing)}")
    for k in ("layers", "batch", "context"):
        if not isinstance(r[k], int) or isinstance(r[k], bool) or not 1 <= r[k] < MAX_COUNT:
            raise UserError(f"{where}.{k}': expected a whole number from 1 to {MAX_COUNT - 1:,} (got {r[k]!r})")
    if not isinstance(r["model"], str) or not isinstance(r["config"], dict):
        raise UserError(f"{where}': 'model' must be a name and 'config' an object")
    try:
        full = loading.load_model(r["model"])
    except UserError as err:
        raise UserError(f"{where}.model': {err}") from None
    if r["layers"] > full.n_layers:  # `measure --layers` keeps at most the model's own
        raise UserError(f"{where}.layers': {r['layers']} is more than {full.name}'s {full.n_layers} layers")
    try:
        _, cfg = row_model_config(r)
    except UserError as err:
        raise UserError(f"{where}.config': {err}") from None
    except ValueError as err:  # pydantic's, from a stored configuration it refuses
        msg = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise UserError(f"{where}.config': {msg}") from None
    for k in ("scheme", "bits", "fused"):  # the row's own copies, which the fit and the reports group by
        if k in r and (r[k] != getattr(cfg, k) or isinstance(r[k], bool) != isinstance(getattr(cfg, k), bool)):
            raise UserError(f"{where}.{k}': {r[k]!r}, but its config says {getattr(cfg, k)!r}")
    if not isinstance(r.get("label", ""), str):
        raise UserError(f"{where}.label': expected a name (got {r['label']!r})")
    for k in TARGETS.values():
        if k in r and not (_finite(r[k]) and r[k] > 0):
            raise UserError(f"{where}.{k}': {r[k]!r} is not a time; expected a finite number of seconds > 0")
    if not isinstance(r["ops"], dict):
        raise UserError(f"{where}.ops': expected an object of ops")
    known = op_names(r["model"], r["layers"], json.dumps(r["config"], sort_keys=True))
    for name, m in r["ops"].items():
        if name not in known:
            raise UserError(f"{where}.ops.{name}': not an op of {SchemeConfig.stored(r['config']).label}'s decode "
                            f"step; known: {', '.join(sorted(known))}")
        for k in ("time_s", "kernel_time_s"):
            v = (m.get(k, 0.0) if k == "kernel_time_s" else m.get(k)) if isinstance(m, dict) else None
            if not (_finite(v) and v >= 0):
                raise UserError(f"{where}.ops.{name}.{k}': {v!r} is not a time; expected a finite number of "
                                f"seconds >= 0")


def write_measurements(out: Path, info: dict, rows: list[dict], on_written=None) -> None:
    """Measured rows as OUT.json (device, software, every row with its config and ops) and OUT.csv (flat). Both are
    written under temporary names first, then renamed over the old ones with Ctrl-C held back until both renames are
    done and `on_written()` has run: an interruption at any moment leaves both files at the previous row count or both
    at the new one, and `on_written` runs exactly when they hold the new one (so a count kept by it is never off)."""
    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k not in ("config", "ops")}
            | {f"t_{n}_s": o["time_s"] for n, o in r.get("ops", {}).items()}
            | {f"k_{n}_s": o["kernel_time_s"] for n, o in r.get("ops", {}).items() if "kernel_time_s" in o}
            for r in rows]
    table = pd.DataFrame(flat).assign(**{k: v for k, v in info.items() if not isinstance(v, dict)})
    moves = []
    try:
        for suffix, write in ((".json", lambda p: p.write_text(to_json({"device": info, "rows": rows}))),
                              (".csv", lambda p: table.to_csv(p, index=False))):
            final = out.with_suffix(suffix)
            tmp = partial(final)
            moves.append((tmp, final))
            write(tmp)
    except BaseException:  # interrupted before the renames: both old files stand, no temporary file is left
        for tmp, _ in moves:
            tmp.unlink(missing_ok=True)
        raise
    interrupted = None
    for tmp, final in moves:
        while tmp.exists():  # finish every rename, then pass a Ctrl-C that came meanwhile on
            try:
                os.replace(tmp, final)
            except KeyboardInterrupt as err:
                interrupted = err
    while on_written is not None:
        try:
            on_written()
            on_written = None
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def is_measurement(data) -> bool:
    """Whether parsed JSON is an `xqsim measure` file (device and rows, each row with a status), not another JSON
    kept beside them (a benchmark's table of kernel timings also has device and rows)."""
    if not (isinstance(data, dict) and {"device", "rows"} <= data.keys()):
        return False
    rows = data["rows"]
    return not (isinstance(rows, list) and rows and isinstance(rows[0], dict) and "status" not in rows[0])

"""`xqsim measure`, `calibrate`, `validate` and `accuracy`: the commands that run the engine or read what it
measured (they import torch, scipy or the engine only when they run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import loading, specs
from .cli import _count, app, console, out_path, scheme_options
from .scenario import scheme_configs
from .schemes import SCHEMES, rematerializing
from .specs import UserError


@app.command()
@scheme_options
def measure(
    grid: Annotated[Path | None, typer.Option(help="measurement grid YAML (see measurements/h100/grid_*.yaml)")] = None,
    model: Annotated[str | None, typer.Option(help="model name or .yaml (single configuration)")] = None,
    scheme: Annotated[str | None, typer.Option(help=f"one of {', '.join(specs.SCHEMES)}")] = None,
    batch: Annotated[str, typer.Option(help="sequences")] = "1",
    context: Annotated[str, typer.Option(help="tokens, e.g. 4k")] = "1024",
    layers: Annotated[int | None, typer.Option(help="keep this many layers of the model")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp32 (cpu), bf16 or fp16 (cuda); default: the grid's, "
                                                  "else fp32")] = None,
    kernels: Annotated[str | None, typer.Option(help="engine: triton (Triton kernels; the default on cuda) "
                                                    "or torch (plain torch ops, the reference; the default on "
                                                    "cpu)")] = None,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 20,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 3,
    out: Annotated[Path | None, typer.Option("-o", "--out", parser=out_path,
                                             help="write rows to OUT.json and OUT.csv")] = None,
    force: Annotated[bool, typer.Option(help="overwrite OUT")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the (single) result as JSON")] = False,
    options: dict | None = None,
) -> None:
    """Run and time decode steps of the engine (CUDA events on a GPU, perf_counter on CPU): a grid, or one
    configuration (--scheme with SchemeConfig's options: --bits, --strategy, ...)."""
    try:
        from .engine import measure as m
    except ImportError as err:
        raise UserError(f"the engine needs torch: pip install -e '.[engine]' ({err})") from None
    g = loading.parse(m.MeasureGrid, loading.read_yaml(grid), grid) if grid is not None else None
    for name, v, least in (("repeats", repeats, 1), ("warmup", warmup, 0), ("layers", layers, 1)):
        if v is not None and v < least:
            raise UserError(f"command line: field '{name}': {v} is not allowed; at least {least}")
    dev, dt = m.check_device(device, dtype if dtype is not None else g.dtype if g else "fp32")
    kernels = m.check_kernels(kernels, dev)
    if g is not None:
        specs_, configs, batches, contexts, repeats, warmup, max_tokens = _grid_plan(g, grid)
    else:
        if model is None or scheme is None:
            raise UserError("command line: give --grid FILE, or --model and --scheme for one configuration")
        specs_ = [_kept_layers(loading.load_model(model, where="command line: field 'model'"), layers)]
        configs = [loading.scheme_config(scheme=scheme, **(options or {}))]
        batches, contexts, max_tokens = [_count(batch, "batch")], [_count(context, "context")], 2**62
        loading.resolve_for(configs[0], specs_[0])
    total = _check_points(m, grid, specs_, configs, batches, contexts, max_tokens, dev, dt)
    paths = _check_out(out, force, grid, g, model)
    info = m.device_info(dev) | {"engine": kernels}
    rows: list[dict] = []
    kept = [0]  # rows in both files
    on_row = _row_sink(rows, kept, out, info, total, as_json)
    console.print(f"measuring {total} configurations on {info['device_name']} with the {kernels} engine "
                  f"(torch {info['torch']})") \
        if not as_json else None
    try:
        m.run_grid(specs_, configs, batches, contexts, dev, dt, repeats, warmup, max_tokens, on_row, kernels)
    except KeyboardInterrupt:
        where = f" in {paths[0]} and {paths[1]}" if out else ""
        print(f"xqsim: interrupted; {kept[0]} rows kept{where}" if kept[0] else
              "xqsim: interrupted; no row measured yet" + (", nothing written" if out else ""), file=sys.stderr)
        sys.exit(130)
    if as_json:
        print(loading.to_json({"device": info} | (rows[0] if len(rows) == 1 else {"rows": rows})))


def _check_points(m, grid: Path | None, specs_, configs, batches, contexts, max_tokens: int, dev, dt) -> int:
    """The number of points to measure; before the first, every point that cannot fit the device is refused (not
    after hours)."""
    total = sum(1 for _ in specs_ for _ in configs for b in batches for t in contexts if b * t <= max_tokens)
    if not total:
        raise UserError(f"{grid}: field 'max_tokens': every batch x context is above {max_tokens:,} tokens; nothing "
                        f"to measure")
    for spec, cfg in ((s, c) for s in specs_ for c in configs if _resolves(c, s)):
        for b, t in ((b, t) for b in batches for t in contexts if b * t <= max_tokens):
            m.check_fits(spec, cfg, b, t, dev, dt, where=str(grid) if grid is not None else "command line")
    return total


def _check_out(out: Path | None, force: bool, grid: Path | None, g, model: str | None) -> list[Path]:
    """OUT.json and OUT.csv, checked before any work: a name (not a folder), writable, not an input of this run,
    not a file already there unless --force."""
    if out is None:
        return []
    if out.name in ("", ".", ".."):
        raise UserError(f"command line: field 'out': '{out}' is a folder; give a name (OUT.json and OUT.csv are "
                        f"written)")
    paths = [out.with_suffix(".json"), out.with_suffix(".csv")]
    inputs = [p for p in (grid, Path(model or "")) if p is not None and p.suffix in (".yaml", ".yml", ".json")]
    inputs += [grid.parent / x for x in (g.models if g else []) if x.endswith((".yaml", ".yml"))]
    loading.check_files(paths, force, inputs, what="measurement", option="-o OUT")
    return paths


def _row_sink(rows: list[dict], kept: list[int], out: Path | None, info: dict, total: int, as_json: bool):
    """What `measure` does with each measured row: keep it, rewrite OUT.json and OUT.csv (kept[0] follows the files:
    set once both hold the new row, even if a Ctrl-C came meanwhile) and print a line."""
    from .measurements import write_measurements

    def on_row(row: dict) -> None:
        rows.append(row)
        if out:
            write_measurements(out, info, rows, on_written=lambda: kept.__setitem__(0, len(rows)))
        else:
            kept[0] = len(rows)
        if not as_json:
            what = f"{row['model']} {row['label']} B={row['batch']} T={row['context']}"
            took = f"{row['step_time_s'] * 1e3:.3f} ms" if row["status"] == "ok" else row["status"]
            if row["status"] == "error":
                took += f" ({row['error']})"
            if "step_time_graph_s" in row:
                took += f" (graph {row['step_time_graph_s'] * 1e3:.3f} ms)"
            console.print(f"[{len(rows)}/{total}] {what}: {took}")

    return on_row


def _resolves(cfg, spec) -> bool:
    """Whether cfg fits the model's shapes (one that does not is measured as an 'invalid' row, saying why)."""
    try:
        cfg.resolved(spec)
        return True
    except UserError:
        return False


def _kept_layers(spec, layers: int | None):
    """The model with its first `layers` layers (all where None or more)."""
    return spec.model_copy(update={"n_layers": min(layers, spec.n_layers)}) if layers else spec


def _grid_plan(g, grid: Path) -> tuple:
    """A measurement grid's models (with the layers it keeps), configurations, batches, contexts, repeats, warm-up
    steps and token limit."""
    specs_ = [_kept_layers(loading.load_model(x, grid.parent, f"{grid}: field 'models.{i}'"), g.layers)
              for i, x in enumerate(g.models)]
    return specs_, scheme_configs(g.schemes, grid), g.batch, g.context, g.repeats, g.warmup, g.max_tokens


@app.command()
def calibrate(
    measurements: Annotated[list[Path], typer.Argument(help="`xqsim measure` JSON files of one device")],
    hardware: Annotated[str, typer.Option(help="the profile whose spec figures the fit scales")],
    out: Annotated[Path | None, typer.Option("-o", "--out", parser=out_path, help="profile YAML to write "
                                             "(default hardware/<name>_fitted.yaml)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite OUT")] = False,
    target: Annotated[str | None, typer.Option(help="fit the CUDA-graph step (graph, the default where "
                                                    "measured) or the eager step (eager)")] = None,
) -> None:
    """Fit per-class overheads and efficiencies to measured steps; write a new profile with a `fitted:` block."""
    import datetime

    from . import calibrate as cal
    from .measurements import read_measurements

    hw = loading.load_hardware(hardware, where="command line: field 'hardware'")
    out = out or loading.HARDWARE_DIR / f"{hw.name}_fitted.yaml"
    # before any work: a path that cannot be written, one of the measurement files or the profile, a file there
    loading.check_files([out], force, [*measurements, Path(hardware)], what="calibration", option="-o FILE")
    infos, rows = read_measurements(measurements)
    fitted, report = cal.fit(rows, hw, "", _target(target))
    versions = ", ".join(f"{k} {infos[0][k]}" for k in ("torch", "triton") if infos[0].get(k))
    fitted = fitted.model_copy(update={"source": (
        f"xqsim calibrate on {report['n']} configurations of the {fitted.engine} engine from "
        f"{', '.join(p.name for p in measurements)} ({infos[0]['device_name']}, {versions}), "
        f"{datetime.date.today().isoformat()}")})
    if not (fitted.mem_efficiency or fitted.compute_efficiency or fitted.overhead_s
            or fitted.factors):  # a profile that claims a fit it does not hold
        raise UserError(f"{measurements[0]}: the {report['n']} configurations determine none of the fit's parameters "
                        f"(each must weigh in at least 3 of them); measure more, nothing written")
    cal.write_profile(hw, fitted, out)
    t = Table(title=f"Fitted on {report['n']:,} measured {report['target']} steps: median error "
                    f"{report['median_abs_pct']:.1f}%, p90 {report['p90_abs_pct']:.1f}% (in sample)",
              title_justify="left")
    for c in ("op class", "overhead per kernel", "bandwidth / spec", "FLOP rate / spec"):
        t.add_column(c)
    for c in specs.OP_CLASSES:
        o, m, f = fitted.overhead_s.get(c), fitted.mem_efficiency.get(c), fitted.compute_efficiency.get(c)
        t.add_row(c, f"{o * 1e6:.1f} µs" if o else "—", f"{m:.3f}" if m else "—", f"{f:.3f}" if f else "—")
    console.print(t)
    for k, v in fitted.factors.items():
        console.print(f"{specs.FACTORS[k][0]}: x{v:.2f} time")
    if report["not_determined"]:
        console.print(f"not determined by these measurements (spec value kept): {', '.join(report['not_determined'])}")
    console.print(f"wrote {out}")


@app.command()
def validate(
    measurements: Annotated[list[Path], typer.Argument(help="`xqsim measure` JSON files of one device")],
    hardware: Annotated[str, typer.Option(help="profile to predict with (its fitted block if any)")],
    transfer_from: Annotated[str | None, typer.Option(help="use this profile's fitted efficiencies on "
                                                          "--hardware's spec figures")] = None,
    held_out: Annotated[str | None, typer.Option(help="refit without each block: context, batch or scheme")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", parser=out_path,
                                             help="folder for the table and plots")] = None,
    force: Annotated[bool, typer.Option(help="overwrite the table and plots in OUT")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    target: Annotated[str | None, typer.Option(help="judge against the CUDA-graph step (graph) or the eager "
                                                    "step (eager); default: the fitted block's")] = None,
    spec_only: Annotated[bool, typer.Option("--spec-only", help="ignore the profile's fitted block")] = False,
) -> None:
    """Predict every measured configuration; report the error overall, per regime and per scheme."""
    from . import validation as val
    from .measurements import read_measurements

    if out is not None:  # before any work: never over an input, nor a file that is there unless --force
        written = [out / "validation.csv", out / "validation.png", out / "validation.svg"]
        loading.check_folder(out, written, force, measurements, what="validation")
    hw = loading.load_hardware(hardware, where="command line: field 'hardware'")
    if spec_only or held_out:  # a held-out fit starts from the spec figures
        hw = hw.model_copy(update={"fitted": None})
    if transfer_from:
        hw = val.transferred(hw, loading.load_hardware(transfer_from, where="command line: field 'transfer_from'"))
    if held_out not in (None, *val.HELD_OUT):
        raise UserError(f"command line: field 'held_out': '{held_out}' is not allowed; allowed: "
                        f"{', '.join(val.HELD_OUT)}")
    _, rows = read_measurements(measurements)
    df, report = val.validation(rows, hw, held_out, _target(target))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        loading.write_atomic(out / "validation.csv", lambda p: df.to_csv(p, index=False))
        val.plot_validation(df, out / "validation")
    if as_json:
        print(loading.to_json(report))
        return
    t = Table(title=f"{len(df)} configurations on {hw.name} ({report['profile']} rates, {report['target']} "
                    f"steps, held out: {report['held_out']})", title_justify="left")
    for c in ("", "n", "median |error|", "p90", "max"):
        t.add_column(c, justify="left" if not c else "right")
    blocks = [("all", report)] + [(f"regime {k}", v) for k, v in report["per_regime"].items()] + \
        [(f"scheme {k}", v) for k, v in report["per_scheme"].items()] + \
        [(k.replace("_", " "), report[k]) for k in ("fused_tiled", "per_op") if k in report]
    for name, r in blocks:
        t.add_row(name, str(r["n"]), *(f"{r[k]:.1f}%" for k in ("median_abs_pct", "p90_abs_pct", "max_abs_pct")))
    console.print(t)


def _target(target: str | None) -> str | None:
    if target not in (None, "graph", "eager"):
        raise UserError(f"command line: field 'target': '{target}' is not allowed; allowed: graph, eager")
    return target


@app.command()
def accuracy(
    model: Annotated[str, typer.Option(help="model with real weights (smollm2-135m) or a .gguf file")] = "smollm2-135m",
    schemes: Annotated[str | None, typer.Option(help="comma-separated schemes, e.g. kivi,xquant")] = None,
    bits: Annotated[str, typer.Option(help="comma-separated code bits; 16 = unquantized")] = "2,3,4,8",
    strategy: Annotated[str | None, typer.Option(help="remat or absorb_v (default absorb_v: same logits)")] = None,
    grid: Annotated[Path | None, typer.Option(help="accuracy grid YAML (measurements/accuracy/grid.yaml)")] = None,
    tokens: Annotated[str, typer.Option(help="tokens of the evaluation slice")] = "3072",
    context: Annotated[str, typer.Option(help="tokens per window (cache emptied between windows)")] = "512",
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file (default: the Britannica article)")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", parser=out_path, help="output folder")] = \
        Path("measurements/accuracy"),
    force: Annotated[bool, typer.Option(help="overwrite the files of a previous run there")] = False,
    jobs: Annotated[int, typer.Option(help="configurations run at once, one torch thread each (at most 256)")] = 1,
) -> None:
    """Perplexity, logit error and top-1 agreement of each scheme on a real model, decoding token by token."""
    try:
        from . import accuracy as acc
    except ImportError as err:
        raise UserError(f"the accuracy run needs torch: pip install -e '.[engine,accuracy]' ({err})") from None
    if grid is not None:
        g = loading.parse(acc.AccuracyGrid, loading.read_yaml(grid), grid)
        configs, model, n, c = scheme_configs(g.schemes, grid), g.model, g.tokens, g.context
        text = text or (grid.parent / g.text if g.text else None)
    else:
        if not schemes:
            raise UserError("command line: give --schemes (e.g. kivi,xquant) or --grid FILE")
        n, c = _count(tokens, "tokens"), _count(context, "context")
        if c < 2:  # a window predicts its tokens 2..c from the ones before
            raise UserError("command line: field 'context': a window needs at least 2 tokens")
        names = [s.strip() for s in schemes.split(",")]
        if strategy is not None and not any(n in SCHEMES and SCHEMES[n].rematerializes for n in names):
            raise UserError(f"command line: field 'strategy': applies only to rematerializing schemes "
                            f"{rematerializing()}; --schemes lists none")
        configs = [_accuracy_config(s, b, strategy) for s in names for b in dict.fromkeys(_ints(bits, "bits"))]
        configs = list(dict.fromkeys(configs))
    if not 1 <= jobs <= 256:
        raise UserError(f"command line: field 'jobs': {jobs} is not allowed; from 1 to 256")
    jobs = min(jobs, len(configs))  # a process per configuration at most
    acc.check_writable(out, force, [x for x in (grid, text, Path(model)) if x is not None])
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        tasks: dict[int, int] = {}

        def start(i: int, label: str, steps: int) -> None:
            tasks[i] = progress.add_task(f"{label} ({i}/{len(configs)})", total=steps)

        try:
            df = acc.run(model, configs, n, c, text, out, max(jobs, 1), start, lambda i: progress.advance(tasks[i]),
                         g.model_dump(mode="json") if grid else None)
        except KeyboardInterrupt:
            print(f"xqsim: interrupted; finished configurations kept in {out}/accuracy.csv", file=sys.stderr)
            sys.exit(130)
    t = Table(title=f"{df['model'].iloc[0]} on {df['text'].iloc[0]}: {df['windows'].iloc[0]} windows x {c} tokens",
              title_justify="left")
    for col in ("scheme", "mem (paper)", "mem (full)", "ppl", "ΔPPL", "mean |Δlogit|", "top-1"):
        t.add_column(col, justify="left" if col == "scheme" else "right")
    for r in df.itertuples():
        t.add_row(r.label, f"{r.mem_ratio_paper:.3f}", f"{r.mem_ratio_full:.3f}", f"{r.ppl:.3f}", f"{r.delta_ppl:+.4f}",
                  f"{r.logit_err_mean:.2e}", f"{r.top1_agree:.4f}")
    console.print(t)
    console.print(f"wrote {out}/accuracy.csv, accuracy.json, delta_ppl_vs_memory.png/.svg")


def _accuracy_config(name: str, bits: int, strategy: str | None):
    """One `accuracy --schemes` entry at `bits` (the baseline has none), with the strategy where the scheme
    rematerializes (K/V schemes take none); an unknown name is loading's one-line error."""
    sch = SCHEMES.get(name)
    return loading.scheme_config(scheme=name, bits=bits if sch is None or sch.compresses else None,
                                 strategy=strategy if sch is not None and sch.rematerializes else None)


def _ints(value: str, field: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"command line: field '{field}': expected comma-separated integers (got {value!r})") from None
    if not out:
        raise UserError(f"command line: field '{field}': expected comma-separated integers (got {value!r})")
    return out

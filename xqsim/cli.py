"""`xqsim`: estimate one configuration, sweep a scenario, list hardware and models, open the dashboard."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import loading, specs
from .specs import REMAT_SCHEMES, UserError

try:  # typer < 0.20 raises click's exceptions; newer typer vendors click as its own
    from click.exceptions import ClickException as _ClickException
except ImportError:
    _ClickException = typer.TyperException
CLI_ERRORS = tuple({_ClickException, getattr(typer, "TyperException", _ClickException)})

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which KV-cache scheme wins on which GPU, and where the answer flips.")
hw_app = typer.Typer(no_args_is_help=True, help="Hardware profiles.")
models_app = typer.Typer(no_args_is_help=True, help="Model shapes.")
app.add_typer(hw_app, name="hw")
app.add_typer(models_app, name="models")
console = Console(width=None if sys.stdout.isatty() else 160)


MAX_COUNT = {"batch": 2**20, "context": 2**31}  # sequences; tokens (2.1 billion): far past any GPU's memory


def _count(value: str, field: str) -> int:
    """A whole positive count like 16, 32k or 1M, at most MAX_COUNT[field]; else a one-line error."""
    most = MAX_COUNT.get(field, 2**31)
    x = specs.count_value(str(value))
    if not (math.isfinite(x) and x == int(x) and 0 < x <= most):
        raise UserError(f"command line: field '{field}': expected a positive integer like 16, 32k or 1M, at "
                        f"most {most:,} (got {value!r})")
    return int(x)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


@app.command()
def estimate(
    hardware: Annotated[str, typer.Option(help="profile name (xqsim hw list) or a .yaml file")],
    model: Annotated[str, typer.Option(help="model name (xqsim models list) or a .yaml file")],
    scheme: Annotated[str, typer.Option(help=f"one of {', '.join(specs.SCHEMES)}")],
    batch: Annotated[str, typer.Option(help="sequences decoded together")] = "1",
    context: Annotated[str, typer.Option(help="tokens in the cache, e.g. 32768 or 32k")] = "4096",
    bits: Annotated[int | None, typer.Option(help="code bits; 16 = unquantized; default: the scheme's paper's "
                                                 "(xqsim.specs.DEFAULT_BITS)")] = None,
    group: Annotated[int | None, typer.Option(help="quantization group size")] = None,
    residual: Annotated[int | None, typer.Option(help="fp16 residual window [tokens]")] = None,
    strategy: Annotated[str | None, typer.Option(help="remat or absorb_v")] = None,
    fused: Annotated[bool, typer.Option(help="fuse dequant/remat into attention")] = False,
    first_layers: Annotated[int | None, typer.Option(help="leading layers kept at --first-bits")] = None,
    first_bits: Annotated[int | None, typer.Option(help="bits of the leading layers")] = None,
    rank_k: Annotated[int | None, typer.Option(help="key latent rank (GQA variants)")] = None,
    rank_v: Annotated[int | None, typer.Option(help="value latent rank (GQA variants)")] = None,
    v_bits: Annotated[int | None, typer.Option(help="xquant_yang value bits")] = None,
    share_from: Annotated[int | None, typer.Option(help="xquant_yang: first layer of code sharing")] = None,
    spec_only: Annotated[bool, typer.Option("--spec-only", help="ignore the profile's fitted block")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """One configuration: ops, memory (paper and full accounting), step time, capacity."""
    from .estimate import estimate as run_estimate

    hw = loading.load_hardware(hardware, where="command line: field 'hardware'")
    m = loading.load_model(model, where="command line: field 'model'")
    cfg = loading.scheme_config(
        scheme=scheme, bits=bits, group=group,
        residual=residual, strategy=strategy, fused=fused, first_layers=first_layers, first_bits=first_bits,
        rank_k=rank_k, rank_v=rank_v, v_bits=v_bits, share_from=share_from)
    try:  # options that do not fit this model's shapes (e.g. a rank above its dkv)
        cfg.resolved(m)
    except UserError as err:
        raise UserError(f"command line: {_named_field(str(err))}{err}") from None
    r = run_estimate(hw, m, cfg, _count(batch, "batch"), _count(context, "context"), fitted=not spec_only)
    if as_json:
        print(loading.to_json(r))
        return
    _print_estimate(r)


def _print_estimate(r: dict) -> None:
    t = Table(title=f"{r['label']} · {r['model']} · {r['hardware']} ({r['profile']} rates) · "
                    f"batch {r['batch']} · context {r['context']}", title_justify="left")
    for c in ("op", "class", "×layers", "GFLOP", "MB read", "MB written", "FLOP/B", "µs each", "bound"):
        t.add_column(c, justify="left" if c in ("op", "class", "bound") else "right")
    for o in r["ops"]:
        t.add_row(o["name"], o["op_class"], str(o["layers"]), f"{o['flops'] / 1e9:,.3f}",
                  f"{o['bytes_read'] / 1e6:,.2f}", f"{o['bytes_written'] / 1e6:,.2f}",
                  f"{o['intensity_flop_per_byte']:,.1f}", f"{o['time_s'] * 1e6:,.1f}", o["bound"])
    console.print(t)
    full, paper = r["accounting"]["full"], r["accounting"]["paper"]
    m = Table(title="Memory", title_justify="left")
    m.add_column("what")
    m.add_column("bytes", justify="right")
    for label, key in (("weights", "weights_bytes"), ("cache codes", "cache_codes_bytes"),
                       ("cache metadata (fp16 scale+zero)", "cache_metadata_bytes"),
                       ("cache fp16 residual window", "cache_residual_bytes"),
                       ("cache total (full accounting)", "cache_bytes"), ("transient peak", "transient_bytes"),
                       ("total", "total_bytes"), ("usable capacity", "capacity_bytes")):
        m.add_row(label, _gb(r[key]))
    m.add_row("cache, paper accounting", _gb(paper["cache_bytes"]))
    console.print(m)
    console.print(
        f"paper accounting: normalized KV size {paper['normalized_kv_size']:.4f} "
        f"({paper['compression_x']:.2f}x), equivalent bits {paper['equivalent_bits']:.4f}\n"
        f"full accounting: cache {full['ratio_vs_fp16_kv']:.4f} of fp16 KV at this context "
        f"(residual window included; transient buffers apart: {_gb(r['transient_bytes'])})\n"
        f"step {r['step_time_s'] * 1e3:.3f} ms ({r['bound']}-bound; compute {r['t_compute_s'] * 1e3:.3f} ms, "
        f"memory {r['t_mem_s'] * 1e3:.3f} ms, overhead {r['t_overhead_s'] * 1e3:.3f} ms), "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['flops'] / 1e12:.3f} TFLOP and {r['bytes_moved'] / 1e9:.3f} GB "
        f"per step\nfits: {r['fits']}; max batch at this context {r['max_batch']:,}; max context at this batch "
        f"{r['max_context']:,}; throughput at the largest batch that fits (≤{r['batch']}): "
        f"{r['throughput_cap_tokens_per_s']:,.0f} tokens/s")


def _named_field(msg: str, prefix: str = "") -> str:
    """"field 'PREFIX.NAME': " for the first scheme option a check's message mentions, e.g. 'bits=5 ...'."""
    names = [w for w in re.findall(r"[A-Za-z_]\w*", msg) if w in specs.SchemeConfig.model_fields]
    field = ".".join(x for x in (prefix, names[0] if names else "") if x)
    return f"field '{field}': " if field else ""


def _scenario_configs(scenario: specs.Scenario, path: Path) -> list[specs.SchemeConfig]:
    configs = []
    for i, entry in enumerate(scenario.schemes):
        try:
            configs += entry.expand()
        except ValidationError as err:
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise UserError(f"{path}: {_named_field(msg, f'schemes.{i}')}{msg}") from None
    return list(dict.fromkeys(configs))


@app.command()
def recommend(
    model: Annotated[str, typer.Option(help="model name (xqsim models list) or a .yaml file")],
    hardware: Annotated[str, typer.Option(help="profiles, comma-separated (xqsim hw list) or .yaml files")] =
    "h100_sxm,h200,a100_80gb,b200",
    batch: Annotated[str, typer.Option(help="the most sequences you would decode together")] = "16",
    context: Annotated[str, typer.Option(help="tokens per sequence, e.g. 32k")] = "32k",
    max_delta_ppl: Annotated[str, typer.Option(
        help="largest perplexity increase you accept, relative to an fp16 cache (5% or 0.05; 'none': no "
             "limit)")] = "5%",
    scenario: Annotated[Path, typer.Option(help="the scheme variants to consider: a scenario's `schemes`")] =
    loading.SCENARIOS_DIR / "long_ctx.yaml",
    fitted: Annotated[bool, typer.Option(help="use profiles' fitted rates (they describe xqsim's torch engine) "
                                              "instead of the spec roofline")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the ranked table as JSON")] = False,
) -> None:
    """Which KV-cache scheme to serve with: the most tokens/s within memory on each GPU, under a quality limit."""
    from .recommend import fmt_threshold, verdict_lines
    from .recommend import recommend as run_recommend

    hws = [loading.load_hardware(h.strip(), where="command line: field 'hardware'") for h in hardware.split(",")
           if h.strip()]
    if not hws:
        raise UserError("command line: field 'hardware': give at least one profile")
    m = loading.load_model(model, where="command line: field 'model'")
    limit = None if max_delta_ppl.strip().lower() == "none" else _fraction(max_delta_ppl, "max-delta-ppl")
    sc = loading.load_scenario(scenario)
    configs = _scenario_configs(sc, scenario)
    b, t = _count(batch, "batch"), _count(context, "context")
    df = run_recommend(hws, m, configs, b, t, limit, fitted=fitted)
    if as_json:
        cols = ["hardware", "verdict", "label", "tokens_per_s", "x_fp16", "batch", "context", "cache_bytes",
                "delta_ppl_rel", "accuracy_result", "eligible", "rates"]
        out = df[cols].replace({np.nan: None})
        print(loading.to_json({"model": m.name, "batch": b, "context": t, "max_delta_ppl": limit,
                               "quality_measured_on": df.attrs.get("accuracy_model"),
                               "rows": out.to_dict("records")}))
        return
    basis = "fitted rates" if fitted else "spec roofline"
    console.print(f"[bold]{m.name}[/bold], up to {b} sequences of {t:,} tokens, {fmt_threshold(limit)} "
                  f"({basis}; quality: relative perplexity increase on {df.attrs.get('accuracy_model') or '-'}, "
                  f"measurements/accuracy/)")
    for line in verdict_lines(df, limit):
        console.print("  " + line)
    tab = Table(title="Ranked per GPU (capacity-limited throughput: the most sequences, up to the batch, that fit)",
                title_justify="left")
    for c in ("hardware", "verdict", "scheme", "tokens/s", "x fp16", "batch", "cache", "ppl +"):
        tab.add_column(c, justify="right" if c in ("tokens/s", "x fp16", "batch", "cache", "ppl +") else "left")
    for r in df.groupby("hardware", sort=False).head(6).itertuples():
        tab.add_row(r.hardware, r.verdict, r.label, f"{r.tokens_per_s:,.0f}",
                    f"{r.x_fp16:.2f}" if np.isfinite(r.x_fp16) else "-", str(r.batch), _gb(r.cache_bytes),
                    f"{r.delta_ppl_rel:+.1%}" if np.isfinite(r.delta_ppl_rel) else "n/a")
    console.print(tab)


def _fraction(value: str, field: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05; a one-line error otherwise."""
    v = value.strip()
    try:
        x = float(v[:-1]) / 100 if v.endswith("%") else float(v)
    except ValueError:
        raise UserError(f"command line: field '{field}': '{value}' is not a fraction (e.g. 5% or 0.05)") from None
    if not (0 <= x < 10) or math.isnan(x):
        raise UserError(f"command line: field '{field}': {value} is out of range (0 to 1000%)")
    return x


@app.command()
def sweep(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML, or the name of a shipped one (long_ctx, ...)")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="output folder (default results/<name>)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite files a previous sweep wrote there")] = False,
    spec_only: Annotated[bool, typer.Option("--spec-only", help="ignore fitted efficiencies")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="run a sweep above the size that asks first")] = False,
    csv: Annotated[bool | None, typer.Option("--csv/--no-csv", help="write results.csv beside results.parquet "
                                             "(default: up to 2,000,000 configurations)")] = None,
    workers: Annotated[int, typer.Option(help="processes that evaluate the grid", min=1, max=256)] = 1,
) -> None:
    """Evaluate a scenario's whole grid; write the table, crossovers, memory walls and plots."""
    from . import stream as st
    from . import sweep as sw

    scenario = loading.find_scenario(scenario)
    sc = loading.load_scenario(scenario)
    base = scenario.parent
    hws = [loading.load_hardware(h, base, f"{scenario}: field 'hardware.{i}'") for i, h in enumerate(sc.hardware)]
    models = [loading.load_model(m, base, f"{scenario}: field 'models.{i}'") for i, m in enumerate(sc.models)]
    configs = _scenario_configs(sc, scenario)
    n = len(hws) * len(models) * len(configs) * len(set(sc.batch)) * len(sc.contexts())
    csv = n <= st.LARGE_SWEEP if csv is None else csv
    mem, files = st.size_estimate(n, csv, workers)
    console.print(f"{n:,} configurations: about {mem / 1e9:,.1f} GB of memory and {files / 1e9:,.2f} GB of files"
                  + ("" if csv else " (no results.csv: pass --csv to write it)"))
    if n > st.LARGE_SWEEP and not yes:
        raise UserError(f"{scenario}: {n:,} configurations (about {mem / 1e9:,.1f} GB of memory, {files / 1e9:,.1f} "
                        f"GB of files) is above {st.LARGE_SWEEP:,}; narrow its lists or pass --yes")
    out = out or Path("results") / sc.name
    inputs = (scenario, *(base / x for x in [*sc.hardware, *sc.models] if str(x).endswith((".yaml", ".yml"))))
    sw.check_writable(out, force, inputs)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(f"evaluating and writing {n:,} configurations", total=n)

        def step(msg: str, rows: int | None = None) -> None:
            if msg.startswith("skipped"):
                progress.console.print(f"[yellow]{msg}")
            elif msg:
                progress.update(task, description=msg)
            if rows is not None:
                progress.update(task, completed=rows)

        res = st.sweep_scenario(scenario, sc, hws, models, configs, out, csv=csv, fitted=sc.fitted and not spec_only,
                                workers=workers, on_step=step)
        progress.update(task, description=f"evaluated {res.rows:,} configurations", total=res.rows)
    best = sw.summary(res.kept, res.plot_batch, res.plot_context)
    _print_summary(best, res.plot_batch, res.plot_context)
    _print_crossovers(res.crossovers, best, res.plot_batch)
    console.print(f"{len(res.crossovers):,} crossovers in all (crossovers.csv); results in {out}/")


def _print_crossovers(cross, best, batch: int) -> None:
    """Where the schemes of the summary overtake one another, on its hardware."""
    labels = set(best["label"].astype(str))
    sel = cross[(cross["hardware"] == best["hardware"].iloc[0]) & cross["scheme_a"].isin(labels)
                & cross["scheme_b"].isin(labels) & cross["at"].isin([f"batch={batch}", "max batch that fits"])]
    if sel.empty:
        return
    t = Table(title=f"Crossovers along context among those schemes on {best['hardware'].iloc[0]}",
              title_justify="left")
    for c in ("model", "metric", "at", "between", "context", "better after"):
        t.add_column(c, justify="right" if c == "context" else "left")
    for r in sel.itertuples():
        t.add_row(str(r.model), str(r.metric), str(r.at), f"{r.scheme_a} / {r.scheme_b}", f"{r.crossover:,.0f}",
                  str(r.winner))
    console.print(t)


def _print_summary(s, batch: int, context: int) -> None:
    b, c = int(s["batch"].iloc[0]), int(s["context"].iloc[0])  # the grid point the values are taken at
    near = f" (the grid point nearest batch {batch}, context {context:,})" if (b, c) != (batch, context) else ""
    t = Table(title=f"Fastest variant of each scheme at batch {b}, context {c:,}{near} on {s['hardware'].iloc[0]} "
                    f"(every GPU and variant: results.csv)", title_justify="left")
    for c in ("hardware", "model", "scheme", "cache", "fits", "step ms", "tokens/s", "bound", "max context",
              "tokens/s at max batch"):
        t.add_column(c, justify="right" if c not in ("hardware", "model", "scheme", "bound", "fits") else "left")
    for r in s.itertuples():
        t.add_row(str(r.hardware), str(r.model), str(r.label), _gb(r.cache_bytes), "yes" if r.fits else "no",
                  f"{r.step_time_s * 1e3:.2f}", f"{r.tokens_per_s:,.0f}", str(r.bound), f"{r.max_context:,}",
                  f"{r.throughput_cap_tokens_per_s:,.0f}")
    console.print(t)


@app.command()
def measure(
    grid: Annotated[Path | None, typer.Option(help="measurement grid YAML (see measurements/h100/grid_*.yaml)")] = None,
    model: Annotated[str | None, typer.Option(help="model name or .yaml (single configuration)")] = None,
    scheme: Annotated[str | None, typer.Option(help=f"one of {', '.join(specs.SCHEMES)}")] = None,
    bits: Annotated[int | None, typer.Option(help="code bits; 16 = unquantized; default: the scheme's paper's")] = None,
    strategy: Annotated[str | None, typer.Option(help="remat or absorb_v")] = None,
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
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write rows to OUT.json and OUT.csv")] = None,
    force: Annotated[bool, typer.Option(help="overwrite OUT")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the (single) result as JSON")] = False,
) -> None:
    """Run and time decode steps of the engine (CUDA events on a GPU, perf_counter on CPU)."""
    try:
        from .engine import measure as m
        from .measurements import write_measurements
    except ImportError as err:
        raise UserError(f"the engine needs torch: pip install -e '.[engine]' ({err})") from None
    g = loading.parse(m.MeasureGrid, loading.read_yaml(grid), grid) if grid is not None else None
    for name, v, least in (("repeats", repeats, 1), ("warmup", warmup, 0), ("layers", layers, 1)):
        if v is not None and v < least:
            raise UserError(f"command line: field '{name}': {v} is not allowed; at least {least}")
    dev, dt = m.check_device(device, dtype or (g.dtype if g else "fp32"))
    kernels = m.check_kernels(kernels, dev)
    if g is not None:
        specs_ = [loading.load_model(x, grid.parent, f"{grid}: field 'models.{i}'") for i, x in enumerate(g.models)]
        configs = _scenario_configs(g, grid)
        batches, contexts, n_layers = g.batch, g.context, g.layers
        repeats, warmup, max_tokens = g.repeats, g.warmup, g.max_tokens
    else:
        if model is None or scheme is None:
            raise UserError("command line: give --grid FILE, or --model and --scheme for one configuration")
        specs_ = [loading.load_model(model)]
        configs = [loading.scheme_config(scheme=scheme, bits=bits, strategy=strategy)]
        batches, contexts, n_layers, max_tokens = [_count(batch, "batch")], [_count(context, "context")], layers, 2**62
    if n_layers:
        specs_ = [x.model_copy(update={"n_layers": min(n_layers, x.n_layers)}) for x in specs_]
    if grid is None:
        loading.resolve_for(configs[0], specs_[0])
        m.check_fits(specs_[0], configs[0], batches[0], contexts[0], dev, dt)
    info = m.device_info(dev) | {"engine": kernels}
    paths = [out.with_suffix(".json"), out.with_suffix(".csv")] if out else []
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists; choose another --out or pass --force")
    rows: list[dict] = []
    kept = [0]  # rows in both files
    total = sum(1 for _ in specs_ for _ in configs for b in batches for t in contexts if b * t <= max_tokens)

    def on_row(row: dict) -> None:
        rows.append(row)
        if out:  # the count follows the files: set once both hold the new row, even if Ctrl-C came meanwhile
            write_measurements(out, info, rows, on_written=lambda: kept.__setitem__(0, len(rows)))
        else:
            kept[0] = len(rows)
        if not as_json:
            what = f"{row['model']} {row['label']} B={row['batch']} T={row['context']}"
            took = f"{row['step_time_s'] * 1e3:.3f} ms" if row["status"] == "ok" else row["status"]
            if "step_time_graph_s" in row:
                took += f" (graph {row['step_time_graph_s'] * 1e3:.3f} ms)"
            console.print(f"[{len(rows)}/{total}] {what}: {took}")

    console.print(f"measuring {total} configurations on {info['device_name']} with the {kernels} engine "
                  f"(torch {info['torch']})") \
        if not as_json else None
    try:
        m.run_grid(specs_, configs, batches, contexts, dev, dt, repeats, warmup, max_tokens, on_row, kernels)
    except KeyboardInterrupt:
        print(f"xqsim: interrupted; {kept[0]} rows kept" + (f" in {paths[0]} and {paths[1]}" if out else ""),
              file=sys.stderr)
        sys.exit(130)
    if as_json:
        print(loading.to_json({"device": info} | (rows[0] if len(rows) == 1 else {"rows": rows})))


@app.command()
def calibrate(
    measurements: Annotated[list[Path], typer.Argument(help="`xqsim measure` JSON files of one device")],
    hardware: Annotated[str, typer.Option(help="the profile whose spec figures the fit scales")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="profile YAML to write (default "
                                                                  "hardware/<name>_fitted.yaml)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite OUT")] = False,
    target: Annotated[str | None, typer.Option(help="fit the CUDA-graph step (graph, the default where "
                                                    "measured) or the eager step (eager)")] = None,
) -> None:
    """Fit per-class overheads and efficiencies to measured steps; write a new profile with a `fitted:` block."""
    import datetime

    from . import calibrate as cal
    from .measurements import read_measurements

    hw = loading.load_hardware(hardware)
    out = out or loading.HARDWARE_DIR / f"{hw.name}_fitted.yaml"
    if out.exists() and not force:  # before any work
        raise UserError(f"{out}: already exists; choose another -o or pass --force (your file is left as it is)")
    infos, rows = read_measurements(measurements)
    n_fit = sum(1 for r in rows if not r.get("fused"))
    source = (f"xqsim calibrate on {n_fit} unfused configurations from {', '.join(p.name for p in measurements)} "
              f"({infos[0]['device_name']}, torch {infos[0]['torch']}), {datetime.date.today().isoformat()}")
    fitted, report = cal.fit(rows, hw, source, _target(target))
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
    if fitted.bitplane_factor:
        console.print(f"(de)quantization of 3/5/6/7-bit codes (bit planes): x{fitted.bitplane_factor:.2f} time")
    if fitted.channel_factor:
        console.print(f"(de)quantization of per-channel codes (channel-major to token-major): "
                      f"x{fitted.channel_factor:.2f} time")
    if report["not_determined"]:
        console.print(f"not determined by these measurements (spec value kept): {', '.join(report['not_determined'])}")
    console.print(f"wrote {out}")


@app.command()
def validate(
    measurements: Annotated[list[Path], typer.Argument(help="`xqsim measure` JSON files of one device")],
    hardware: Annotated[str, typer.Option(help="profile to predict with (its fitted block if any)")],
    transfer_from: Annotated[str | None, typer.Option(help="use this profile's fitted efficiencies on "
                                                          "--hardware's spec figures")] = None,
    held_out: Annotated[str | None, typer.Option(help="refit without each block: context or scheme")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="folder for the table and plots")] = None,
    force: Annotated[bool, typer.Option(help="overwrite the table and plots in OUT")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    target: Annotated[str | None, typer.Option(help="judge against the CUDA-graph step (graph) or the eager "
                                                    "step (eager); default: the fitted block's")] = None,
    spec_only: Annotated[bool, typer.Option("--spec-only", help="ignore the profile's fitted block")] = False,
) -> None:
    """Predict every measured configuration; report the error overall, per regime and per scheme."""
    from . import calibrate as cal
    from .measurements import read_measurements

    if out is not None:  # before any work: never over a file that is there unless --force
        written = [out / "validation.csv", out / "validation.png", out / "validation.svg"]
        there = [p for p in written if p.exists()]
        if there and not force:
            raise UserError(f"{there[0]}: already exists; choose another -o DIR or pass --force to overwrite")
    hw = loading.load_hardware(hardware)
    if spec_only or held_out:  # a held-out fit starts from the spec figures
        hw = hw.model_copy(update={"fitted": None})
    if transfer_from:
        hw = cal.transferred(hw, loading.load_hardware(transfer_from))
    if held_out not in (None, "context", "scheme"):
        raise UserError(f"command line: field 'held_out': '{held_out}' is not allowed; allowed: context, scheme")
    _, rows = read_measurements(measurements)
    df, report = cal.validation(rows, hw, held_out, _target(target))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        loading.write_atomic(out / "validation.csv", lambda p: df.to_csv(p, index=False))
        cal.plot_validation(df, out / "validation")
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
def dashboard(
    port: Annotated[int, typer.Option(help="port to serve the page on")] = 8501,
    headless: Annotated[bool, typer.Option(help="do not open a browser")] = False,
) -> None:
    """Open the Streamlit dashboard (streamlit run app.py; needs pip install -e '.\\[app]')."""
    import importlib.util
    import subprocess

    if not 1 <= port <= 65535:
        raise UserError(f"command line: field 'port': {port} is not a TCP port (1 to 65535)")
    if importlib.util.find_spec("streamlit") is None:
        raise UserError("the dashboard needs streamlit: pip install -e '.[app]'")
    script = Path(__file__).parent / "dashboard" / "app.py"  # shipped with the package: runs from any folder
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
           "--server.headless", str(headless).lower(), "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal"]  # .streamlit/config.toml's settings, for a run from any folder
    sys.exit(subprocess.run(cmd, cwd=Path.cwd()).returncode)


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
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("measurements/accuracy"),
    force: Annotated[bool, typer.Option(help="overwrite the files of a previous run there")] = False,
    jobs: Annotated[int, typer.Option(help="configurations run at once, one torch thread each")] = 1,
) -> None:
    """Perplexity, logit error and top-1 agreement of each scheme on a real model, decoding token by token."""
    try:
        from . import accuracy as acc
    except ImportError as err:
        raise UserError(f"the accuracy run needs torch: pip install -e '.[engine,accuracy]' ({err})") from None
    if grid is not None:
        g = loading.parse(acc.AccuracyGrid, loading.read_yaml(grid), grid)
        configs, model, n, c = _scenario_configs(g, grid), g.model, g.tokens, g.context
        text = text or (grid.parent / g.text if g.text else None)
    else:
        if not schemes:
            raise UserError("command line: give --schemes (e.g. kivi,xquant) or --grid FILE")
        n, c = _count(tokens, "tokens"), _count(context, "context")
        if c < 2:  # a window predicts its tokens 2..c from the ones before
            raise UserError("command line: field 'context': a window needs at least 2 tokens")
        configs = [loading.scheme_config(scheme=s.strip(), bits=None if s.strip() == "fp16" else b,
                                         strategy=strategy if s.strip() in REMAT_SCHEMES else None)  # K/V: none
                   for s in schemes.split(",") for b in dict.fromkeys(_ints(bits, "bits"))]
        configs = list(dict.fromkeys(configs))
    if jobs < 1:
        raise UserError(f"command line: field 'jobs': {jobs} is not allowed; at least 1")
    acc.check_writable(out, force)
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


def _ints(value: str, field: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"command line: field '{field}': expected comma-separated integers (got {value!r})") from None
    if not out:
        raise UserError(f"command line: field '{field}': expected comma-separated integers (got {value!r})")
    return out


@hw_app.command("list")
def hw_list() -> None:
    """Shipped hardware profiles with their spec figures."""
    t = Table(title="Hardware profiles (hardware/*.yaml)", title_justify="left")
    for c in ("name", "device", "memory", "usable", "bandwidth", "bf16 dense", "ridge FLOP/B", "fitted"):
        t.add_column(c)
    for hw in loading.list_hardware():
        mem = hw.memory_bytes.value  # HBM is sold in GiB: 80 "GB" = 80 GiB = 85.9e9 B
        t.add_row(hw.name, hw.display_name, f"{mem / 2**30:,.0f} GiB ({mem / 1e9:,.1f} GB)",
                  f"{hw.usable_fraction.value:.2f}",
                  f"{hw.mem_bytes_per_s.value / 1e12:.2f} TB/s", f"{hw.flops_per_s['bf16'].value / 1e12:,.0f} TFLOP/s",
                  f"{hw.ridge_flop_per_byte:.0f}", "yes" if hw.fitted else "no")
    console.print(t)


@models_app.command("list")
def models_list() -> None:
    """Shipped model shapes."""
    t = Table(title="Models (models/*.yaml)", title_justify="left")
    for c in ("name", "model", "layers", "d_model", "heads", "kv heads", "head dim", "ffn", "vocab"):
        t.add_column(c)
    for m in loading.list_models():
        t.add_row(m.name, m.display_name, str(m.n_layers), str(m.d_model), str(m.n_heads), str(m.n_kv_heads),
                  str(m.hd), str(m.ffn_dim), str(m.vocab_size))
    console.print(t)


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)  # typer returns 130 for a Ctrl-C inside a command instead of raising
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as err:
        print(f"xqsim: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("xqsim: interrupted", file=sys.stderr)
        sys.exit(130)
    except CLI_ERRORS as err:
        print(f"xqsim: error: {one_line(err.format_message())}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """A message as one printable line: what a user wrote may hold line breaks and control characters (a YAML key
    '\x1e' or '\n'), which are shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)

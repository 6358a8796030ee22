"""`xqsim`: estimate one configuration, sweep a scenario, list hardware and models, open the dashboard."""

from __future__ import annotations

import functools
import inspect
import math
import sys
import typing
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import loading, rates, specs
from . import scenario as scenario_
from .specs import SchemeConfig, UserError

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


RATES_HELP = ("the rates each GPU predicts with: spec (datasheet roofline), fitted (the GPU's own fit for the "
              "engine a configuration runs on: torch unfused, the kernel engine fused; else spec, said so) or "
              "transferred (else another GPU's fit for that engine)")


def _rate_mode(mode: str) -> str:
    """--rates checked: one line naming the field and what is allowed."""
    try:
        return rates.check(mode, "command line: field 'rates'")
    except ValueError as err:
        raise UserError(str(err)) from None


def out_path(value) -> Path:
    """An -o path as given; an empty one (an unset shell variable) is an error, not the current folder."""
    if not str(value).strip():
        raise typer.BadParameter("an empty path; give a file or folder name")
    return Path(value)


def _option_type(annotation) -> type:
    """The plain type a command-line option of a SchemeConfig field parses to: int, float, str or bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _option_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if args:  # X | None
        return _option_type(args[0])
    return annotation


def scheme_options(fn):
    """A command that takes SchemeConfig's options: one typer option per field but `scheme`, declared from the
    field (its type and description), so a field added to SchemeConfig is on the command line without an edit
    here. The command receives them as `options`: the fields given (flags only when set)."""
    names = [n for n in SchemeConfig.model_fields if n != "scheme"]
    sig = inspect.signature(fn, eval_str=True)
    extra = []
    for name in names:
        f = SchemeConfig.model_fields[name]
        t = _option_type(f.annotation)
        help_ = (f.description or name).replace("[", "\\[")
        if t is bool:
            ann, default = Annotated[bool, typer.Option(help=help_)], False
        else:
            ann, default = Annotated[t | None, typer.Option(help=help_)], None
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    kept = [p for p in sig.parameters.values() if p.name != "options"]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {n: kwargs.pop(n) for n in names}
        return fn(**kwargs, options={k: v for k, v in options.items() if v is not None and v is not False})

    wrapper.__signature__ = sig.replace(parameters=keyword + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in keyword + extra}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's own
    return wrapper


def _count(value: str, field: str) -> int:
    """A whole positive count like 16, 32k or 1M, at most MAX_COUNT[field]; else a one-line error."""
    most = MAX_COUNT.get(field, 2**31)
    x = scenario_.count_value(str(value))
    if not (math.isfinite(x) and x == int(x) and 0 < x <= most):
        raise UserError(f"command line: field '{field}': expected a positive integer like 16, 32k or 1M, at "
                        f"most {most:,} (got {value!r})")
    return int(x)


def _distinct(specs_: list, where: str) -> None:
    """Profiles or models of distinct names: results are keyed by name, so one given twice (by name and as a file)
    is an error, not two GPUs or models of one name."""
    names = [x.name for x in specs_]
    twice = next((i for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise UserError(f"{where}: '{names[twice]}' is listed twice (entries {names.index(names[twice])} and {twice})")


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


@app.command()
@scheme_options
def estimate(
    hardware: Annotated[str, typer.Option(help="profile name (xqsim hw list) or a .yaml file")],
    model: Annotated[str, typer.Option(help="model name (xqsim models list) or a .yaml file")],
    scheme: Annotated[str, typer.Option(help=f"one of {', '.join(specs.SCHEMES)}")],
    batch: Annotated[str, typer.Option(help="sequences decoded together")] = "1",
    context: Annotated[str, typer.Option(help="tokens in the cache, e.g. 32768 or 32k")] = "4096",
    rate_mode: Annotated[str, typer.Option("--rates", help=RATES_HELP)] = "fitted",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    options: dict | None = None,
) -> None:
    """One configuration: ops, memory (paper and full accounting), step time, capacity; the scheme's options
    (--bits, --strategy, --fused, ...) as SchemeConfig declares them."""
    from .estimate import estimate as run_estimate

    hw = loading.load_hardware(hardware, where="command line: field 'hardware'")
    m = loading.load_model(model, where="command line: field 'model'")
    cfg = loading.scheme_config(scheme=scheme, **(options or {}))
    try:  # options that do not fit this model's shapes (e.g. a rank above its dkv)
        cfg.resolved(m)
    except UserError as err:
        raise UserError(f"command line: {scenario_.named_field(str(err))}{err}") from None
    r = run_estimate(hw, m, cfg, _count(batch, "batch"), _count(context, "context"), _rate_mode(rate_mode))
    if as_json:
        print(loading.to_json(r))
        return
    _print_estimate(r)


def _print_estimate(r: dict) -> None:
    t = Table(title=f"{r['label']} · {r['model']} · {r['hardware']} · batch {r['batch']} · context {r['context']}"
                    f"\nrates: {r['rates']}", title_justify="left")
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
    rate_mode: Annotated[str, typer.Option("--rates", help=RATES_HELP)] = "fitted",
    as_json: Annotated[bool, typer.Option("--json", help="print the ranked table as JSON")] = False,
) -> None:
    """Which KV-cache scheme to serve with: the most tokens/s within memory on each GPU, under a quality limit."""
    from .recommend import fmt_threshold, verdict_lines
    from .recommend import recommend as run_recommend

    hws = [loading.load_hardware(h.strip(), where="command line: field 'hardware'") for h in hardware.split(",")
           if h.strip()]
    if not hws:
        raise UserError("command line: field 'hardware': give at least one profile")
    _distinct(hws, "command line: field 'hardware'")
    m = loading.load_model(model, where="command line: field 'model'")
    limit = None if max_delta_ppl.strip().lower() == "none" else _fraction(max_delta_ppl, "max-delta-ppl")
    sc = loading.load_scenario(scenario)
    configs = sc.scheme_configs(scenario)
    b, t = _count(batch, "batch"), _count(context, "context")
    mode = _rate_mode(rate_mode)
    df = run_recommend(hws, m, configs, b, t, limit, rate_mode=mode)
    if as_json:
        cols = ["hardware", "verdict", "label", "tokens_per_s", "x_fp16", "batch", "context", "cache_bytes",
                "delta_ppl_rel", "accuracy_result", "eligible", "rates"]
        out = df[cols].replace({np.nan: None})
        print(loading.to_json({"model": m.name, "batch": b, "context": t, "max_delta_ppl": limit, "rate_mode": mode,
                               "quality_measured_on": df.attrs.get("accuracy_model"),
                               "rows": out.to_dict("records")}))
        return
    console.print(f"[bold]{m.name}[/bold], up to {b} sequences of {t:,} tokens, {fmt_threshold(limit)} "
                  f"(quality: relative perplexity increase on {df.attrs.get('accuracy_model') or '-'}, "
                  f"measurements/accuracy/)")
    console.print(rates.summary(hws, [SchemeConfig(scheme="fp16"), *configs], mode), style="dim")
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
    out: Annotated[Path | None, typer.Option("-o", "--out", parser=out_path,
                                             help="output folder (default results/<name>)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite files a previous sweep wrote there")] = False,
    rate_mode: Annotated[str | None, typer.Option("--rates", help=RATES_HELP + "; default: the scenario's "
                                                  "`rates`")] = None,
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
    _distinct(hws, f"{scenario}: field 'hardware'")
    _distinct(models, f"{scenario}: field 'models'")
    configs = sc.scheme_configs(scenario)
    n = len(hws) * len(models) * len(configs) * len(set(sc.batch)) * len(sc.contexts())
    csv = n <= st.LARGE_SWEEP if csv is None else csv
    mem, files = st.size_estimate(n, csv, workers)
    console.print(f"{n:,} configurations: about {mem / 1e9:,.1f} GB of memory and {files / 1e9:,.2f} GB of files"
                  + ("" if csv else " (no results.csv: pass --csv to write it)"))
    if n > st.LARGE_SWEEP and not yes:
        raise UserError(f"{scenario}: {n:,} configurations (about {mem / 1e9:,.1f} GB of memory, {files / 1e9:,.1f} "
                        f"GB of files) is above {st.LARGE_SWEEP:,}; narrow its lists or pass --yes")
    mode = _rate_mode(rate_mode) if rate_mode is not None else sc.rates
    console.print(rates.summary(hws, configs, mode), style="dim")
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

        res = st.sweep_scenario(scenario, sc, hws, models, configs, out, csv=csv, rate_mode=mode, workers=workers,
                                on_step=step)
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
        if type(err).__name__ == "NoArgsIsHelpError":  # `xqsim` or `xqsim hw` alone: its help was printed
            sys.exit(0)
        print(f"xqsim: error: {one_line(err.format_message())}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # what the checks before any work cannot foresee: a full disk, a permission revoked
        # (the partly written file was under a temporary name: write_atomic and the streamed table remove it)
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"xqsim: error: {one_line(where + (err.strerror or str(err)))}", file=sys.stderr)
        sys.exit(1)


def one_line(message: str) -> str:
    """A message as one printable line: what a user wrote may hold line breaks and control characters (a YAML key
    '\x1e' or '\n'), which are shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


from . import cli_measure  # noqa: E402,F401  (its commands join `app`)

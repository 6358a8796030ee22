"""Time decode steps of the engine: every op and the whole step, CUDA events on a GPU (perf_counter on
CPU), warm-up, then the median of the repeats. The cache is filled with random data to the context
asked for; each timed step is rolled back so every repeat decodes at the same context.

On a GPU the step is timed twice. Eager: every op and the whole step bracketed by CUDA event pairs from
Python (`step_time_s`, per-op times), so the CPU's launch cost is in it, as in an eager server. Graph: the
same step (and its rollback) captured once as a CUDA graph and replayed (`step_time_graph_s`): the GPU's
own time, as a server that captures its decode step (vLLM, TensorRT-LLM) sees it. The capture applies
because a rolled-back step at a fixed context does the same work at the same addresses every time (the
cache is reserved up front, so nothing reallocates); where capture fails the row says why and keeps the
eager figures. Per op, the eager event pairs also time the CPU launching it (a 3 us kernel can read 60 us), so
each op's GPU work is also taken from the profiler: the summed durations of the kernels it launched
(`kernel_time_s`, `kernels` per op and for the whole step, the mean of a few profiled eager steps). With the
torch engine a fused configuration runs as tiles of torch ops (xqsim.engine.model); with the Triton engine the
ops of a fused attention run in one kernel (xqsim.engine.kernels), which the op holding it times.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..capacity import memory
from ..scenario import ScenarioScheme
from ..specs import MAX_LAYERS, ModelSpec, Positive, SchemeConfig, UserError
from .model import Engine, Recorder, init_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MeasureGrid(BaseModel):
    """A measurement grid: models (with the number of layers kept) x schemes x batch x context."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    models: list[str] = Field(min_length=1)
    layers: int = Field(2, gt=0, le=MAX_LAYERS, strict=True,
                        description="layers kept of each model (per-layer costs are what we fit)")
    schemes: list[ScenarioScheme] = Field(min_length=1)
    batch: list[Positive] = Field(min_length=1)
    context: list[Positive] = Field(min_length=1)
    max_tokens: Annotated[int, Field(gt=0, le=2**62, strict=True)] = Field(
        2**20, description="skip batch x context above this many tokens")
    repeats: int = Field(20, ge=1, strict=True)
    warmup: int = Field(3, ge=0, strict=True)
    dtype: str = Field("bf16", description="compute dtype; the command line's --dtype overrides it")


class Timer(Recorder):
    """Records each op between two clock readings: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda, self.marks = cuda, []

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, cls: str, flops: float = 0.0) -> Iterator[None]:
        start = self._mark()
        yield
        self.marks.append((name, cls, float(flops), start, self._mark()))

    def seconds(self) -> list[tuple[str, str, float, float]]:
        """(name, class, flops, seconds) per op; call after synchronizing."""
        if self.cuda:
            return [(n, c, f, a.elapsed_time(b) / 1e3) for n, c, f, a, b in self.marks]
        return [(n, c, f, b - a) for n, c, f, a, b in self.marks]


def fill(engine: Engine, cache, batch: int, tokens: int, seed: int = 0, chunk_values: int = 2**25) -> None:
    """Append `tokens` random tokens to every store (values of unit scale), in chunks of ~32M values."""
    g = torch.Generator(device=engine.device).manual_seed(seed)
    for layer in cache:
        for st in layer.values():
            st.reserve(tokens + 1, batch, engine.device)
            chunk = max(st.R or 1, chunk_values // (batch * st.t.width) // max(st.R, 1) * max(st.R, 1))
            done = 0
            while done < tokens:
                n = min(chunk, tokens - done)
                st.append(torch.randn(batch, n, st.t.width, generator=g, device=engine.device, dtype=engine.dtype))
                done += n


def device_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": str(device), "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "host_cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"device_name": p.name, "device_memory_bytes": p.total_memory,
                 "driver": _driver_version(),
                 "sm_count": p.multi_processor_count}
    else:
        info["device_name"] = "cpu"
    return info


def _driver_version() -> str | None:
    """The NVIDIA driver's version, as nvidia-smi reports it (torch does not expose it)."""
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def measure_one(spec: ModelSpec, cfg: SchemeConfig, batch: int, context: int, device, dtype,
                repeats: int = 20, warmup: int = 3, seed: int = 0, weights=None, kernels: str | None = None) -> dict:
    """Time one configuration at `context` tokens (the step's own token included) on the engine `kernels`
    ('triton' or 'torch'; None: triton on CUDA). The row says which engine ran and whether it ran fused."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    # cache elements in the compute dtype when it is 16-bit (bf16 on the GPU): no cast of the cache per step
    store = dtype if torch.finfo(dtype).bits == 16 else torch.float16
    engine = Engine(spec, cfg, device=dev, dtype=dtype, store_dtype=store, seed=seed, weights=weights,
                    kernels=kernels)
    cache = engine.new_cache()
    fill(engine, cache, batch, context - 1, seed)
    tokens = torch.randint(0, spec.vocab_size, (batch,), device=dev)
    snaps = [[st.snapshot() for st in layer.values()] for layer in cache]

    def one(rec: Recorder) -> None:
        engine.step(tokens, cache, rec)
        for layer, snap in zip(cache, snaps, strict=True):
            for st, s in zip(layer.values(), snap, strict=True):
                st.rollback(s)

    for _ in range(warmup):
        one(Recorder())
    timers, steps = [], []
    for _ in range(repeats):
        t = Timer(cuda)
        with t("step", "step"):
            one(t)
        timers.append(t)
    if cuda:
        torch.cuda.synchronize(dev)
    per_op: dict[str, list[float]] = {}
    flops: dict[str, tuple[str, float]] = {}
    for t in timers:
        rows = t.seconds()
        steps.append(rows[-1][3])
        sums: dict[str, float] = {}
        for n, c, f, s in rows[:-1]:
            sums[n] = sums.get(n, 0.0) + s
            flops[n] = (c, flops.get(n, (c, 0.0))[1] + f / repeats)
        for n, s in sums.items():
            per_op.setdefault(n, []).append(s)
    graph = time_graph(lambda: one(Recorder()), repeats, warmup) if cuda else {}
    kernels = kernel_times(one, PROFILED_STEPS) if cuda else {}
    if engine.kernels == "triton" and "ops" in kernels and kernels.get("kernel_attribution") != "time":
        # torch.profiler does not tie Triton's launches (driver API) to the op that made them: an op whose kernels
        # are all Triton's reads 0 kernels and 0 s; leave its kernel fields out, so its eager event time stands
        kernels["ops"] = {n: o for n, o in kernels["ops"].items() if o["kernels"] > 0}
        kernels["kernels_note"] = "Triton kernels are not in kernel_time_s or kernels (not attributed by the profiler)"
    engine.step(tokens, cache)  # once more, kept: the cache now holds `context` tokens
    analytic = memory(spec, engine.cfg, batch, np.array([context]))
    return {
        "engine": engine.kernels, "fused": engine.cfg.fused,
        "cache_bytes_allocated": Engine.cache_bytes(cache),
        "cache_bytes_analytic": int(analytic["cache_bytes"][0]),
        "step_time_s": statistics.median(steps),
        "step_time_p10_s": float(np.percentile(steps, 10)), "step_time_p90_s": float(np.percentile(steps, 90)),
        "ops": {n: {"op_class": flops[n][0], "flops": flops[n][1], "time_s": statistics.median(v)}
                | kernels.get("ops", {}).get(n, {}) for n, v in per_op.items()},
    } | graph | {k: v for k, v in kernels.items() if k != "ops"}


PROFILED_STEPS = 3
_PREFIX = "xq:"


class _Annotate(Recorder):
    """Marks each op as a profiler range and waits for the GPU before the range ends, so every kernel the op ran
    runs inside its range, however it was launched: Triton launches through the driver API, which the profiler
    does not tie to the op that launched them (attribute())."""

    @contextlib.contextmanager
    def __call__(self, name: str, cls: str, flops: float = 0.0) -> Iterator[None]:
        with torch.profiler.record_function(_PREFIX + name):
            yield
            torch.cuda.synchronize()


def attribute(events, cpu) -> tuple[dict[str, list[float]], list[float]]:
    """Per op name: [GPU time us, count] of the device events (kernels, copies) whose midpoint lies inside one of
    its profiler ranges (the innermost where ranges nest; an op's ranges with none count 0); and [total us, count]
    of all device events. `cpu`: the host's device type (CPU events are the ranges, the others device work)."""
    ranges = sorted((e.time_range.start, e.time_range.end, e.name[len(_PREFIX):]) for e in events
                    if e.device_type == cpu and e.name.startswith(_PREFIX))
    ops: dict[str, list[float]] = {name: [0.0, 0] for _, _, name in ranges}
    total = [0.0, 0]
    starts = [r[0] for r in ranges]
    for e in events:
        if e.device_type == cpu:
            continue
        t0, t1 = e.time_range.start, e.time_range.end
        total[0], total[1] = total[0] + (t1 - t0), total[1] + 1
        mid = (t0 + t1) / 2
        inside = [r for r in ranges[:bisect.bisect_right(starts, mid)] if r[1] >= mid]
        if inside:
            name = min(inside, key=lambda r: r[1] - r[0])[2]
            ops[name][0], ops[name][1] = ops[name][0] + (t1 - t0), ops[name][1] + 1
    return ops, total


def _kernels_under(evt) -> tuple[float, int]:
    """GPU time [us] and count of the kernels (and copies) launched under a profiler event, children included."""
    t, n = sum(k.duration for k in evt.kernels), len(evt.kernels)
    for ch in evt.cpu_children:
        a, b = _kernels_under(ch)
        t, n = t + a, n + b
    return t, n


def kernel_times(one: Callable[[Recorder], None], steps: int) -> dict:
    """Per op, the GPU time of its own kernels (CUPTI kernel durations from torch.profiler, no launch gaps or
    CPU time in them) and how many it ran, the mean over `steps` eager steps: {ops: {name: {kernel_time_s,
    kernels}}, kernel_time_s: all kernels of the step, kernels, kernel_attribution}; {kernels: <why not>} if
    profiling fails. The kernels are given to the op whose range (which waits for the GPU) they ran in
    (attribute(): kernel_attribution 'time'); where the profiler returns no device records, to the op that launched
    them through the runtime API, which misses Triton's launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                one(_Annotate())
            torch.cuda.synchronize()
        events = prof.events()
    except RuntimeError as err:
        return {"kernels": f"not profiled: {str(err).splitlines()[0][:160]}"}
    if any(e.device_type != DeviceType.CPU for e in events):  # the device's own records: attributed by time
        ops, total = attribute(events, DeviceType.CPU)
        return {"ops": {k: {"kernel_time_s": t / steps / 1e6, "kernels": n / steps} for k, (t, n) in ops.items()},
                "kernel_time_s": total[0] / steps / 1e6, "kernels": total[1] / steps, "kernel_attribution": "time"}
    ops: dict[str, list[float]] = {}
    total = [0.0, 0]
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if e.name.startswith(_PREFIX):
            t, n = _kernels_under(e)
            acc = ops.setdefault(e.name[len(_PREFIX):], [0.0, 0])
            acc[0], acc[1] = acc[0] + t, acc[1] + n
        if e.cpu_parent is None:  # every kernel once: under a top-level CPU event (rollback copies included)
            t, n = _kernels_under(e)
            total[0], total[1] = total[0] + t, total[1] + n
    return {"ops": {k: {"kernel_time_s": t / steps / 1e6, "kernels": n / steps} for k, (t, n) in ops.items()},
            "kernel_time_s": total[0] / steps / 1e6, "kernels": total[1] / steps}


def time_graph(step: Callable[[], None], repeats: int, warmup: int) -> dict:
    """Capture step() as a CUDA graph and time `repeats` replays: {graph: ok, step_time_graph_s, p10, p90},
    or {graph: <why not>} when it cannot be captured (the eager figures stand alone)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants (cuBLAS workspaces)
        step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            step()
    except torch.cuda.OutOfMemoryError:
        return {"graph": "oom"}
    except RuntimeError as err:  # an op that cannot be captured
        torch.cuda.synchronize()
        return {"graph": f"not captured: {str(err).splitlines()[0][:160]}"}
    for _ in range(warmup):
        g.replay()
    marks = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        marks.append((a, b))
    torch.cuda.synchronize()
    t = [a.elapsed_time(b) / 1e3 for a, b in marks]
    del g
    return {"graph": "ok", "step_time_graph_s": statistics.median(t),
            "step_time_graph_p10_s": float(np.percentile(t, 10)), "step_time_graph_p90_s": float(np.percentile(t, 90))}


def run_grid(specs_: list[ModelSpec], configs: list[SchemeConfig], batches: list[int], contexts: list[int],
             device, dtype, repeats: int, warmup: int, max_tokens: int,
             on_row: Callable[[dict], None], kernels: str | None = None) -> None:
    """Measure every configuration; an out-of-memory one becomes a row with status 'oom', one the engine refuses
    'invalid', one that fails in it 'error' (with its message), and the grid goes on."""
    for spec in specs_:
        weights = init_weights(spec, 0, torch.device(device), dtype)  # once per model: shared by its configs
        # every configuration at a (batch, context) before the next, smallest first: a run cut at its time limit
        # keeps every scheme at the sizes it reached, not some schemes whole and the rest not at all
        for b, t, cfg in ((b, t, cfg) for b in sorted(batches) for t in sorted(contexts) for cfg in configs):
            if b * t > max_tokens:
                continue
            row = {"model": spec.name, "layers": spec.n_layers, "scheme": cfg.scheme, "label": cfg.label,
                   "bits": cfg.bits, "strategy": cfg.strategy, "fused": cfg.fused,
                   "batch": b, "context": t, "config": cfg.model_dump(mode="json")}
            try:
                row |= {"status": "ok"} | measure_one(spec, cfg, b, t, device, dtype, repeats, warmup,
                                                      weights=weights, kernels=kernels)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
            except UserError as err:
                row |= {"status": "invalid", "error": str(err)}
            except Exception as err:  # a failed kernel (compile, launch) ends its row, not the grid
                first = (str(err).splitlines() or [""])[0][:200]
                row |= {"status": "error", "error": f"{type(err).__name__}: {first}"}
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            on_row(row)


def check_fits(spec: ModelSpec, cfg: SchemeConfig, batch: int, context: int, device: torch.device,
               dtype: torch.dtype, where: str = "command line") -> None:
    """A UserError if the analytic memory of this run (weights at the engine's dtype, cache, transient
    buffers) exceeds the device's free memory; `where` names what asked for it (a grid file)."""
    c = cfg.resolved(spec)
    m = memory(spec, c, batch, np.array([context]))
    scale = torch.finfo(dtype).bits / 8 / 2  # analytic weights and activations are 2-byte
    need = m["weights_bytes"] * 2 * scale / spec.weight_bytes + m["cache_bytes"][0] + m["transient_bytes"][0] * scale
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        hint = "--layers, a smaller batch or context" if where == "command line" else "fewer layers, a smaller " \
                                                                                       "batch or context"
        raise UserError(f"{where}: {cfg.label} on {spec.name} ({spec.n_layers} layers) at batch {batch}, "
                        f"context {context} needs about {need / 1e9:,.1f} GB (weights "
                        f"{m['weights_bytes'] * 2 * scale / spec.weight_bytes / 1e9:,.1f}, cache "
                        f"{m['cache_bytes'][0] / 1e9:,.1f}, transient {m['transient_bytes'][0] * scale / 1e9:,.1f}) "
                        f"but {device.type} has {free / 1e9:,.1f} GB free; use {hint}")


def check_kernels(kernels: str | None, device: torch.device) -> str:
    """The engine asked for ('triton' by default on CUDA, else 'torch'), or a UserError saying why not."""
    from .kernels import ENGINES, resolve

    if kernels is not None and kernels not in ENGINES:  # the command line's own wording for a name it does not know
        raise UserError(f"command line: field 'kernels': '{kernels}' is not allowed; allowed: {', '.join(ENGINES)}")
    try:
        return resolve(kernels, device)
    except ValueError as err:
        raise UserError(f"command line: field 'kernels': {err}; use --kernels torch") from None


def check_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for, or a UserError saying why not."""
    if dtype not in DTYPES:
        raise UserError(f"command line: field 'dtype': '{dtype}' is not allowed; allowed: {', '.join(DTYPES)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"command line: field 'device': '{device}' is not allowed; allowed: cpu, cuda, cuda:N")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("command line: field 'device': cuda asked for, but torch sees no CUDA device here; "
                        "use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"command line: field 'device': '{device}': torch sees {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cpu" and dtype != "fp32":
        raise UserError(f"command line: field 'dtype': {dtype} on cpu is not supported; use fp32 on cpu")
    return dev, DTYPES[dtype]



"""Ops -> time on a hardware profile: the roofline, kernel by kernel, and the bound of each.

A kernel is one op, or the consecutive ops of a layer that share a `kernel` name (fused). Its time is
max(compute time, memory time) + one overhead (that of its first op's class), where compute time = sum of FLOPs / the
achieved FLOP rate of each op's class and memory time = sum of bytes / the achieved bandwidth of each
op's class (spec peak x fitted efficiency; x the fitted bit-plane factor for (de)quantization of code widths
that do not divide 8, x the fitted channel factor for per-channel codes). Its bound is
'overhead' when the overhead exceeds the busy time, else 'compute' or 'memory', whichever is longer.
The step's bound is the one that accounts for most of its time.
"""

from __future__ import annotations

import numpy as np

from .schemes.ops import Op
from .specs import FACTORS, OP_CLASSES, Rates

BOUNDS = ("memory", "compute", "overhead")


def kernels(ops: list[Op]) -> list[list[Op]]:
    """Group ops into kernels: consecutive ops with the same non-empty kernel name and layer count."""
    out: list[list[Op]] = []
    for op in ops:
        prev = out[-1][-1] if out else None
        if prev is not None and op.kernel and op.kernel == prev.kernel and op.layers == prev.layers:
            out[-1].append(op)
        else:
            out.append([op])
    return out


def kernel_class(kern: list[Op]) -> str:
    """The op class whose per-kernel overhead a kernel pays: its last op's. A fused kernel ends in the op it exists
    for (dequantize, rebuild and rotate feed `attention`; XQuant-CL's dequantization feeds `accumulate`), so the
    fused attention kernels pay attention's overhead, not that of the quantize kernels."""
    return kern[-1].cls


def op_busy(flops, nbytes, flop_rate, byte_rate, scaled=()) -> tuple:
    """An op's compute time and memory time [s]: FLOPs over its class's FLOP rate; bytes over its class's
    bandwidth, times each factor whose flag is set (`scaled`: (flag, factor) pairs, specs.FACTORS: codes whose
    width does not divide 8, per-channel codes). Broadcasts over arrays (the fit passes every op of every row at
    once)."""
    tm = nbytes / byte_rate
    for flag, factor in scaled:
        tm = tm * np.where(flag, factor, 1.0)
    return flops / flop_rate, tm


def kernel_time(tc, tm, overhead) -> tuple:
    """A kernel's time [s] from its ops' summed compute and memory times and its overhead: max(tc, tm) + overhead,
    and the overhead it pays (none for a kernel with no work, which is never launched: dequantization at context
    1, quantization before a window fills)."""
    ov = overhead * ((tc + tm) > 0)
    return np.maximum(tc, tm) + ov, ov


def _busy(op: Op, rates: Rates) -> tuple:
    return op_busy(op.flops, op.bytes, rates.flops_per_s[op.cls], rates.bytes_per_s[op.cls],
                   [(True, rates.factors[k]) for k in FACTORS if getattr(op, k)])


def step_time(ops: list[Op], rates: Rates, per_class: bool = True) -> dict[str, np.ndarray]:
    """Totals of one decode step; every value broadcasts over the inputs' arrays."""
    zero = 0.0
    tot = {"flops": zero, "bytes_moved": zero, "t_compute_s": zero, "t_mem_s": zero, "t_overhead_s": zero,
           "step_time_s": zero}
    by_bound = [zero, zero, zero]
    by_class = dict.fromkeys(OP_CLASSES, zero)
    for kern in kernels(ops):
        n = kern[0].layers
        flops, nbytes = sum(op.flops for op in kern), sum(op.bytes for op in kern)
        parts = [_busy(op, rates) for op in kern]
        tc = sum(p[0] for p in parts)
        tm = sum(p[1] for p in parts)
        t, overhead = kernel_time(tc, tm, rates.overhead_s[kernel_class(kern)])
        busy = np.maximum(tc, tm)
        tot["flops"] = tot["flops"] + n * flops
        tot["bytes_moved"] = tot["bytes_moved"] + n * nbytes
        tot["t_compute_s"] = tot["t_compute_s"] + n * tc
        tot["t_mem_s"] = tot["t_mem_s"] + n * tm
        tot["t_overhead_s"] = tot["t_overhead_s"] + n * overhead
        tot["step_time_s"] = tot["step_time_s"] + n * t
        is_over = overhead > busy
        is_comp = ~is_over & (tc > tm)
        by_bound[0] = by_bound[0] + n * t * (~is_over & ~is_comp)
        by_bound[1] = by_bound[1] + n * t * is_comp
        by_bound[2] = by_bound[2] + n * t * is_over
        if per_class:
            if len(kern) == 1:
                by_class[kern[0].cls] = by_class[kern[0].cls] + n * t
            else:  # a fused kernel's time is shared by its ops' own roofline times
                own = [np.maximum(a, b) for a, b in parts]
                total_own = sum(own)
                for op, o in zip(kern, own, strict=True):
                    by_class[op.cls] = by_class[op.cls] + n * t * np.divide(
                        o, total_own, out=np.full(np.shape(total_own), 1 / len(kern)), where=total_own > 0)
    stacked = np.stack(np.broadcast_arrays(*by_bound))
    tot["bound_code"] = np.argmax(stacked, axis=0)
    for b, v in zip(BOUNDS, by_bound, strict=True):
        tot[f"t_{b}_bound_s"] = v
    if per_class:
        for c, v in by_class.items():
            tot[f"t_{c}_s"] = v
    return tot


def op_table(ops: list[Op], rates: Rates) -> list[dict]:
    """One row per op (scalars): FLOPs, bytes, its own roofline time and bound, per layer and in total."""
    rows = []
    for op in ops:
        tc, tm = (float(x) for x in _busy(op, rates))
        t, overhead = (float(x) for x in kernel_time(tc, tm, rates.overhead_s[op.cls]))
        busy = max(tc, tm)
        bound = "overhead" if overhead > busy else ("compute" if tc > tm else "memory")
        rows.append({
            "name": op.name, "op_class": op.cls, "layers": op.layers, "kernel": op.kernel or op.name,
            "flops": float(op.flops), "bytes_read": float(op.read), "bytes_written": float(op.write),
            "intensity_flop_per_byte": float(op.flops) / float(op.bytes) if float(op.bytes) else float("inf"),
            "t_compute_s": tc, "t_mem_s": tm, "time_s": t, "bound": bound,
            "achieved_flops_per_s": float(op.flops) / t if t > 0 else 0.0,
        })
    return rows

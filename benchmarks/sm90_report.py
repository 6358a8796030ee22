"""Compile the fused rematerialization kernel for sm_90 on a machine without a GPU and report what the H200 would
run: registers a thread, spilled bytes, shared memory, and counts of the instructions that decide its speed
(HGMMA: Hopper's asynchronous tensor-core products; HMMA: the older synchronous ones; LDGSTS: asynchronous
global-to-shared copies; LDL/STL: local-memory traffic). No GPU time is spent.

    python benchmarks/sm90_report.py [--scheme xquant|xquant_gqa] [--absorb] [--block-n 128] [--block-k N]
        [--block-v N] [--warps 8] [--stages 3] [--sass FILE]

The launches are captured from a real call of `remat_attention` on CPU tensors at Llama-3.1-8B's shapes (the
kernel is never run), then compiled with the specialization Triton's JIT gives them on a GPU (16-byte aligned
pointers, integers divisible by 16 marked so), which is what lets it pipeline the weights' loads.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int32: "i32",
       torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages")


def capture(call) -> list[tuple[JITFunction, tuple, dict]]:
    """The (kernel, args, kwargs) of every Triton launch `call()` makes; nothing is launched."""
    launches = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = run
    return launches


def compile_sm90(fn: JITFunction, args: tuple, kwargs: dict):
    """fn compiled for sm_90 with these arguments' types and the JIT's divisibility specialization."""
    names = fn.arg_names
    values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if i in fn.constexprs:
            signature[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT folds integers equal to 1 into constants
                signature[name], constexprs[(i,)] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v).__name__}")
    opts = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=opts)


def report(k, sass_file: Path | None = None) -> dict:
    """Registers, spills, shared memory and instruction counts of a compiled kernel (cuobjdump from Triton's
    wheel)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    if sass_file:
        sass_file.write_text(sass)
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDL", "STL",
                                                              "BAR", "LDS", "STS")}
    ops["loop"] = hot_loop(sass)
    return {"regs": int(reg.group(1)) if reg else None, "stack": int(stack.group(1)) if stack else None,
            "smem": k.metadata.shared, **ops}


def hot_loop(sass: str) -> str:
    """Instructions of the innermost loop around the first HGMMA (the key projection's step): their count and the
    most frequent opcodes, e.g. '212:FFMA=40,LOP3=30,...'."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             re.finditer(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);", sass)]
    first = next((i for i, (_, ins) in enumerate(lines) if "HGMMA" in ins), None)
    if first is None:
        return "none"
    for addr, ins in lines[first:]:
        b = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if b and int(b.group(1), 16) <= lines[first][0]:
            body = [i.split()[-1] if i.startswith("@") else i.split()[0] for a, i in lines
                    if int(b.group(1), 16) <= a <= addr]
            ops = Counter(o.split(".")[0] for o in body)
            return f"{len(body)}:" + ",".join(f"{k}={v}" for k, v in ops.most_common(8))
    return "none"


def remat_call(a) -> None:
    """One remat_attention call at Llama-3.1-8B's shapes on CPU tensors (2-bit sources)."""
    from xqsim.engine.cache import Store
    from xqsim.engine.kernels.attention import Source
    from xqsim.engine.kernels.remat import remat_attention
    from xqsim.schemes.layout import tensor

    B, T, H, hd, d, Hkv = 1, 4096 + 77, 32, 128, 4096, 8
    gen = torch.Generator().manual_seed(0)

    def src(name, width, axis, residual):
        st = Store(tensor(name, width, 2, axis=axis), 128, residual, torch.bfloat16, kernels="torch")
        st.append(torch.randn(B, T, width, generator=gen))
        return Source.of(st)

    q = torch.randn(B, H, hd, dtype=torch.bfloat16)
    if a.scheme == "xquant":
        xk, xv, x0, kw, vw = src("x", d, "token", 0), None, None, d, d
    else:
        xk, xv, kw, vw = src("xk", 1023, "channel", 128), src("xv", 1024, "token", 0), 1024, 1024
        x0 = Source(torch.randn(B, T, 1, dtype=torch.bfloat16), 1, 0, 16, 128)
    wk = torch.randn(kw, Hkv * hd, dtype=torch.bfloat16)
    wv = torch.randn(vw, Hkv * hd, dtype=torch.bfloat16)
    try:
        remat_attention(q, xk, wk, 500000.0, x0=x0, xv=xv, wv=wv, absorb=a.absorb, block_n=a.block_n,
                        block_k=a.block_k, block_v=a.block_v, num_warps=a.warps, num_stages=a.stages)
    except Exception:  # the merge's output is never written: the launches were recorded, the call fails after
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", choices=("xquant", "xquant_gqa"), default="xquant")
    ap.add_argument("--absorb", action="store_true")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--block-v", type=int, default=None)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--sass", type=Path, default=None, help="write the first kernel's SASS here")
    a = ap.parse_args()
    launches = capture(lambda: remat_call(a))
    if not launches:
        sys.exit("sm90_report: no launch recorded")
    for n, (fn, args, kwargs) in enumerate(launches):
        r = report(compile_sm90(fn, args, kwargs), a.sass if n == 0 else None)
        fast = {k: kwargs[k] for k in ("KFAST", "VFAST") if k in kwargs}
        print(fn.__name__, fast, " ".join(f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()

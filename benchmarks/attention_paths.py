"""Decode attention over a strided KV cache on a GPU, three ways torch can do it: torch.matmul + softmax
(copies K/V when the cache views are strided, batch > 1), scaled_dot_product_attention with the g query
heads of a KV head as g query rows (one block per sequence and KV head: an 8-KV-head model at batch 1 keeps
8 SMs busy), and with enable_gqa (flash attention folds the query heads and splits the context: flash
decoding). The engine uses the last. Prints time and K/V read rate per shape; needs CUDA.

Measured 2026-11-23 on an H100 80GB HBM3, torch 2.11 (us, TB/s of K+V read):
  GQA 8 KV heads, batch 1, 128k tokens: enable_gqa 185 (2.9), g query rows 1509 (0.36)
  GQA, batch 16, 16k tokens: enable_gqa 352 (3.1), g query rows 356 (3.0)
  MHA 32 KV heads, batch 1, 128k tokens: 703 (3.1) either way
"""

from __future__ import annotations

import torch


def timed(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e-3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("attention_paths: needs a CUDA device")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(torch.cuda.get_device_name(), torch.__version__)
    for hkv, g in ((8, 4), (32, 1)):
        for b, t in ((1, 4096), (1, 131072), (4, 65536), (16, 16384), (64, 1024)):
            dkv = hkv * 128
            buf = torch.randn(b, t + 1, 2, dkv, device="cuda", dtype=torch.bfloat16)  # a cache with room to grow
            k = buf[:, :t, 0].view(b, t, hkv, 128).transpose(1, 2)
            v = buf[:, :t, 1].view(b, t, hkv, 128).transpose(1, 2)
            q = torch.randn(b, hkv, g, 128, device="cuda", dtype=torch.bfloat16)
            qh = q.reshape(b, hkv * g, 1, 128)  # (B, H, 1, hd)
            paths = {
                "matmul": lambda q=q, k=k, v=v: torch.softmax((q @ k.transpose(-1, -2) / 128 ** 0.5).float(), -1)
                .to(q.dtype) @ v,
                "sdpa g rows": lambda q=q, k=k, v=v: sdpa(q, k, v),
                "sdpa enable_gqa": lambda q=qh, k=k, v=v: sdpa(q, k, v, enable_gqa=True),
            }
            kv = 2 * b * t * dkv * 2
            res = ", ".join(f"{n} {(s := timed(f)) * 1e6:.0f} us ({kv / s / 1e12:.2f} TB/s)" for n, f in paths.items())
            print(f"KV heads {hkv}, batch {b}, context {t}: {res}")


if __name__ == "__main__":
    main()

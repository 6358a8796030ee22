"""Why XQuant loses to KIVI on SmolLM2-135M: the post-norm layer input X has a few outlier channels, and
per-token groups of 128 channels spend their range on them. Prints, per layer, max |X| against the median |X|,
and the relative error (Frobenius) of K = X Wk and V = X Wv rebuilt from X quantized per token (XQuant) against
K and V quantized directly as KIVI does (keys per channel over the tokens, values per token within a head).

    python benchmarks/x_outliers.py [--tokens 256] [--bits 4]
"""

from __future__ import annotations

import argparse

import torch

from xqsim import specs
from xqsim.accuracy import gguf, load_text
from xqsim.accuracy.tokenizer import BPETokenizer
from xqsim.engine.model import Engine
from xqsim.engine.quant import dequantize, quantize


def roundtrip(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """v quantized in groups of `group` along its last axis and dequantized."""
    codes, scale, zero = quantize(v, bits, group)
    return dequantize(codes, scale, zero, group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    m = gguf.load_model("smollm2-135m")
    s, w, b, G = m.spec, m.weights, args.bits, 128
    ids = BPETokenizer(m.tokens, m.merges, m.pre).encode(load_text(None)[0])[: args.tokens]
    # unquantized XQuant caches exactly the post-norm X of every layer
    e = Engine(s, specs.SchemeConfig(scheme="xquant"), store_dtype=torch.float32, weights=w)
    cache = e.new_cache()
    with torch.no_grad():
        e.prefill(torch.tensor(ids)[None], cache)
    print(f"{'layer':>5} {'max|X|':>7} {'median|X|':>9}  relative error at {b} bits: "
          "K from X, K (KIVI), V from X, V (KIVI)")
    for i in range(s.n_layers):
        x = cache[i]["x"].read(torch.float32)[0]  # (T, d)
        k, v = x @ w[f"{i}.wk"], x @ w[f"{i}.wv"]  # (T, dkv)
        xq = roundtrip(x, b, G)
        kk = roundtrip(k.T, b, min(G, k.shape[0])).T  # keys per channel, over the tokens
        vk = roundtrip(v.view(-1, s.n_kv_heads, s.hd), b, G).view(v.shape)  # values per token within a head

        def rel(a, ref):
            return ((a - ref).norm() / ref.norm()).item()

        print(f"{i:>5} {x.abs().max().item():7.2f} {x.abs().median().item():9.3f}  {rel(xq @ w[f'{i}.wk'], k):.3f} "
              f"{rel(kk, k):.3f} {rel(xq @ w[f'{i}.wv'], v):.3f} {rel(vk, v):.3f}")


if __name__ == "__main__":
    main()

"""The engine on SmolLM2-135M against an independent implementation: Hugging Face transformers loading the same
GGUF file (its own dequantization and its own un-permutation of Wq/Wk, LlamaForCausalLM in float32).

Prints the max |logit difference| over the first --tokens tokens of the evaluation text, the engine decoding
token by token with an unquantized float32 cache (the accuracy reference), transformers in one forward pass;
and how the two tokenizers split the text. transformers is not a dependency of xqsim: run this in an
environment that has it (pip install transformers accelerate), offline:

    HF_HUB_OFFLINE=1 python benchmarks/reference_check.py [--tokens 300]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from xqsim import specs
from xqsim.accuracy import gguf, load_text
from xqsim.accuracy.tokenizer import BPETokenizer
from xqsim.engine.model import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=300)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = gguf.load_model("smollm2-135m")
    tok = BPETokenizer(m.tokens, m.merges, m.pre)
    text, _ = load_text(None)
    ids = tok.encode(text)
    x = torch.tensor(ids[: args.tokens])[None]  # (1, N)

    e = Engine(m.spec, specs.SchemeConfig(scheme="fp16"), store_dtype=torch.float32, weights=m.weights)
    cache = e.new_cache()
    t0 = time.perf_counter()
    with torch.no_grad():
        ours = torch.stack([e.step(x[:, t], cache) for t in range(x.shape[1])], 1)[0]  # (N, vocab)
    t_ours = time.perf_counter() - t0

    hf = AutoModelForCausalLM.from_pretrained(str(m.path.parent), gguf_file=m.path.name, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        theirs = hf(x).logits[0].float()  # (N, vocab)
    diff = (ours - theirs).abs()
    print(f"logits over {x.shape[1]} tokens: max |engine - transformers| {diff.max().item():.3e}, "
          f"mean {diff.mean().item():.3e}, logit range {theirs.min().item():.2f} .. {theirs.max().item():.2f}, "
          f"top-1 agreement {(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item():.4f} "
          f"(engine decode {t_ours / x.shape[1] * 1e3:.1f} ms/token)")

    hf_tok = AutoTokenizer.from_pretrained(str(m.path.parent), gguf_file=m.path.name)
    theirs_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    differ = sum(a != b for a, b in zip(ids, theirs_ids, strict=False)) + abs(len(ids) - len(theirs_ids))
    multi = sum(t.lstrip("Ġ").isdigit() and len(t.lstrip("Ġ")) > 1 for t in m.tokens)
    print(f"tokenizer: xqsim {len(ids)} ids, transformers {len(theirs_ids)}, {differ} positions differ "
          f"(transformers' GGUF tokenizer does not split digits, llama.cpp's '{m.pre}' does; the vocabulary has "
          f"{multi} multi-digit tokens); xqsim decodes back to the text: {tok.decode(ids) == text}")


if __name__ == "__main__":
    main()

"""Accuracy on a real model, apart from the analytic half (it needs torch): the run (perplexity.py), the GGUF
loader of the model's weights (gguf.py) and its byte-level BPE tokenizer (tokenizer.py)."""

from .perplexity import (
    COLUMNS,
    AccuracyGrid,
    MemoEngine,
    MemoStore,
    check_writable,
    decode,
    load_text,
    run,
    strip_ocr_markers,
)

__all__ = ["COLUMNS", "AccuracyGrid", "MemoEngine", "MemoStore", "check_writable", "decode",
           "load_text", "run", "strip_ocr_markers"]

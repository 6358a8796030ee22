"""GPT-2-style byte-level BPE from a GGUF file's own vocabulary and merges (no hub, no `tokenizers`).

Pre-tokenization follows llama.cpp (llama-vocab.cpp) for the file's `tokenizer.ggml.pre`: 'smollm' (and
'starcoder', 'refact', ...) first split every digit apart, then apply GPT-2's pattern; 'gpt2' and the
default apply GPT-2's pattern only. Special tokens in the text are not parsed: text is text.
"""

from __future__ import annotations

from functools import lru_cache

from ..specs import UserError

# GPT-2's pre-tokenizer pattern (openai/gpt-2 encoder.py), as llama.cpp writes it
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
NO_MERGE = 1 << 62  # rank of a pair that has no merge
DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@lru_cache(maxsize=1)
def byte_chars() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (openai/gpt-2 encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


class BPETokenizer:
    """encode(text) -> token ids; decode(ids) -> text."""

    def __init__(self, tokens: list[str], merges: list[str], pre: str = "gpt2"):
        try:
            import regex
        except ImportError:
            raise UserError("the tokenizer needs the regex package: pip install -e '.[accuracy]'") from None
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.tokens = tokens
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        pattern = (r"\p{N}|" if pre in DIGITS_FIRST else "") + GPT2_PATTERN
        self.split = regex.compile(pattern).findall
        self.chars = byte_chars()
        self.bytes_of = {c: b for b, c in self.chars.items()}
        self._word_cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        """Merge the characters of one pre-token by rank, lowest first (GPT-2's bpe())."""
        parts = list(word)
        while len(parts) > 1:
            rank, j = min((self.ranks.get(pair, NO_MERGE), j)
                          for j, pair in enumerate(zip(parts, parts[1:], strict=False)))
            if rank == NO_MERGE:
                break
            a, b = parts[j], parts[j + 1]
            merged, k = [], 0
            while k < len(parts):  # merge every occurrence of the pair, left to right
                if k + 1 < len(parts) and parts[k] == a and parts[k + 1] == b:
                    merged.append(a + b)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        try:
            return [self.ids[p] for p in parts]
        except KeyError as err:
            raise UserError(f"tokenizer: piece {err} of {word!r} is not in the vocabulary") from None

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self.split(text):
            ids = self._word_cache.get(piece)
            if ids is None:
                ids = self._bpe("".join(self.chars[b] for b in piece.encode("utf-8")))
                self._word_cache[piece] = ids
            out += ids
        return out

    def decode(self, ids: list[int]) -> str:
        data = bytes(self.bytes_of[c] for i in ids for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")

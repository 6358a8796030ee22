"""A Llama-style decoder in torch (RMSNorm, RoPE, MHA/GQA, SwiGLU) that decodes with any scheme's cache.

Each op of a decode step runs inside `rec(name, op_class, flops)`: the FLOPs come from the shapes the op
really computed on, so a test can hold them against the analytic op list (xqsim.schemes.ops).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from .. import schemes
from ..schemes.layout import LayerGroup
from ..schemes.ops import ADD_FLOPS, DEQUANT_FLOPS, NORM_FLOPS, QUANT_FLOPS, ROPE_FLOPS, SWIGLU_FLOPS
from ..specs import ModelSpec, SchemeConfig
from .cache import Store
from .kernels import check as check_kernels
from .kernels import resolve as resolve_kernels


class Recorder:
    """Collects (name, op_class, flops) per op; a subclass may time them."""

    def __init__(self):
        self.ops: list[tuple[str, str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str, cls: str, flops: float = 0.0):
        yield
        self.ops.append((name, cls, float(flops)))


def init_weights(spec: ModelSpec, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    """Random weights of the real shapes, seeded (never zeros): N(0, 1/sqrt(fan_in))."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, f, V = spec.d_model, spec.ffn_dim, spec.vocab_size

    def w(*shape):  # drawn on the device: the same seed gives other values on CPU and GPU
        return (torch.randn(*shape, generator=g, device=device) / math.sqrt(shape[0])).to(dtype)

    out = {"embed": w(V, d) * math.sqrt(V), "norm": 1 + 0.1 * w(d) * math.sqrt(d)}
    out["head"] = out["embed"].T.contiguous() if spec.tie_embeddings else w(d, V)
    for i in range(spec.n_layers):
        out |= {f"{i}.wq": w(d, spec.dq), f"{i}.wk": w(d, spec.dkv), f"{i}.wv": w(d, spec.dkv),
                f"{i}.wo": w(spec.dq, d), f"{i}.w_gate": w(d, f), f"{i}.w_up": w(d, f), f"{i}.w_down": w(f, d),
                f"{i}.attn_norm": 1 + 0.1 * w(d) * math.sqrt(d), f"{i}.mlp_norm": 1 + 0.1 * w(d) * math.sqrt(d)}
    return out


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, kernels: str = "torch") -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last axis of x (..., T, hd) at positions pos (T,).
    kernels='triton' runs it as one Triton kernel (kernels.rope), 'torch' as torch ops (the reference)."""
    if check_kernels(kernels) == "triton":
        from .kernels.rope import rope as rope_triton

        return rope_triton(x, pos, theta)
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]  # (T, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _fused_dequant(stores: dict[str, Store], B: int, rec: Recorder) -> None:
    """The dequant op of each quantized store, recorded for its FLOPs and empty: a Triton kernel dequantizes the
    codes where it reads them, so the op moves no bytes of its own (the analytic model's fused execution)."""
    for name, st in stores.items():
        if st.t.quantized:
            with rec(f"dequant_{name}", "dequant", DEQUANT_FLOPS * B * st.n_quantized * st.t.width):
                pass


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Engine:
    """Decode with one scheme's cache. store_dtype is the cache's element type (fp16 counts 2 bytes as the
    analytic model does; float32 storage is for identity tests on CPU). A fused config attends in tiles of
    `tile` tokens (dequantize, rematerialize and attend one tile at a time, online softmax). kernels='triton'
    (the default on CUDA) runs the Triton kernels of xqsim.engine.kernels where the engine has them: K/V schemes
    then attend in one split-KV kernel over the stored codes (so their config becomes fused); 'torch' runs
    plain torch ops, the reference and the CPU path."""

    def __init__(self, spec: ModelSpec, cfg: SchemeConfig, device="cpu", dtype=torch.float32,
                 store_dtype=torch.float16, seed: int = 0, weights: dict | None = None, tile: int = 4096,
                 kernels: str | None = None):
        self.spec, self.cfg, self.tile = spec, cfg.resolved(spec), tile
        self.device, self.dtype, self.store_dtype = torch.device(device), dtype, store_dtype
        self.kernels = resolve_kernels(kernels, self.device)  # 'triton' (default on CUDA) or 'torch'
        if self.kernels == "triton" and schemes.SCHEMES[self.cfg.scheme].compresses:
            # K/V schemes attend in one kernel that dequantizes in registers, XQuant's rebuild K and V in one kernel
            # that never writes them: the fused execution, whatever was asked
            self.cfg = self.cfg.model_copy(update={"fused": True})

        self.w = weights if weights is not None else init_weights(spec, seed, self.device, dtype)
        self.groups = schemes.layout(spec, self.cfg)
        self.group_of: dict[int, LayerGroup] = {i: g for g in self.groups for i in g.layers}
        # where each layer rebuilds K and V from (None: the scheme caches them); the engine asks the plan, not the
        # scheme's name
        self.plan_of = {i: schemes.plan(spec, self.cfg, g) for i, g in self.group_of.items()}
        self._factorize()

    # ------------------------------------------------------------------ SVD factors (GQA variants)
    def _factorize(self) -> None:
        self.f: dict[str, torch.Tensor] = {}
        for i, p in self.plan_of.items():
            if p is not None and p.split_latents:  # the SVDs of Wk and of Wv, ranks rk and rv
                for side, r in (("k", p.k_width), ("v", p.v_width)):
                    U, S, Vh = torch.linalg.svd(self.w[f"{i}.w{side}"].double(), full_matrices=False)
                    self.f[f"{i}.down_{side}"] = U[:, :r].to(self.dtype)  # (d, r)
                    self.f[f"{i}.up_{side}"] = (S[:r, None] * Vh[:r]).to(self.dtype)  # (r, dkv)
            elif p is not None and p.up:  # one SVD of [Wk | Wv]: down-project with U, up-project with U^T
                U, _, _ = torch.linalg.svd(torch.cat([self.w[f"{i}.wk"], self.w[f"{i}.wv"]], 1).double(),
                                           full_matrices=False)
                self.f[f"{i}.U"] = U[:, : p.up].to(self.dtype)  # (d, r)

    # ------------------------------------------------------------------ cache
    def new_cache(self) -> list[dict[str, Store]]:
        """One dict of Stores per layer, as the analytic layout says."""
        c = self.cfg
        layers: list[dict[str, Store]] = []
        for i in range(self.spec.n_layers):
            stores = {}
            for t in self.group_of[i].tensors:
                eta = (c.eta_k if t.name == "k" else c.eta_v) or 0.0  # Yang et al.'s calibration where set
                below = layers[i - 1][t.name] if t.shared else None
                stores[t.name] = Store(t, c.group, c.residual or 0, self.store_dtype, eta, below, self.kernels)
            layers.append(stores)
        return layers

    @staticmethod
    def cache_bytes(cache: list[dict[str, Store]]) -> int:
        """Bytes of the tensors the cache really holds, all layers [B]."""
        return sum(s.nbytes() for layer in cache for s in layer.values())

    # ------------------------------------------------------------------ one step
    def step(self, tokens: torch.Tensor, cache: list[dict[str, Store]], rec: Recorder | None = None):
        """Decode one token per sequence: tokens (B,) -> logits (B, vocab); appends to the cache."""
        rec = rec or Recorder()
        s, w, B = self.spec, self.w, tokens.shape[0]
        d = s.d_model
        with rec("embedding", "elementwise"):
            x = w["embed"][tokens][:, None, :]  # (B, 1, d)
        acc = None
        for i in range(s.n_layers):
            with rec("attn_norm", "elementwise", NORM_FLOPS * B * d):
                h = rms_norm(x, w[f"{i}.attn_norm"], s.norm_eps)  # (B, 1, d)
            with rec("q_proj", "matmul", 2 * B * d * s.dq):
                q = h @ w[f"{i}.wq"]  # (B, 1, dq)
            if self.plan_of[i] is not None:
                o, acc = self._remat_attention(i, h, q, cache[i], acc, rec)
            else:
                o = self._kv_attention(i, h, q, cache[i], rec)
            with rec("o_proj", "matmul", 2 * B * s.dq * d):
                o = o @ w[f"{i}.wo"]  # (B, 1, d)
            with rec("attn_residual", "elementwise", ADD_FLOPS * B * d):
                x = x + o
            with rec("mlp_norm", "elementwise", NORM_FLOPS * B * d):
                h = rms_norm(x, w[f"{i}.mlp_norm"], s.norm_eps)
            with rec("mlp_gate_up", "matmul", 2 * B * d * 2 * s.ffn_dim):
                gate, up = h @ w[f"{i}.w_gate"], h @ w[f"{i}.w_up"]  # (B, 1, ffn) each
            with rec("mlp_act", "elementwise", SWIGLU_FLOPS * B * s.ffn_dim):
                a = torch.nn.functional.silu(gate) * up
            with rec("mlp_down", "matmul", 2 * B * s.ffn_dim * d):
                o = a @ w[f"{i}.w_down"]
            with rec("mlp_residual", "elementwise", ADD_FLOPS * B * d):
                x = x + o
        with rec("final_norm", "elementwise", NORM_FLOPS * B * d):
            x = rms_norm(x, w["norm"], s.norm_eps)
        with rec("lm_head", "matmul", 2 * B * d * s.vocab_size):
            return (x @ w["head"])[:, 0]  # (B, vocab)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: list[dict[str, Store]]) -> torch.Tensor:
        """Run a prompt (B, T0) through the model at full precision (causal attention over its own K and V,
        as KIVI and XQuant do), fill the cache with what each layer stores, return the last logits (B, vocab)."""
        s, w = self.spec, self.w
        B, T0 = tokens.shape
        H, Hkv, hd = s.n_heads, s.n_kv_heads, s.hd
        pos = torch.arange(T0, device=tokens.device)
        x = w["embed"][tokens]  # (B, T0, d)
        acc = None
        for i in range(s.n_layers):
            h = rms_norm(x, w[f"{i}.attn_norm"], s.norm_eps)  # (B, T0, d)
            q = rope((h @ w[f"{i}.wq"]).view(B, T0, H, hd).transpose(1, 2), pos, s.rope_theta)  # (B, H, T0, hd)
            k = rope((h @ w[f"{i}.wk"]).view(B, T0, Hkv, hd).transpose(1, 2), pos, s.rope_theta)  # (B, Hkv, T0, hd)
            v = (h @ w[f"{i}.wv"]).view(B, T0, Hkv, hd).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), is_causal=True)
            x = x + o.transpose(1, 2).reshape(B, T0, H * hd) @ w[f"{i}.wo"]
            hm = rms_norm(x, w[f"{i}.mlp_norm"], s.norm_eps)
            x = x + (torch.nn.functional.silu(hm @ w[f"{i}.w_gate"]) * (hm @ w[f"{i}.w_up"])) @ w[f"{i}.w_down"]
            acc = self._prefill_store(i, h, k, v, cache[i], acc)
        return rms_norm(x[:, -1], w["norm"], s.norm_eps) @ w["head"]

    def _prefill_store(self, i, h, k, v, stores, acc):
        """What layer i caches for the prompt; the CL schemes rebuild X^ from what they stored."""
        c, role, p = self.cfg, self.group_of[i].role, self.plan_of[i]
        B, T0, _ = h.shape
        if p is None:
            stores["k"].append(k.transpose(1, 2).reshape(B, T0, -1))  # post-RoPE keys (B, T0, dkv)
            stores["v"].append(v.transpose(1, 2).reshape(B, T0, -1))
            return acc
        if p.split_latents:
            lk, lv = h @ self.f[f"{i}.down_k"], h @ self.f[f"{i}.down_v"]
            if c.keep_first_channel:
                stores["xk0"].append(lk[..., :1])
                lk = lk[..., 1:]
            stores["xk"].append(lk)
            stores["xv"].append(lv)
            return acc
        st = next(iter(stores.values()))
        U = self.f.get(f"{i}.U")
        x = h - acc if role == "delta" else h  # (B, T0, d)
        st.append(x @ U if U is not None else x)
        if role == "plain":
            return acc
        back = st.read(self.dtype)
        back = back @ U.T if U is not None else back  # (B, T0, d)
        return back if role == "base" else acc + back

    def _store(self, stores: dict[str, Store], values: dict[str, torch.Tensor], rec: Recorder) -> None:
        """append_<t> and quantize_<t>, in the analytic model's order."""
        for name, v in values.items():
            st = stores[name]
            B, n, width = v.shape
            if st.t.quantized and not st.R:  # no residual window: the new token goes straight to codes
                with rec(f"quantize_{name}", "quant", QUANT_FLOPS * B * n * width):
                    st.append(v)
                continue
            with rec(f"append_{name}", "elementwise"):
                st.push(v)
            if st.t.quantized:  # FLOPs of the tokens it really quantizes now (R at a time per channel)
                with rec(f"quantize_{name}", "quant", QUANT_FLOPS * B * st.pending() * width):
                    st.flush()

    def _kv_attention(self, i, h, q, stores, rec):
        s, w = self.spec, self.w
        B, T0 = h.shape[0], stores["k"].tokens
        hd, H, Hkv = s.hd, s.n_heads, s.n_kv_heads
        pos = torch.arange(T0, T0 + 1, device=h.device)
        with rec("kv_proj", "matmul", 2 * B * s.d_model * 2 * s.dkv):
            k, v = h @ w[f"{i}.wk"], h @ w[f"{i}.wv"]  # (B, 1, dkv)
        with rec("rope_q", "rope", ROPE_FLOPS * B * s.dq):
            qh = rope(q.view(B, 1, H, hd).transpose(1, 2), pos, s.rope_theta, self.kernels)  # (B, H, 1, hd)
        with rec("rope_k", "rope", ROPE_FLOPS * B * s.dkv):
            k = rope(k.view(B, 1, Hkv, hd).transpose(1, 2), pos, s.rope_theta, self.kernels)  # (B, Hkv, 1, hd)
            k = k.transpose(1, 2).reshape(B, 1, -1)  # (B, 1, dkv)
        self._store(stores, {"k": k, "v": v}, rec)
        if self.kernels == "triton":
            return self._kernel_attention(qh, stores, rec)

        def make_tile(t0: int, t1: int):
            kv = self._read_tile(stores, t0, t1, rec)  # (B, n, dkv) each
            return tuple(kv[x].view(B, t1 - t0, Hkv, hd).transpose(1, 2) for x in ("k", "v"))  # (B, Hkv, n, hd)

        return self._attend_tiles(qh, stores["k"].tokens, make_tile, rec)

    def _kernel_attention(self, qh: torch.Tensor, stores: dict[str, Store], rec: Recorder) -> torch.Tensor:
        """Attention of q (B, H, 1, hd) over the cached K and V in one Triton split-KV kernel (and its merge):
        codes are dequantized in registers, so the dequant ops move no bytes of their own (the analytic model's
        fused execution); they are recorded, empty, for their FLOPs."""
        from .kernels.attention import Source, decode_attention

        B, H, _, hd = qh.shape
        _fused_dequant(stores, B, rec)
        T = stores["k"].tokens
        with rec("attention", "attention", 4 * B * H * T * hd):
            o = decode_attention(qh.reshape(B, H, hd), Source.of(stores["k"]), Source.of(stores["v"]))  # (B, H, hd)
        return o.reshape(B, 1, H * hd)

    def _remat_attention(self, i, h, q, stores, acc, rec):
        """Store this token's X (or latent, or delta), rebuild K and V for all T tokens, attend.
        acc (B, T, d) is X^ of the CL schemes, carried from layer to layer; returned updated."""
        s, w, c = self.spec, self.w, self.cfg
        B, d, hd, H = h.shape[0], s.d_model, s.hd, s.n_heads
        role, p = self.group_of[i].role, self.plan_of[i]
        T = next(iter(stores.values())).tokens + 1
        pos = torch.arange(T, device=h.device)
        x_new = h - acc[:, -1:] if role == "delta" else h  # CL: the delta against X^ of layer i-1
        if p.split_latents:
            with rec("down_proj", "matmul", 2 * B * d * p.down):
                lk, lv = h @ self.f[f"{i}.down_k"], h @ self.f[f"{i}.down_v"]  # (B, 1, rk), (B, 1, rv)
            new = ({"xk0": lk[..., :1], "xk": lk[..., 1:]} if c.keep_first_channel else {"xk": lk}) | {"xv": lv}
        elif p.up:
            U = self.f[f"{i}.U"]  # (d, r)
            with rec("down_proj", "matmul", 2 * B * d * U.shape[1]):
                new = {next(iter(stores)): x_new @ U}  # (B, 1, r)
        else:
            new = {next(iter(stores)): x_new}  # (B, 1, d)
        with rec("rope_q", "rope", ROPE_FLOPS * B * s.dq):
            qh = rope(q.view(B, 1, H, hd).transpose(1, 2), pos[-1:], s.rope_theta, self.kernels)  # (B, H, 1, hd)
        self._store(stores, new, rec)
        absorb = c.strategy == "absorb_v"
        if self.kernels == "triton":
            from .kernels.remat import supported

            if supported(s.hd, self.device):  # else the torch tiles below (MIN_GPU_HEAD_DIM)
                return self._kernel_remat(i, qh, stores, acc, rec)
        if role == "base":
            acc = torch.empty(B, T, d, device=h.device, dtype=self.dtype)  # X^ (B, T, d), filled tile by tile
        wv = self.f[f"{i}.up_v"] if p.split_latents else w[f"{i}.wv"]
        tile = functools.partial(self._rebuilt_tile, i, stores, acc, pos, rec)
        return self._attend_tiles(qh, T, tile, rec, wv if absorb else None), acc

    def _rebuilt_tile(self, i, stores, acc, pos, rec, t0: int, t1: int):
        """Tokens [t0, t1) of layer i rebuilt in torch: K (B, Hkv, n, hd), rotated, and V (B, Hkv, n, hd), or with
        absorb_v the value source (B, n, width). The CL schemes write their tile of X^ into acc (B, T, d) first."""
        s, w, c = self.spec, self.w, self.cfg
        role, p = self.group_of[i].role, self.plan_of[i]
        d, dkv, hd, Hkv = s.d_model, s.dkv, s.hd, s.n_kv_heads
        vals = self._read_tile(stores, t0, t1, rec)  # name -> (B, n, width)
        B, n = next(iter(vals.values())).shape[:2]
        if p.split_latents:
            k_src = torch.cat([vals["xk0"], vals["xk"]], -1) if c.keep_first_channel else vals["xk"]  # (B, n, rk)
            v_src, wk, wv = vals["xv"], self.f[f"{i}.up_k"], self.f[f"{i}.up_v"]
        else:
            x = next(iter(vals.values()))  # (B, n, width)
            if p.up:
                U = self.f[f"{i}.U"]
                with rec("up_proj", "remat", 2 * B * n * U.shape[1] * d):
                    x = x @ U.T  # (B, n, d)
            if role != "plain":
                with rec("accumulate", "elementwise", ADD_FLOPS * B * n * d * (role == "delta")):
                    if role == "base":
                        acc[:, t0:t1] = x
                    else:
                        acc[:, t0:t1] += x
                x = acc[:, t0:t1]
            k_src = v_src = x
            wk, wv = w[f"{i}.wk"], w[f"{i}.wv"]
        with rec("remat_k", "remat", 2 * B * n * k_src.shape[-1] * dkv):
            K = (k_src @ wk).view(B, n, Hkv, hd).transpose(1, 2)  # (B, Hkv, n, hd)
        with rec("rope_k", "rope", ROPE_FLOPS * B * n * dkv):
            K = rope(K, pos[t0:t1], s.rope_theta, self.kernels)
        if c.strategy == "absorb_v":
            return K, v_src
        with rec("remat_v", "remat", 2 * B * n * v_src.shape[-1] * dkv):
            return K, (v_src @ wv).view(B, n, Hkv, hd).transpose(1, 2)  # (B, Hkv, n, hd)

    def _kernel_remat(self, i, qh, stores, acc, rec):
        """_remat_attention's rebuild and attention in one Triton kernel (kernels.remat): codes are dequantized, K
        and V rebuilt and K rotated tile by tile on chip, so those ops move no bytes of their own; they are recorded,
        empty, for their FLOPs."""
        from .kernels.remat import remat_attention

        s, c = self.spec, self.cfg
        B, H, _, hd = qh.shape
        T, dkv, absorb = next(iter(stores.values())).tokens, s.dkv, c.strategy == "absorb_v"
        (xk, x0, xv, wk, wv), acc = self._kernel_sources(i, B, stores, acc, rec)
        k_width, v_width = wk.shape[0], wv.shape[0]
        with rec("remat_k", "remat", 2 * B * T * k_width * dkv):
            pass  # inside the kernel, as are RoPE of K and, with remat, the rebuild of V
        with rec("rope_k", "rope", ROPE_FLOPS * B * T * dkv):
            pass
        if not absorb:
            with rec("remat_v", "remat", 2 * B * T * v_width * dkv):
                pass
        q = qh.reshape(B, H, hd)
        with rec("attention_qk" if absorb else "attention", "attention", (2 if absorb else 4) * B * H * T * hd):
            o = remat_attention(q, xk, wk, s.rope_theta, x0=x0, xv=xv, wv=wv, absorb=absorb)  # (B, H, hd | width)
        if absorb:
            with rec("attention_px", "attention", 2 * B * H * T * v_width):
                pass
            with rec("v_absorb", "matmul", 2 * B * H * v_width * hd):
                o = torch.einsum("bkgw,wkh->bkgh", o.to(self.dtype).view(B, s.n_kv_heads, H // s.n_kv_heads, -1),
                                 wv.view(-1, s.n_kv_heads, hd))  # (B, Hkv, g, hd)
        return o.reshape(B, 1, H * hd), acc

    def _kernel_sources(self, i, B, stores, acc, rec):
        """What the remat kernel reads for layer i at batch B: ((key source, fp16 first channel or None, value
        source or None, key weight, value weight), X^). The cross-layer schemes first rebuild X^ (B, T, d), read
        unquantized: XQuant-CL in one kernel that dequantizes and adds (kernels.remat.accumulate), CL-GQA in torch
        (dequantize, up-project, add). Other sources are read as they are stored, dequantized inside the kernel."""
        from .kernels.attention import Source
        from .kernels.remat import accumulate

        s, w, c = self.spec, self.w, self.cfg
        d, role, p = s.d_model, self.group_of[i].role, self.plan_of[i]
        st = next(iter(stores.values()))
        T = st.tokens
        if p.acc and not p.up:  # X^ (B, T, d) from X or its delta, dequantized inside the accumulation kernel
            _fused_dequant(stores, B, rec)
            with rec("accumulate", "elementwise", ADD_FLOPS * B * T * d * (role == "delta")):
                acc = accumulate(Source.of(st), acc if role == "delta" else None, self.dtype)
            return (Source(acc, d, 0, 16, c.group), None, None, w[f"{i}.wk"], w[f"{i}.wv"]), acc
        if p.up:  # X (B, T, d) up-projected from the joint latent, then X^
            x = next(iter(self._read_tile(stores, 0, T, rec).values()))  # (B, T, r)
            U = self.f[f"{i}.U"]
            with rec("up_proj", "remat", 2 * B * T * U.shape[1] * d):
                x = x @ U.T  # (B, T, d)
            if role != "plain":
                with rec("accumulate", "elementwise", ADD_FLOPS * B * T * d * (role == "delta")):
                    acc = x if role == "base" else acc + x  # X^ (B, T, d)
                x = acc
            return (Source(x, d, 0, 16, c.group), None, None, w[f"{i}.wk"], w[f"{i}.wv"]), acc
        _fused_dequant(stores, B, rec)
        if p.split_latents:
            x0 = Source.of(stores["xk0"]) if c.keep_first_channel else None
            return (Source.of(stores["xk"]), x0, Source.of(stores["xv"]), self.f[f"{i}.up_k"],
                    self.f[f"{i}.up_v"]), acc
        return (Source.of(st), None, None, w[f"{i}.wk"], w[f"{i}.wv"]), acc  # X itself

    def _read_tile(self, stores: dict[str, Store], t0: int, t1: int, rec: Recorder) -> dict[str, torch.Tensor]:
        """Tokens [t0, t1) of every tensor as values; dequant_<t> for the quantized ones."""
        out = {}
        for name, st in stores.items():
            if st.t.quantized:
                B = st.fp.shape[0] if st.fp is not None else st.scale.shape[0]
                flops = DEQUANT_FLOPS * B * st.quantized_in(t0, t1) * st.t.width
                with rec(f"dequant_{name}", "dequant", flops):
                    out[name] = st.read_range(t0, t1, self.dtype)
            else:
                out[name] = st.read_range(t0, t1, self.dtype)
        return out

    def _attend_tiles(self, qh: torch.Tensor, T: int, make_tile, rec: Recorder, wv_absorb=None) -> torch.Tensor:
        """Attention of q (B, H, 1, hd) over T tokens, tile by tile with an online softmax.

        Unfused, one tile spans the context (every intermediate exists whole, as the analytic model says)
        and q.K^T, softmax and P.V run as one scaled_dot_product_attention, which reads K and V once, as the
        model's attention op does (FlashAttention on a GPU); fused, tiles of `self.tile` tokens with the softmax
        carried in torch: no intermediate is larger than a tile. make_tile(t0, t1) gives
        K (B, Hkv, n, hd) and V (B, Hkv, n, hd), or with absorb_v the value source (B, n, width)."""
        s = self.spec
        B, H, _, hd = qh.shape
        Hkv, g = s.n_kv_heads, H // s.n_kv_heads
        tile = self.tile if self.cfg.fused else T
        if tile >= T and wv_absorb is None:  # one tile: one fused pass over K and V
            K, V = make_tile(0, T)
            with rec("attention", "attention", 4 * B * H * T * hd):
                # K/V may be strided views of the cache (only hd must be dense); with enable_gqa, torch's flash
                # attention folds the g query heads of a KV head into one block and splits the context over
                # blocks (flash decoding), so batch 1 reads K and V at ~2.9 TB/s on an H100 instead of the
                # ~0.4 TB/s of g query rows per (sequence, KV head) block (benchmarks/attention_paths.py)
                o = torch.nn.functional.scaled_dot_product_attention(qh, K, V, enable_gqa=True)  # (B, H, 1, hd)
            return o.reshape(B, 1, H * hd)
        qg = qh.view(B, Hkv, g, hd) / math.sqrt(hd)  # (B, Hkv, g, hd)
        m = l = o = None
        for t0 in range(0, T, tile):
            t1 = min(T, t0 + tile)
            n = t1 - t0
            K, V = make_tile(t0, t1)
            absorb = wv_absorb is not None
            with rec("attention_qk" if absorb else "attention", "attention", (2 if absorb else 4) * B * H * n * hd):
                sc = qg @ K.transpose(-1, -2)  # (B, Hkv, g, n)
                m_new = sc.amax(-1, keepdim=True) if m is None else torch.maximum(m, sc.amax(-1, keepdim=True))
                p = torch.exp(sc - m_new)
                alpha = None if m is None else torch.exp(m - m_new)
                l = p.sum(-1, keepdim=True) if l is None else l * alpha + p.sum(-1, keepdim=True)
                if not absorb:
                    pv = p @ V  # (B, Hkv, g, hd)
                    o = pv if o is None else o * alpha + pv
            if absorb:
                with rec("attention_px", "attention", 2 * B * H * n * V.shape[-1]):
                    # one batched matmul over the H query rows: p (B, H, n) @ X (B, n, width); broadcasting
                    # X over the heads (p @ V[:, None]) would copy it H_kv times
                    pv = (p.reshape(B, H, n) @ V).view(B, Hkv, g, -1)  # (B, Hkv, g, width)
                    o = pv if o is None else o * alpha + pv
            m = m_new
        o = o / l
        if wv_absorb is not None:
            with rec("v_absorb", "matmul", 2 * B * H * o.shape[-1] * hd):
                o = torch.einsum("bkgw,wkh->bkgh", o, wv_absorb.view(-1, Hkv, hd))  # (B, Hkv, g, hd)
        return o.reshape(B, 1, H * hd)


"""The split-KV decode attention kernel against torch over the same cache: fp16 and KIVI layouts, 2/3/4/8 bits,
groups and residual windows, contexts that are not multiples of the group, the tile or the split, GQA and MHA.
On CPU it runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from xqsim import loading, specs  # noqa: E402
from xqsim.capacity import memory  # noqa: E402
from xqsim.engine.cache import Store  # noqa: E402
from xqsim.engine.kernels import available  # noqa: E402
from xqsim.engine.kernels.attention import Source, decode_attention, fast_tiles, n_splits  # noqa: E402
from xqsim.engine.model import Engine  # noqa: E402
from xqsim.schemes.layout import tensor  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not available(DEV):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def reference(q, K, V):
    """softmax(q K^T / sqrt(hd)) V in float64: q (B, H, hd), K/V (B, T, Hkv*hd) -> (B, H, hd)."""
    B, H, hd = q.shape
    Hkv = K.shape[-1] // hd
    Kh = K.double().view(B, -1, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (B, H, T, hd)
    Vh = V.double().view(B, -1, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    s = (q.double()[:, :, None] @ Kh.transpose(-1, -2)) / hd**0.5  # (B, H, 1, T)
    return (s.softmax(-1) @ Vh)[:, :, 0]


def stores(bits, G, R, T, B, Hkv, hd, seed, kernels="triton"):
    """A layer's K (per channel) and V (per token, rows of one head) holding T random tokens; kernels='triton' packs
    2-, 4- and 8-bit codes along the contracted axis (the Triton engine's stores), 'torch' as quant.pack does."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    dkv = Hkv * hd
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float16
    k = Store(tensor("k", dkv, bits, axis="channel"), G, R, dtype, kernels=kernels)
    v = Store(tensor("v", dkv, bits, row=hd), G, R, dtype, kernels=kernels)
    k.append(torch.randn(B, T, dkv, generator=g, device=DEV))
    v.append(torch.randn(B, T, dkv, generator=g, device=DEV))
    return k, v


CASES = [  # bits, group, residual, context, batch, KV heads, query heads per KV head, head dim, tile, fast tiles
    (16, 128, 0, 77, 2, 2, 4, 32, 32, False),
    (16, 128, 0, 300, 1, 4, 1, 16, 64, False),  # MHA
    (2, 64, 64, 333, 2, 2, 4, 64, 64, True),  # fast tiles, then a residual tail
    (2, 128, 128, 300, 1, 1, 8, 64, 128, True),  # a 128-token tile: 8 words a row
    (4, 32, 32, 200, 2, 2, 4, 32, 32, True),
    (8, 32, 64, 333, 1, 2, 4, 16, 16, True),
    (4, 64, 32, 333, 1, 2, 2, 32, 32, True),  # two tiles in a 64-token key block
    (2, 32, 32, 200, 2, 2, 4, 32, 32, False),  # 2 words a row: general path
    (2, 16, 32, 131, 1, 2, 2, 16, 16, False),
    (3, 32, 64, 333, 2, 2, 4, 32, 32, False),  # codes straddle bytes: every tile through the general path
    (2, 8, 8, 45, 2, 2, 4, 16, 16, False),  # value groups of 8 < head dim: general path
    (4, 32, 32, 31, 2, 2, 4, 32, 32, False),  # nothing quantized yet (T < R)
]


@pytest.mark.parametrize("bits,G,R,T,B,Hkv,g,hd,tile,fast_path,kernels",
                         [(*c, "triton") for c in CASES if c[0] in (2, 4, 8)] + [(*c, "torch") for c in CASES])
def test_kernel_equals_reference(bits, G, R, T, B, Hkv, g, hd, tile, fast_path, kernels):
    """Both packings of the codes (cross: the Triton engine's at 2, 4 and 8 bits; quant.pack's, which is also the
    Triton engine's at 3 and 16 bits: the general path only)."""
    k, v = stores(bits, G, R, T, B, Hkv, hd, seed=bits * 1000 + T, kernels=kernels)
    q = torch.randn(B, Hkv * g, hd, device=DEV, generator=torch.Generator(device=DEV).manual_seed(T))
    ref = reference(q, k.read(torch.float64), v.read(torch.float64))
    if bits < 16:
        assert fast_tiles(Source.of(k), Source.of(v), hd, tile) == (fast_path and kernels == "triton"), \
            f"bits {bits} hd {hd} tile {tile} {kernels}: fast tiles not as this case expects"
    # where fast tiles run, mixed=False sends the tiles that reach into the fp16 windows through the general path
    # over the same cross-packed codes (elsewhere every tile takes the general path already)
    for fast, mixed in ((True, True),) + (((True, False),) if fast_path else ()):
        out = decode_attention(q.to(k.dtype), Source.of(k), Source.of(v), block_n=tile, fast=fast, mixed=mixed)
        assert out.shape == ref.shape and out.dtype == k.dtype
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"bits {bits} G {G} R {R} T {T} fast={fast} mixed={mixed}: relative error {err:.2e}" \
                           " (limit 1e-2)"


def test_split_boundaries_do_not_change_the_result():
    """The same cache attended with 1 and with many context splits (and tiles of 16 and 32) agrees to the rounding
    of the output's dtype (bf16 on a GPU: 2^-8 relative)."""
    k, v = stores(4, 64, 64, 250, 1, 2, 32, seed=3)
    q = torch.randn(1, 8, 32, device=DEV, dtype=k.dtype)
    assert fast_tiles(Source.of(k), Source.of(v), 32, 32)
    outs = [decode_attention(q, Source.of(k), Source.of(v), block_n=bn, per_sm=ps).double()
            for bn, ps in ((32, 1), (16, 64), (64, 64))]
    for o in outs[1:]:
        err = ((o - outs[0]).norm() / outs[0].norm()).item()
        assert err < 4e-3, f"split or tile changed the output by {err:.2e} (limit 4e-3)"


def test_n_splits_fills_the_last_wave():
    assert n_splits(8, 8192, 128, 396) == 49  # 392 programs: 99% of one wave
    assert n_splits(2048, 8192, 128, 396) == 1
    assert n_splits(8, 200, 128, 396) == 2  # never more splits than tiles
    for bh, T in ((8, 131072), (64, 32768), (32, 8192)):
        s = n_splits(bh, T, 128, 396)
        n = bh * s
        assert n / (-(-n // 396) * 396) >= 0.9, (bh, T, s)


@pytest.mark.parametrize("scheme,kw", [("fp16", {}), ("kivi", {"bits": 2, "group": 16, "residual": 16}),
                                       ("kivi", {"bits": 3, "group": 8, "residual": 8}),
                                       ("xquant_yang", {"bits": 2, "group": 16, "residual": 16})])
def test_engine_decodes_the_same_logits_with_the_kernel(scheme, kw):
    """tiny-gqa, a 28-token prompt and 12 decoded tokens (a key block of 16 leaves the window while decoding) into a
    Triton-engine cache; then one step attended by the kernel and the same step (rolled back) attended by torch over
    the same cache: the same logits. The cache holds the analytic bytes."""
    m = loading.load_model("tiny-gqa")
    tokens = torch.randint(0, m.vocab_size, (2, 41), generator=torch.Generator().manual_seed(2)).to(DEV)
    e = Engine(m, specs.SchemeConfig(scheme=scheme, **kw), device=DEV, seed=1, store_dtype=torch.float16,
               kernels="triton")
    cache = e.new_cache()
    e.prefill(tokens[:, :28], cache)
    for t in range(28, 40):
        e.step(tokens[:, t], cache)
    snaps = [[st.snapshot() for st in layer.values()] for layer in cache]
    outs = []
    for kernels in ("triton", "torch"):
        e.kernels = kernels
        outs.append(e.step(tokens[:, 40], cache))
        for layer, snap in zip(cache, snaps, strict=True):
            for st, sn in zip(layer.values(), snap, strict=True):
                st.rollback(sn)
    err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    assert err < 5e-3, f"{scheme} {kw}: max |logit diff| / max |logit| = {err:.2e}"
    analytic = int(memory(m, e.cfg, 2, np.array([40]))["cache_bytes"][0])
    assert Engine.cache_bytes(cache) == analytic, (Engine.cache_bytes(cache), analytic)


def test_engine_records_kernel_attention_as_fused_ops():
    """Under kernels='triton' a KIVI config runs fused: dequant ops recorded for their FLOPs, one attention op."""
    from xqsim.engine.model import Recorder

    m = loading.load_model("tiny-gqa")
    e = Engine(m, specs.SchemeConfig(scheme="kivi", bits=2, group=16, residual=16), device=DEV, kernels="triton")
    assert e.cfg.fused and e.kernels == "triton"
    cache = e.new_cache()
    e.prefill(torch.randint(0, m.vocab_size, (1, 40), device=DEV), cache)
    rec = Recorder()
    e.step(torch.randint(0, m.vocab_size, (1,), device=DEV), cache, rec)
    names = [n for n, _, _ in rec.ops]
    assert names.count("attention") == m.n_layers and names.count("dequant_k") == m.n_layers, names


def test_small_value_scales_keep_their_precision():
    """8-bit values of a small range (scales ~3e-5) under spread scores: most of P*s lies below fp16's normal range
    (6e-5) unless the kernel scales it; the fast tiles must still match the reference to fp16 rounding."""
    bits, G, R, T, B, Hkv, g, hd = 8, 32, 32, 512, 1, 1, 4, 32
    dkv, dtype = Hkv * hd, (torch.bfloat16 if DEV.type == "cuda" else torch.float16)
    gen = torch.Generator(device=DEV).manual_seed(11)
    k = Store(tensor("k", dkv, bits, axis="channel"), G, R, dtype, kernels="triton")
    v = Store(tensor("v", dkv, bits, row=hd), G, R, dtype, kernels="triton")
    k.append(torch.randn(B, T, dkv, generator=gen, device=DEV))
    v.append(1e-3 * torch.randn(B, T, dkv, generator=gen, device=DEV))
    q = 3 * torch.randn(B, Hkv * g, hd, device=DEV, generator=gen)
    assert fast_tiles(Source.of(k), Source.of(v), hd, 32)
    ref = reference(q, k.read(torch.float64), v.read(torch.float64))
    out = decode_attention(q.to(dtype), Source.of(k), Source.of(v), block_n=32)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 5e-3, f"relative error {err:.2e} (limit 5e-3)"

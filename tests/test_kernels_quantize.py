"""Quantize-on-append as one Triton kernel (xqsim.engine.kernels.quantize) against the torch reference
(quant.quantize + quant.pack, Store with kernels='torch'): codes, scale and zero bit for bit in both layouts, the
sliding residual window, bytes, snapshot/rollback, and an engine decode. Without a GPU the kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from xqsim import loading, specs  # noqa: E402
from xqsim.engine.cache import Store  # noqa: E402
from xqsim.engine.kernels import available  # noqa: E402
from xqsim.engine.model import Engine  # noqa: E402
from xqsim.engine.quant import pack, quantize, unpack  # noqa: E402
from xqsim.schemes.layout import CacheTensor  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not available(DEV):
    pytest.skip("Triton cannot run here (no CUDA device and TRITON_INTERPRET is not 1)", allow_module_level=True)

from xqsim.engine.kernels.quantize import quantize_channels, quantize_tokens  # noqa: E402

SENTINEL = 0xA5  # bytes around the slots a kernel writes: they must stay as they were


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp16 tensors equal bit for bit (tells -0 from +0, NaN equals NaN)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def check_codes(got: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Codes equal except at rounding ties: y (same shape) is the reference's (x - zero) / scale."""
    bad = got != ref
    frac = bad.float().mean().item()
    diff = (got.int() - ref.int()).abs().max().item() if got.numel() else 0
    frac_part = (y - y.floor())[bad]
    ties = bool(((frac_part - 0.5).abs() < 1e-3).all())
    assert frac <= 1e-3 and diff <= 1 and ties, \
        f"{what}: {bad.sum().item()} of {got.numel()} codes differ ({frac:.2e}), max |diff| {diff}, all at ties: {ties}"


def ratio(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """(x - zero) / scale per value, x (..., n) with scale/zero (..., ceil(n/group)), as quant.quantize has it."""
    n = x.shape[-1]
    s = scale.float().clamp_min(1e-8).repeat_interleave(group, -1)[..., :n]
    return (x.float() - zero.float().repeat_interleave(group, -1)[..., :n]) / s


def padded(shape: tuple, dim: int, extra: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer with `extra` spare slots on both sides of `dim` filled with a sentinel, and the view between."""
    big = list(shape)
    big[dim] += 2 * extra
    buf = torch.full(big, SENTINEL, dtype=torch.uint8, device=DEV) if dtype == torch.uint8 else \
        torch.full(big, -7.0, dtype=dtype, device=DEV)
    return buf, buf.narrow(dim, extra, shape[dim])


def untouched(buf: torch.Tensor, dim: int, extra: int) -> bool:
    fill = SENTINEL if buf.dtype == torch.uint8 else -7.0
    n = buf.shape[dim]
    return bool((buf.narrow(dim, 0, extra) == fill).all() and (buf.narrow(dim, n - extra, extra) == fill).all())


# (row, rows, group, dtype, eta): whole groups, one group a row, a partial last group (80 = 2*32 + 16), and a
# group that is not a multiple of 8 (its codes straddle the kernel's chunks of 8)
TOKEN_CASES = [(128, 2, 32, torch.float16, 0.0), (128, 2, 128, torch.bfloat16, 0.0),
               (80, 3, 32, torch.float32, 0.1), (40, 2, 12, torch.float16, 0.0)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("row,rows,group,dtype,eta", TOKEN_CASES)
def test_token_groups_match_torch(bits, row, rows, group, dtype, eta):
    B, k = 2, 3
    x = (torch.randn(B, k + 2, rows * row, generator=gen(bits * 100 + group), device=DEV) * 3 + 1).to(dtype)
    x = x[:, 1:k + 1]  # a strided view, as the residual window is
    codes_ref, scale_ref, zero_ref = quantize(x.reshape(B, k, rows, row), bits, group, eta)
    ng, nbytes = -(-row // group), -(-row * bits // 8)
    cbuf, codes = padded((B, k, rows, nbytes), 1, 2, torch.uint8)
    sbuf, scale = padded((B, k, rows, ng), 1, 2, torch.float16)
    zbuf, zero = padded((B, k, rows, ng), 1, 2, torch.float16)
    quantize_tokens(x, row, bits, group, eta, codes, scale, zero)
    what = f"token row={row} G={group} {bits}-bit {dtype} eta={eta}"
    assert bits_equal(scale, scale_ref) and bits_equal(zero, zero_ref), f"{what}: scale/zero differ"
    got = unpack(codes, bits, row)  # (B, k, rows, row)
    check_codes(got, codes_ref, ratio(x.reshape(B, k, rows, row), scale_ref, zero_ref, group), what)
    assert torch.equal(pack(got, bits), codes), f"{what}: padding bits of the last byte are not zero"
    if torch.equal(got, codes_ref):
        assert torch.equal(codes, pack(codes_ref, bits)), f"{what}: bytes differ from quant.pack"
    assert all(untouched(b, 1, 2) for b in (cbuf, sbuf, zbuf)), f"{what}: wrote outside its slots"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,width,dtype,eta", [(32, 40, torch.float16, 0.0), (128, 24, torch.bfloat16, 0.05),
                                                   (12, 20, torch.float32, 0.0)])
def test_channel_blocks_match_torch(bits, group, width, dtype, eta):
    B, nb = 2, 2
    k = nb * group
    x = (torch.randn(B, k + 3, width, generator=gen(bits + group), device=DEV) * 2 - 1).to(dtype)[:, 3:]
    blocks = x.transpose(1, 2).reshape(B, width, nb, group)  # (B, width, nb, G)
    codes_ref, scale_ref, zero_ref = quantize(blocks, bits, group, eta)
    scale_ref, zero_ref = scale_ref[..., 0], zero_ref[..., 0]  # (B, width, nb)
    nbytes = -(-group * bits // 8)
    cbuf, codes = padded((B, width, nb, nbytes), 2, 1, torch.uint8)
    sbuf, scale = padded((B, width, nb), 2, 1, torch.float16)
    zbuf, zero = padded((B, width, nb), 2, 1, torch.float16)
    quantize_channels(x, bits, group, eta, codes, scale, zero)
    what = f"channel G={group} {bits}-bit {dtype} eta={eta}"
    assert bits_equal(scale, scale_ref) and bits_equal(zero, zero_ref), f"{what}: scale/zero differ"
    got = unpack(codes, bits, group)  # (B, width, nb, G)
    check_codes(got, codes_ref, ratio(blocks, scale_ref[..., None], zero_ref[..., None], group), what)
    assert torch.equal(pack(got, bits), codes), f"{what}: padding bits of the last byte are not zero"
    assert all(untouched(b, 2, 1) for b in (cbuf, sbuf, zbuf)), f"{what}: wrote outside its slots"


def test_ties_round_half_to_even_by_hand():
    """A group of 8 at 2 bits: min 0, max 3, scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (torch.round), packed
    little-endian, 4 codes a byte; the second group: scale 2 (0..6), 1 -> 0.5 -> 0, 3 -> 1.5 -> 2, 5 -> 2.5 -> 2;
    the third is constant: scale 0 (clamped to 1e-8 for the codes), all codes 0."""
    x = torch.tensor([0, 3, 0.5, 1.5, 2.5, 1, 2, 0, 0, 6, 1, 3, 5, 2, 4, 6] + [-1.5] * 8
                     + [0, 1e-8, 3e-8, 2e-8, 0, 0, 0, 0], device=DEV).view(1, 1, 32)
    codes = torch.empty(1, 1, 1, 8, dtype=torch.uint8, device=DEV)
    scale = torch.empty(1, 1, 1, 4, dtype=torch.float16, device=DEV)
    zero = torch.empty_like(scale)
    quantize_tokens(x, 32, 2, 8, 0.0, codes, scale, zero)
    # the last group's scale 1e-8 rounds to fp16 0; its codes divide by the clamp, 1e-8
    want = [0, 3, 0, 2, 2, 1, 2, 0, 0, 3, 0, 2, 2, 1, 2, 3] + [0] * 8 + [0, 1, 3, 2, 0, 0, 0, 0]
    assert unpack(codes, 2, 32).flatten().tolist() == want, unpack(codes, 2, 32).flatten().tolist()
    assert codes.flatten().tolist() == [0 | 3 << 2 | 0 << 4 | 2 << 6, 2 | 1 << 2 | 2 << 4 | 0 << 6,
                                        0 | 3 << 2 | 0 << 4 | 2 << 6, 2 | 1 << 2 | 2 << 4 | 3 << 6, 0, 0,
                                        0 | 1 << 2 | 3 << 4 | 2 << 6, 0]
    assert scale.flatten().tolist() == [1.0, 2.0, 0.0, 0.0] and zero.flatten().tolist() == [0.0, 0.0, -1.5, 0.0]
    assert quantize(x, 2, 8)[0].flatten().tolist() == want  # the reference agrees


def test_shared_call_writes_scale_and_zero_only():
    x = torch.randn(2, 4, 64, generator=gen(5), device=DEV).to(torch.float16)
    scale = torch.empty(2, 4, 2, 2, dtype=torch.float16, device=DEV)
    zero = torch.empty_like(scale)
    quantize_tokens(x, 32, 2, 16, 0.0, None, scale, zero)
    _, s, z = quantize(x.reshape(2, 4, 2, 32), 2, 16)
    assert bits_equal(scale, s) and bits_equal(zero, z)
    with pytest.raises(ValueError, match="codes"):  # a wrong output shape is refused, not written past
        quantize_tokens(x, 32, 2, 16, 0.0, torch.empty(2, 4, 2, 4, dtype=torch.uint8, device=DEV), scale, zero)


# ------------------------------------------------------------------ Store: triton path against the torch path

def tensor_of(axis: str, bits: int, shared: bool = False) -> CacheTensor:
    return CacheTensor("v" if axis == "token" else "k", 48, 24 if axis == "token" else 48, axis, bits, shared)


def stores(t: CacheTensor, group: int, R: int, dtype, eta: float = 0.0, below=(None, None)):
    return [Store(t, group, R, dtype, eta, b, kernels=kn) for kn, b in zip(("torch", "triton"), below, strict=True)]


def assert_same(ref: Store, st: Store, what: str) -> None:
    assert (ref.n_quantized, ref.tokens, ref.nbytes()) == (st.n_quantized, st.tokens, st.nbytes()), \
        f"{what}: (quantized, tokens, bytes) torch {(ref.n_quantized, ref.tokens, ref.nbytes())}, " \
        f"triton {(st.n_quantized, st.tokens, st.nbytes())}"
    if ref.fp is not None and ref.fp.shape[1]:
        assert ref.fp.dtype == st.fp.dtype == st.dtype, f"{what}: windows in {ref.fp.dtype}, {st.fp.dtype}"
        assert torch.equal(ref.fp, st.fp), f"{what}: fp16 windows differ"
    if ref.n_quantized:
        assert bits_equal(ref.scale, st.scale) and bits_equal(ref.zero, st.zero), f"{what}: scale/zero differ"
        if not ref.t.shared:
            bad = (ref.packed() != st.packed()).float().mean().item()
            assert bad <= 1e-3, f"{what}: {bad:.2e} of the packed code bytes differ"
        v_ref, v = ref.read(torch.float32), st.read(torch.float32)
        assert torch.allclose(v_ref, v, rtol=0, atol=1e-2 * v_ref.abs().max().item()), f"{what}: values differ"


def feed(sts: list[Store], T0: int, steps: int, width: int, dtype, seed: int, check=None) -> None:
    """A prompt of T0 tokens in fp32 (the stores cast it), then `steps` decode steps of one token in `dtype` (push,
    then flush, as the engine does)."""
    g = gen(seed)
    x = torch.randn(2, T0, width, generator=g, device=DEV)
    for st in sts:
        st.append(x)
    for i in range(steps):
        x = torch.randn(2, 1, width, generator=g, device=DEV).to(dtype)
        for st in sts:
            if st.R:
                st.push(x)
                st.flush()
            else:
                st.append(x)
        if check:
            check(i)


# (axis, bits, group, R, dtype, eta): windows of 0 and 8 tokens per token, R = 2G and R = G per channel,
# 3 bits with a prompt that is no multiple of the group, Yang et al.'s eta
STORE_CASES = [("token", 2, 16, 8, torch.float16, 0.0), ("token", 3, 16, 0, torch.bfloat16, 0.0),
               ("token", 4, 12, 5, torch.float32, 0.1), ("token", 8, 32, 8, torch.float16, 0.0),
               ("channel", 2, 8, 16, torch.float16, 0.0), ("channel", 3, 16, 16, torch.bfloat16, 0.2),
               ("channel", 4, 8, 8, torch.float32, 0.0), ("channel", 8, 16, 32, torch.float16, 0.0)]


@pytest.mark.parametrize("axis,bits,group,R,dtype,eta", STORE_CASES)
def test_store_triton_matches_torch(axis, bits, group, R, dtype, eta):
    t = tensor_of(axis, bits)
    ref, st = stores(t, group, R, dtype, eta)
    what = f"{axis} {bits}-bit G={group} R={R} {dtype} eta={eta}"
    feed([ref, st], 37, 3 * max(R, 8) + 3, t.width, dtype, bits + R,
         check=lambda i: assert_same(ref, st, f"{what} step {i}") if i % 7 == 0 else None)
    assert_same(ref, st, what)
    assert st.n_quantized > 37, f"{what}: only {st.n_quantized} tokens quantized: the test quantizes too little"


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_shared_store_holds_no_codes(axis):
    t, ts = tensor_of(axis, 2), tensor_of(axis, 2, shared=True)
    below = stores(t, 8, 16, torch.float16)
    ref, st = stores(ts, 8, 16, torch.float16, below=below)
    feed(below + [ref, st], 20, 20, t.width, torch.float16, 3)
    assert st._codes.buf is None and st.n_quantized == ref.n_quantized > 0
    assert_same(ref, st, f"shared {axis}")
    assert torch.equal(st.codes, below[1].codes)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_reserve_then_steps_never_reallocate_and_window_stays_small(axis, kernels):
    t, R, G = tensor_of(axis, 2), 16, 8
    st = Store(t, G, R, torch.float16, kernels=kernels)
    st.reserve(110, 2, DEV)
    assert st._fp.capacity <= 2 * R + 1, f"fp16 window reserved for {st._fp.capacity} tokens (R = {R})"
    bufs = [g.buf.data_ptr() for g in (st._fp, st._codes, st._scale, st._zero)]
    moves = st._fp.moves
    feed([st], 3, 106, t.width, torch.float16, 4)
    assert [g.buf.data_ptr() for g in (st._fp, st._codes, st._scale, st._zero)] == bufs, "a buffer was reallocated"
    # the window slides by an offset: it moves (a compaction) once in about R steps, not at every step
    assert 0 < st._fp.moves - moves <= 2 * 106 // R, f"window moved {st._fp.moves - moves} times in 106 steps"
    assert st.tokens == 109 and st.n_quantized >= 109 - R


def test_window_is_the_last_tokens_in_order():
    t = tensor_of("token", 4)
    st = Store(t, 8, 6, torch.float32, kernels="triton")
    st.reserve(64, 1, DEV)
    seen = []
    for i in range(40):
        x = torch.full((1, 1, t.width), float(i), device=DEV)
        seen.append(x)
        st.push(x)
        st.flush()
        assert torch.equal(st.fp, torch.cat(seen[-6:], 1)), f"step {i}: window {st.fp[0, :, 0].tolist()}"


@pytest.mark.parametrize("kernels,bits", [("torch", 3), ("triton", 3), ("triton", 2)])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_snapshot_rollback_restores_exactly(axis, kernels, bits):
    """A step and its rollback from one snapshot, repeated (as measure.py and the CUDA-graph replay do),
    including a step that compacts the window, and 2R + 2 steps that overwrite where the window was; then the
    store goes on exactly as one that never stepped."""
    t, R, G = tensor_of(axis, bits), 8, 8
    st = Store(t, G, R, torch.float16, kernels=kernels)
    twin = Store(t, G, R, torch.float16, kernels=kernels)
    assert st.cross == (kernels == "triton" and bits == 2), "packing not the one this case is for"
    st.reserve(100, 2, DEV)
    twin.reserve(100, 2, DEV)
    g = gen(9)
    x0 = torch.randn(2, R + 1, t.width, generator=g, device=DEV).to(torch.float16)  # fits the reserved window
    st.append(x0)
    twin.append(x0)
    # step until the next push must compact the window (no room after it), so that the rolled-back step moves it
    while st._fp.start + st._fp.n < st._fp.capacity:
        x = torch.randn(2, 1, t.width, generator=g, device=DEV).to(torch.float16)
        for s in (st, twin):
            s.push(x)
            s.flush()
    # codes as quant.pack lays out the held tokens' codes (a cross-packed value store's partly held last byte
    # keeps the bits of a rolled-back token: bits no reader takes)
    state = [v.clone() for v in (st.fp, st.packed(), st.scale, st.zero)]
    snap = st.snapshot()
    moved = []
    for rep in range(3):
        m = st._fp.moves
        for _ in range(2 * R + 2 if rep == 2 else 1):
            st.push(torch.randn(2, 1, t.width, generator=g, device=DEV).to(torch.float16))
            st.flush()
        moved.append(st._fp.moves != m)
        st.rollback(snap)
        after = [st.fp, st.packed(), st.scale, st.zero]
        assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True)), f"{axis}: rollback {rep} differs"
        assert torch.equal(st.packed(), twin.packed()), f"{axis}: rollback {rep}: codes differ from the twin's"
        assert (st.tokens, st.nbytes()) == (twin.tokens, twin.nbytes())
    assert st._fp.capacity == 2 * R + 1 and moved[0], "no compaction in the rolled-back step: path not tested"
    feed([st, twin], 1, 2 * R + 3, t.width, torch.float16, 10)
    assert_same(twin, st, f"{axis} {kernels} {bits}-bit: after rollbacks")


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cross_packing_holds_the_analytic_bytes_at_every_count(axis):
    """The Triton engine's K/V stores pack along the contracted axis; token by token (a value store's last word
    partly held) they count exactly the bytes the analytic layout counts."""
    import numpy as np

    from xqsim.schemes.layout import codes_bytes, meta_bytes, residual_bytes

    t = tensor_of(axis, 2)
    st = Store(t, 8, 8, torch.float16, kernels="triton")
    assert st.cross
    g = gen(5)
    for i in range(40):
        x = torch.randn(2, 1, t.width, generator=g, device=DEV).to(torch.float16)
        st.push(x)
        st.flush()
        T = np.array([st.tokens])
        want = 2 * int((codes_bytes(t, T, 8, 8) + meta_bytes(t, T, 8, 8) + residual_bytes(t, T, 8))[0])
        assert st.nbytes() == want, f"{axis} step {i}: {st.nbytes()} bytes held, analytic {want}"


def test_unknown_kernels_refused():
    with pytest.raises(ValueError, match="kernels"):
        Store(tensor_of("token", 2), 8, 8, torch.float16, kernels="cuda")


# ------------------------------------------------------------------ the engine

def test_engine_triton_cache_matches_torch(monkeypatch):
    """KIVI 2-bit on tiny-gqa: the Triton engine's cache holds exactly what torch stores fed the same values hold,
    and the same contents as the torch engine's (up to the attention and RoPE kernels' float rounding, if those
    run in Triton too)."""
    m = loading.load_model("tiny-gqa")
    cfg = specs.SchemeConfig(scheme="kivi", bits=2, group=16, residual=16)
    steps, B = 34, 2  # 34 tokens: a key block of 16 quantized, the window holding the rest
    tokens = torch.randint(0, m.vocab_size, (B, steps), generator=torch.Generator().manual_seed(3)).to(DEV)
    pushed: dict[int, list[torch.Tensor]] = {}
    push = Store.push

    def recording_push(self, x):
        pushed.setdefault(id(self), []).append(x.clone())
        push(self, x)

    out, caches = {}, {}
    for kn in ("torch", "triton"):
        e = Engine(m, cfg, device=DEV, kernels=kn, seed=1)
        cache = e.new_cache()
        if kn == "triton":
            monkeypatch.setattr(Store, "push", recording_push)
        out[kn] = torch.stack([e.step(tokens[:, i], cache) for i in range(steps)], 1)
        monkeypatch.setattr(Store, "push", push)
        caches[kn] = cache
    for i, (lt, lr) in enumerate(zip(caches["triton"], caches["torch"], strict=True)):
        for name, st in lt.items():
            assert st.kernels == "triton" and st.n_quantized >= 16, (name, st.kernels, st.n_quantized)
            # exact: torch stores fed the values the triton engine pushed hold the same bytes
            ref = Store(st.t, st.G, st.R, st.dtype, st.eta)
            for x in pushed[id(st)]:
                ref.push(x)
                ref.flush()
            assert_same(ref, st, f"layer {i} {name}: replayed into torch stores")
            # the torch engine: the same cache (layer 0's inputs can differ only by the RoPE kernel's rounding)
            r = lr[name]
            assert (r.n_quantized, r.tokens, r.nbytes()) == (st.n_quantized, st.tokens, st.nbytes())
            n = st.G if st.t.axis == "channel" else st.t.row
            bad = (unpack(r.packed(), st.t.bits, n) != unpack(st.packed(), st.t.bits, n)).float().mean().item()
            fp = (r.fp.float() - st.fp.float()).abs().max().item()
            sz = max((r.scale.float() - st.scale.float()).abs().max().item(),
                     (r.zero.float() - st.zero.float()).abs().max().item())
            assert bad <= 0.01 and fp <= 1e-2 and sz <= 1e-2, \
                f"layer {i} {name}: torch vs triton engine: {bad:.2e} of codes differ, max |fp diff| {fp:.2e}, " \
                f"max |scale/zero diff| {sz:.2e}"
    err = ((out["torch"] - out["triton"]).abs().max() / out["torch"].abs().max()).item()
    assert err < 1e-2, f"logits differ by {err:.2e} of the largest"

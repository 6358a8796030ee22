"""RoPE as one Triton kernel (xqsim.engine.kernels.rope) against model.rope's torch ops: by hand, on strided
views as the engine passes them, at long-context positions, in fp32, fp16 and bf16. Without a GPU the kernel
runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from xqsim.engine import model  # noqa: E402
from xqsim.engine.kernels import available  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not available(DEV):
    pytest.skip("Triton cannot run here (no CUDA device and TRITON_INTERPRET is not 1)", allow_module_level=True)

from xqsim.engine.kernels.rope import rope  # noqa: E402

THETA = 500000.0


def compare(x: torch.Tensor, pos: torch.Tensor, what: str, theta: float = THETA) -> None:
    """The kernel against model.rope: within one rounding of x's dtype (cos and sin may differ in their last fp32
    bit, which can tip a 16-bit rounding), and exactly equal on nearly every element."""
    ref = model.rope(x, pos, theta)
    got = rope(x, pos, theta)
    assert got.shape == ref.shape and got.dtype == x.dtype and got.is_contiguous(), (got.shape, got.dtype)
    d = (got.float() - ref.float()).abs()
    eps = torch.finfo(x.dtype).eps
    tol = 2 * eps * (ref.float().abs() + x.float().abs().amax(-1, keepdim=True))
    frac = (d > 0).float().mean().item()
    worst = (d / tol).max().item()
    limit = 0.3 if x.dtype == torch.float32 else 0.02  # fp32 shows cos/sin's last-bit differences
    assert worst <= 1 and frac <= limit, f"{what}: max |diff| {d.max().item():.3e} ({worst:.2f} of the tolerance), " \
        f"{frac:.3f} of elements differ"


def test_by_hand():
    """hd 4, theta 100: inverse frequencies 1 and 0.1; x = (a, b | c, d) at position p."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=DEV)  # (T=1, hd=4)
    p = 3
    out = rope(x, torch.tensor([p], device=DEV), 100.0)[0].tolist()
    c0, s0, c1, s1 = math.cos(p), math.sin(p), math.cos(0.1 * p), math.sin(0.1 * p)
    want = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 1 * s0 + 3 * c0, 2 * s1 + 4 * c1]
    assert out == pytest.approx(want, abs=1e-6), (out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_on_dense_input(dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g, device=DEV).to(dtype)  # (B, H, T, hd)
    compare(x, torch.arange(7, 12, device=DEV), f"dense {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_on_the_engines_views(dtype):
    """Decode: q (B, 1, H*hd) viewed (B, H, 1, hd) through a transpose, at one position past 100k tokens;
    rematerialized K: (B, Hkv, n, hd) from a (B, n, Hkv, hd) transpose, at the positions of a tile."""
    g = torch.Generator(device=DEV).manual_seed(1)
    B, H, hd = 3, 4, 64
    q = torch.randn(B, 1, H * hd, generator=g, device=DEV).to(dtype)
    qh = q.view(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd), strides (H*hd, hd, H*hd, 1)
    compare(qh, torch.arange(123456, 123457, device=DEV), f"decode q {dtype}")
    k = torch.randn(B, 6, 2, hd, generator=g, device=DEV).to(dtype)
    pos = torch.arange(40, device=DEV)
    compare(k.transpose(1, 2), pos[30:36], f"remat K tile {dtype}")


def test_odd_half_and_leading_dims_that_need_a_copy():
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(4, 3, 2, 7, 48, generator=g, device=DEV)  # half = 24: a padded tile
    compare(x.permute(2, 0, 1, 3, 4), torch.arange(100, 107, device=DEV), "3 leading dims, permuted")
    compare(x[0, 0, 0], torch.arange(5, 12, device=DEV), "no leading dims", theta=10000.0)


def test_input_is_left_alone_and_model_dispatches():
    g = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(2, 2, 3, 16, generator=g, device=DEV).to(torch.bfloat16)
    before = x.clone()
    pos = torch.arange(3, device=DEV)
    out = model.rope(x, pos, THETA, kernels="triton")
    assert torch.equal(x, before)
    assert torch.equal(out, rope(x, pos, THETA))
    assert not torch.equal(out, x)  # it rotated something
    with pytest.raises(ValueError, match="kernels"):
        model.rope(x, pos, THETA, kernels="cuda")

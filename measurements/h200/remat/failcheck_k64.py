"""Whether tests/test_kernels_remat.py::test_default_variant_at_llama_widths can fail on this GPU: its case run with
the step and warps that Triton 3.6 summed wrongly (64 channels, 8 warps, one program an SM). On an H200:
PYTHONPATH=. python measurements/h200/remat/failcheck_k64.py"""
import tests.test_kernels_remat as t
from xqsim.engine.kernels import remat

orig = remat.remat_attention
t.remat_attention = lambda *a, **k: orig(*a, **k, block_k=64, num_warps=8, per_sm=1)
for absorb in (False, True):
    try:
        t.test_default_variant_at_llama_widths(absorb)
        print(f"block_k=64, 8 warps, absorb={absorb}: passes")
    except AssertionError as e:
        print(f"block_k=64, 8 warps, absorb={absorb}: FAILS: {e}")

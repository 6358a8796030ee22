import os

try:  # Triton kernels run on the CPU through Triton's interpreter when there is no GPU: set before triton loads
    import torch
except ImportError:  # the engine's extra is not installed: no kernels to run
    torch = None
if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from xqsim import loading, specs


@pytest.fixture(scope="session")
def tiny():
    return loading.load_model("tiny")  # MHA: n=2, d=64, H=Hkv=4, hd=16, ffn 128, vocab 256


@pytest.fixture(scope="session")
def tiny_gqa():
    return loading.load_model("tiny-gqa")  # GQA: n=2, d=64, H=4, Hkv=2, hd=16 (dkv=32)


@pytest.fixture(scope="session")
def h100():
    return loading.load_hardware("h100_sxm")


def cfg(scheme: str, model, **kw) -> specs.SchemeConfig:
    """A resolved SchemeConfig."""
    return specs.SchemeConfig(scheme=scheme, **kw).resolved(model)


def arr(*values):
    return np.array(values, dtype=np.int64)


def pytest_addoption(parser):
    parser.addoption("--browser", action="store_true", help="run the dashboard's tests in headless chromium")
    parser.addoption("--shots", default=None, help="folder for the browser tests' screenshots (default: a temp dir)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--browser"):
        return
    skip = pytest.mark.skip(reason="real-browser test: run with pytest -m browser --browser (README, Dashboard)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)

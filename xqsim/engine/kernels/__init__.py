"""Triton decode kernels that read the compressed cache where it lies (one module per kernel family).

The engine runs them with `kernels="triton"` (the default on CUDA); `kernels="torch"` keeps the plain torch ops,
the reference every kernel is tested against and the CPU path. On a machine without a GPU the kernels run under
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which is how CI checks their indexing.
"""

from __future__ import annotations

import os

import torch

ENGINES = ("torch", "triton")


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run on this device (a CUDA GPU, or any device under the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or interpreted()


def check(kernels: str) -> str:
    """kernels, or a ValueError when it names no engine."""
    if kernels not in ENGINES:
        raise ValueError(f"kernels={kernels!r}: allowed: {', '.join(ENGINES)}")
    return kernels


def resolve(kernels: str | None, device: torch.device) -> str:
    """The engine to run: 'triton' by default where it can run on `device`, else 'torch'."""
    if kernels is None:
        return "triton" if device.type == "cuda" and available(device) else "torch"
    if check(kernels) == "triton" and not available(device):
        raise ValueError(f"kernels='triton' needs a CUDA device or TRITON_INTERPRET=1 (device is {device.type})")
    return kernels


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which numpy >= 2.4
    refuses, so any loop over a run-time bound fails on the CPU; read the one element instead."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "xqsim_fixed", False):
        return

    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    fixed.xqsim_fixed = True
    interpreter._patch_lang_tensor = fixed


if interpreted():
    try:
        _interpreter_index_fix()
    except (ImportError, AttributeError):  # another Triton: its interpreter is used as it is
        pass

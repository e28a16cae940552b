"""What was compiled into robust_fast._C, and why a backend cannot run here."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def compiled_library_error() -> Optional[str]:
    """None when robust_fast._C loaded, else the reason it did not."""
    try:
        from robust_fast import _C  # noqa: F401  (loading registers the ops)
    except Exception as exc:  # an ImportError or an undefined-symbol OSError alike
        return f"robust_fast._C could not be loaded ({type(exc).__name__}: {exc})"
    return None


_kernel_registered: dict = {}


def has_compiled_kernel(device_type: str) -> bool:
    """Whether robust_fast._C registered kernels for this device (asked once per device)."""
    if device_type not in _kernel_registered:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _kernel_registered[device_type] = (
            compiled_library_error() is None and key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key("robust_fast::pgd_step", key))
    return _kernel_registered[device_type]


# What is installed does not change while a program runs: torch.compile may fold these.
@torch.compiler.assume_constant_result
def cpp_unavailable_reason(device_type: str) -> Optional[str]:
    error = compiled_library_error()
    if error is not None:
        return error
    if device_type == "meta":
        # Meta tensors reach no kernel: shapes come from the op's fake registration, which
        # torch.compile and FakeTensorMode call. Rebuilding would not help.
        return ("the C++ op has no Meta kernel; for shapes without data, trace under "
                "torch.compile or torch._subclasses.fake_tensor.FakeTensorMode, which use its "
                "fake registration")
    if device_type not in ("cpu", "cuda"):
        return f"robust_fast._C has CPU and CUDA kernels only, none for {device_type} tensors"
    if not has_compiled_kernel(device_type):
        return (f"robust_fast._C was built without {device_type.upper()} kernels "
                "(rebuild with a CUDA torch and CUDA_HOME set, or FORCE_CUDA=1)")
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        import robust_fast.kernels  # noqa: F401  (mapped from kernels/ by setup.py)
    except ImportError as exc:
        return f"robust_fast.kernels is not installed ({exc}): pip install -e . from the source tree"
    return None


@torch.compiler.assume_constant_result
def triton_unavailable_reason(device_type: str) -> Optional[str]:
    error = triton_import_error()
    if error is not None:
        return error
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device_type == "cpu":
        if triton_interpreting():
            return None
        return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before import"
    return f"Triton kernels do not run on {device_type} tensors"

"""Backend choice: per call (backend=), per block (use_backend), per process (set_backend),
or from the environment variable ROBUST_FAST_BACKEND. "auto" takes the C++ kernel for the
tensor's device and falls back to the reference, with one warning, when it cannot run.

The contract every op in robust_fast/ops follows: call resolve(backend, tensor.device.type)
once per call, then branch on its answer in one order, "cpp" (torch.ops.robust_fast), then
"triton" (the launchers of triton_kernels(family)), else "reference"."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import warnings
from types import ModuleType
from typing import Iterator, Optional

from robust_fast import _build

BACKENDS = ("auto", "cpp", "triton", "reference")
_ENV_VAR = "ROBUST_FAST_BACKEND"

_process_default: Optional[str] = None
_block_choice = threading.local()
_warned_fallback: set = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these tensors."""


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Sets the process-wide default backend; None goes back to ROBUST_FAST_BACKEND or "auto"."""
    global _process_default
    _process_default = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The backend a call without backend= would ask for now."""
    stack = getattr(_block_choice, "stack", None)
    if stack:
        return stack[-1]
    if _process_default is not None:
        return _process_default
    return _check_name(os.environ.get(_ENV_VAR, "auto"), _ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, calls without backend= use `name`."""
    _check_name(name, "backend")
    stack = getattr(_block_choice, "stack", None)
    if stack is None:
        stack = _block_choice.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def resolve(requested: Optional[str], device_type: str) -> str:
    """The concrete backend, "cpp", "triton" or "reference", that runs a call on tensors of
    device_type (requested None: get_backend()). Raises BackendUnavailableError when the
    requested backend cannot run there; "auto" never chooses "triton"."""
    name = get_backend() if requested is None else _check_name(requested, "backend")
    if name == "reference":
        return name
    if name == "cpp":
        reason = _build.cpp_unavailable_reason(device_type)
        if reason:
            raise BackendUnavailableError(f"backend 'cpp' cannot run on {device_type}: {reason}")
        return name
    if name == "triton":
        reason = _build.triton_unavailable_reason(device_type)
        if reason:
            raise BackendUnavailableError(f"backend 'triton' cannot run on {device_type}: {reason}")
        return name
    reason = _build.cpp_unavailable_reason(device_type)
    if reason is None:
        return "cpp"
    if device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        warnings.warn(f"robust_fast: using the reference backend on {device_type}: {reason}",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def triton_kernels(family: str) -> ModuleType:
    """robust_fast.kernels.<family> (kernels/<family>.py), the Triton launchers of a family.
    Imported on first use, not with robust_fast: Triton is optional, and its interpreter reads
    TRITON_INTERPRET when a kernel module is imported. Call it after resolve chose "triton"."""
    name = f"robust_fast.kernels.{family}"
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)

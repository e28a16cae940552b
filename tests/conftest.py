import atexit
import os
import shutil
import tempfile

import torch

# Models the tests train (the demos' teachers, the benchmarks' models) go to a cache of their own,
# removed at exit: the tests leave nothing in the user's ~/.cache/robust_fast.
_TEST_CACHE = tempfile.mkdtemp(prefix="robust_fast-test-cache-")
os.environ["ROBUST_FAST_CACHE"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)

# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton
# is first imported. Where a GPU is visible they compile and run on it instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from robust_fast import _build  # noqa: E402

KERNEL_BACKENDS = ("cpp", "triton")
DEVICE_TYPES = ("cpu", "cuda")


def unavailable_reason(backend: str, device_type: str):
    """Why `backend` cannot run on `device_type` here, or None when it can."""
    if backend == "cpp":
        return _build.cpp_unavailable_reason(device_type)
    if backend == "triton":
        return _build.triton_unavailable_reason(device_type)
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def usable_backends(device_type: str = "cpu"):
    """Every kernel backend for one device type, skipped with its reason where it cannot run."""
    return [pytest.param(name, marks=pytest.mark.skipif(
        unavailable_reason(name, device_type) is not None,
        reason=str(unavailable_reason(name, device_type)))) for name in KERNEL_BACKENDS]


def backend_devices(include_reference: bool = False):
    """(backend, device) for every kernel backend (and the reference) on every device type,
    each pair skipped with its reason where it cannot run: a GPU machine runs them all."""
    backends = KERNEL_BACKENDS + (("reference",) if include_reference else ())
    pairs = []
    for device in DEVICE_TYPES:
        for name in backends:
            reason = unavailable_reason(name, device)
            pairs.append(pytest.param(name, device, id=f"{name}-{device}",
                                      marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return pairs


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

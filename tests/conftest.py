import os

# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before
# triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from robust_fast import _build  # noqa: E402


def usable_backends(device_type: str = "cpu"):
    """Every non-reference backend that can run here, each with its reason when it cannot."""
    found = []
    for name, reason in (("cpp", _build.cpp_unavailable_reason(device_type)),
                         ("triton", _build.triton_unavailable_reason(device_type))):
        found.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return found


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

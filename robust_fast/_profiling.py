"""Named ranges robust_fast::<name>: NVTX for Nsight, and torch.profiler.record_function so the
same names appear in torch.profiler traces. Nothing is opened while torch.compile traces."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the ranges are a courtesy; the ops work without them
    _nvtx = None


@contextlib.contextmanager
def op_range(name: str) -> Iterator[None]:
    if torch.compiler.is_compiling():
        yield
        return
    full_name = f"robust_fast::{name}"
    with contextlib.ExitStack() as stack:
        if _nvtx is not None:
            stack.enter_context(_nvtx.annotate(full_name, domain="robust_fast"))
        stack.enter_context(torch.profiler.record_function(full_name))
        yield

"""Named ranges robust_fast::<name>: NVTX for Nsight, and a torch.profiler record_function so the
same names appear in torch.profiler traces. Cheap when nothing listens: a few hundred ns, since
an op call is a few microseconds. Nothing is opened while torch.compile traces."""
from __future__ import annotations

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the ranges are a courtesy; the ops work without them
    _nvtx = None

_DOMAIN = "robust_fast"


def _torch_profiler_enabled() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


class op_range:
    """with op_range("pgd_step"): ... opens robust_fast::pgd_step for NVTX and torch.profiler."""

    __slots__ = ("name", "_record")

    def __init__(self, name: str):
        self.name = f"robust_fast::{name}"
        self._record = None

    def __enter__(self):
        if torch.compiler.is_compiling():
            return self
        if _nvtx is not None:
            _nvtx.push_range(self.name, domain=_DOMAIN)
        if _torch_profiler_enabled():
            self._record = torch.profiler.record_function(self.name)
            self._record.__enter__()
        return self

    def __exit__(self, *exc_info):
        if torch.compiler.is_compiling():
            return False
        if self._record is not None:
            self._record.__exit__(*exc_info)
            self._record = None
        if _nvtx is not None:
            _nvtx.pop_range(domain=_DOMAIN)
        return False

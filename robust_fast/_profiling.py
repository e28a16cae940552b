"""Named ranges robust_fast::<name>: NVTX for Nsight, and a torch.profiler record_function so the
same names appear in torch.profiler traces. Cheap when nothing listens (no NVTX tool attached,
no torch.profiler running): two attribute reads. Nothing is opened while torch.compile traces."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch.autograd import profiler as _autograd_profiler

# Tools that receive NVTX ranges (Nsight Systems, Nsight Compute) name their library in these
# variables for the program they launch; without one, NVTX calls reach no one.
# ROBUST_FAST_NVTX=1 opens the ranges regardless (a tool that attaches another way).
NVTX_TOOL_VARIABLES = ("NVTX_INJECTION64_PATH", "NVTX_INJECTION32_PATH")
NVTX_FORCE_VARIABLE = "ROBUST_FAST_NVTX"


def nvtx_for_tools(environ: Mapping[str, str] = os.environ):
    """The nvtx module when a tool listens (and nvtx is installed), else None: a range pushed
    to no one still costs microseconds in Python on every call."""
    forced = environ.get(NVTX_FORCE_VARIABLE, "0") == "1"
    if not forced and not any(environ.get(name) for name in NVTX_TOOL_VARIABLES):
        return None
    try:
        import nvtx
    except ImportError:  # the ranges are a courtesy; the ops work without them
        return None
    return nvtx


_nvtx = nvtx_for_tools()

_DOMAIN = "robust_fast"


class op_range:
    """with op_range("pgd_step"): ... opens robust_fast::pgd_step for NVTX and torch.profiler."""

    __slots__ = ("name", "_record", "_pushed")

    def __init__(self, name: str):
        self.name = f"robust_fast::{name}"
        self._record = None
        self._pushed = False

    def __enter__(self):
        # Nothing listening, nothing to open: the usual case returns before asking whether
        # torch.compile traces (which costs more than the rest of this, from cold caches).
        profiling = _autograd_profiler._is_profiler_enabled
        if _nvtx is None and not profiling:
            return self
        if torch.compiler.is_compiling():
            return self
        if _nvtx is not None:
            _nvtx.push_range(self.name, domain=_DOMAIN)
            self._pushed = True
        if profiling:
            self._record = torch.profiler.record_function(self.name)
            self._record.__enter__()
        return self

    def __exit__(self, *exc_info):
        if self._record is not None:
            self._record.__exit__(*exc_info)
            self._record = None
        if self._pushed:
            _nvtx.pop_range(domain=_DOMAIN)
            self._pushed = False
        return False

"""What this installation can do: versions, and which backend runs where (or why not)."""
from __future__ import annotations

import platform
import sys
from typing import Dict, List, Optional

import torch

import robust_fast
from robust_fast import _build


def _triton_version() -> Optional[str]:
    if _build.triton_import_error() is not None:
        return None
    import triton
    return triton.__version__


def backend_status() -> Dict[str, Dict[str, Optional[str]]]:
    """{device: {backend: None if usable else the reason it is not}}."""
    status = {}
    for device in ("cpu", "cuda"):
        status[device] = {
            "cpp": _build.cpp_unavailable_reason(device),
            "triton": _build.triton_unavailable_reason(device),
            "reference": None if device == "cpu" or torch.cuda.is_available() else "no CUDA device is visible",
        }
    return status


def info_lines() -> List[str]:
    lines = [
        f"robust_fast {robust_fast.__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})",
        f"triton      {_triton_version() or 'not installed'}"
        + (" (interpreter: TRITON_INTERPRET=1)" if _build.triton_interpreting() else ""),
        f"compiled    {'robust_fast._C loaded' if _build.compiled_library_error() is None else _build.compiled_library_error()}",
        f"default     backend {robust_fast.get_backend()!r}",
        "backends:",
    ]
    for device, backends in backend_status().items():
        for backend, reason in backends.items():
            lines.append(f"  {device:<5} {backend:<10} {'usable' if reason is None else 'unusable: ' + reason}")
    return lines

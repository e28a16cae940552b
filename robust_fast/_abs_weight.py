"""|W| of a layer's weight, kept while the weight is unchanged.

Every IBP product of the radius needs |W|. Recomputing it each call costs a pass over the weight
(for a large Linear layer more than the product of a small batch), so it is cached per weight
tensor and recomputed only when the weight changes: when its version counter moves (an
optimizer step, any in-place write) or its storage is swapped (`param.data = ...`).

A write through `param.data` (`param.data.copy_(...)`, old-style code) bypasses the version
counter: after one, call clear(), or compute within `with disabled():`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, Iterator, Optional, Tuple

import torch

# id(weight) -> (weak reference to it, its version, its data pointer, |weight|)
_cache: Dict[int, Tuple[weakref.ref, int, int, torch.Tensor]] = {}
_off = threading.local()


def cached_abs_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """|weight| (detached), from the cache when the weight has not changed since; None where no
    cache can be kept (while torch.compile traces, for tensors without storage or version)."""
    if (torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, torch.nn.Parameter)
            or getattr(_off, "depth", 0)):
        return None
    try:
        version, pointer = weight._version, weight.data_ptr()
    except RuntimeError:  # inference tensors have no version counter
        return None
    key = id(weight)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version and entry[2] == pointer:
        return entry[3]
    absolute = weight.detach().abs()
    _cache[key] = (weakref.ref(weight, lambda _ref, key=key: _cache.pop(key, None)), version, pointer,
                   absolute)
    return absolute


def clear() -> None:
    """Forgets every cached |W|."""
    _cache.clear()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread), |W| is computed on every call, never cached."""
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1

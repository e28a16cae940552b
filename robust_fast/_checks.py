"""Argument checks shared by the op families: each error names the op and the argument."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch


def check_floating_tensor(name: str, value, caller: str) -> torch.Tensor:
    """value itself when it is a floating-point torch.Tensor; a TypeError naming it otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{caller}: {name} must have a floating-point dtype, got {value.dtype}")
    return value


def check_choice(name: str, value, choices, caller: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{caller}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_finite(name: str, value, caller: str) -> float:
    """A real number > 0 and finite, as a float (bools and NaN refused)."""
    if type(value) is float and 0.0 < value < math.inf:  # the usual case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{caller}: {name} must be > 0 and finite, got {value}")
    return value


def check_real_in(name: str, value, caller: str, low: float = 0.0, high: float = math.inf) -> float:
    """A real number in [low, high] (NaN, infinities outside it and bools refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not low <= value <= high or math.isinf(value):
        bounds = f">= {low:g} and finite" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{caller}: {name} must be {bounds}, got {value}")
    return value


def check_clip(clip, caller: str = "pgd_step") -> Tuple[Optional[float], Optional[float]]:
    """(low, high) of a box, either side None for open; None for no box. Bounds are numbers
    (not NaN) with low <= high; a ValueError or TypeError naming the caller otherwise."""
    if clip is None:
        return None, None
    if (type(clip) is tuple and len(clip) == 2 and type(clip[0]) is float and type(clip[1]) is float
            and clip[0] <= clip[1]):  # the common case, fast (NaN fails the comparison)
        return clip
    if not isinstance(clip, Sequence) or isinstance(clip, str) or len(clip) != 2:
        raise TypeError(f"{caller}: clip must be None or a pair (low, high), got {clip!r}")
    bounds = []
    for side, bound in zip(("low", "high"), clip):
        if bound is None:
            bounds.append(None)
            continue
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or math.isnan(float(bound)):
            raise ValueError(f"{caller}: clip {side} must be a number or None, got {bound!r}")
        bounds.append(float(bound))
    low, high = bounds
    if low is not None and high is not None and low > high:
        raise ValueError(f"{caller}: clip low must be <= high, got ({low}, {high})")
    return low, high

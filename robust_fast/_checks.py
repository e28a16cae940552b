"""Argument checks shared by the op families: each error names the op and the argument."""
from __future__ import annotations

import math
import numbers

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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{caller}: {name} must be > 0 and finite, got {value}")
    return value

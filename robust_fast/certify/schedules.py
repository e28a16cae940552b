"""Schedules of IBP training (Gowal et al. 2018; the smoothed ramp of Zhang et al. 2020).

Training starts on clean inputs (a warm-up with eps = 0, kappa = 1), then eps grows from 0 to
the training radius while kappa, the weight of the clean loss, falls from kappa_start to
kappa_end. The training radius is TRAIN_EPS_FACTOR times the radius the model is tested at:
training slightly wider gives better certified accuracy at the test radius.
"""
from __future__ import annotations

import math
import numbers

TRAIN_EPS_FACTOR = 1.1
SMOOTHED_KNEE = 0.25  # the smoothed ramp is a power-4 polynomial until this fraction of it


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_value(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def training_eps(eps_test: float, factor: float = TRAIN_EPS_FACTOR) -> float:
    """The radius to train at for certificates at eps_test: factor * eps_test."""
    eps_test, factor = _check_value("eps_test", eps_test), _check_value("factor", factor)
    if eps_test < 0 or factor <= 0:
        raise ValueError(f"eps_test must be >= 0 and factor > 0, got {eps_test}, {factor}")
    return factor * eps_test


def ramp_fraction(step: int, warmup_steps: int, ramp_steps: int, kind: str = "linear") -> float:
    """How far along the ramp `step` is, in [0, 1]: 0 through the warm-up, 1 after the ramp.

    kind "linear": a straight line. "smoothed": a * s**4 until SMOOTHED_KNEE of the ramp, then
    the straight line that continues it with the same slope and reaches 1 at the ramp's end
    (a gentle start, which keeps the first bounds from exploding).
    """
    step = _check_count("step", step)
    warmup_steps = _check_count("warmup_steps", warmup_steps)
    ramp_steps = _check_count("ramp_steps", ramp_steps)
    if kind not in ("linear", "smoothed"):
        raise ValueError(f"kind must be 'linear' or 'smoothed', got {kind!r}")
    s = step - warmup_steps
    if s <= 0:
        return 0.0
    if s >= ramp_steps:
        return 1.0
    if kind == "linear":
        return s / ramp_steps
    knee = SMOOTHED_KNEE * ramp_steps
    # a * knee**4 + 4 * a * knee**3 * (ramp - knee) = 1: value and slope continuous at the knee.
    a = 1.0 / (knee ** 4 + 4.0 * knee ** 3 * (ramp_steps - knee))
    if s <= knee:
        return a * s ** 4
    return a * knee ** 4 + 4.0 * a * knee ** 3 * (s - knee)


def eps_schedule(step: int, *, eps_train: float, warmup_steps: int, ramp_steps: int,
                 kind: str = "smoothed") -> float:
    """The training radius at `step`: 0 during the warm-up, then ramped up to eps_train."""
    eps_train = _check_value("eps_train", eps_train)
    if eps_train < 0:
        raise ValueError(f"eps_train must be >= 0, got {eps_train}")
    return eps_train * ramp_fraction(step, warmup_steps, ramp_steps, kind)


def kappa_schedule(step: int, *, warmup_steps: int, ramp_steps: int, kappa_start: float = 1.0,
                   kappa_end: float = 0.5) -> float:
    """The weight of the clean loss at `step`: kappa_start during the warm-up, then linearly to
    kappa_end over the ramp."""
    kappa_start, kappa_end = _check_value("kappa_start", kappa_start), _check_value("kappa_end", kappa_end)
    if not (0 <= kappa_start <= 1 and 0 <= kappa_end <= 1):
        raise ValueError(f"kappa_start and kappa_end must lie in [0, 1], got {kappa_start}, {kappa_end}")
    return kappa_start + (kappa_end - kappa_start) * ramp_fraction(step, warmup_steps, ramp_steps, "linear")

"""What APGD, APGD-T, FAB-T, Square and auto_attack share: the check of their common arguments,
the walk over a batch in chunks of at most batch_size samples, and the count of their steps
on a progress stage."""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from robust_fast._checks import check_clip
from robust_fast._progress import Stage, check_progress


def check_attack_arguments(model, x, y, eps, norm, steps, restarts, rho, batch_size, clip, caller):
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"{caller}: model must be an nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{caller}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"{caller}: x must have a batch dimension and a sample shape, got {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"{caller}: y must be an int64 tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{caller}: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{caller}: y must be on x's device {x.device}, got {y.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= float(eps) < math.inf:
        raise ValueError(f"{caller}: eps must be a finite float >= 0, got {eps!r}")
    norm = norm.lower() if isinstance(norm, str) else norm
    if norm not in ("linf", "l2"):
        raise ValueError(f"{caller}: norm must be 'linf' or 'l2', got {norm!r}")
    for name, value, least in (("steps", steps, 0), ("restarts", restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{caller}: {name} must be >= {least}, got {value}")
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 <= float(rho) <= 1:
        raise ValueError(f"{caller}: rho must be a float in [0, 1], got {rho!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"{caller}: batch_size must be None or an int >= 1, got {batch_size!r}")
    return float(eps), norm, check_clip(clip, caller=caller)


def chunks(n: int, batch_size: Optional[int]):
    size = n if batch_size is None else batch_size
    for begin in range(0, n, max(size, 1)):
        yield slice(begin, min(n, begin + size))


def clean_predictions(model, x: torch.Tensor, batch_size: Optional[int]) -> torch.Tensor:
    return torch.cat([model(x[rows]).argmax(dim=1) for rows in chunks(x.shape[0], batch_size)]) \
        if x.shape[0] else torch.zeros(0, dtype=torch.int64, device=x.device)


# --------------------------------------------------------------------------------------------
# progress

@contextmanager
def attack_stage(progress, desc: str, unit: str, caller: str) -> Iterator[Stage]:
    """The Stage an attack counts its steps on: the caller's (auto_attack hands each attack one)
    or its own, made from progress (None, True, False or "log") and closed when it ends."""
    if isinstance(progress, Stage):
        yield progress
        return
    stage = Stage(0, desc, unit, check_progress(progress, caller))
    try:
        yield stage
    finally:
        stage.close()


class StepCounter:
    """An attack's steps on a Stage: `chunks` chunks of `runs` runs (targets x restarts) of `steps`
    steps each. A run or chunk that ends early (every sample fooled) counts the steps it skipped,
    so the bar's rate and time left stay those of the work still planned."""

    def __init__(self, stage: Stage, steps: int, runs: int, chunks: int):
        self.stage, self.steps, self.runs = stage, int(steps), int(runs)
        self.chunk, self.run = 0, 0
        stage.set_total(self.steps * self.runs * int(chunks))

    def start_run(self, left: int, runs: int = 1, **where) -> Optional[Callable[[int], None]]:
        """Before `runs` runs side by side on `left` rows: shows where they are; returns the
        per-step tick (None where nothing is shown, so the loop pays nothing)."""
        if not self.stage.active:
            return None
        self.stage.set_postfix(**where, left=left)
        return lambda rows_left: self.stage.update(runs, left=rows_left)

    def end_run(self, runs: int = 1) -> None:
        self.run += runs
        self.stage.advance_to((self.chunk * self.runs + self.run) * self.steps)

    def end_chunk(self) -> None:
        self.chunk, self.run = self.chunk + 1, 0
        self.stage.advance_to(self.chunk * self.runs * self.steps)


def chunk_count(n: int, batch_size: Optional[int]) -> int:
    return sum(1 for _ in chunks(n, batch_size))

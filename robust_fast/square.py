"""The L-inf Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): a random
search that needs only the model's outputs, no gradient. AutoAttack runs it to catch a model
whose gradients are masked.

Start: vertical stripes, each column of each channel at x - eps or x + eps. Query i: a square
window of side s_i, at a random place, is set to x +- eps (one random sign per channel) in one
candidate per sample; the candidate is kept where it lowers the margin z_y - max_{j != y} z_j
(or raises the cross-entropy). The window's area shrinks as the queries go: p_i of the image,
p_init halved at fixed fractions of the budget (rescaled to n_queries out of 10000).

All samples still robust are queried together, their random draws made on the device; the
samples already fooled are dropped every few queries (the only reads back from the device).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.apgd import _check_common, _chunks, margin

SQUARE_LOSSES = ("margin", "ce")
COMPACT_EVERY = 32      # queries between drops of fooled samples (each one a read back)
REDRAWS = 3             # extra draws for a window that would leave the candidate unchanged

# (fraction of 10000 queries after which, divisor of p_init): the published schedule.
_P_SCHEDULE = ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
               (200, 8), (50, 4), (10, 2))


def p_selection(p_init: float, query: int, n_queries: int, rescale: bool = True) -> float:
    """The fraction of the image a window covers at `query` (of n_queries); without rescale,
    the schedule of a 10000-query budget."""
    rescaled = int(query / n_queries * 10000) if rescale else query
    for after, divisor in _P_SCHEDULE:
        if rescaled > after:
            return p_init / divisor
    return p_init


def window_side(p: float, channels: int, height: int, width: int) -> int:
    side = max(int(round(math.sqrt(p * channels * height * width / channels))), 1)
    return min(side, height - 1)


def _objective(model, x, y, loss: str):
    """(margin, value to minimise) per sample."""
    logits = model(x)
    m = margin(logits, y)
    if loss == "margin":
        return m, m
    return m, -F.cross_entropy(logits, y, reduction="none")


def _random_signs(shape, generator, device, dtype):
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def _candidate(x, x_best, eps, side, clip, generator):
    """x_best with one random window per sample set to x +- eps (per channel)."""
    n, c, h, w = x.shape
    device = x.device
    top = torch.randint(0, h - side + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, w - side + 1, (n, 1), generator=generator, device=device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    window = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    signs = _random_signs((n, c, 1, 1), generator, device, x.dtype)
    candidate = torch.where(window, x + eps * signs, x_best)
    low, high = clip
    return candidate if low is None and high is None else candidate.clamp(min=low, max=high)


def _square_run(model, x, y, *, eps, n_queries, p_init, rescale, loss, clip, generator):
    """One run over samples all still robust; returns the best point of each."""
    n, c, h, w = x.shape
    low, high = clip
    stripes = _random_signs((n, c, 1, w), generator, x.device, x.dtype)
    x_best = x + eps * stripes
    if low is not None or high is not None:
        x_best = x_best.clamp(min=low, max=high)
    margin_best, objective_best = _objective(model, x_best, y, loss)
    out = x_best.clone()
    rows = torch.arange(n, device=x.device)
    for query in range(1, n_queries):
        if query % COMPACT_EVERY == 0:
            robust = margin_best > 0
            if not bool(robust.all()):
                out[rows] = x_best
                rows, x, y, x_best = rows[robust], x[robust], y[robust], x_best[robust]
                margin_best, objective_best = margin_best[robust], objective_best[robust]
                if rows.numel() == 0:
                    return out
        side = window_side(p_selection(p_init, query, n_queries, rescale), c, h, w)
        candidate = _candidate(x, x_best, eps, side, clip, generator)
        for _ in range(REDRAWS):  # a window already at those signs changes nothing: draw again
            unchanged = ((candidate - x_best).abs() < 1e-7).flatten(1).all(dim=1)
            redrawn = _candidate(x, x_best, eps, side, clip, generator)
            candidate = torch.where(unchanged[:, None, None, None], redrawn, candidate)
        margin_new, objective_new = _objective(model, candidate, y, loss)
        # Fooled samples stay where they are until they are dropped.
        better = (objective_new < objective_best) & (margin_best > 0)
        x_best = torch.where(better[:, None, None, None], candidate, x_best)
        margin_best = torch.where(better, margin_new, margin_best)
        objective_best = torch.where(better, objective_new, objective_best)
    out[rows] = x_best
    return out


def square(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
           n_queries: int = 5000, p_init: float = 0.8, loss: str = "margin", restarts: int = 1,
           rescale_schedule: bool = True, generator: Optional[torch.Generator] = None,
           batch_size: Optional[int] = None, clip=(0.0, 1.0)) -> torch.Tensor:
    """The Square attack (L-inf) on images x (B, C, H, W): returns x_adv.

    Per sample: the first point found that fools the model, else the point of lowest margin
    (loss="margin") or highest cross-entropy (loss="ce"). Samples the model already
    misclassifies are returned unchanged; each restart queries only the samples still robust.
    n_queries: queries per sample and restart. rescale_schedule: the window schedule stretched
    to n_queries (else that of 10000 queries). generator: every random draw. L2 is not
    implemented.
    """
    eps, norm, clip = _check_common(model, x, y, eps, norm, 0, restarts, 0.5, batch_size, clip, "square")
    if norm != "linf":
        raise ValueError("square: only norm='linf' is implemented")
    if x.dim() != 4:
        raise ValueError(f"square: x must be images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] < 2:
        raise ValueError(f"square: images must be at least 2 pixels high, got {x.shape[2]}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, numbers.Integral) or n_queries < 1:
        raise ValueError(f"square: n_queries must be an int >= 1, got {n_queries!r}")
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0 < p_init <= 1:
        raise ValueError(f"square: p_init must be a float in (0, 1], got {p_init!r}")
    if loss not in SQUARE_LOSSES:
        raise ValueError(f"square: loss must be one of {SQUARE_LOSSES}, got {loss!r}")
    x = x.detach()
    with modules_in_mode(model, False), op_range("square"), torch.no_grad():
        x_adv = x.clone()
        for rows in _chunks(x.shape[0], batch_size):
            xc, yc = x[rows], y[rows]
            result = xc.clone()
            robust = model(xc).argmax(dim=1) == yc
            for _ in range(restarts):
                index = robust.nonzero().squeeze(1)
                if index.numel() == 0:
                    break
                found = _square_run(model, xc[index], yc[index], eps=eps, n_queries=int(n_queries),
                                    p_init=float(p_init), rescale=bool(rescale_schedule), loss=loss,
                                    clip=clip, generator=generator)
                result[index] = found
                robust[index] = model(found).argmax(dim=1) == yc[index]
            x_adv[rows] = result
        return x_adv

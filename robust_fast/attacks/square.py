"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L-inf and L2: a
random search that needs only the model's outputs, no gradient. AutoAttack runs it to catch a
model whose gradients are masked.

L-inf. Start: vertical stripes, each column of each channel at x - eps or x + eps. Query i: a square
window of side s_i, at a random place, is set to x +- eps (one random sign per channel) in one
candidate per sample; the candidate is kept where it lowers the margin z_y - max_{j != y} z_j
(or raises the cross-entropy). The window's area shrinks as the queries go: p_i of the image,
p_init halved at fixed fractions of the budget (rescaled to n_queries out of 10000).

L2. Start: the image tiled with h x h squares (h = min(H, W) // 5, the grid centred), each
holding the paper's centred pattern eta with a random sign per channel, the whole rescaled to
L2 norm eps (then clipped into the box). The pattern eta^(h1,h2) (h1 >= h2) is
  eta_rs = sum_{k=0}^{M(r,s)} 1 / (n + 1 - k)^2,  n = floor(h1/2),
  M(r,s) = n - max(|r - floor(h1/2) - 1|, |s - floor(h2/2) - 1|)   (r, s from 1),
and an update is eta = [eta^(h,k), -eta^(h,h-k)], k = floor(h/2), of unit norm and turned by 90
degrees with probability 1/2. Query i (Algorithm 3 of the paper): two windows W1, W2 of side s_i
(the same schedule as L-inf); with nu the current perturbation and e^2 = eps^2 - ||nu||^2 the
unused budget, per channel c' of C: nu_W1 <- (rho eta + nu_W1 / ||nu_W1||) rescaled to norm
sqrt(||nu_{W1 u W2}||^2 + e^2 / C), nu_W2 <- 0 outside W1, rho a random sign (where the two
unit vectors cancel, as for a one-pixel window half the time, rho eta alone). The total norm is
then eps again; the candidate x + nu is clipped into the box (for x inside the box, clipping
only shrinks |nu|, so the candidate stays in the ball).

All samples still robust are queried together, their random draws made on the device; the
samples already fooled are dropped after every query on CPU, every few queries on an
accelerator (the only reads back from the device). An L-inf query touches only its window:
the window's old values are saved, the new ones written into the best point in place, and
written back where the candidate is not kept (no full-size candidate, no full-size select).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.attacks._common import StepCounter, attack_stage, check_attack_arguments, chunk_count, chunks
from robust_fast.attacks.apgd import margin, reads_back_for_free

SQUARE_LOSSES = ("margin", "ce")
COMPACT_EVERY = 32      # queries between drops of fooled samples on an accelerator (each one a read back)

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
    return min(side, height - 1, width)


def _objective(model, x, y, loss: str):
    """(margin, value to minimise) per sample; with the margin loss both are one tensor."""
    logits = model(x)
    m = margin(logits, y)
    if loss == "margin":
        return m, m
    return m, -F.cross_entropy(logits, y, reduction="none")


class _LinfDraws:
    """What every L-inf query of a run reuses: the signed step (-eps, +eps) that a drawn bit
    picks (one indexing, instead of turning the bit into a sign and scaling it), and each
    window side's pixel offsets from the window's top-left pixel (the side changes a few times
    per run)."""

    def __init__(self, eps: float, width: int, dtype, device):
        self.steps = torch.tensor([-eps, eps], dtype=dtype, device=device)
        self.width, self.device = width, device
        self.reads_back_for_free = reads_back_for_free(device)
        self._offsets = {}

    def offsets(self, side: int) -> torch.Tensor:
        if side not in self._offsets:
            line = torch.arange(side, device=self.device)
            self._offsets[side] = (line[:, None] * self.width + line[None, :]).reshape(1, 1, side * side)
        return self._offsets[side]


def _random_signs(shape, generator, device, dtype):
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def _linf_query(model, x_flat, x_best, y, draws: _LinfDraws, side, clip, generator, loss):
    """One L-inf query of every sample, in place: a random side x side window of x_best set to
    x +- eps (one random sign per channel) and clipped into the box; the model's margin and
    objective at the candidates; then, where the candidate is not kept (decided by the caller
    through the returned `keep`), the window's old values are written back. Only the window's
    n * C * side^2 values are read and written: a query costs little beyond the model's forward.
    Returns (margin, objective, restore) with restore(keep) finishing the query."""
    n, c, h, w = x_best.shape
    device = x_best.device
    top = torch.randint(0, h - side + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, w - side + 1, (n, 1), generator=generator, device=device)
    steps = draws.steps.take(torch.randint(0, 2, (n, c, 1), generator=generator, device=device))  # +-eps
    corner = top * w + left                                                       # (n, 1)
    index = (corner[:, :, None] + draws.offsets(side)).expand(n, c, side * side)
    best_flat = x_best.view(n, c, h * w)
    old = best_flat.gather(2, index)
    new = x_flat.gather(2, index).add_(steps)
    low, high = clip
    if low is not None or high is not None:
        new.clamp_(min=low, max=high)
    best_flat.scatter_(2, index, new)
    changed = (new != old).flatten(1).any(dim=1)
    if draws.reads_back_for_free and not bool(changed.all()):
        # A window already at those values leaves its candidate equal to the best point: its
        # objective is known and the candidate cannot be kept, so it is not queried (on CPU,
        # where the model's time grows with the rows; the outcome is the same).
        margin_new = torch.full((n,), math.inf, dtype=x_best.dtype, device=device)
        objective_new = margin_new if loss == "margin" else torch.full_like(margin_new, math.inf)
        queried = changed.nonzero().squeeze(1)
        if queried.numel():
            margin_queried, objective_queried = _objective(model, x_best.index_select(0, queried),
                                                           y.index_select(0, queried), loss)
            margin_new.index_copy_(0, queried, margin_queried)
            if objective_new is not margin_new:
                objective_new.index_copy_(0, queried, objective_queried)
    else:
        margin_new, objective_new = _objective(model, x_best, y, loss)

    def restore(keep: torch.Tensor) -> None:
        best_flat.scatter_(2, index, torch.where(keep[:, None, None], new, old))
    return margin_new, objective_new, restore


# --- L2 ---------------------------------------------------------------------------------------

def centred_pattern(h1: int, h2: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The paper's eta^(h1,h2) (h1 rows >= h2 columns): sum_{k=0}^{M(r,s)} 1/(n+1-k)^2 with
    n = floor(h1/2), M(r,s) = n - max(|r - floor(h1/2) - 1|, |s - floor(h2/2) - 1|), r, s from 1;
    largest at the centre, decreasing towards the border (0 where M < 0)."""
    n = h1 // 2
    r = torch.arange(1, h1 + 1, device=device)[:, None]
    s = torch.arange(1, h2 + 1, device=device)[None, :]
    m = n - torch.maximum((r - h1 // 2 - 1).abs(), (s - h2 // 2 - 1).abs())  # (h1, h2)
    k = torch.arange(0, n + 1, device=device, dtype=dtype)
    terms = 1.0 / (n + 1 - k) ** 2                                           # (n + 1,)
    cumulative = torch.cat([torch.zeros(1, dtype=dtype, device=device), terms.cumsum(0)])
    return cumulative[(m + 1).clamp(min=0)]  # sum over k = 0..M: cumulative[M + 1]


def update_pattern(h: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The update's two orientations (2, h, h): [eta^(h,k), -eta^(h,h-k)] side by side
    (k = floor(h/2)), of unit L2 norm, and the same turned by 90 degrees."""
    k = h // 2
    eta = torch.cat([centred_pattern(h, k, dtype, device), -centred_pattern(h, h - k, dtype, device)], dim=1)
    eta = eta / eta.norm()
    return torch.stack([eta, eta.t()])


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _into_ball_and_box(x, delta, eps, clip):
    """x + delta with delta scaled into the L2 ball (against rounding), then clipped."""
    norms = _per_sample_norm(delta)
    scale = torch.where(norms > eps, eps / norms.clamp(min=1e-30), torch.ones_like(norms))
    candidate = x + delta * scale[:, None, None, None]
    low, high = clip
    return candidate if low is None and high is None else candidate.clamp(min=low, max=high)


def _l2_start(x, eps, clip, generator):
    """A centred grid of h x h tiles, h = min(H, W) // 5, each with the update pattern (random
    orientation, random sign per channel), rescaled to norm eps."""
    n, c, height, width = x.shape
    device, dtype = x.device, x.dtype
    side = max(min(height, width) // 5, 1)
    tiles_r, tiles_c = height // side, width // side
    patterns = update_pattern(side, dtype, device)                                 # (2, s, s)
    turned = torch.randint(0, 2, (n, 1, tiles_r, tiles_c), generator=generator, device=device)
    signs = _random_signs((n, c, tiles_r, tiles_c), generator, device, dtype)
    tiles = patterns[turned] * signs[..., None, None]                              # (n, c, R, C, s, s)
    grid = tiles.permute(0, 1, 2, 4, 3, 5).reshape(n, c, tiles_r * side, tiles_c * side)
    top, left = (height - tiles_r * side) // 2, (width - tiles_c * side) // 2
    delta = torch.zeros_like(x)
    delta[:, :, top:top + tiles_r * side, left:left + tiles_c * side] = grid
    delta = delta * (eps / _per_sample_norm(delta))[:, None, None, None]
    return _into_ball_and_box(x, delta, eps, clip)


def _window(n, height, width, side, generator, device):
    """A random side x side window per sample: its mask (n, 1, H, W) and top-left corner."""
    top = torch.randint(0, height - side + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, width - side + 1, (n, 1), generator=generator, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    return in_rows[:, None, :, None] & in_cols[:, None, None, :], top, left


def _l2_candidate(x, x_best, eps, side, clip, generator):
    """Algorithm 3 of the paper: the perturbation's mass in W1 and W2 moved into W1, along
    rho * eta + nu_W1 / ||nu_W1|| per channel, plus the unused budget; norm eps again."""
    n, c, height, width = x.shape
    device, dtype = x.device, x.dtype
    tiny = torch.finfo(dtype).tiny
    in_1, top, left = _window(n, height, width, side, generator, device)
    in_2, _, _ = _window(n, height, width, side, generator, device)
    turned = torch.randint(0, 2, (n,), generator=generator, device=device)
    signs = _random_signs((n, c, 1, 1), generator, device, dtype)
    # eta placed in W1: each pixel reads the pattern at its offset from the window's corner.
    patterns = update_pattern(side, dtype, device)[turned]                          # (n, s, s)
    offset_r = (torch.arange(height, device=device) - top).clamp(0, side - 1)        # (n, H)
    offset_c = (torch.arange(width, device=device) - left).clamp(0, side - 1)        # (n, W)
    picks = torch.arange(n, device=device)[:, None, None]
    eta = patterns[picks, offset_r[:, :, None], offset_c[:, None, :]][:, None] * in_1  # (n, 1, H, W)

    nu = x_best - x
    unused = (eps ** 2 - nu.flatten(1).pow(2).sum(dim=1)).clamp(min=0)               # (n,)
    nu_1 = nu * in_1
    norm_1 = nu_1.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()                         # (n, c, 1, 1)
    mass_12 = (nu * (in_1 | in_2)).pow(2).sum(dim=(2, 3), keepdim=True)              # (n, c, 1, 1)
    direction = signs * eta + nu_1 / norm_1.clamp(min=tiny)
    length = direction.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    # Two unit vectors that cancel (rho * eta = -nu_W1 / ||nu_W1||, half the time for a window
    # of one pixel) leave no direction: then the new mass goes along rho * eta alone.
    cancelled = length < 1e-4
    direction = torch.where(cancelled, signs * eta, direction)
    length = torch.where(cancelled, torch.ones_like(length), length)
    available = (mass_12 + unused[:, None, None, None] / c).sqrt()
    new = direction / length.clamp(min=tiny) * available
    delta = torch.where(in_1, new, torch.where(in_2, torch.zeros_like(nu), nu))
    return _into_ball_and_box(x, delta, eps, clip)


# --- the search --------------------------------------------------------------------------------

def _square_run(model, x, y, *, eps, norm, n_queries, p_init, rescale, loss, clip, generator, tick=None):
    """One run over samples all still robust; returns the best point of each. tick: called
    after every query with the number of samples still queried (progress)."""
    n, c, h, w = x.shape
    low, high = clip
    if norm == "l2":
        x_best = _l2_start(x, eps, clip, generator)
    else:
        stripes = _random_signs((n, c, 1, w), generator, x.device, x.dtype)
        x_best = x + eps * stripes
        if low is not None or high is not None:
            x_best = x_best.clamp(min=low, max=high)
    x_best = x_best.contiguous()
    margin_best, objective_best = _objective(model, x_best, y, loss)
    if tick is not None:
        tick(n)
    out = x_best.clone()
    rows = torch.arange(n, device=x.device)
    x_flat = x.reshape(n, c, h * w)
    # Fooled samples leave after every query where reading back costs nothing (CPU), else
    # every COMPACT_EVERY queries.
    every = 1 if reads_back_for_free(x.device) else COMPACT_EVERY
    draws = _LinfDraws(eps, w, x.dtype, x.device) if norm == "linf" else None
    for query in range(1, n_queries):
        if query % every == 0:
            robust = margin_best > 0
            if not bool(robust.all()):
                out[rows] = x_best
                rows, x, y, x_best = rows[robust], x[robust], y[robust], x_best[robust]
                x_flat = x.reshape(x.shape[0], c, h * w)
                margin_best = margin_best[robust]
                objective_best = margin_best if loss == "margin" else objective_best[robust]
                if rows.numel() == 0:
                    return out
        side = window_side(p_selection(p_init, query, n_queries, rescale), c, h, w)
        if norm == "l2":
            candidate = _l2_candidate(x, x_best, eps, side, clip, generator)
            margin_new, objective_new = _objective(model, candidate, y, loss)
        else:
            margin_new, objective_new, restore = _linf_query(model, x_flat, x_best, y, draws, side, clip,
                                                              generator, loss)
        # Kept where the objective improves or the candidate fools the model; fooled samples
        # stay where they are until they are dropped.
        if every == 1 and loss == "margin":
            # Every row is still robust (margin_best > 0: the fooled ones were just dropped), so
            # a candidate that fools the model (margin <= 0) also lowers the margin.
            better = margin_new < margin_best
        else:
            better = ((objective_new < objective_best) | (margin_new <= 0)) & (margin_best > 0)
        if norm == "l2":
            x_best = torch.where(better[:, None, None, None], candidate, x_best)
        else:
            restore(better)
        margin_best = torch.where(better, margin_new, margin_best)
        objective_best = margin_best if loss == "margin" else torch.where(better, objective_new, objective_best)
        if tick is not None:
            tick(rows.numel())
    out[rows] = x_best
    return out


def square(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
           n_queries: int = 5000, p_init: float = 0.8, loss: str = "margin", restarts: int = 1,
           rescale_schedule: bool = True, generator: Optional[torch.Generator] = None,
           batch_size: Optional[int] = None, clip=(0.0, 1.0), progress=False) -> torch.Tensor:
    """The Square attack (norm "linf" or "l2") on images x (B, C, H, W): returns x_adv.

    Per sample: the first point found that fools the model, else the point of lowest margin
    (loss="margin") or highest cross-entropy (loss="ce"). Samples the model already
    misclassifies are returned unchanged; each restart queries only the samples still robust.
    n_queries: queries per sample and restart. rescale_schedule: the window schedule stretched
    to n_queries (else that of 10000 queries). generator: every random draw. For x inside the
    clip box every candidate is inside the box and the eps-ball (L-inf or L2) around x.
    progress: a bar over the queries (restart, samples left, time left) with True (None: when
    stderr is a terminal), one line when done with "log", nothing with False (the default); it
    changes no result.
    """
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, 0, restarts, 0.5, batch_size, clip, "square")
    if norm == "l2" and eps <= 0:
        raise ValueError(f"square: eps must be > 0 for norm='l2', got {eps!r}")
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
        with attack_stage(progress, "square", "query", "square") as stage:
            counter = StepCounter(stage, int(n_queries), restarts, chunk_count(x.shape[0], batch_size))
            for rows in chunks(x.shape[0], batch_size):
                xc, yc = x[rows], y[rows]
                result = xc.clone()
                robust = model(xc).argmax(dim=1) == yc
                for r in range(restarts):
                    index = robust.nonzero().squeeze(1)
                    if index.numel() == 0:
                        break
                    tick = counter.start_run(index.numel(), restart=f"{r + 1}/{restarts}")
                    found = _square_run(model, xc[index], yc[index], eps=eps, norm=norm,
                                        n_queries=int(n_queries),
                                        p_init=float(p_init), rescale=bool(rescale_schedule), loss=loss,
                                        clip=clip, generator=generator, tick=tick)
                    counter.end_run()
                    result[index] = found
                    robust[index] = model(found).argmax(dim=1) == yc[index]
                x_adv[rows] = result
                counter.end_chunk()
        return x_adv

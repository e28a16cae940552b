"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf and L2:
the third attack of AutoAttack's standard version.

FAB looks for the smallest perturbation that changes the class. Against target t it
linearises g(z) = z_t(z) - z_y(z) at the current point x1: the boundary is the hyperplane
{z : g(x1) + grad . (z - x1) = 0}. A step projects both x1 and the clean x0 onto that
hyperplane inside the box (d1, d2: the smallest moves in the attack's norm), overshoots by eta,
and mixes the two with alpha = min(|d1| / (|d1| + |d2|), alpha_max), which pulls the iterate
towards x0:
    x1 <- clip((1 - alpha)(x1 + eta d1) + alpha (x0 + eta d2)).
Where x1 is misclassified, it is recorded when nearer to x0 than the best so far, then pulled
back: x1 <- x0 + beta (x1 - x0). AutoAttack's standard version runs it with the targets ranked
2nd to 10th on the clean input (n_target_classes=9), one restart (from x0 itself), 100 steps,
alpha_max 0.1, eta 1.05, beta 0.9; a sample counts as fooled when the point found is
misclassified and within eps.

The projection onto {z : w . z = b} inside the box is a small solver per sample (project_to_
hyperplane_in_box): the move that reaches the hyperplane with the least L-inf (or L2) norm
moves every coordinate towards the bound on the descending side, by min(s k_i, p_i) (k_i = 1
for L-inf, |w_i| for L2; p_i the room to that bound), for the least s whose total decrease
sum_i |w_i| min(s k_i, p_i) reaches the gap. The decrease is piecewise linear and concave in s, with
breakpoints p_i / k_i: Newton's method from s = 0 lands on it exactly in a few passes (3 to 6 on
Fashion-MNIST images), each a handful of element-wise operations over the batch; one sort and
two cumulative sums (the exact alternative, and the fallback) cost more than the passes.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import torch

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.attacks._common import StepCounter, attack_stage, check_attack_arguments, chunk_count, chunks

# AutoAttack's standard settings for FAB-T.
STEPS = 100
N_TARGET_CLASSES = 9
ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9


# --------------------------------------------------------------------------------------------
# the projection

NEWTON_STEPS = 30  # rows not solved by then (rare: 3 to 6 passes suffice on images) go to the sort


def _descent_problem(t, w, gap, norm, low, high):
    """The problem in the form both solvers take: |w|, the room p_i towards the bound on the
    side that lowers w . z, the rate k_i, the gap made >= 0, and the direction sign(w)."""
    flip = torch.where(gap < 0, -1.0, 1.0).to(w.dtype)
    w = w * flip[:, None]              # now the gap is >= 0 and the move lowers w . z
    room_low = t - low if low is not None else torch.full_like(t, math.inf)
    room_high = high - t if high is not None else torch.full_like(t, math.inf)
    room = torch.where(w > 0, room_low, room_high).clamp(min=0)
    size = w.abs()
    rate = torch.ones_like(size) if norm == "linf" else size
    return size, room, rate, gap * flip, torch.sign(w)


def _move(s, size, room, rate, direction):
    return -direction * torch.where(size > 0, torch.minimum(s * rate, room), torch.zeros_like(room))


def _level_by_sorting(size, room, rate, gap):
    """s for every row, exactly: sort the breakpoints p_i / k_i, evaluate the decrease at each
    (cumulative sums), and solve the linear piece where it reaches the gap."""
    breaks = torch.where(size > 0, room / rate, torch.full_like(room, math.inf))
    breaks, order = breaks.sort(dim=1)
    finite = torch.isfinite(breaks)      # unbounded coordinates (no box) sort last
    slope = (size * rate).gather(1, order)                                   # |w_i| k_i
    value = torch.where(finite, (size * room).gather(1, order), 0.0)         # |w_i| p_i
    before = value.cumsum(dim=1) - value                                     # sum over j < k
    after = slope.flip(1).cumsum(dim=1).flip(1)                              # sum over j >= k
    decrease = torch.where(finite, before + torch.where(finite, breaks, 0.0) * after, math.inf)
    k = (decrease < gap[:, None]).sum(dim=1, keepdim=True).clamp(max=size.shape[1] - 1)
    s = (gap[:, None] - before.gather(1, k)) / after.gather(1, k).clamp(min=torch.finfo(size.dtype).tiny)
    s = s.clamp(min=0)
    unbounded = (~finite & (slope > 0)).any(dim=1, keepdim=True)
    reachable = unbounded | (value.sum(dim=1, keepdim=True) >= gap[:, None])
    return torch.where(reachable, s, math.inf)


def _level_by_newton(size, room, rate, gap, steps=NEWTON_STEPS):
    """s for every row by Newton's method on the decrease D(s) = sum_i |w_i| min(s k_i, p_i),
    from s = 0. D is concave and piecewise linear, so each iterate stays at or below the gap and
    the iteration ends, exactly, once a step saturates no new coordinate. Returns (s, solved)."""
    slope_each = size * rate
    s = torch.zeros_like(gap)[:, None]
    decrease = torch.zeros_like(s)
    free = room > 0                                   # coordinates not yet at their bound
    solved = torch.zeros_like(free[:, 0])
    for _ in range(steps):
        slope = (slope_each * free).sum(dim=1, keepdim=True)
        # No free coordinate left short of the gap: the hyperplane is out of the box's reach.
        s = s + (gap[:, None] - decrease) / slope.clamp(min=torch.finfo(size.dtype).tiny)
        step = s * rate
        decrease = (size * torch.minimum(step, room)).sum(dim=1, keepdim=True)
        still_free = step < room
        solved = ~(still_free != free).any(dim=1)
        free = still_free
        if bool(solved.all()):
            break
    return s, solved


def project_to_hyperplane_in_box(t: torch.Tensor, w: torch.Tensor, gap: torch.Tensor, norm: str,
                                 low: Optional[float] = 0.0, high: Optional[float] = 1.0,
                                 method: str = "newton") -> torch.Tensor:
    """Per row of t (N, D): the move d of least L-inf or L2 norm with w . (t + d) = w . t - gap,
    t + d inside [low, high] (either bound None: open). gap = w . t - b is the signed distance
    of t's value to the hyperplane's; where no move inside the box reaches the hyperplane, d is
    the box's corner nearest to it (d_i = the whole room towards the bound that lowers the gap).
    Coordinates with w_i = 0 do not move. method: "newton" (a few passes over the rows; rows it
    has not solved after NEWTON_STEPS go to the sort) or "sort" (one sort, exact)."""
    size, room, rate, gap, direction = _descent_problem(t, w, gap, norm, low, high)
    with torch.no_grad():
        if method == "sort":
            s = _level_by_sorting(size, room, rate, gap)
        else:
            s, solved = _level_by_newton(size, room, rate, gap)
            if not bool(solved.all()):
                rest = ~solved
                s[rest] = _level_by_sorting(size[rest], room[rest], rate[rest], gap[rest])
    return _move(s, size, room, rate, direction)


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


# --------------------------------------------------------------------------------------------
# one run against one target per sample

class FabRun(NamedTuple):
    x: torch.Tensor          # the nearest misclassified point found (x0 where none)
    distance: torch.Tensor   # its distance to x0 in the attack's norm (inf where none)


def _gap_and_gradient(model, x1, y, target):
    """g = z_t - z_y per sample and its gradient at x1 (each sample's gradient its own)."""
    with torch.enable_grad():
        leaf = x1.detach().requires_grad_(True)
        logits = model(leaf)
        g = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(g.sum(), leaf)
    return g.detach(), grad


def fab_run(model, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor, x_start: torch.Tensor, *,
            eps: float, norm: str, steps: int, alpha_max: float, eta: float, beta: float,
            clip, early_stop: bool, tick: Optional[Callable[[int], None]] = None) -> FabRun:
    """One FAB-T run of a batch of samples all correctly classified (inputs already checked).
    early_stop: a sample leaves once it has a misclassified point within eps (its outcome in
    AutoAttack is then decided); without it, every sample takes every step. tick: called after
    every step with the number of samples still running (progress)."""
    n = x0.shape[0]
    low, high = clip
    best_x, best = x0.clone(), torch.full((n,), math.inf, dtype=x0.dtype, device=x0.device)
    rows = torch.arange(n, device=x0.device)
    x1 = x_start.clone()
    flat0 = x0.flatten(1)
    view = (-1,) + (1,) * (x0.dim() - 1)
    for _ in range(steps):
        if rows.numel() == 0:
            break
        with op_range("attack_step"):
            g, grad = _gap_and_gradient(model, x1, y, target)
            w = grad.flatten(1)
            # The hyperplane g(x1) + w . (z - x1) = 0: its gap at x1 is g, at x0 g + w . (x0 - x1).
            gap1 = g
            gap0 = g + (w * (flat0 - x1.flatten(1))).sum(dim=1)
            d = project_to_hyperplane_in_box(torch.cat([x1.flatten(1), flat0]), torch.cat([w, w]),
                                             torch.cat([gap1, gap0]), norm, low, high)
            m = x1.shape[0]
            d1, d2 = d[:m].view_as(x1), d[m:].view_as(x1)
            size = _norms(d, norm).clamp(min=1e-8)
            a1, a2 = size[:m], size[m:]
            alpha = (a1 / (a1 + a2)).clamp(min=0, max=alpha_max).view(view)
            x1 = (x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha
            if low is not None or high is not None:
                x1 = x1.clamp(min=low, max=high)
            wrong = model(x1).argmax(dim=1) != y
            distance = _norms(x1 - x0, norm)
            nearer = wrong & (distance < best[rows])
            best_x[rows[nearer]] = x1[nearer]
            best[rows[nearer]] = distance[nearer]
            x1 = torch.where(wrong.view(view), x0 + beta * (x1 - x0), x1)
            if early_stop:
                keep = best[rows] > eps
                if not bool(keep.all()):
                    rows, x0, flat0, x1, y, target = rows[keep], x0[keep], flat0[keep], x1[keep], y[keep], target[keep]
        if tick is not None:
            tick(rows.numel())
    return FabRun(best_x, best)


# --------------------------------------------------------------------------------------------
# the attack

def _random_start(x, eps, norm, clip, generator):
    """A restart's start: x plus a random direction of size eps / 2, clipped to the box."""
    view = (-1,) + (1,) * (x.dim() - 1)
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    start = x + 0.5 * eps * t / _norms(t, norm).clamp(min=1e-12).view(view)
    low, high = clip
    return start if low is None and high is None else start.clamp(min=low, max=high)


def _check_fab_settings(n_target_classes, alpha_max, eta, beta):
    if isinstance(n_target_classes, bool) or not isinstance(n_target_classes, numbers.Integral) \
            or n_target_classes < 1:
        raise ValueError(f"fab_t: n_target_classes must be an int >= 1, got {n_target_classes!r}")
    for name, value, ok in (("alpha_max", alpha_max, lambda v: 0 <= v <= 1),
                            ("eta", eta, lambda v: 0 < v < math.inf),
                            ("beta", beta, lambda v: 0 <= v <= 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
            bound = {"alpha_max": "in [0, 1]", "eta": "> 0 and finite", "beta": "in [0, 1]"}[name]
            raise ValueError(f"fab_t: {name} must be a float {bound}, got {value!r}")


def fab_t(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
          steps: int = STEPS, n_target_classes: int = N_TARGET_CLASSES, restarts: int = 1,
          alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA, early_stop: bool = True,
          generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
          clip=(0.0, 1.0), progress=False) -> torch.Tensor:
    """FAB-T (norm "linf" or "l2"): returns x_adv.

    Against each of the n_target_classes classes ranked highest on the clean input after the
    top one in turn, `restarts` runs of `steps` steps (the first from x itself, the others from
    a random point at distance eps / 2, drawn from `generator`), each only on the samples no
    earlier run fooled within eps. Per sample: the nearest misclassified point found within
    eps (early_stop=False: every run takes every step, so it is the nearest of the whole
    search; early_stop=True, the default: the search of a sample ends at its first one, as
    AutoAttack only asks whether there is one), else x itself. Samples the model already
    misclassifies are returned unchanged. The defaults are AutoAttack's standard settings.
    progress: a bar over the steps (target, restart, samples left, time left) with True (None:
    when stderr is a terminal), one line when done with "log", nothing with False (the
    default); it changes no result.
    """
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, steps, restarts, 0.5, batch_size, clip, "fab_t")
    _check_fab_settings(n_target_classes, alpha_max, eta, beta)
    x = x.detach()
    with modules_in_mode(model, False), op_range("fab_t"), torch.no_grad():
        x_adv = x.clone()
        with attack_stage(progress, "fab-t", "step", "fab_t") as stage:
            # The targets per sample need the class count: one image through the model, and only
            # where the count is shown.
            targets = min(int(n_target_classes), model(x[:1]).shape[1] - 1) if stage.active and x.shape[0] else 0
            counter = StepCounter(stage, steps, targets * int(restarts), chunk_count(x.shape[0], batch_size))
            for rows in chunks(x.shape[0], batch_size):
                x_adv[rows] = _fab_t_chunk(model, x[rows], y[rows], eps=eps, norm=norm, steps=int(steps),
                                           n_target_classes=int(n_target_classes), restarts=int(restarts),
                                           alpha_max=float(alpha_max), eta=float(eta), beta=float(beta),
                                           early_stop=bool(early_stop), generator=generator, clip=clip,
                                           counter=counter)
                counter.end_chunk()
        return x_adv


def _fab_t_chunk(model, x, y, *, eps, norm, steps, n_target_classes, restarts, alpha_max, eta, beta,
                 early_stop, generator, clip, counter):
    result = x.clone()
    if x.shape[0] == 0:
        return result
    clean_logits = model(x)
    attack = clean_logits.argmax(dim=1) == y
    ranked = clean_logits.argsort(dim=1, descending=True)
    targets = min(n_target_classes, clean_logits.shape[1] - 1)
    for k in range(targets):
        target = ranked[:, k + 1]  # the (k+2)-th most likely class of the clean input
        for restart in range(restarts):
            index = attack.nonzero().squeeze(1)
            if index.numel() == 0:
                return result
            xs = x[index]
            start = xs if restart == 0 else _random_start(xs, eps, norm, clip, generator)
            tick = counter.start_run(index.numel(), target=f"{k + 1}/{targets}", restart=f"{restart + 1}/{restarts}")
            run = fab_run(model, xs, y[index], target[index], start, eps=eps, norm=norm, steps=steps,
                          alpha_max=alpha_max, eta=eta, beta=beta, clip=clip, early_stop=early_stop, tick=tick)
            counter.end_run()
            fooled = run.distance <= eps
            result[index[fooled]] = run.x[fooled]
            attack[index[fooled]] = False
    return result

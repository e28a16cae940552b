"""APGD and APGD-T (Croce & Hein, ICML 2020) on the fused APGD step.

APGD is PGD with momentum and a step size that adapts per sample: it starts at 2*eps and is
halved at checkpoints w_j = ceil(p_j * steps), with p_0 = 0, p_1 = 0.22 and
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for each sample where
  (1) fewer than rho * (w_j - w_{j-1}) of the steps since the last checkpoint increased the loss,
  or (2) its step size was not halved at the last checkpoint and its best loss has not grown
      since then;
such a sample continues from its best point (highest loss so far). Every sample's bookkeeping
lives in tensors on the device: on an accelerator the loop reads nothing back between
checkpoints, and at a checkpoint only whether some sample was fooled (to let it leave, with
early_stop). On CPU, where reading a value costs no synchronisation, fooled samples leave
after every step.

Returned, per sample: the first point that fooled the model (misclassified), else the point of
highest loss. A sample the model already misclassifies is returned as it is and not attacked.
Each sample's trajectory is its own: the same in a batch, alone (batch_size=1), with or
without early_stop (which only saves the work of fooled samples).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.attacks._common import (StepCounter, attack_stage, check_attack_arguments, chunk_count, chunks,
                                         clean_predictions)
from robust_fast.ops.apgd import run_apgd_step

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # the weight of the new step after the first (the paper's alpha)
# APGD-T without batch_size: its runs side by side up to this many rows. On CPU a step's cost
# per row grows again past a few hundred rows (the activations leave the cache: measured on a
# small CNN, per row 0.085 ms at 74 rows, 0.077 at 300, 0.107 at 666); a GPU wants large batches.
TARGET_ROWS = {"cpu": 256}
TARGET_ROWS_ELSEWHERE = 4096


# --------------------------------------------------------------------------------------------
# the schedule

def checkpoint_fractions(limit: float = 1.0) -> List[float]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while p_j <= limit."""
    fractions = [0.0, 0.22]
    while True:
        following = fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06)
        if following > limit + 1e-12:
            return fractions
        fractions.append(following)


def checkpoints(steps: int) -> List[int]:
    """The steps after which APGD checks each sample: ceil(p_j * steps) for 0 < p_j, below
    `steps` (a check after the last step would change nothing). Increasing, no repeats."""
    found: List[int] = []
    for p in checkpoint_fractions()[1:]:
        w = math.ceil(round(p * steps, 9))  # round away float noise (0.41 * 100 = 41.000000001)
        if 0 < w < steps and (not found or w > found[-1]):
            found.append(w)
    return found


def halving_mask(increases: torch.Tensor, interval: int, rho: float, halved_last: torch.Tensor,
                 loss_best: torch.Tensor, loss_best_last: torch.Tensor) -> torch.Tensor:
    """The samples whose step size is halved at a checkpoint: (1) fewer than rho * interval of
    the interval's steps increased the loss, or (2) not halved at the last checkpoint and the
    best loss did not grow since it."""
    too_few_increases = increases.to(torch.float64) < rho * interval
    stalled = ~halved_last & (loss_best <= loss_best_last)
    return too_few_increases | stalled


# --------------------------------------------------------------------------------------------
# losses: per sample, higher is stronger

def _sorted_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.sort(dim=1).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)."""
    ordered = _sorted_logits(logits)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(dim=1) == y
    best_other = torch.where(top_is_y, ordered[:, -2], ordered[:, -1])
    return -(z_y - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
    ordered = _sorted_logits(logits)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12)


def targeted_dlr_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
    """targeted_dlr_loss and its gradient with respect to the logits, in closed form.

    With N = z_y - z_t and D = z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12, the loss -N/D has
    d/dz_y = -1/D, d/dz_t = 1/D, d/dz_pi1 = N/D^2 and d/dz_pi3 = d/dz_pi4 = -N/(2 D^2): five
    entries per sample (summed where indices coincide). The expressions and the sort that picks
    pi1, pi3, pi4 are autograd's through targeted_dlr_loss, so the gradient is the same to the
    bit; it skips autograd's graph of a sort, two gathers and the arithmetic at every step."""
    return _targeted_dlr_loss_and_grad(logits, torch.stack((y, target), dim=1))


def _targeted_dlr_loss_and_grad(logits: torch.Tensor, y_t: torch.Tensor):
    """targeted_dlr_loss_and_grad with y and target stacked, (B, 2): an APGD-T run stacks them
    once, not at every step."""
    ordered, order = logits.sort(dim=1)
    z_y_t = logits.gather(1, y_t)
    denominator = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12
    # z_t - z_y is -(z_y - z_t) exactly, so the loss and every entry below round as autograd's.
    loss = (z_y_t[:, 1] - z_y_t[:, 0]).div_(denominator)     # -N / D
    quotient = loss / denominator                            # -N / D^2
    inverse = denominator.reciprocal()                       # 1 / D
    low = quotient * 0.5                                     # d/dz_pi3 = d/dz_pi4
    # Entries y, t, pi4, pi3, pi2, pi1 (pi2 gets 0: a slice is cheaper than picking three).
    values = torch.stack((inverse.neg(), inverse, low, low, torch.zeros_like(low), quotient.neg()), dim=1)
    grad = torch.zeros_like(logits).scatter_add_(1, torch.cat((y_t, order[:, -4:]), dim=1), values)
    return loss, grad


def _per_sample_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return dlr_loss(logits, y)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: negative exactly when the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return z_y - others.amax(dim=1)


def _loss_logits_grad(model, x, y, y_t, loss: str):
    """Per-sample losses, logits and d(sum of losses)/dx: each sample's gradient is its own.
    y_t: None, or the (B, 2) stack of y and the target (the targeted DLR loss)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = model(leaf)
        if y_t is not None:
            # The targeted DLR loss's gradient in closed form, then one backward of the model.
            losses, grad_logits = _targeted_dlr_loss_and_grad(logits.detach(), y_t)
            (grad,) = torch.autograd.grad(logits, leaf, grad_outputs=grad_logits)
            return losses, logits.detach(), grad
        losses = _per_sample_loss(loss, logits, y)
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach(), logits.detach(), grad


# --------------------------------------------------------------------------------------------
# one run

def random_start(x: torch.Tensor, eps: float, norm: str, clip, generator) -> torch.Tensor:
    """APGD's start: a random point on the surface of the eps-ball (per sample: uniform noise
    scaled to L-inf norm eps, or Gaussian noise scaled to L2 norm eps), clamped to the box."""
    view = (-1,) + (1,) * (x.dim() - 1)
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        size = noise.flatten(1).abs().amax(dim=1)
    else:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        size = noise.flatten(1).norm(dim=1) + 1e-12
    start = x + eps * noise / size.view(view)
    low, high = clip
    return start if low is None and high is None else start.clamp(min=low, max=high)


def reads_back_for_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` costs no synchronisation (CPU tensors)."""
    return device.type == "cpu"


class _Run(NamedTuple):
    x: torch.Tensor        # the first fooling point, else the point of highest loss
    fooled: torch.Tensor   # bool (B,)
    loss: torch.Tensor     # the best loss (B,)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def apgd_run(model, x_nat: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor, *, eps: float,
             norm: str, steps: int, loss: str, rho: float, early_stop: bool, clip,
             target: Optional[torch.Tensor] = None, backend: Optional[str] = None,
             sample: Optional[torch.Tensor] = None, rank: Optional[torch.Tensor] = None,
             tick: Optional[Callable[[int], None]] = None) -> _Run:
    """One APGD run of a batch from x_start (every row attacked; inputs already checked).

    sample, rank (int64, one per row; APGD-T's targets side by side): rows of one sample with
    ranks in the order their results are taken. With early_stop a row also leaves once a row
    of its sample with a lower rank is fooled: that row's result is taken, its own is not used.
    tick: called after every step with the number of rows still running (progress)."""
    n = x_nat.shape[0]
    low, high = clip
    out_x, out_fooled = x_start.clone(), torch.zeros(n, dtype=torch.bool, device=x_nat.device)
    out_loss = torch.empty(n, dtype=x_nat.dtype, device=x_nat.device)
    if n == 0:
        return _Run(out_x, out_fooled, out_loss)
    rows = torch.arange(n, device=x_nat.device)  # which sample each active row is
    x = x_start.clone()
    y_t = None if target is None else torch.stack((y, target), dim=1)
    loss_now, logits, grad = _loss_logits_grad(model, x, y, y_t, loss)
    fooled = logits.argmax(dim=1) != y
    x_fool = x.clone()                                       # valid where fooled
    x_best, grad_best, loss_best = x.clone(), grad.clone(), loss_now.clone()
    x_prev = x.clone()
    eta = torch.full((n,), 2.0 * eps, dtype=torch.float64, device=x_nat.device)
    increases = torch.zeros(n, dtype=torch.int32, device=x_nat.device)
    halved_last = torch.zeros(n, dtype=torch.bool, device=x_nat.device)
    loss_best_last = loss_best.clone()
    schedule, previous_checkpoint = checkpoints(steps), 0
    reads_back_freely = reads_back_for_free(x_nat.device)
    if sample is not None:  # per sample, the lowest rank fooled so far (n: none; ranks are < n)
        first_fooled = torch.full((n,), n, dtype=torch.int64, device=x_nat.device)

    def leave(gone: torch.Tensor) -> None:
        out_x[rows[gone]] = _where(fooled[gone], x_fool[gone], x_best[gone])
        out_fooled[rows[gone]] = fooled[gone]
        out_loss[rows[gone]] = loss_best[gone]

    for i in range(steps):
        with op_range("attack_step"):
            run_apgd_step(x, x_prev, grad, x_nat, eta, eps, 1.0 if i == 0 else MOMENTUM,
                          norm, low, high, True, backend)
            loss_new, logits, grad = _loss_logits_grad(model, x, y, y_t, loss)
            increases += loss_new > loss_now
            loss_now = loss_new
            improved = loss_new > loss_best
            x_best = _where(improved, x, x_best)
            grad_best = _where(improved, grad, grad_best)
            loss_best = torch.where(improved, loss_new, loss_best)
            wrong = logits.argmax(dim=1) != y
            x_fool = _where(wrong & ~fooled, x, x_fool)
            fooled = fooled | wrong
            at_checkpoint = i + 1 in schedule
            if at_checkpoint:
                # Halve eta and go back to the best point where the loss stalled.
                interval = i + 1 - previous_checkpoint
                previous_checkpoint = i + 1
                halve = halving_mask(increases, interval, rho, halved_last, loss_best, loss_best_last)
                eta = torch.where(halve, eta / 2, eta)
                x = _where(halve, x_best, x)
                grad = _where(halve, grad_best, grad)
                loss_now = torch.where(halve, loss_best, loss_now)
                halved_last, loss_best_last = halve, loss_best.clone()
                increases.zero_()
            # Fooled samples leave: at checkpoints (the only reads back from an accelerator),
            # or after every step where reading back costs nothing.
            if early_stop and (at_checkpoint or reads_back_freely) and bool(fooled.any()):
                gone = fooled
                if sample is not None:
                    first_fooled.scatter_reduce_(0, sample[fooled], rank[fooled], "amin")
                    gone = fooled | (rank > first_fooled[sample])
                leave(gone)
                keep = ~gone
                rows, x, x_prev, grad, x_nat, y = rows[keep], x[keep], x_prev[keep], grad[keep], x_nat[keep], y[keep]
                x_fool, x_best, grad_best = x_fool[keep], x_best[keep], grad_best[keep]
                loss_now, loss_best, loss_best_last = loss_now[keep], loss_best[keep], loss_best_last[keep]
                eta, increases, halved_last, fooled = eta[keep], increases[keep], halved_last[keep], fooled[keep]
                y_t = None if y_t is None else y_t[keep]
                if sample is not None:
                    sample, rank = sample[keep], rank[keep]
                if rows.numel() == 0:
                    break
        if tick is not None:
            tick(rows.numel())
    leave(torch.ones_like(fooled))
    return _Run(out_x, out_fooled, out_loss)


# --------------------------------------------------------------------------------------------
# the attacks

def _starts(x, eps, norm, clip, generator, restarts):
    """Every restart's start for every sample, drawn up front: a sample's draws do not depend
    on which samples it is attacked with."""
    return [random_start(x, eps, norm, clip, generator) for _ in range(restarts)]


def apgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
         steps: int = 100, loss: str = "ce", restarts: int = 1, rho: float = 0.75,
         early_stop: bool = True, generator: Optional[torch.Generator] = None,
         batch_size: Optional[int] = None, clip=(0.0, 1.0), backend: Optional[str] = None,
         progress=False) -> torch.Tensor:
    """APGD (Croce & Hein 2020) with the cross-entropy ("ce") or DLR ("dlr") loss: returns x_adv.

    Per sample: the first point that fools the model, else the point of highest loss over all
    restarts. Samples the model already misclassifies are returned unchanged. Each restart
    attacks only the samples no earlier one fooled, from a new random start (drawn from
    `generator`). early_stop: fooled samples stop (on CPU after the step that fooled them, on
    a GPU at the next checkpoint); the result is the same. batch_size: at most this many samples
    go through the model at once. The model runs in eval mode; every module's mode and the
    parameters' .grad are left as they were. progress: a bar over the steps (restart, samples
    left, time left) with True (None: when stderr is a terminal), one line when done with "log",
    nothing with False (the default); it changes no result.
    """
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, steps, restarts, rho, batch_size, clip, "apgd")
    if loss not in LOSSES:
        raise ValueError(f"apgd: loss must be one of {LOSSES}, got {loss!r}")
    x = x.detach()
    with modules_in_mode(model, False), op_range("apgd"), torch.no_grad():
        if loss == "dlr":
            _check_classes(model, x[:1], 3, "apgd: the DLR loss")
        starts = _starts(x, eps, norm, clip, generator, restarts)
        x_adv = x.clone()
        with attack_stage(progress, f"apgd-{loss}", "step", "apgd") as stage:
            counter = StepCounter(stage, steps, restarts, chunk_count(x.shape[0], batch_size))
            for rows in chunks(x.shape[0], batch_size):
                x_adv[rows] = _apgd_chunk(model, x[rows], y[rows], [s[rows] for s in starts], eps=eps,
                                          norm=norm, steps=steps, loss=loss, rho=float(rho),
                                          early_stop=early_stop, clip=clip, backend=backend, counter=counter)
                counter.end_chunk()
        return x_adv


def _check_classes(model, x_one: torch.Tensor, least: int, what: str) -> int:
    if x_one.shape[0] == 0:
        return least
    classes = model(x_one).shape[1]
    if classes < least:
        raise ValueError(f"{what} needs at least {least} classes, the model has {classes}")
    return classes


def _apgd_chunk(model, x, y, starts, *, eps, norm, steps, loss, rho, early_stop, clip, backend, counter):
    result = x.clone()
    attack = clean_predictions(model, x, None) == y  # still robust: the ones to attack
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for r, start in enumerate(starts):
        index = attack.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        tick = counter.start_run(index.numel(), restart=f"{r + 1}/{len(starts)}")
        run = apgd_run(model, x[index], y[index], start[index], eps=eps, norm=norm, steps=steps,
                       loss=loss, rho=rho, early_stop=early_stop, clip=clip, backend=backend, tick=tick)
        counter.end_run()
        better = run.fooled | (run.loss > best_loss[index])
        result[index[better]] = run.x[better]
        best_loss[index] = torch.maximum(best_loss[index], run.loss)
        attack[index[run.fooled]] = False
    return result


def apgdt(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
          steps: int = 100, n_target_classes: int = 9, restarts: int = 1, rho: float = 0.75,
          early_stop: bool = True, generator: Optional[torch.Generator] = None,
          batch_size: Optional[int] = None, clip=(0.0, 1.0), backend: Optional[str] = None,
          progress=False) -> torch.Tensor:
    """APGD-T: APGD on the targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2),
    against each of the n_target_classes classes ranked highest on the clean input after the
    top one in turn, each only on the samples no earlier target fooled. A sample counts as
    fooled when misclassified (any class). Returns x_adv: per sample, the first point that
    fooled the model, else the point of lowest margin z_y - max_{i != y} z_i over the targets.
    The (target, restart) runs go through the model side by side (the results are those of one
    run after the other): batch_size caps the rows, samples times runs, of one model call;
    without it, up to max(samples, TARGET_ROWS) rows. Other arguments as for apgd (progress:
    the bar also shows the targets).
    """
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, steps, restarts, rho, batch_size, clip, "apgdt")
    if isinstance(n_target_classes, bool) or not isinstance(n_target_classes, numbers.Integral) \
            or n_target_classes < 1:
        raise ValueError(f"apgdt: n_target_classes must be an int >= 1, got {n_target_classes!r}")
    x = x.detach()
    with modules_in_mode(model, False), op_range("apgdt"), torch.no_grad():
        classes = _check_classes(model, x[:1], 4, "apgdt: the targeted DLR loss")
        n_targets = min(int(n_target_classes), classes - 1)
        # One start per (target, restart) for every sample, drawn up front.
        starts = [_starts(x, eps, norm, clip, generator, restarts) for _ in range(n_targets)]
        x_adv = x.clone()
        with attack_stage(progress, "apgd-t", "step", "apgdt") as stage:
            counter = StepCounter(stage, steps, n_targets * restarts, chunk_count(x.shape[0], batch_size))
            for rows in chunks(x.shape[0], batch_size):
                x_adv[rows] = _apgdt_chunk(model, x[rows], y[rows], [[s[rows] for s in per_target]
                                                                     for per_target in starts],
                                           eps=eps, norm=norm, steps=steps, rho=float(rho),
                                           early_stop=early_stop, clip=clip, backend=backend,
                                           batch_size=batch_size, counter=counter)
                counter.end_chunk()
        return x_adv


def _span(numbers, total: int) -> str:
    """'3/9' for one 0-based number, '3-5/9' for a range: where runs side by side are."""
    low, high = min(numbers) + 1, max(numbers) + 1
    return f"{low}/{total}" if low == high else f"{low}-{high}/{total}"


def _apgdt_chunk(model, x, y, starts, *, eps, norm, steps, rho, early_stop, clip, backend, batch_size,
                 counter):
    """The (target, restart) runs in their order, side by side as far as batch_size (else
    max(samples, TARGET_ROWS)) rows allow: a row's trajectory does not depend on the rows beside
    it, a row leaves once its sample is fooled by an earlier run, and the results are taken in
    order, each run's only for the samples no earlier run fooled, as one run after the other
    would give them. Fewer, larger model calls: the per-step overhead is shared by the targets."""
    result = x.clone()
    clean_logits = model(x)
    attack = clean_logits.argmax(dim=1) == y
    ranked = clean_logits.argsort(dim=1, descending=True)
    best_margin = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    runs = [(k, r, start) for k, per_target in enumerate(starts) for r, start in enumerate(per_target)]
    done = 0
    while done < len(runs):
        index = attack.nonzero().squeeze(1)
        m = index.numel()
        if m == 0:
            break
        limit = batch_size if batch_size is not None else \
            max(m, TARGET_ROWS.get(x.device.type, TARGET_ROWS_ELSEWHERE))
        group = runs[done:done + max(1, limit // m)]
        done += len(group)
        tick = counter.start_run(m * len(group), runs=len(group),
                                 target=_span([k for k, _, _ in group], len(starts)),
                                 restart=_span([r for _, r, _ in group], len(starts[0])))
        # Rows run-major: row j * m + i is sample index[i] under the group's j-th run.
        x_rows, y_rows = x[index].repeat((len(group),) + (1,) * (x.dim() - 1)), y[index].repeat(len(group))
        targets = torch.cat([ranked[index, k + 1] for k, _, _ in group])  # (k+2)-th most likely class
        run = apgd_run(model, x_rows, y_rows, torch.cat([start[index] for _, _, start in group]), eps=eps,
                       norm=norm, steps=steps, loss="dlr", rho=rho, early_stop=early_stop, clip=clip,
                       target=targets, backend=backend,
                       sample=torch.arange(m, device=x.device).repeat(len(group)),
                       rank=torch.arange(len(group), device=x.device).repeat_interleave(m), tick=tick)
        counter.end_run(len(group))
        run_margin = margin(model(run.x), y_rows)
        for j in range(len(group)):
            rows = slice(j * m, (j + 1) * m)
            still = attack[index]  # not fooled by an earlier run: this run's result counts
            fooled, margin_j = run.fooled[rows] & still, run_margin[rows]
            better = fooled | (still & (margin_j < best_margin[index]))
            result[index[better]] = run.x[rows][better]
            best_margin[index] = torch.where(still, torch.minimum(best_margin[index], margin_j),
                                             best_margin[index])
            attack[index[fooled]] = False
    return result

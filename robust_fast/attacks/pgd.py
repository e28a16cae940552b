"""Gradient attacks on the fused PGD step: fgsm and pgd (L-inf and L2; random start, restarts,
targeted, early stop).

Gradients are taken with respect to the input only (torch.autograd.grad): parameters' .grad
stay as they were, and no graph outlives a step. The model runs in eval mode during the attack,
as in torchattacks, and every module's mode is restored afterwards.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._checks import check_clip
from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.ops.pgd import prepare_radius, run_pgd_step

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Radius = Union[float, torch.Tensor]
Clip = Optional[Tuple[Optional[float], Optional[float]]]


def _check_attack_inputs(model, x, y, steps=1, restarts=1):
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"y must be an int64 tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
    for name, value in (("steps", steps), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


def _per_sample_view(value: Radius, like: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return float(value)


def _loss_and_logits(model, x: torch.Tensor, y: torch.Tensor, loss_fn: Optional[LossFn]):
    logits = model(x)
    loss = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)
    if loss.dim() != 0:  # a per-sample loss: its sum has the same per-sample gradients
        loss = loss.sum()
    return loss, logits


def input_gradient(model, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Optional[LossFn] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d x, logits), touching no parameter's .grad and keeping no graph."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        loss, logits = _loss_and_logits(model, x_leaf, y, loss_fn)
        (grad,) = torch.autograd.grad(loss, x_leaf)
    return grad, logits.detach()


def _succeeded(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    prediction = logits.argmax(dim=1)
    return prediction == y if targeted else prediction != y


def _random_start(x: torch.Tensor, eps: Radius, norm: str, clip: Clip,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    # The same draws, in the same order, as torchattacks' PGD and PGDL2.
    low, high = (None, None) if clip is None else clip
    eps_b = _per_sample_view(eps, x)
    if norm == "linf":
        noise = torch.empty_like(x).uniform_(0.0, 1.0, generator=generator) if isinstance(eps_b, torch.Tensor) \
            else torch.empty_like(x).uniform_(-eps_b, eps_b, generator=generator)
        if isinstance(eps_b, torch.Tensor):
            noise = (noise * 2 - 1) * eps_b
        start = x + noise
    else:
        delta = torch.empty_like(x).normal_(generator=generator)
        norms = delta.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
        radius = torch.zeros_like(norms).uniform_(0, 1, generator=generator)
        delta *= radius / norms * eps_b
        start = x + delta
    if low is None and high is None:
        return start
    return torch.clamp(start, min=low, max=high)


def _per_sample_score(model, x_adv, y, loss_fn, targeted):
    """(succeeded, loss) per sample: higher is a stronger perturbation."""
    with torch.no_grad():
        logits = model(x_adv)
        if loss_fn is None:
            loss = F.cross_entropy(logits, y, reduction="none")
        else:
            loss = loss_fn(logits, y)
            if loss.dim() == 0:  # a scalar loss ranks nothing per sample: fall back to CE
                loss = F.cross_entropy(logits, y, reduction="none")
    if targeted:
        loss = -loss
    return _succeeded(logits, y, targeted), loss


def _rows(value: Radius, index) -> Radius:
    """The per-sample radii of some rows (a float stays a float)."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def _join(value: Radius, more: Radius) -> Radius:
    return torch.cat([value, more]) if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def _step_in_place(x_act, grad, x_nat, eps: Radius, alpha: Radius, step_options) -> None:
    """One PGD step of the active rows, on radii prepared at the attack's entry: no checks,
    no host synchronisation."""
    run_pgd_step(x_act, grad, x_nat, eps, alpha, out=x_act, **step_options)


def _step_size(alpha: Radius, grad: torch.Tensor, eps_for_division: float) -> Radius:
    """torchattacks' PGDL2 moves alpha * g / (||g|| + eps_for_division); the fused L2 step moves
    alpha * g / ||g||. The same move, then: a per-sample alpha scaled by ||g|| / (||g|| + e)."""
    if not eps_for_division:
        return alpha
    norms = grad.flatten(1).norm(p=2, dim=1)
    scale = norms / (norms + eps_for_division)
    scale = torch.where(torch.isfinite(scale), scale, 0.0)  # a NaN gradient makes no move anyway
    return alpha * scale.to(torch.float64)  # a per-sample radius, as run_pgd_step takes it


def _attack_in_chunks(model, x, y, x_adv, *, eps, alpha, steps, loss_fn, pool, division, step_options):
    for begin in range(0, x.shape[0], pool):
        rows = slice(begin, begin + pool)
        x_chunk, x_nat, y_chunk = x_adv[rows], x[rows], y[rows]  # views: x_adv is updated in place
        eps_chunk, alpha_chunk = _rows(eps, rows), _rows(alpha, rows)
        for _ in range(steps):
            with op_range("attack_step"):
                grad, _ = input_gradient(model, x_chunk, y_chunk, loss_fn)
                _step_in_place(x_chunk, grad, x_nat, eps_chunk, _step_size(alpha_chunk, grad, division),
                               step_options)
    return x_adv


def _attack_with_early_stop(model, x, y, x_adv, *, eps, alpha, steps, loss_fn, pool, division,
                            step_options):
    """Samples move through a pool of at most `pool` rows: each takes up to `steps` steps and
    leaves as soon as it succeeds (its point is kept in x_adv); a waiting sample takes each
    freed place, so the model keeps seeing full batches. The active rows live compacted in
    their own tensors; every sample follows the trajectory it would follow alone."""
    n = x.shape[0]
    if steps == 0 or n == 0:
        return x_adv
    waiting = 0                                    # the next sample to enter
    rows = torch.arange(0, device=x.device)        # which sample each active row is
    taken = torch.zeros(0, dtype=torch.long, device=x.device)  # steps each has taken
    x_act, x_nat, y_act = x_adv[:0], x[:0], y[:0]
    eps_act, alpha_act = _rows(eps, rows), _rows(alpha, rows)

    def leave(gone):
        nonlocal rows, taken, x_act, x_nat, y_act, eps_act, alpha_act
        x_adv[rows[gone]] = x_act[gone]
        keep = ~gone
        rows, taken, x_act, x_nat, y_act = rows[keep], taken[keep], x_act[keep], x_nat[keep], y_act[keep]
        eps_act, alpha_act = _rows(eps_act, keep), _rows(alpha_act, keep)
        return keep

    while waiting < n or rows.numel() > 0:
        if rows.numel() < pool and waiting < n:
            new = torch.arange(waiting, min(n, waiting + pool - rows.numel()), device=x.device)
            waiting += new.numel()
            rows, taken = torch.cat([rows, new]), torch.cat([taken, torch.zeros_like(new)])
            x_act, x_nat, y_act = (torch.cat([x_act, x_adv[new]]), torch.cat([x_nat, x[new]]),
                                   torch.cat([y_act, y[new]]))
            eps_act, alpha_act = _join(eps_act, _rows(eps, new)), _join(alpha_act, _rows(alpha, new))
        with op_range("attack_step"):
            grad, logits = input_gradient(model, x_act, y_act, loss_fn)
            succeeded = _succeeded(logits, y_act, step_options["targeted"])
            if bool(succeeded.any()):
                grad = grad[leave(succeeded)]
                if rows.numel() == 0:
                    continue
            _step_in_place(x_act, grad, x_nat, eps_act, _step_size(alpha_act, grad, division),
                           step_options)
            taken += 1
            finished = taken >= steps
            if bool(finished.any()):
                leave(finished)
    return x_adv


def _attack_once(model, x, y, *, eps, alpha, steps, norm, clip, targeted, loss_fn,
                 early_stop, random_start, generator, batch_size, eps_for_division, backend):
    # Every start is drawn up front, in one call: the same draws however the batch is split.
    x_adv = _random_start(x, eps, norm, clip, generator) if random_start else x.clone()
    pool = x.shape[0] if batch_size is None else batch_size
    low, high = (None, None) if clip is None else clip
    step_options = dict(norm=norm, clip_min=low, clip_max=high, targeted=targeted, backend=backend)
    attack = _attack_with_early_stop if early_stop else _attack_in_chunks
    return attack(model, x, y, x_adv, eps=eps, alpha=alpha, steps=steps, loss_fn=loss_fn,
                  pool=max(pool, 1), division=eps_for_division, step_options=step_options)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius = 8 / 255, alpha: Radius = 2 / 255,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        targeted: bool = False, loss_fn: Optional[LossFn] = None, early_stop: bool = False,
        generator: Optional[torch.Generator] = None, clip: Clip = (0.0, 1.0),
        model_training: bool = False, batch_size: Optional[int] = None,
        eps_for_division: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.): returns x_adv, a new tensor.

    y: the true labels, or the target labels when targeted=True (the step then descends the
    loss of the target). loss_fn(logits, y): a scalar or per-sample loss, cross-entropy by
    default. restarts: per sample, the perturbation that succeeds, else the one of highest
    loss, is kept. early_stop: a sample stops moving once it succeeds (for evaluation; never
    weaker than without it). generator: draws the random start. model_training: run the
    model in training mode during the attack (eval by default, as torchattacks does).
    batch_size: at most this many samples go through the model at once (all by default). With
    early_stop, each sample that leaves is replaced by the next waiting one, so the model keeps
    seeing full batches; evaluate a whole test set in one call this way. eps_for_division
    (L2 only): step alpha * g / (||g|| + eps_for_division) as torchattacks.PGDL2 does; 0 (the
    default) steps along g / ||g|| exactly and saves a norm per step.
    """
    _check_attack_inputs(model, x, y, steps, restarts)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    norm = norm.lower() if isinstance(norm, str) else norm
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    # Validated once here (the only reads back from the device); the loop never checks again.
    eps = prepare_radius("eps", eps, x.shape[0], x, caller="pgd")
    alpha = prepare_radius("alpha", alpha, x.shape[0], x, caller="pgd")
    clip = check_clip(clip, caller="pgd")
    if not isinstance(targeted, bool):
        raise TypeError(f"pgd: targeted must be a bool, got {type(targeted).__name__}")
    if isinstance(eps_for_division, bool) or not isinstance(eps_for_division, numbers.Real) \
            or not 0 <= eps_for_division < math.inf:
        raise ValueError(f"pgd: eps_for_division must be a finite float >= 0, got {eps_for_division!r}")
    if eps_for_division and norm != "l2":
        raise ValueError("pgd: eps_for_division applies to norm='l2' only (the L-inf step takes "
                         "the sign of the gradient)")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("pgd"), torch.no_grad():
        options = dict(eps=eps, alpha=alpha, steps=steps, norm=norm, clip=clip, targeted=targeted,
                       loss_fn=loss_fn, early_stop=early_stop, random_start=random_start,
                       generator=generator, batch_size=batch_size,
                       eps_for_division=float(eps_for_division), backend=backend)
        best = _attack_once(model, x, y, **options)
        if restarts == 1:
            return best
        best_success, best_loss = _per_sample_score(model, best, y, loss_fn, targeted)
        for _ in range(restarts - 1):
            candidate = _attack_once(model, x, y, **options)
            success, loss = _per_sample_score(model, candidate, y, loss_fn, targeted)
            better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
            best[better] = candidate[better]
            best_success = torch.where(better, success, best_success)
            best_loss = torch.where(better, loss, best_loss)
        return best


def fgsm(model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius = 8 / 255, clip: Clip = (0.0, 1.0),
         targeted: bool = False, loss_fn: Optional[LossFn] = None, model_training: bool = False,
         backend: Optional[str] = None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al.): one L-inf step of size eps from x."""
    _check_attack_inputs(model, x, y)
    eps = prepare_radius("eps", eps, x.shape[0], x, caller="fgsm")
    low, high = check_clip(clip, caller="fgsm")
    if not isinstance(targeted, bool):
        raise TypeError(f"fgsm: targeted must be a bool, got {type(targeted).__name__}")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("fgsm"), torch.no_grad():
        grad, _ = input_gradient(model, x, y, loss_fn)
        return run_pgd_step(x, grad, x, eps, eps, "linf", low, high, targeted, backend=backend)


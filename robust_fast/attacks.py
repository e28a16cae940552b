"""Gradient attacks on the fused PGD step: fgsm, pgd (L-inf and L2; random start, restarts,
targeted, early stop) and torchattacks-style classes FGSM, PGD and PGDL2.

Gradients are taken with respect to the input only (torch.autograd.grad): parameters' .grad
stay as they were, and no graph outlives a step. The model runs in eval mode during the attack,
as in torchattacks, and every module's mode is restored afterwards.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.ops.pgd import check_clip, check_radius, pgd_step

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


def _select(value: Radius, index: torch.Tensor) -> Radius:
    return value[index] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


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
        norms = delta.reshape(x.shape[0], -1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
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


def _attack_once(model, x, y, *, eps, alpha, steps, norm, clip, targeted, loss_fn,
                 early_stop, random_start, generator, backend):
    x_adv = _random_start(x, eps, norm, clip, generator) if random_start else x.clone()
    if not early_stop:
        for _ in range(steps):
            with op_range("attack_step"):
                grad, _ = input_gradient(model, x_adv, y, loss_fn)
                pgd_step(x_adv, grad, x, eps=eps, alpha=alpha, norm=norm, clip=clip,
                         targeted=targeted, out=x_adv, backend=backend)
        return x_adv
    # Early stop: samples that already succeed leave the batch and keep their point; the
    # active ones live compacted in their own tensors, so later steps cost less.
    active = torch.arange(x.shape[0], device=x.device)
    x_act, x_nat_act, y_act = x_adv, x, y
    eps_act, alpha_act = eps, alpha
    for _ in range(steps):
        with op_range("attack_step"):
            grad, logits = input_gradient(model, x_act, y_act, loss_fn)
            done = _succeeded(logits, y_act, targeted)
            if bool(done.any()):
                x_adv[active[done]] = x_act[done]
                keep = ~done
                active, x_act, x_nat_act, y_act, grad = (
                    active[keep], x_act[keep], x_nat_act[keep], y_act[keep], grad[keep])
                eps_act, alpha_act = _select(eps_act, keep), _select(alpha_act, keep)
                if active.numel() == 0:
                    return x_adv
            pgd_step(x_act, grad, x_nat_act, eps=eps_act, alpha=alpha_act, norm=norm, clip=clip,
                     targeted=targeted, out=x_act, backend=backend)
    if x_act is not x_adv:  # until a sample leaves, the active batch is x_adv itself
        x_adv[active] = x_act
    return x_adv


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius = 8 / 255, alpha: Radius = 2 / 255,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        targeted: bool = False, loss_fn: Optional[LossFn] = None, early_stop: bool = False,
        generator: Optional[torch.Generator] = None, clip: Clip = (0.0, 1.0),
        model_training: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.): returns x_adv, a new tensor.

    y: the true labels, or the target labels when targeted=True (the step then descends the
    loss of the target). loss_fn(logits, y): a scalar or per-sample loss, cross-entropy by
    default. restarts: per sample, the perturbation that succeeds, else the one of highest
    loss, is kept. early_stop: a sample stops moving once it succeeds (for evaluation; never
    weaker than without it). generator: draws the random start. model_training: run the
    model in training mode during the attack (eval by default, as torchattacks does).
    """
    _check_attack_inputs(model, x, y, steps, restarts)
    norm = norm.lower() if isinstance(norm, str) else norm
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    check_radius("eps", eps, x.shape[0], x, caller="pgd")
    check_radius("alpha", alpha, x.shape[0], x, caller="pgd")
    clip = check_clip(clip, caller="pgd")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("pgd"), torch.no_grad():
        options = dict(eps=eps, alpha=alpha, steps=steps, norm=norm, clip=clip, targeted=targeted,
                       loss_fn=loss_fn, early_stop=early_stop, random_start=random_start,
                       generator=generator, backend=backend)
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
    check_radius("eps", eps, x.shape[0], x, caller="fgsm")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("fgsm"), torch.no_grad():
        grad, _ = input_gradient(model, x, y, loss_fn)
        return pgd_step(x, grad, x, eps=eps, alpha=eps, norm="linf", clip=clip,
                        targeted=targeted, backend=backend)


class _Attack:
    """torchattacks-style wrapper: attack(x, y) -> x_adv, with its mode switches."""

    def __init__(self, model):
        self.model = model
        self.targeted = False
        self.model_training = False

    def set_mode_targeted_by_label(self, quiet: bool = True):
        """From now on, y passed to the attack holds the target labels."""
        self.targeted = True

    def set_mode_default(self):
        self.targeted = False

    def set_model_training_mode(self, model_training: bool = False):
        self.model_training = model_training

    def forward(self, x, y):
        raise NotImplementedError

    def __call__(self, x, y):
        return self.forward(x, y)

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({fields})"


class FGSM(_Attack):
    def __init__(self, model, eps: float = 8 / 255):
        super().__init__(model)
        self.eps = eps

    def forward(self, x, y):
        return fgsm(self.model, x, y, eps=self.eps, targeted=self.targeted,
                    model_training=self.model_training)


class PGD(_Attack):
    """L-inf PGD with torchattacks.PGD's arguments and defaults (plus restarts, early_stop)."""

    norm = "linf"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, restarts: int = 1, early_stop: bool = False):
        super().__init__(model)
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.random_start, self.restarts, self.early_stop = random_start, restarts, early_stop

    def forward(self, x, y):
        return pgd(self.model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   random_start=self.random_start, restarts=self.restarts,
                   targeted=self.targeted, early_stop=self.early_stop,
                   model_training=self.model_training)


class PGDL2(PGD):
    """L2 PGD with torchattacks.PGDL2's arguments and defaults (plus restarts, early_stop)."""

    norm = "l2"

    def __init__(self, model, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 random_start: bool = True, restarts: int = 1, early_stop: bool = False):
        super().__init__(model, eps, alpha, steps, random_start, restarts, early_stop)

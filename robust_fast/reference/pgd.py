"""The PGD step in plain PyTorch: the specification every other backend is tested against.

Arguments arrive already validated by robust_fast.ops.pgd (same shapes, device and dtype;
eps/alpha as floats or float64 tensors of shape (B,)).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Radius = Union[float, torch.Tensor]


def _per_sample(value: Radius, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A per-sample radius broadcast against `like` (B, ...), in its dtype; floats pass through."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return value


def _clip(x: torch.Tensor, clip_min: Optional[float], clip_max: Optional[float]) -> torch.Tensor:
    if clip_min is None and clip_max is None:
        return x
    return torch.clamp(x, min=clip_min, max=clip_max)


def pgd_step_linf_reference(x_adv, grad, x_nat, eps: Radius, alpha: Radius,
                            clip_min=None, clip_max=None, targeted=False):
    # torchattacks' expression order: step, then project the difference, then the box.
    direction = torch.sign(grad).nan_to_num(0.0)
    if targeted:
        direction = -direction
    eps_b, alpha_b = _per_sample(eps, x_adv), _per_sample(alpha, x_adv)
    stepped = x_adv + alpha_b * direction
    delta = torch.clamp(stepped - x_nat, min=-eps_b, max=eps_b)
    return _clip(x_nat + delta, clip_min, clip_max)


def pgd_step_l2_reference(x_adv, grad, x_nat, eps: Radius, alpha: Radius,
                          clip_min=None, clip_max=None, targeted=False):
    batch = x_adv.shape[0]
    if x_adv.numel() == 0:
        return _clip(x_adv.clone(), clip_min, clip_max)
    view = (batch,) + (1,) * (x_adv.dim() - 1)
    flat_grad = grad.reshape(batch, -1)
    # The squares are summed in float (double for double inputs), as every kernel does.
    wide_grad = flat_grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    grad_sq = (wide_grad * wide_grad).sum(dim=1)
    grad_norm = grad_sq.sqrt()
    # Squares below the smallest normal number of that type lose digits or vanish: a sum under
    # numel * that number understates ||g||, and the step would outgrow alpha. Such a sample,
    # like one whose sum overflowed or is NaN, makes no move (never a NaN).
    smallest_reliable = flat_grad.shape[1] * torch.finfo(grad_sq.dtype).tiny
    moves = (grad_sq >= smallest_reliable) & torch.isfinite(grad_sq)
    inv_norm = torch.where(moves, 1.0 / torch.where(moves, grad_norm, 1.0), 0.0).to(x_adv.dtype)
    unit_grad = torch.where(moves.view(view), grad * inv_norm.view(view), 0.0)
    if targeted:
        unit_grad = -unit_grad
    alpha_b = _per_sample(alpha, x_adv)
    delta = (x_adv + alpha_b * unit_grad) - x_nat
    delta_norm = torch.linalg.vector_norm(delta.reshape(batch, -1), dim=1)
    eps_t = eps.to(delta_norm.dtype) if isinstance(eps, torch.Tensor) else eps
    # Scale by min(1, eps/||delta||); a delta inside the ball (or of norm 0) is left alone.
    factor = torch.where(delta_norm > eps_t, eps_t / delta_norm, torch.ones_like(delta_norm))
    return _clip(x_nat + delta * factor.view(view), clip_min, clip_max)


def pgd_step_reference(x_adv, grad, x_nat, *, eps: Radius, alpha: Radius, norm="linf",
                       clip_min=None, clip_max=None, targeted=False):
    if norm == "linf":
        return pgd_step_linf_reference(x_adv, grad, x_nat, eps, alpha, clip_min, clip_max, targeted)
    return pgd_step_l2_reference(x_adv, grad, x_nat, eps, alpha, clip_min, clip_max, targeted)

"""The APGD step in plain PyTorch: the specification every other backend is tested against.

One momentum step of APGD (Croce & Hein, ICML 2020) for a batch:
    z     = P(x + eta * s),   s = sign(grad) (linf) or grad / ||grad||_2 per sample (l2)
    x_new = P(x + a * (z - x) + (1 - a) * (x - x_prev))
P projects onto the eps-ball around x_nat, then clamps into the box. The first step is the PGD
step of robust_fast.reference.pgd; the second projection reuses its pieces.

Arguments arrive already validated by robust_fast.ops.apgd (same shapes, device and dtype; eta
a float64 tensor of shape (B,), eps a float or a float64 (B,) tensor).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from robust_fast.reference.pgd import _clip, _per_sample, pgd_step_reference

Radius = Union[float, torch.Tensor]


def _project(point, x_nat, eps: Radius, norm: str, clip_min, clip_max):
    if norm == "linf":
        eps_b = _per_sample(eps, point)
        return _clip(x_nat + torch.clamp(point - x_nat, min=-eps_b, max=eps_b), clip_min, clip_max)
    batch = point.shape[0]
    if point.numel() == 0:
        return _clip(point.clone(), clip_min, clip_max)
    delta = point - x_nat
    delta_norm = torch.linalg.vector_norm(delta.reshape(batch, -1), dim=1)
    eps_t = eps.to(delta_norm.dtype) if isinstance(eps, torch.Tensor) else eps
    factor = torch.where(delta_norm > eps_t, eps_t / delta_norm, torch.ones_like(delta_norm))
    return _clip(x_nat + delta * factor.view(-1, *([1] * (point.dim() - 1))), clip_min, clip_max)


def apgd_step_reference(x, x_prev, grad, x_nat, *, eta: torch.Tensor, eps: Radius, momentum: float,
                        norm: str = "linf", clip_min: Optional[float] = None,
                        clip_max: Optional[float] = None) -> torch.Tensor:
    z = pgd_step_reference(x, grad, x_nat, eps=eps, alpha=eta, norm=norm, clip_min=clip_min,
                           clip_max=clip_max)
    moved = x + momentum * (z - x) + (1.0 - momentum) * (x - x_prev)
    return _project(moved, x_nat, eps, norm, clip_min, clip_max)

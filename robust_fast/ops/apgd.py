"""robust_fast.apgd_step: one fused momentum step of APGD (L-inf and L2) with projection.

The public function validates its inputs, opens the robust_fast::apgd_step range, picks a
backend and calls it. The C++ ops (torch.ops.robust_fast.apgd_step / apgd_step_) get their fake
kernels and an autograd guard here, so they work under torch.compile and fail loudly under
autograd. The projection math is pgd_step's (csrc/include/robust_fast/pgd_math.h).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from robust_fast import _backend, _build
from robust_fast._checks import check_clip, check_floating_tensor
from robust_fast._layout import kernel_layout, overlap
from robust_fast._profiling import op_range
from robust_fast.ops.pgd import Radius, check_radius, output_layout_like, schema_pair
from robust_fast.reference.apgd import apgd_step_reference

NORMS = ("linf", "l2")


def _check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"apgd_step: momentum must be a float in [0, 1], got {type(momentum).__name__}")
    momentum = float(momentum)
    if math.isnan(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"apgd_step: momentum must be in [0, 1], got {momentum}")
    return momentum


def apgd_step(x: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, *,
              eta: Radius, eps: Radius, momentum: float = 0.75, norm: str = "linf",
              clip: Optional[Tuple[Optional[float], Optional[float]]] = (0.0, 1.0),
              in_place: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """One APGD step (Croce & Hein 2020) of a batch:

        z     = P(x + eta * s)
        x_new = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))

    s = sign(grad) for linf, grad / ||grad||_2 per sample for l2 (a zero, NaN or unmeasurable
    gradient makes no move, as in pgd_step); P projects onto the eps-ball around x_nat, then
    clamps into clip. The paper's momentum is 0.75, and 1 on the first step (x_prev unused).

    eta: the step size, a float or a (B,) tensor (one per sample, as APGD halves it per sample).
    eps: a float or a (B,) tensor. clip: (low, high), either side None, or None for no box.
    in_place: False returns x_new in a new tensor and modifies nothing; True writes x_new into x
    and the old x into x_prev (the attack loop's update, one pass) and returns x.
    backend: "auto", "cpp", "triton" or "reference" (None: the current default).
    """
    x = check_floating_tensor("x", x, "apgd_step")
    if x.dim() < 1:
        raise ValueError("apgd_step: x must have a batch dimension, got a 0-dim tensor")
    for name, other in (("x_prev", x_prev), ("grad", grad), ("x_nat", x_nat)):
        check_floating_tensor(name, other, "apgd_step")
        if other.shape != x.shape:
            raise ValueError(f"apgd_step: {name} must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(other.shape)}")
        if other.device != x.device:
            raise ValueError(f"apgd_step: {name} must be on x's device {x.device}, got {other.device}")
        if other.dtype != x.dtype:
            raise TypeError(f"apgd_step: {name} must have x's dtype {x.dtype}, got {other.dtype}")
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"apgd_step: norm must be one of {NORMS}, got {norm!r}")
    norm = norm.lower()
    batch = x.shape[0]
    eta = check_radius("eta", eta, batch, x, "apgd_step")
    eps = check_radius("eps", eps, batch, x, "apgd_step")
    momentum = _check_momentum(momentum)
    clip_min, clip_max = check_clip(clip, caller="apgd_step")
    if not isinstance(in_place, bool):
        raise TypeError(f"apgd_step: in_place must be a bool, got {type(in_place).__name__}")
    if in_place and x.numel() > 0 and (x_prev is x or (not torch.compiler.is_compiling()
                                                     and overlap(x, x_prev) != "none")):
        raise ValueError("apgd_step: in_place needs x and x_prev in separate memory")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, x_prev, grad, x_nat)):
        raise RuntimeError("apgd_step is not differentiable: call it under torch.no_grad() "
                           "or on detached tensors")
    return run_apgd_step(x, x_prev, grad, x_nat, eta, eps, momentum, norm, clip_min, clip_max,
                         in_place, backend)


def run_apgd_step(x: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                  eta: Radius, eps: Radius, momentum: float, norm: str,
                  clip_min: Optional[float], clip_max: Optional[float], in_place: bool,
                  backend: Optional[str] = None) -> torch.Tensor:
    """apgd_step on arguments already validated (by apgd_step, or once at an attack's entry):
    no checks and no host synchronisation."""
    chosen = _backend.resolve(backend, x.device.type)
    with op_range("apgd_step"):
        if chosen == "cpp":
            eta_value, eta_per_sample = schema_pair(eta)
            eps_value, eps_per_sample = schema_pair(eps)
            args = (x, x_prev, grad, x_nat, eta_value, eps_value, eta_per_sample, eps_per_sample,
                    momentum, norm, clip_min, clip_max)
            if in_place:
                torch.ops.robust_fast.apgd_step_(*args)
                return x
            return torch.ops.robust_fast.apgd_step(*args)
        if chosen == "triton":
            return _apgd_step_triton(x, x_prev, grad, x_nat, eta, eps, momentum, norm, clip_min,
                                     clip_max, in_place)
        result = apgd_step_reference(x, x_prev, grad, x_nat, eta=eta, eps=eps, momentum=momentum,
                                     norm=norm, clip_min=clip_min, clip_max=clip_max)
        if not in_place:
            return result
        x_prev.copy_(x)
        x.copy_(result)
        return x


def _apgd_step_triton(x, x_prev, grad, x_nat, eta, eps, momentum, norm, clip_min, clip_max, in_place):
    apgd_step_triton = _backend.triton_kernels("apgd").apgd_step_triton
    operands = (("x", x), ("x_prev", x_prev), ("grad", grad), ("x_nat", x_nat))
    written = (("x", x), ("x_prev", x_prev)) if in_place else ()
    layout = kernel_layout("apgd_step", operands, written)
    scalars = (eta, eps, momentum, norm, clip_min, clip_max)
    if not in_place:
        return apgd_step_triton(*layout.operands, torch.empty_like(layout.operands[0]), None, *scalars)
    if layout.writes_directly:
        apgd_step_triton(*layout.operands, x, x_prev, *scalars)
        return x
    out, prev_out = torch.empty_like(layout.operands[0]), torch.empty_like(layout.operands[0])
    apgd_step_triton(*layout.operands, out, prev_out, *scalars)
    x.copy_(out)
    x_prev.copy_(prev_out)
    return x


def _register_fake_and_autograd() -> None:
    if _build.compiled_library_error() is not None:
        return

    @torch.library.register_fake("robust_fast::apgd_step")
    def _(x, x_prev, grad, x_nat, eta, eps, eta_per_sample, eps_per_sample, momentum, norm,
          clip_min, clip_max):
        return output_layout_like("apgd_step", ("x", x), ("x_prev", x_prev), ("grad", grad),
                                  ("x_nat", x_nat))

    @torch.library.register_fake("robust_fast::apgd_step_")
    def _(x, x_prev, grad, x_nat, eta, eps, eta_per_sample, eps_per_sample, momentum, norm,
          clip_min, clip_max):
        return None

    def _not_differentiable(ctx, grad_output):
        raise RuntimeError("robust_fast::apgd_step is not differentiable (a projection step of an "
                           "attack): detach its inputs")

    torch.library.register_autograd("robust_fast::apgd_step", _not_differentiable)


_register_fake_and_autograd()

"""robust_fast.pgd_step: one fused PGD step with projection onto the L-inf or L2 ball and the box.

The public function validates its inputs, opens the robust_fast::pgd_step range, picks a backend
and calls it. The C++ op (torch.ops.robust_fast.pgd_step / pgd_step_out) gets its fake kernel and
its autograd guard here, so it works under torch.compile and fails loudly under autograd.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from robust_fast import _backend, _build
from robust_fast._checks import check_clip, check_floating_tensor
from robust_fast._layout import kernel_layout
from robust_fast._profiling import op_range
from robust_fast.reference.pgd import pgd_step_reference

# A radius (eps, alpha; apgd_step's eta) from an op's entry to its kernels: a float, or a float64
# tensor of shape (B,) on the operands' device, contiguous (check_radius makes one). Only at the
# C++ op's boundary does it become the schema's pair (float, Tensor?): schema_pair.
Radius = Union[float, torch.Tensor]
NORMS = ("linf", "l2")
STEP_SIZES = ("alpha", "eta")  # radii that must also be finite


def _check_operand(name: str, value) -> torch.Tensor:
    return check_floating_tensor(name, value, "pgd_step")


def check_radius(name: str, value, batch: int, x: torch.Tensor,
                 caller: str = "pgd_step") -> Radius:
    """The radius as the kernels take it: a float for a number (or a 0-dim CPU tensor), else a
    float64 (B,) tensor on x's device. Never reads a value back from a GPU: there, a 0-dim
    tensor becomes a per-sample one and bad values fail asynchronously (torch._assert_async);
    see prepare_radius."""
    if type(value) is float and value >= 0 and value != math.inf:  # the common case, fast
        return value
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in
                                      (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{caller}: {name} must be a real tensor, got {value.dtype}")
        if value.dim() == 0 and value.device.type == "cpu":
            value = value.item()
        else:
            if value.dim() == 0:
                value = value.expand(batch)
            if value.shape != (batch,):
                raise ValueError(f"{caller}: {name} as a tensor must have shape ({batch},) "
                                 f"(one value per sample), got {tuple(value.shape)}")
            # Contiguous: the kernels index it by sample (an expanded 0-dim tensor is not).
            per_sample = value.detach().to(device=x.device, dtype=torch.float64).contiguous()
            if not torch.compiler.is_compiling():
                _check_radius_values(name, per_sample, caller, x.device.type == "cpu")
            return per_sample
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a float or a tensor of shape ({batch},), "
                        f"got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{caller}: {name} must be >= 0 and not NaN, got {value}")
    if name in STEP_SIZES and math.isinf(value):
        raise ValueError(f"{caller}: {name} must be finite, got inf")
    return value


def _check_radius_values(name: str, per_sample: torch.Tensor, caller: str, read_back: bool) -> None:
    """>= 0 and not NaN (alpha also finite) in every sample: a ValueError when read_back,
    else an asynchronous device-side assertion that costs no host synchronisation."""
    valid = per_sample >= 0  # False for NaN
    if name in STEP_SIZES:
        valid &= torch.isfinite(per_sample)
    message = (f"{caller}: {name} must be >= 0 and not NaN in every sample"
               + (", and finite" if name in STEP_SIZES else ""))
    if read_back:
        if not bool(valid.all()):
            raise ValueError(message)
    else:
        torch._assert_async(valid.all(), message)


def prepare_radius(name: str, value, batch: int, x: torch.Tensor, caller: str) -> Radius:
    """A radius validated once, at an attack's entry, for run_pgd_step in its loop: a float,
    or a float64 (B,) tensor on x's device. Reads the values back (once) so that a bad one is
    a ValueError here rather than an asynchronous failure inside the loop."""
    radius = check_radius(name, value, batch, x, caller)
    if isinstance(radius, torch.Tensor) and x.device.type != "cpu":
        _check_radius_values(name, radius, caller, read_back=True)
    return radius


def _check_norm(norm) -> str:
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"pgd_step: norm must be one of {NORMS}, got {norm!r}")
    return norm.lower()


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, *, eps: Radius,
             alpha: Radius, norm: str = "linf",
             clip: Optional[Tuple[Optional[float], Optional[float]]] = (0.0, 1.0),
             targeted: bool = False, out: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> torch.Tensor:
    """One PGD step: move x_adv along grad, project onto the eps-ball around x_nat, clamp to clip.

    linf: x_nat + clamp(x_adv + alpha*sign(grad) - x_nat, -eps, eps), then clamp to clip
    (torchattacks' order; bit-identical to it in fp32). l2: step alpha along grad/||grad||
    per sample, scale the difference by min(1, eps/||delta||), clamp to clip. targeted=True
    steps against the gradient. A zero or NaN gradient makes no move, nor (l2) does one whose
    sum of squares, taken in float (double for double inputs), under- or overflows: a step is
    never longer than alpha.

    eps, alpha: floats, or tensors of shape (B,) for one value per sample.
    clip: (low, high), either side None for open, or None for no box.
    out: where to write the result; out=x_adv updates in place. No other input is modified.
    backend: "auto", "cpp", "triton" or "reference"; None takes the current default
    (robust_fast.use_backend / set_backend / ROBUST_FAST_BACKEND, else "auto").
    """
    x_adv = _check_operand("x_adv", x_adv)
    grad = _check_operand("grad", grad)
    x_nat = _check_operand("x_nat", x_nat)
    if x_adv.dim() < 1:
        raise ValueError("pgd_step: x_adv must have a batch dimension, got a 0-dim tensor")
    for name, other in (("grad", grad), ("x_nat", x_nat)):
        if other.shape != x_adv.shape:
            raise ValueError(f"pgd_step: {name} must have the shape of x_adv {tuple(x_adv.shape)}, "
                             f"got {tuple(other.shape)}")
        if other.device != x_adv.device:
            raise ValueError(f"pgd_step: {name} must be on x_adv's device {x_adv.device}, got {other.device}")
        if other.dtype != x_adv.dtype:
            raise TypeError(f"pgd_step: {name} must have x_adv's dtype {x_adv.dtype}, got {other.dtype}")
    norm = _check_norm(norm)
    batch = x_adv.shape[0]
    eps = check_radius("eps", eps, batch, x_adv)
    alpha = check_radius("alpha", alpha, batch, x_adv)
    clip_min, clip_max = check_clip(clip)
    if not isinstance(targeted, bool):
        raise TypeError(f"pgd_step: targeted must be a bool, got {type(targeted).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"pgd_step: out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.shape != x_adv.shape or out.dtype != x_adv.dtype or out.device != x_adv.device:
            raise ValueError("pgd_step: out must match x_adv in shape, dtype and device, got "
                             f"{tuple(out.shape)} {out.dtype} {out.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_adv, grad, x_nat)):
        raise RuntimeError("pgd_step is not differentiable: call it under torch.no_grad() "
                           "or on detached tensors")

    return run_pgd_step(x_adv, grad, x_nat, eps, alpha, norm, clip_min, clip_max, targeted, out,
                        backend)


def run_pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: Radius,
                 alpha: Radius, norm: str, clip_min: Optional[float], clip_max: Optional[float],
                 targeted: bool, out: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """pgd_step on arguments already validated (by pgd_step, or once at an attack's entry, with
    prepare_radius): no checks and no host synchronisation, so an attack's loop can call it
    every step."""
    chosen = _backend.resolve(backend, x_adv.device.type)
    with op_range("pgd_step"):
        if chosen == "cpp":
            eps_value, eps_per_sample = schema_pair(eps)
            alpha_value, alpha_per_sample = schema_pair(alpha)
            args = (x_adv, grad, x_nat, eps_value, alpha_value, eps_per_sample, alpha_per_sample,
                    norm, clip_min, clip_max, targeted)
            if out is None:
                return torch.ops.robust_fast.pgd_step(*args)
            torch.ops.robust_fast.pgd_step_out(*args, out)
            return out
        if chosen == "triton":
            return _pgd_step_triton(x_adv, grad, x_nat, eps, alpha, norm, clip_min, clip_max,
                                    targeted, out)
        result = pgd_step_reference(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm,
                                    clip_min=clip_min, clip_max=clip_max, targeted=targeted)
        if out is None:
            return result
        out.copy_(result)
        return out


def _pgd_step_triton(x_adv, grad, x_nat, eps, alpha, norm, clip_min, clip_max, targeted, out):
    written = () if out is None else (("out", out),)
    layout = kernel_layout("pgd_step", (("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat)), written)
    target = out if out is not None and layout.writes_directly else torch.empty_like(layout.operands[0])
    _backend.triton_kernels("pgd").pgd_step_triton(*layout.operands, target, eps, alpha, norm, clip_min, clip_max, targeted)
    if out is None or target is out:
        return target
    out.copy_(target)
    return out


def schema_pair(radius: Radius) -> Tuple[float, Optional[torch.Tensor]]:
    """A radius as the C++ schemas take it: (float, None), or (0.0, per-sample tensor)."""
    return (0.0, radius) if isinstance(radius, torch.Tensor) else (radius, None)


def output_layout_like(op: str, *operands: Tuple[str, torch.Tensor]) -> torch.Tensor:
    """An empty result with the strides the kernels give theirs (for the fake kernels)."""
    return torch.empty_like(kernel_layout(op, operands).operands[0])


def _register_fake_and_autograd() -> None:
    if _build.compiled_library_error() is not None:
        return

    @torch.library.register_fake("robust_fast::pgd_step")
    def _(x_adv, grad, x_nat, eps, alpha, eps_per_sample, alpha_per_sample, norm,
          clip_min, clip_max, targeted):
        return output_layout_like("pgd_step", ("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat))

    @torch.library.register_fake("robust_fast::pgd_step_out")
    def _(x_adv, grad, x_nat, eps, alpha, eps_per_sample, alpha_per_sample, norm,
          clip_min, clip_max, targeted, out):
        return None

    def _not_differentiable(ctx, grad_output):
        raise RuntimeError("robust_fast::pgd_step is not differentiable (a projection step of an "
                           "attack): detach its inputs")

    torch.library.register_autograd("robust_fast::pgd_step", _not_differentiable)


_register_fake_and_autograd()

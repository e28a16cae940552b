"""robust_fast.gaussian_copies: the noisy copies of randomized smoothing, in one pass.

x (B, ...) becomes (B * copies, ...) with row b * copies + j = x[b] + sigma * N(0, I): x read
once, the output written once, where the eager expression x.repeat_interleave(copies, 0) +
sigma * torch.randn(...) makes three passes over the largest tensor.

Random draws (the contract). Each call draws one 64-bit seed from the generator (torch's default
generator for x's device when None): torch.randint on it, so successive calls differ and a
generator seeded alike repeats them exactly; the generator advances by that one draw, whatever
the size of the output. The normals are then a function of (seed, output element) alone: the
C++ kernels (csrc/include/robust_fast/normal_math.h, Philox4x32-10 and Box-Muller, the same
numbers on CPU and CUDA) and the Triton kernel (tl.randn) index them by the element's position
in the (contiguous) output, whatever x's layout; the reference seeds a generator with it for
torch.randn. So each backend repeats itself under one seed, and different backends draw
different numbers.

This file owns the op: the checks, the layout (x packed to contiguous once, a contiguous
output), the dispatch, the fake kernels of the C++ ops (torch.ops.robust_fast.gaussian_copies
and gaussian_copies_out) and the op's autograd (the gradient of x sums its copies' gradients).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from robust_fast import _backend, _build
from robust_fast._checks import check_floating_tensor, check_positive_finite
from robust_fast._layout import _has_internal_overlap, overlap
from robust_fast._profiling import op_range
from robust_fast.reference.noise import gaussian_copies_reference

OP = "gaussian_copies"
_SEED_LOW, _SEED_HIGH = -(2 ** 63), 2 ** 63 - 1


def _check_copies(copies) -> int:
    if isinstance(copies, bool) or not isinstance(copies, numbers.Integral):
        raise TypeError(f"{OP}: copies must be an int, got {type(copies).__name__}")
    if copies < 1:
        raise ValueError(f"{OP}: copies must be >= 1, got {copies}")
    return int(copies)


def _check_generator(generator, x: torch.Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu" and generator.device != x.device:
        raise ValueError(f"{OP}: generator must be on the CPU or on x's device {x.device}, "
                         f"got {generator.device}")


def output_shape(x: torch.Tensor, copies: int) -> Tuple[int, ...]:
    return (x.shape[0] * copies,) + tuple(x.shape[1:])


def _check_out(out, x: torch.Tensor, copies: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{OP}: out must be a torch.Tensor or None, got {type(out).__name__}")
    shape = output_shape(x, copies)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{OP}: out must have shape {shape} and x's dtype {x.dtype} and device "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} {out.device}")


def _check_out_memory(out: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """out's memory, for the Triton and reference paths (the C++ op checks it itself)."""
    if out is None or out.numel() == 0:
        return
    if _has_internal_overlap(out):
        raise RuntimeError(f"{OP}: out has elements that share memory (an expanded tensor?): pass a dense one")
    if overlap(out, x) != "none":
        raise RuntimeError(f"{OP}: out must share no memory with x")


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One 64-bit seed as a 0-dim int64 tensor on the generator's device (the default
    generator's: x's device), drawn without reading anything back to the host."""
    where = generator.device if generator is not None else device
    return torch.randint(_SEED_LOW, _SEED_HIGH, (), dtype=torch.int64, generator=generator, device=where)


def gaussian_copies(x: torch.Tensor, copies: int, sigma: float, *,
                    generator: Optional[torch.Generator] = None, out: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """(B * copies, ...) noisy copies of x (B, ...): row b * copies + j is x[b] + sigma * N(0, I).

    x is never modified. The output is contiguous whatever x's layout (x, B images, is packed
    once when it is not), so x's layout never changes the numbers; fp16/bf16 compute in
    float32 and round once. Differentiable in x (each x[b] gets
    the sum of its copies' gradients), except with out=.
    copies: an int >= 1. sigma: a float > 0, finite.
    generator: a torch.Generator on the CPU or on x's device, or None for torch's default one;
    each call draws one seed from it (module docstring: the random-draw contract).
    out: where to write the copies (shape (B * copies, ...), x's dtype and device, no memory
    shared with x).
    backend: "auto", "cpp", "triton" or "reference" (see robust_fast.use_backend).
    """
    check_floating_tensor("x", x, OP)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have a batch dimension, got a 0-dim tensor")
    copies = _check_copies(copies)
    sigma = check_positive_finite("sigma", sigma, OP)
    _check_generator(generator, x)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if out is not None:
        _check_out(out, x, copies)
        if needs_grad:
            raise RuntimeError(f"{OP}: out= does not support automatic differentiation: "
                               "detach x or leave out None")
    seed = draw_seed(generator, x.device)

    chosen = _backend.resolve(backend, x.device.type)
    with op_range(OP):
        if chosen == "cpp":
            if out is None:
                return torch.ops.robust_fast.gaussian_copies(x, copies, sigma, seed)
            torch.ops.robust_fast.gaussian_copies_out(x, copies, sigma, seed, out)
            return out
        _check_out_memory(out, x)
        if chosen == "triton":
            if needs_grad:
                return _TritonCopies.apply(x, copies, sigma, seed)
            return _gaussian_copies_triton(x, copies, sigma, seed, out)
        result = gaussian_copies_reference(x, copies, sigma, seed)
        if out is None:
            return result
        out.copy_(result)
        return out


# --------------------------------------------------------------------------------------------
# layout: x packed to contiguous once (it is the smaller tensor, by copies); the output is
# contiguous, so that an element's noise depends on its logical position, not on x's layout

def empty_output(x: torch.Tensor, copies: int) -> torch.Tensor:
    return torch.empty(output_shape(x, copies), dtype=x.dtype, device=x.device)


def _triton_seed(seed: torch.Tensor, x: torch.Tensor):
    """The launcher's seed: the tensor itself when it lies on x's device, else its value (a CPU
    tensor, read without a synchronisation)."""
    return seed if seed.device == x.device else int(seed)


def _gaussian_copies_triton(x, copies, sigma, seed, out):
    direct = out is not None and out.is_contiguous()
    target = out if direct else empty_output(x, copies)
    _backend.triton_kernels("noise").gaussian_copies_triton(x.contiguous(), copies, sigma,
                                                            _triton_seed(seed, x), target)
    if out is None or direct:
        return target
    out.copy_(target)
    return out


# --------------------------------------------------------------------------------------------
# autograd: one backward for the C++ op's registration and the Triton path

def backward(ctx, grad_out):
    """x[b]'s gradient: the sum of its copies' gradients; nothing for copies, sigma, seed."""
    if grad_out is None:
        return None, None, None, None
    grad = grad_out.reshape((ctx.batch, ctx.copies) + tuple(grad_out.shape[1:])).sum(1)
    return grad, None, None, None


def setup_context(ctx, inputs, output) -> None:
    x, copies = inputs[0], inputs[1]
    ctx.batch, ctx.copies = x.shape[0], copies


class _TritonCopies(torch.autograd.Function):
    """The Triton path when x requires grad: the kernel forward, the shared backward."""

    @staticmethod
    def forward(ctx, x, copies, sigma, seed):
        setup_context(ctx, (x, copies, sigma, seed), None)
        return _gaussian_copies_triton(x, copies, sigma, seed, None)

    @staticmethod
    def backward(ctx, grad_out):
        return backward(ctx, grad_out)


def _register_fake_and_autograd() -> None:
    if _build.compiled_library_error() is not None:
        return

    @torch.library.register_fake("robust_fast::gaussian_copies")
    def _(x, copies, sigma, seed):
        return empty_output(x, copies)

    @torch.library.register_fake("robust_fast::gaussian_copies_out")
    def _(x, copies, sigma, seed, out):
        return None

    torch.library.register_autograd("robust_fast::gaussian_copies", backward, setup_context=setup_context)


_register_fake_and_autograd()

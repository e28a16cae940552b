"""robust_fast.ibp_linear, ibp_conv2d, ibp_relu: a box through one layer, in center/radius form.

A box is (center, radius), the set [center - radius, center + radius]. Linear and conv2d map it
to (layer(center), |layer|(radius)): both products in one call, |W| taken from a cache that is
refreshed when the weight changes (robust_fast/_abs_weight.py). ibp_relu maps it to
[relu(lower), relu(upper)]; relu=True on a product applies it in the same call (on the C++
path in place on the products' fresh outputs, in the Triton linear kernel in its epilogue).

The C++ ops (torch.ops.robust_fast.ibp_linear / ibp_conv2d / ibp_relu and their backwards
_ibp_*_backward) get their fake kernels and autograd here; the Triton backend
(robust_fast.kernels.ibp) carries its own autograd.Functions.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from robust_fast import _backend, _build
from robust_fast._abs_weight import cached_abs_weight
from robust_fast._abs_weight import clear as clear_abs_weight_cache  # noqa: F401  (public: after .data writes)
from robust_fast._checks import check_floating_tensor
from robust_fast._layout import is_non_overlapping_and_dense
from robust_fast._profiling import op_range
from robust_fast.reference.ibp import ibp_conv2d_reference, ibp_linear_reference, ibp_relu_reference

Box = Tuple[torch.Tensor, torch.Tensor]
IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# arguments

def _check_box(op: str, center, radius) -> None:
    check_floating_tensor("center", center, op)
    check_floating_tensor("radius", radius, op)
    if radius.shape != center.shape:
        raise ValueError(f"{op}: radius must have center's shape {tuple(center.shape)}, got {tuple(radius.shape)}")
    if radius.dtype != center.dtype:
        raise TypeError(f"{op}: radius must have center's dtype {center.dtype}, got {radius.dtype}")
    if radius.device != center.device:
        raise ValueError(f"{op}: radius must be on center's device {center.device}, got {radius.device}")


def _check_parameters(op: str, center: torch.Tensor, weight, bias, weight_dim: int) -> None:
    check_floating_tensor("weight", weight, op)
    if weight.dim() != weight_dim:
        expected = "(out_features, in_features)" if weight_dim == 2 else "(out_channels, in_channels/groups, kH, kW)"
        raise ValueError(f"{op}: weight must be {expected}, got {tuple(weight.shape)}")
    tensors = [("weight", weight)]
    if bias is not None:
        check_floating_tensor("bias", bias, op)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.dtype != center.dtype:
            raise TypeError(f"{op}: {name} must have center's dtype {center.dtype}, got {t.dtype}")
        if t.device != center.device:
            raise ValueError(f"{op}: {name} must be on center's device {center.device}, got {t.device}")


def _pair(op: str, name: str, value, minimum: int) -> Tuple[int, int]:
    values = (value, value) if isinstance(value, numbers.Integral) else value
    if (not isinstance(values, (tuple, list)) or len(values) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum for v in values)):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(values[0]), int(values[1])


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------
# the public functions

def ibp_linear(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, relu: bool = False,
               backend: Optional[str] = None) -> Box:
    """The box (center, radius) through x -> x @ weight.T + bias: (center @ W.T + b, radius @ |W|.T).

    center, radius: (..., in_features), radius >= 0 (not checked: reading it back would cost a
    pass); any leading dimensions (E boxes, B samples). weight (out, in), bias (out,) or None.
    relu: then through ReLU in the same call. Differentiable in center, radius, weight, bias.
    backend: "auto", "cpp", "triton" or "reference" (see robust_fast.use_backend).
    """
    op = "ibp_linear"
    _check_box(op, center, radius)
    _check_parameters(op, center, weight, bias, 2)
    if center.dim() < 1 or center.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: center must be (..., {weight.shape[1]}) for weight {tuple(weight.shape)}, "
                         f"got {tuple(center.shape)}")
    chosen = _backend.resolve(backend, center.device.type)
    with op_range(op):
        if chosen == "reference":
            return ibp_linear_reference(center, radius, weight, bias, relu)
        if chosen == "triton":
            from robust_fast.kernels.ibp import ibp_linear_triton
            return ibp_linear_triton(center, radius, weight, bias, relu)
        abs_weight = cached_abs_weight(weight)
        if relu and _needs_grad(center, radius, weight, bias):
            # Fused, the backward would have to recompute the products: keep the pre-activation.
            box = torch.ops.robust_fast.ibp_linear(center, radius, weight, bias, abs_weight, False)
            return torch.ops.robust_fast.ibp_relu(*box)
        return torch.ops.robust_fast.ibp_linear(center, radius, weight, bias, abs_weight, relu)


def ibp_conv2d(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
               dilation: IntPair = 1, groups: int = 1, *, relu: bool = False,
               backend: Optional[str] = None) -> Box:
    """The box (center, radius) through F.conv2d(x, weight, bias, stride, padding, dilation,
    groups): (conv(center, W, b), conv(radius, |W|)).

    center, radius: (..., C, H, W) with any leading dimensions (E boxes, B samples), radius >= 0
    (not checked). padding is zero padding, as F.conv2d's integer padding. relu: then through
    ReLU in the same call. Differentiable in center, radius, weight, bias.
    """
    op = "ibp_conv2d"
    _check_box(op, center, radius)
    _check_parameters(op, center, weight, bias, 4)
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be an int >= 1, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: out_channels {weight.shape[0]} must be divisible by groups {groups}")
    if center.dim() < 4 or center.shape[-3] != weight.shape[1] * groups:
        raise ValueError(f"{op}: center must be (..., {weight.shape[1] * groups}, H, W) for weight "
                         f"{tuple(weight.shape)} and groups {groups}, got {tuple(center.shape)}")
    for axis, (size, k, s, p, d) in enumerate(zip(center.shape[-2:], weight.shape[-2:], stride, padding, dilation)):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(f"{op}: center's spatial size {tuple(center.shape[-2:])} padded by {padding} "
                             f"is smaller than the dilated kernel {tuple(weight.shape[-2:])}")
    chosen = _backend.resolve(backend, center.device.type)
    with op_range(op):
        if chosen == "reference":
            return ibp_conv2d_reference(center, radius, weight, bias, stride, padding, dilation, groups, relu)
        if chosen == "triton":
            from robust_fast.kernels.ibp import ibp_conv2d_triton
            return ibp_conv2d_triton(center, radius, weight, bias, stride, padding, dilation, groups, relu)
        abs_weight = cached_abs_weight(weight)
        args = (center, radius, weight, bias, abs_weight, stride, padding, dilation, groups)
        if relu and _needs_grad(center, radius, weight, bias):
            return torch.ops.robust_fast.ibp_relu(*torch.ops.robust_fast.ibp_conv2d(*args, False))
        return torch.ops.robust_fast.ibp_conv2d(*args, relu)


def ibp_relu(center: torch.Tensor, radius: torch.Tensor, *, backend: Optional[str] = None) -> Box:
    """The box (center, radius) through ReLU: [relu(center - radius), relu(center + radius)]
    as (center, radius). Any shape; differentiable (the gradient of relu at 0 is 0, as torch's)."""
    op = "ibp_relu"
    _check_box(op, center, radius)
    chosen = _backend.resolve(backend, center.device.type)
    with op_range(op):
        if chosen == "reference":
            return ibp_relu_reference(center, radius)
        if chosen == "triton":
            from robust_fast.kernels.ibp import ibp_relu_triton
            return ibp_relu_triton(center, radius)
        return torch.ops.robust_fast.ibp_relu(center, radius)


# --------------------------------------------------------------------------------------------
# fake kernels and autograd of the C++ ops

def _same_dense_layout(first: torch.Tensor, *others: torch.Tensor) -> bool:
    return is_non_overlapping_and_dense(first) and all(o.stride() == first.stride() for o in others)


def _relu_outputs_like(center: torch.Tensor, *others: torch.Tensor) -> Box:
    """The C++ elementwise kernels' outputs: the inputs' shared dense layout, else contiguous."""
    if _same_dense_layout(center, *others):
        return torch.empty_like(center), torch.empty_like(center)
    return (torch.empty(center.shape, dtype=center.dtype, device=center.device),
            torch.empty(center.shape, dtype=center.dtype, device=center.device))


def _images(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.flatten(0, t.dim() - 4)


def _conv_outputs_like(center, weight, bias, stride, padding, dilation, groups) -> Box:
    # What at::convolution returns for the center (layout included), and the radius alike.
    c_out = torch.nn.functional.conv2d(_images(center), weight, bias, stride, padding, dilation, groups)
    r_out = torch.empty_like(c_out)
    leading = tuple(center.shape[:-3])
    return c_out.view(leading + tuple(c_out.shape[1:])), r_out.view(leading + tuple(r_out.shape[1:]))


def _linear_setup(ctx, inputs, output) -> None:
    center, radius, weight, bias, abs_weight, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(center, radius, weight, bias, abs_weight)


def _linear_backward(ctx, grad_center, grad_radius):
    center, radius, weight, bias, abs_weight = ctx.saved_tensors
    if ctx.relu:  # only direct op calls get here (the public function does not fuse under autograd)
        pre = torch.ops.robust_fast.ibp_linear(center, radius, weight, bias, abs_weight, False)
        grad_center, grad_radius = torch.ops.robust_fast._ibp_relu_backward(grad_center, grad_radius, *pre)
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], bias is not None and need[3]]
    gc, gr, gw, gb = torch.ops.robust_fast._ibp_linear_backward(
        grad_center, grad_radius, center, radius, weight, abs_weight, mask)
    return (gc if need[0] else None, gr if need[1] else None, gw if mask[1] else None,
            gb if mask[2] else None, None, None)


def _conv_setup(ctx, inputs, output) -> None:
    center, radius, weight, bias, abs_weight, stride, padding, dilation, groups, relu = inputs
    ctx.settings = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.save_for_backward(center, radius, weight, bias, abs_weight)


def _conv_backward(ctx, grad_center, grad_radius):
    center, radius, weight, bias, abs_weight = ctx.saved_tensors
    if ctx.relu:
        pre = torch.ops.robust_fast.ibp_conv2d(center, radius, weight, bias, abs_weight, *ctx.settings, False)
        grad_center, grad_radius = torch.ops.robust_fast._ibp_relu_backward(grad_center, grad_radius, *pre)
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], bias is not None and need[3]]
    gc, gr, gw, gb = torch.ops.robust_fast._ibp_conv2d_backward(
        grad_center, grad_radius, center, radius, weight, abs_weight, *ctx.settings, mask)
    return (gc if need[0] else None, gr if need[1] else None, gw if mask[1] else None,
            gb if mask[2] else None) + (None,) * 6


def _relu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _relu_backward(ctx, grad_center, grad_radius):
    center, radius = ctx.saved_tensors
    return torch.ops.robust_fast._ibp_relu_backward(grad_center, grad_radius, center, radius)


def _register_fake_and_autograd() -> None:
    if _build.compiled_library_error() is not None:
        return

    @torch.library.register_fake("robust_fast::ibp_relu")
    def _(center, radius):
        return _relu_outputs_like(center, radius)

    @torch.library.register_fake("robust_fast::_ibp_relu_backward")
    def _(grad_center, grad_radius, center, radius):
        return _relu_outputs_like(center, radius, grad_center, grad_radius)

    @torch.library.register_fake("robust_fast::ibp_linear")
    def _(center, radius, weight, bias, abs_weight, relu):
        shape = tuple(center.shape[:-1]) + (weight.shape[0],)
        return center.new_empty(shape), center.new_empty(shape)

    @torch.library.register_fake("robust_fast::_ibp_linear_backward")
    def _(grad_center, grad_radius, center, radius, weight, abs_weight, output_mask):
        nothing = center.new_empty((0,))
        inputs = output_mask[0]
        return (center.new_empty(center.shape) if inputs else nothing,
                center.new_empty(center.shape) if inputs else nothing,
                weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)),
                weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,)))

    @torch.library.register_fake("robust_fast::ibp_conv2d")
    def _(center, radius, weight, bias, abs_weight, stride, padding, dilation, groups, relu):
        return _conv_outputs_like(center, weight, bias, stride, padding, dilation, groups)

    @torch.library.register_fake("robust_fast::_ibp_conv2d_backward")
    def _(grad_center, grad_radius, center, radius, weight, abs_weight, stride, padding, dilation,
          groups, output_mask):
        grad_c, grad_w, grad_b = torch.ops.aten.convolution_backward(
            _images(grad_center), _images(center), weight, [weight.shape[0]], stride, padding,
            dilation, False, [0, 0], groups, output_mask)
        nothing = center.new_empty((0,))
        if output_mask[0]:
            grad_c = grad_c.reshape(center.shape)
            grad_r = torch.empty_like(grad_c)
        else:
            grad_c = grad_r = None
        return (grad_c if grad_c is not None else nothing, grad_r if grad_r is not None else center.new_empty((0,)),
                grad_w if output_mask[1] else weight.new_empty((0,)),
                grad_b if output_mask[2] else weight.new_empty((0,)))

    torch.library.register_autograd("robust_fast::ibp_linear", _linear_backward, setup_context=_linear_setup)
    torch.library.register_autograd("robust_fast::ibp_conv2d", _conv_backward, setup_context=_conv_setup)
    torch.library.register_autograd("robust_fast::ibp_relu", _relu_backward, setup_context=_relu_setup)


_register_fake_and_autograd()

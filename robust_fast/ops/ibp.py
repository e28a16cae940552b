"""robust_fast.ibp_linear, ibp_conv2d, ibp_relu: a box through one layer, in center/radius form.

A box is (center, radius), the set [center - radius, center + radius]. Linear and conv2d map it
to (layer(center), |layer|(radius)): both products in one call, |W| taken from a cache that is
refreshed when the weight changes (robust_fast/_abs_weight.py). ibp_relu maps it to
[relu(lower), relu(upper)]; relu=True on a product applies it in the same call (on the C++
path in place on the products' fresh outputs, in the Triton linear kernel in its epilogue).

This file owns the ops: the checks, the layout the elementwise kernels walk, the dispatch, the
fake kernels of the C++ ops (torch.ops.robust_fast.ibp_linear / ibp_conv2d / ibp_relu and their
backwards _ibp_*_backward) and their autograd, defined once per op and registered on it. The
Triton backend (the launchers of kernels/ibp.py, with the C++ ops' signatures in _TritonOps)
enters the same autograd through _TritonAutograd.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from robust_fast import _backend, _build
from robust_fast._abs_weight import cached_abs_weight
from robust_fast._abs_weight import clear as clear_abs_weight_cache  # noqa: F401  (public: after .data writes)
from robust_fast._checks import check_floating_tensor
from robust_fast._layout import share_one_dense_layout
from robust_fast._precision import full_fp32
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
    if weight.shape[1] == 0:
        chosen = "reference"  # no inputs: the bias alone, a zero radius (the kernels flatten rows of 0)
    with op_range(op):
        if chosen == "cpp":
            run, abs_weight = _cpp_op, cached_abs_weight(weight)
        elif chosen == "triton":
            run, abs_weight = _triton_op, None  # the Triton kernel takes |W| on load
        else:
            with full_fp32(center):
                return ibp_linear_reference(center, radius, weight, bias, relu)
        if relu and _needs_grad(center, radius, weight, bias):
            # Fused, the backward would have to recompute the products: keep the pre-activation.
            return run("ibp_relu", *run("ibp_linear", center, radius, weight, bias, abs_weight, False))
        return run("ibp_linear", center, radius, weight, bias, abs_weight, relu)


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
        if chosen == "cpp":
            run, abs_weight = _cpp_op, cached_abs_weight(weight)
        elif chosen == "triton":
            run, abs_weight = _triton_op, None
        else:
            with full_fp32(center):
                return ibp_conv2d_reference(center, radius, weight, bias, stride, padding, dilation, groups,
                                            relu)
        args = (center, radius, weight, bias, abs_weight, stride, padding, dilation, groups)
        if relu and _needs_grad(center, radius, weight, bias):
            return run("ibp_relu", *run("ibp_conv2d", *args, False))
        return run("ibp_conv2d", *args, relu)


def ibp_relu(center: torch.Tensor, radius: torch.Tensor, *, backend: Optional[str] = None) -> Box:
    """The box (center, radius) through ReLU: [relu(center - radius), relu(center + radius)]
    as (center, radius). Any shape; differentiable (the gradient of relu at 0 is 0, as torch's)."""
    op = "ibp_relu"
    _check_box(op, center, radius)
    chosen = _backend.resolve(backend, center.device.type)
    with op_range(op):
        if chosen == "cpp":
            return torch.ops.robust_fast.ibp_relu(center, radius)
        if chosen == "triton":
            return _triton_op("ibp_relu", center, radius)
        return ibp_relu_reference(center, radius)


# --------------------------------------------------------------------------------------------
# the backends, as the C++ ops' signatures

def _cpp_op(name: str, *args) -> Box:
    """torch.ops.robust_fast.<name>: its registered autograd below runs when a gradient is wanted."""
    return getattr(torch.ops.robust_fast, name)(*args)


def _elementwise_layout(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The elementwise kernels walk flat memory: one dense layout shared by all operands, else
    all packed (csrc/ibp_problem.cpp decides alike for the C++ kernels)."""
    return tensors if share_one_dense_layout(*tensors) else tuple(t.contiguous() for t in tensors)


class _TritonOps:
    """The Triton launchers (kernels/ibp.py) with the C++ ops' signatures, their operands laid out
    as the launchers take them: what the autograd below calls in place of torch.ops.robust_fast."""

    @staticmethod
    def ibp_linear(center, radius, weight, bias, abs_weight, relu):
        return _triton_kernels().ibp_linear_triton(center, radius, weight, bias, relu)

    @staticmethod
    def _ibp_linear_backward(grad_center, grad_radius, center, radius, weight, abs_weight, output_mask):
        return _triton_kernels()._ibp_linear_backward_triton(grad_center, grad_radius, center, radius, weight,
                                                             output_mask)

    @staticmethod
    def ibp_conv2d(center, radius, weight, bias, abs_weight, stride, padding, dilation, groups, relu):
        return _triton_kernels().ibp_conv2d_triton(center, radius, weight, bias, stride, padding, dilation,
                                                   groups, relu)

    @staticmethod
    def _ibp_conv2d_backward(grad_center, grad_radius, center, radius, weight, abs_weight, stride, padding,
                             dilation, groups, output_mask):
        return _triton_kernels()._ibp_conv2d_backward_triton(grad_center, grad_radius, center, radius, weight,
                                                             stride, padding, dilation, groups, output_mask)

    @staticmethod
    def ibp_relu(center, radius):
        return _triton_kernels().ibp_relu_triton(*_elementwise_layout(center, radius))

    @staticmethod
    def _ibp_relu_backward(grad_center, grad_radius, center, radius):
        center, radius, grad_center, grad_radius = _elementwise_layout(center, radius, grad_center, grad_radius)
        return _triton_kernels()._ibp_relu_backward_triton(grad_center, grad_radius, center, radius)


def _triton_kernels():
    return _backend.triton_kernels("ibp")


def _triton_op(name: str, *args) -> Box:
    """_TritonOps.<name>; under autograd through the op's own setup_context and backward."""
    if _needs_grad(*(a for a in args if isinstance(a, torch.Tensor))):
        return _TritonAutograd.apply(*args, name)
    return getattr(_TritonOps, name)(*args)


# --------------------------------------------------------------------------------------------
# autograd: one setup_context and backward per op, for either backend (backend_ops: the set of
# ops the backward calls, torch.ops.robust_fast when registered on the C++ op)

_CPP_OPS = torch.ops.robust_fast


def _linear_setup(ctx, inputs, output, backend_ops=_CPP_OPS) -> None:
    center, radius, weight, bias, abs_weight, relu = inputs
    ctx.relu, ctx.backend_ops = relu, backend_ops
    ctx.save_for_backward(center, radius, weight, bias, abs_weight)


def _linear_backward(ctx, grad_center, grad_radius):
    center, radius, weight, bias, abs_weight = ctx.saved_tensors
    ops = ctx.backend_ops
    if ctx.relu:  # only direct op calls get here (the public function does not fuse under autograd)
        pre = ops.ibp_linear(center, radius, weight, bias, abs_weight, False)
        grad_center, grad_radius = ops._ibp_relu_backward(grad_center, grad_radius, *pre)
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], bias is not None and need[3]]
    gc, gr, gw, gb = ops._ibp_linear_backward(grad_center, grad_radius, center, radius, weight, abs_weight, mask)
    return (gc if need[0] else None, gr if need[1] else None, gw if mask[1] else None,
            gb if mask[2] else None, None, None)


def _conv_setup(ctx, inputs, output, backend_ops=_CPP_OPS) -> None:
    center, radius, weight, bias, abs_weight, stride, padding, dilation, groups, relu = inputs
    ctx.settings = (stride, padding, dilation, groups)
    ctx.relu, ctx.backend_ops = relu, backend_ops
    ctx.save_for_backward(center, radius, weight, bias, abs_weight)


def _conv_backward(ctx, grad_center, grad_radius):
    center, radius, weight, bias, abs_weight = ctx.saved_tensors
    ops = ctx.backend_ops
    if ctx.relu:
        pre = ops.ibp_conv2d(center, radius, weight, bias, abs_weight, *ctx.settings, False)
        grad_center, grad_radius = ops._ibp_relu_backward(grad_center, grad_radius, *pre)
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], bias is not None and need[3]]
    gc, gr, gw, gb = ops._ibp_conv2d_backward(grad_center, grad_radius, center, radius, weight, abs_weight,
                                              *ctx.settings, mask)
    return (gc if need[0] else None, gr if need[1] else None, gw if mask[1] else None,
            gb if mask[2] else None) + (None,) * 6


def _relu_setup(ctx, inputs, output, backend_ops=_CPP_OPS) -> None:
    ctx.backend_ops = backend_ops
    ctx.save_for_backward(*inputs)


def _relu_backward(ctx, grad_center, grad_radius):
    center, radius = ctx.saved_tensors
    return ctx.backend_ops._ibp_relu_backward(grad_center, grad_radius, center, radius)


_AUTOGRAD = {"ibp_linear": (_linear_setup, _linear_backward), "ibp_conv2d": (_conv_setup, _conv_backward),
             "ibp_relu": (_relu_setup, _relu_backward)}


class _TritonAutograd(torch.autograd.Function):
    """A Triton call under autograd: apply(*op arguments, op name) runs _TritonOps.<name> with the
    op's setup_context and backward above (those registered on the C++ op), backend_ops
    _TritonOps. The Triton backend has no op of its own to register them on."""

    @staticmethod
    def forward(ctx, *args):
        inputs, name = args[:-1], args[-1]
        output = getattr(_TritonOps, name)(*inputs)
        _AUTOGRAD[name][0](ctx, inputs, output, backend_ops=_TritonOps)
        ctx.name = name
        return output

    @staticmethod
    def backward(ctx, *grads):
        return tuple(_AUTOGRAD[ctx.name][1](ctx, *grads)) + (None,)


# --------------------------------------------------------------------------------------------
# fake kernels of the C++ ops, and the registration

def _relu_outputs_like(center: torch.Tensor, *others: torch.Tensor) -> Box:
    """The C++ elementwise kernels' outputs: the inputs' shared dense layout, else contiguous."""
    if share_one_dense_layout(center, *others):
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

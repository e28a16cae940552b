"""Interval bound propagation (Gowal et al. 2018) through a whole network: output bounds, margin
bounds with the specification elided into the last layer, certificates, certified accuracy and
the IBP training loss.

The input box is [max(x - eps, low), min(x + eps, high)] for clip = (low, high). It travels in
center/radius form through the layers of an nn.Sequential (nested ones are walked through, as are
this library's models, which are nn.Sequential): Linear and Conv2d through robust_fast.ibp_linear /
ibp_conv2d (a ReLU right after one is fused into its call), ReLU through ibp_relu, and the
other supported layers through the functions registered in LAYER_RULES (add a layer kind with
@layer_rule(MyLayer) on one function). Several epsilons travel together as a leading dimension E.

Soundness: every point of the box maps into [lower, upper] (up to floating-point rounding of
the bounds themselves, a few ulps per layer), for the model in eval mode.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._checks import check_clip, check_floating_tensor
from robust_fast._precision import full_fp32
from robust_fast._modes import modules_in_mode
from robust_fast.layers import Normalize
from robust_fast.ops.ibp import ibp_conv2d, ibp_linear, ibp_relu

Box = Tuple[torch.Tensor, torch.Tensor]
Eps = Union[float, torch.Tensor, Sequence[float]]
Clip = Optional[Tuple[Optional[float], Optional[float]]]

# type -> function(module, center, radius, relu_follows, backend) -> (center, radius, relu_applied)
# center and radius are (E, B, ...): E boxes of B samples each.
LAYER_RULES: Dict[type, Callable] = {}


def layer_rule(*types: type):
    """Registers the decorated function as the bound propagation of these layer types."""
    def register(fn: Callable) -> Callable:
        for t in types:
            LAYER_RULES[t] = fn
        return fn
    return register


def supported_layers() -> List[str]:
    return sorted({t.__name__ for t in LAYER_RULES} | {"Sequential"})


# --------------------------------------------------------------------------------------------
# the layer rules

@layer_rule(nn.Linear)
def _linear(layer: nn.Linear, center, radius, relu_follows, backend):
    return ibp_linear(center, radius, layer.weight, layer.bias, relu=relu_follows, backend=backend) + (relu_follows,)


def _conv_padding(layer: nn.Conv2d) -> Tuple[int, int]:
    if layer.padding_mode != "zeros":
        raise TypeError(f"interval_bounds: Conv2d with padding_mode={layer.padding_mode!r} is not "
                        "supported (only zero padding)")
    if layer.padding == "valid":
        return 0, 0
    if layer.padding == "same":
        spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(s % 2 for s in spans):
            raise TypeError("interval_bounds: Conv2d padding='same' with an even kernel span pads "
                            "asymmetrically; give the padding as integers")
        return spans[0] // 2, spans[1] // 2
    return tuple(layer.padding)


@layer_rule(nn.Conv2d)
def _conv2d(layer: nn.Conv2d, center, radius, relu_follows, backend):
    return ibp_conv2d(center, radius, layer.weight, layer.bias, layer.stride, _conv_padding(layer),
                      layer.dilation, layer.groups, relu=relu_follows, backend=backend) + (relu_follows,)


@layer_rule(nn.ReLU)
def _relu(layer, center, radius, relu_follows, backend):
    return ibp_relu(center, radius, backend=backend) + (False,)


@layer_rule(nn.Flatten)
def _flatten(layer: nn.Flatten, center, radius, relu_follows, backend):
    # The module's dimensions count from the sample's batch dimension; E comes first.
    start = layer.start_dim + 1 if layer.start_dim >= 0 else layer.start_dim
    end = layer.end_dim + 1 if layer.end_dim >= 0 else layer.end_dim
    return center.flatten(start, end), radius.flatten(start, end), False


@layer_rule(nn.Identity)
def _identity(layer, center, radius, relu_follows, backend):
    return center, radius, False


@layer_rule(nn.Dropout)
def _dropout(layer: nn.Dropout, center, radius, relu_follows, backend):
    if layer.training and layer.p > 0:
        raise ValueError("interval_bounds: Dropout is in training mode; bounds hold for the eval-mode "
                         "network: call model.eval() first")
    return center, radius, False


def _per_channel(values: torch.Tensor, center: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """values (C,) shaped to broadcast along channel_dim (counted from the end) of center."""
    return values.to(center.dtype).view((-1,) + (1,) * (-channel_dim - 1))


@layer_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(layer, center, radius, relu_follows, backend):
    name = type(layer).__name__
    if layer.training:
        raise ValueError(f"interval_bounds: {name} is in training mode (it would normalize with the "
                         "statistics of the batch, which depend on every sample in it): call "
                         "model.eval() first, so that it uses its running statistics")
    if layer.running_mean is None:
        raise ValueError(f"interval_bounds: {name} has no running statistics "
                         "(track_running_stats=False); bounds need a fixed affine map")
    # Eval-mode batch norm is the affine map x * scale + shift per channel.
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -layer.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    sample_dims = center.dim() - 2  # without E and B
    channel_dim = -3 if isinstance(layer, nn.BatchNorm2d) else (-1 if sample_dims == 1 else -2)
    if sample_dims < -channel_dim or center.shape[channel_dim] != layer.num_features:
        raise ValueError(f"interval_bounds: {name}({layer.num_features}) does not fit its input of shape "
                         f"{tuple(center.shape[1:])}")
    s = _per_channel(scale, center, channel_dim)
    return center * s + _per_channel(shift, center, channel_dim), radius * s.abs(), False


@layer_rule(nn.AvgPool2d)
def _avg_pool(layer: nn.AvgPool2d, center, radius, relu_follows, backend):
    # A linear map with non-negative weights: the radius goes through it unchanged.
    def pool(t):
        out = layer(t.flatten(0, t.dim() - 4))
        return out.view(tuple(t.shape[:-3]) + tuple(out.shape[1:]))
    return pool(center), pool(radius), False


@layer_rule(Normalize)
def _normalize(layer: Normalize, center, radius, relu_follows, backend):
    dims = center.dim() - 1  # the dimensions the module sees: (B, C, ...)
    channels = center.shape[2] if dims >= 2 else 1
    if layer.mean.numel() not in (1, channels):
        raise ValueError(f"interval_bounds: Normalize has {layer.mean.numel()} channels, its input "
                         f"{tuple(center.shape[1:])} has {channels}")
    mean = layer.per_channel(layer.mean, dims).to(center.dtype)
    std = layer.per_channel(layer.std, dims).to(center.dtype)
    return (center - mean) / std, radius / std, False


# --------------------------------------------------------------------------------------------
# walking the model

def layers_of(model: nn.Module) -> List[nn.Module]:
    """The layers bounds go through, in order: nested nn.Sequential (and subclasses that keep its
    forward, or say with forward_is_sequential = True that theirs computes the same, like
    SmallCNN) walked through. TypeError for anything unsupported."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"interval_bounds: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential) and (type(model).forward is nn.Sequential.forward
                                             or getattr(type(model), "forward_is_sequential", False)):
        found = []
        for child in model:
            found.extend(layers_of(child))
        return found
    rule_type = next((t for t in type(model).__mro__ if t in LAYER_RULES), None)
    if rule_type is None:
        raise TypeError(f"interval_bounds: layer {type(model).__name__} ({model!r}) is not supported; "
                        f"supported: {', '.join(supported_layers())} (register another kind with "
                        "robust_fast.certify.ibp.layer_rule)")
    return [model]


def _rule(layer: nn.Module) -> Callable:
    for t in type(layer).__mro__:
        if t in LAYER_RULES:
            return LAYER_RULES[t]
    raise AssertionError("layers_of returned an unsupported layer")


def propagate(layers: Sequence[nn.Module], center: torch.Tensor, radius: torch.Tensor,
              backend: Optional[str] = None) -> Box:
    """(center, radius) of shape (E, B, ...) through the layers (a ReLU after a Linear or
    Conv2d fused into its call)."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        relu_follows = i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU
        center, radius, relu_applied = _rule(layer)(layer, center, radius, relu_follows, backend)
        i += 2 if relu_applied else 1
    return center, radius


# Boxes per pass through the whole network on CPU when nothing is differentiated: the
# activations of a block stay in the cache from one layer to the next, those of E x B boxes at
# once may not (4 x 128 boxes through the IBP small CNN ran at 0.6-0.7x the speed of 4 calls).
CPU_BLOCK_BOXES = 128


def _differentiated(layers: Sequence[nn.Module], center: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (center.requires_grad or any(
        p.requires_grad for layer in layers for p in layer.parameters()))


def propagate_blocked(layers: Sequence[nn.Module], center: torch.Tensor, radius: torch.Tensor,
                      backend: Optional[str] = None) -> Box:
    """propagate, on CPU without autograd in blocks of CPU_BLOCK_BOXES boxes (the E x B boxes
    taken as one batch), each block through every layer before the next; else in one pass."""
    boxes = center.shape[0] * center.shape[1]
    if (center.device.type != "cpu" or boxes <= CPU_BLOCK_BOXES or _differentiated(layers, center)):
        return propagate(layers, center, radius, backend=backend)
    leading = tuple(center.shape[:2])
    c_all = center.reshape((1, boxes) + tuple(center.shape[2:]))
    r_all = radius.reshape((1, boxes) + tuple(radius.shape[2:]))
    pieces = [propagate(layers, c_all.narrow(1, start, min(CPU_BLOCK_BOXES, boxes - start)),
                        r_all.narrow(1, start, min(CPU_BLOCK_BOXES, boxes - start)), backend=backend)
              for start in range(0, boxes, CPU_BLOCK_BOXES)]
    c_out = torch.cat([c for c, _ in pieces], dim=1)
    r_out = torch.cat([r for _, r in pieces], dim=1)
    return c_out.reshape(leading + tuple(c_out.shape[2:])), r_out.reshape(leading + tuple(r_out.shape[2:]))


# --------------------------------------------------------------------------------------------
# arguments

def _check_input(caller: str, x) -> torch.Tensor:
    check_floating_tensor("x", x, caller)
    if x.dim() < 1:
        raise ValueError(f"{caller}: x must have a batch dimension, got a 0-dim tensor")
    return x


def _check_eps(caller: str, eps, x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(eps as an (E, B) tensor in x's dtype and device, whether E boxes were asked for)."""
    batch = x.shape[0]

    def number(value, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{caller}: {what} must be a real number, got {type(value).__name__}")
        value = float(value)
        if math.isnan(value) or value < 0 or math.isinf(value):
            raise ValueError(f"{caller}: {what} must be >= 0 and finite, got {value}")
        return value

    if isinstance(eps, torch.Tensor):
        if not (eps.is_floating_point() or eps.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{caller}: eps as a tensor must be real, got {eps.dtype}")
        if eps.dim() == 0:
            return torch.full((1, batch), number(eps.item(), "eps"), dtype=x.dtype, device=x.device), False
        if eps.shape != (batch,):
            raise ValueError(f"{caller}: eps as a tensor must have shape ({batch},) (one radius per "
                             f"sample), got {tuple(eps.shape)}")
        values = eps.detach().to(device=x.device, dtype=x.dtype)
        if not bool((values >= 0).all()) or not bool(torch.isfinite(values).all()):
            raise ValueError(f"{caller}: eps must be >= 0 and finite in every sample")
        return values.view(1, batch), False
    if isinstance(eps, (list, tuple)):
        if len(eps) == 0:
            raise ValueError(f"{caller}: eps as a sequence must hold at least one radius")
        values = [number(v, f"eps[{i}]") for i, v in enumerate(eps)]
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(-1, 1).expand(-1, batch), True
    return torch.full((1, batch), number(eps, "eps"), dtype=x.dtype, device=x.device), False


def input_box(x: torch.Tensor, eps: torch.Tensor, clip: Tuple[Optional[float], Optional[float]]) -> Box:
    """(center, radius) (E, B, ...) of [max(x - eps, low), min(x + eps, high)]; eps (E, B)."""
    e = eps.view(tuple(eps.shape) + (1,) * (x.dim() - 1))
    lower, upper = x.unsqueeze(0) - e, x.unsqueeze(0) + e
    low, high = clip
    if not (torch.is_grad_enabled() and x.requires_grad):
        # Nothing to differentiate: clamp and combine in place, two fresh tensors in all.
        if low is not None or high is not None:
            lower.clamp_(low, high)
            upper.clamp_(low, high)
        center = torch.add(upper, lower).mul_(0.5)
        return center, upper.sub_(lower).mul_(0.5)
    if low is not None or high is not None:
        lower, upper = lower.clamp(low, high), upper.clamp(low, high)
    return (upper + lower) * 0.5, (upper - lower) * 0.5


def _prepare(caller: str, model, x, eps, clip):
    layers = layers_of(model)
    x = _check_input(caller, x)
    eps_t, stacked = _check_eps(caller, eps, x)
    clip = check_clip(clip, caller)
    return layers, x, eps_t, stacked, clip


# --------------------------------------------------------------------------------------------
# the public functions

def interval_bounds(model: nn.Module, x: torch.Tensor, eps: Eps, *, clip: Clip = (0.0, 1.0),
                    backend: Optional[str] = None) -> Box:
    """(lower, upper) bounds of model's outputs over every input within eps of x (L-inf) and
    inside clip.

    model: an nn.Sequential (nested allowed; this library's models are ones) of the layers in
    supported_layers(), in eval mode where that matters (BatchNorm, Dropout).
    x: (B, ...) inputs. eps: a float, a (B,) tensor (one radius per sample), or a sequence of E
    floats (bounds of shape (E, B, ...) for E radii in one pass).
    clip: (low, high) of the input domain, either side None for open, or None for no box.
    Differentiable (in the model's parameters and x): the IBP training loss backpropagates it.
    backend: passed on to the ops (see robust_fast.use_backend).
    """
    layers, x, eps_t, stacked, clip = _prepare("interval_bounds", model, x, eps, clip)
    center, radius = propagate_blocked(layers, *input_box(x, eps_t, clip), backend=backend)
    lower, upper = center - radius, center + radius
    # squeeze, not [0]: a view, whose backward is a reshape rather than a zero-filled scatter
    return (lower, upper) if stacked else (lower.squeeze(0), upper.squeeze(0))


def _check_labels(caller: str, y, batch: int, classes: int, device) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{caller}: y must be an integer tensor of labels, got "
                        f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.shape != (batch,):
        raise ValueError(f"{caller}: y must have shape ({batch},) (one label per sample), got {tuple(y.shape)}")
    y = y.to(device=device, dtype=torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{caller}: labels must lie in [0, {classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y


def _last_linear(layers: List[nn.Module]) -> Optional[int]:
    """Index of the last Linear when only shape-free layers (Identity, eval Dropout) follow it."""
    i = len(layers) - 1
    while i >= 0 and isinstance(layers[i], (nn.Identity, nn.Dropout)):
        i -= 1
    return i if i >= 0 and isinstance(layers[i], nn.Linear) else None


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Eps, *,
                  clip: Clip = (0.0, 1.0), backend: Optional[str] = None) -> torch.Tensor:
    """Lower bounds of f_y(x') - f_j(x') over the box, (B, C) ((E, B, C) for E radii), 0 at j = y.

    When the network ends in a Linear layer (W, b) the specification e_y - e_j is merged into it
    (elision): W_j' = W_y - W_j, b_j' = b_y - b_j, bound = W'c + b' - |W'|r from the bounds of the
    last layer's input. Since |W_y - W_j| <= |W_y| + |W_j|, this is never looser than subtracting
    the output intervals (lower_y - upper_j), which is what other networks get.
    """
    caller = "margin_bounds"
    layers, x, eps_t, stacked, clip = _prepare(caller, model, x, eps, clip)
    last = _last_linear(layers)
    center, radius = input_box(x, eps_t, clip)
    if last is None:
        center, radius = propagate_blocked(layers, center, radius, backend=backend)
        classes = center.shape[-1]
        y = _check_labels(caller, y, x.shape[0], classes, x.device)
        index = y.view(1, -1, 1).expand(center.shape[0], -1, 1)
        lower_true = (center - radius).gather(-1, index)
        margin = lower_true - (center + radius)
        margin = margin.scatter(-1, index, 0.0)
    else:
        center, radius = propagate_blocked(layers[:last], center, radius, backend=backend)
        head = layers[last]
        classes = head.out_features
        y = _check_labels(caller, y, x.shape[0], classes, x.device)
        w = head.weight.to(center.dtype)
        w_spec = w[y].unsqueeze(1) - w.unsqueeze(0)                   # (B, C, in)
        with full_fp32(center):
            margin = (torch.einsum("bci,ebi->ebc", w_spec, center)
                      - torch.einsum("bci,ebi->ebc", w_spec.abs(), radius))
        if head.bias is not None:
            b = head.bias.to(center.dtype)
            margin = margin + (b[y].unsqueeze(1) - b.unsqueeze(0))
    return margin if stacked else margin.squeeze(0)


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Eps, *, clip: Clip = (0.0, 1.0),
            backend: Optional[str] = None) -> torch.Tensor:
    """Booleans (B,) ((E, B) for E radii): True where IBP proves that every input of the box is
    classified as y (every margin bound f_y - f_j, j != y, is > 0)."""
    margin = margin_bounds(model, x, y, eps, clip=clip, backend=backend)
    own = F.one_hot(y.to(device=margin.device, dtype=torch.int64), margin.shape[-1]).bool()
    return margin.masked_fill(own, math.inf).gt(0).all(-1)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def certified_accuracy(model: nn.Module, data, eps: Eps, *, batch_size: int = 256,
                       clip: Clip = (0.0, 1.0), backend: Optional[str] = None) -> Union[float, List[float]]:
    """The fraction of samples IBP certifies at eps (a list, one per radius, for a sequence of
    radii), with the model in eval mode (each module's mode restored afterwards).

    data: an (images, labels) pair of tensors, taken batch_size at a time, or an iterable of
    (images, labels) batches (a DataLoader). Batches move to the model's device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"certified_accuracy: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"certified_accuracy: images and labels differ in length: "
                             f"{images.shape[0]} != {labels.shape[0]}")
        data = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, images.shape[0], batch_size))
    device = _device_of(model)
    certified, seen = None, 0
    with modules_in_mode(model, False), torch.no_grad():
        for x, y in data:
            x, y = x.to(device), y.to(device)
            ok = certify(model, x, y, eps, clip=clip, backend=backend)
            counts = ok.reshape(-1, x.shape[0]).sum(-1)
            certified = counts if certified is None else certified + counts
            seen += x.shape[0]
    if seen == 0:
        return math.nan
    fractions = (certified.double() / seen).tolist()
    return fractions if isinstance(eps, (list, tuple)) else fractions[0]


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Union[float, torch.Tensor],
             kappa: float, *, clip: Clip = (0.0, 1.0), backend: Optional[str] = None,
             return_logits: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y), m the margin bounds of margin_bounds (0 at
    the true class): the IBP training objective of Gowal et al. kappa in [0, 1]; eps a float or
    a (B,) tensor. The model is used in the mode it is in (train it with BatchNorm in eval mode,
    or without BatchNorm). return_logits: (loss, f(x)), the clean logits computed even at
    kappa 0 (a training loop's accuracy)."""
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not 0.0 <= float(kappa) <= 1.0:
        raise ValueError(f"ibp_loss: kappa must be a number in [0, 1], got {kappa!r}")
    if isinstance(eps, (list, tuple)):
        raise TypeError("ibp_loss: eps must be a float or a (B,) tensor (one training radius)")
    kappa = float(kappa)
    logits = model(x) if kappa > 0 or return_logits else None
    natural = F.cross_entropy(logits, y) if kappa > 0 else None
    if kappa == 1.0:
        loss = natural
    else:
        margin = margin_bounds(model, x, y, eps, clip=clip, backend=backend)
        robust = F.cross_entropy(-margin, y)
        loss = robust if natural is None else kappa * natural + (1 - kappa) * robust
    return (loss, logits) if return_logits else loss

"""Interval bound propagation in plain PyTorch: the specification every other backend is tested
against, written as the formulas read (and differentiated by autograd).

A box is (center, radius): the set [center - radius, center + radius], radius >= 0.
  linear / conv2d: center' = layer(center) with the bias, radius' = the same layer with |W| in
  place of W and no bias, applied to radius (Gowal et al. 2018).
  relu: [relu(center - radius), relu(center + radius)] back in center/radius form.
Arguments arrive validated by robust_fast.ops.ibp; leading dimensions beyond the layer's own
(E boxes, B samples) are one batch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Box = Tuple[torch.Tensor, torch.Tensor]


def ibp_relu_reference(center: torch.Tensor, radius: torch.Tensor) -> Box:
    lo = torch.relu(center - radius)
    hi = torch.relu(center + radius)
    return (hi + lo) * 0.5, (hi - lo) * 0.5


def ibp_linear_reference(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, relu: bool = False) -> Box:
    out = F.linear(center, weight, bias), F.linear(radius, weight.abs())
    return ibp_relu_reference(*out) if relu else out


def ibp_conv2d_reference(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, stride: Sequence[int] = (1, 1),
                         padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                         groups: int = 1, relu: bool = False) -> Box:
    leading = center.shape[:-3]
    c = center.reshape((-1,) + tuple(center.shape[-3:]))
    r = radius.reshape((-1,) + tuple(radius.shape[-3:]))
    c_out = F.conv2d(c, weight, bias, stride, padding, dilation, groups)
    r_out = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    c_out = c_out.reshape(leading + c_out.shape[1:])
    r_out = r_out.reshape(leading + r_out.shape[1:])
    return ibp_relu_reference(c_out, r_out) if relu else (c_out, r_out)

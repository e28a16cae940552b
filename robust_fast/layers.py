"""Layers the models and the bound propagation share."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel (dimension 1), as torchvision's Normalize, inside the model:
    attacks and certificates then work on images in [0, 1].

    mean, std: one value per channel (or one for all); std > 0.
    """

    def __init__(self, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() == 0 or std_t.numel() == 0:
            raise ValueError("Normalize: mean and std must hold at least one value")
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError(f"Normalize: mean must be finite, got {mean!r}")
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError(f"Normalize: std must be > 0 and finite, got {std!r}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def per_channel(self, t: torch.Tensor, dims: int) -> torch.Tensor:
        """mean or std shaped to broadcast over an input of `dims` dimensions (channels at 1)."""
        return t.view((-1,) + (1,) * (dims - 2)) if dims > 2 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.dim()
        return (x - self.per_channel(self.mean, dims).to(x.dtype)) / self.per_channel(self.std, dims).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"

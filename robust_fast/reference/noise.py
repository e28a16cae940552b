"""gaussian_copies in plain PyTorch: the specification every other backend is tested against
(in distribution: each backend draws its own numbers).

Arguments arrive already validated by robust_fast.ops.noise; seed is the int64 the op drew
from the caller's generator (a 0-dim tensor or an int).
"""
from __future__ import annotations

from typing import Union

import torch

_MASK64 = (1 << 64) - 1


def gaussian_copies_reference(x: torch.Tensor, copies: int, sigma: float,
                              seed: Union[int, torch.Tensor]) -> torch.Tensor:
    """(B * copies, ...): row b * copies + j is x[b] + sigma * N(0, I), the normals drawn by
    torch.randn from a generator on x's device seeded with `seed`."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed) & _MASK64)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.repeat_interleave(copies, dim=0)
    noise = torch.randn(rows.shape, generator=generator, device=x.device, dtype=compute)
    return (rows.to(compute) + sigma * noise).to(x.dtype)

"""The memory layout the PGD kernels walk as it lies (csrc/pgd_problem.cpp says the same in C++):
dense, each sample one contiguous block, and the same strides in every operand. Contiguous and
channels_last inputs qualify; anything else is packed to contiguous once."""
from __future__ import annotations

import torch


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10's TensorImpl::is_non_overlapping_and_dense (not bound in Python): the dimensions of
    size >= 2, ordered by stride, are contiguous; an empty tensor counts as dense."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) >= 2):
        if stride != expected:
            return False
        expected *= size
    return True


def walks_as_it_lies(x_adv: torch.Tensor, *others: torch.Tensor) -> bool:
    batch = x_adv.shape[0]
    samples_are_blocks = batch <= 1 or x_adv.stride(0) * batch == x_adv.numel()
    return (is_non_overlapping_and_dense(x_adv) and samples_are_blocks
            and all(other.stride() == x_adv.stride() for other in others))

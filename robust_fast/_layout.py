"""The one memory-layout rule of every op's kernels; the C++ side says the same in
csrc/include/robust_fast/layout.h. Kernels walk memory as it lies when the operands share one
dense layout (contiguous and channels_last inputs qualify), else the operands are packed once:
- elementwise kernels (ibp_relu and its backward): share_one_dense_layout;
- row kernels (multi_teacher_loss): each row needs a unit stride, unit_stride_rows;
- per-sample kernels (pgd_step, apgd_step): each sample also one contiguous block, kernel_layout.

Attack steps, in full. Operands: walked as they lie when they share one dense layout in which each sample is a
contiguous block (contiguous and channels_last inputs qualify); anything else is packed to
contiguous once.

Written tensors (pgd_step's out, apgd_step's x and x_prev in place): each may be the very memory
of an operand (every element is read before it is written, by the same thread) or share none
with any; a partial overlap is refused, and two written tensors never share memory. They are
written directly when dense with the walked operands' strides, else through temporaries that
are copied into them afterwards.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch

Named = Tuple[str, torch.Tensor]


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10's TensorImpl::is_non_overlapping_and_dense (not bound in Python): the dimensions of
    size >= 2, ordered by stride, are contiguous; an empty tensor counts as dense."""
    if t.is_contiguous() or t.numel() == 0:  # the usual case, without the Python loop
        return True
    expected = 1
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) >= 2):
        if stride != expected:
            return False
        expected *= size
    return True


def share_one_dense_layout(first: torch.Tensor, *others: torch.Tensor) -> bool:
    """Dense, and every other tensor with first's strides: one flat walk serves them all."""
    return is_non_overlapping_and_dense(first) and all(o.stride() == first.stride() for o in others)


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows along the last dimension with a unit stride (any strides between rows); else packed once."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _walks_as_it_lies(first: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    batch = first.shape[0]
    samples_are_blocks = batch <= 1 or first.stride(0) * batch == first.numel()
    return samples_are_blocks and share_one_dense_layout(first, *others)


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [first, end) that t's elements may occupy."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """"none", "same" (the same memory with the same strides), "partial", or "unknown" (their
    spans meet and one of them is not dense: whether elements are shared is not worked out)."""
    if a.numel() == 0 or b.numel() == 0:
        return "none"
    (a_start, a_end), (b_start, b_end) = _span(a), _span(b)
    if a_end <= b_start or b_end <= a_start:
        return "none"
    if not (is_non_overlapping_and_dense(a) and is_non_overlapping_and_dense(b)):
        return "unknown"
    return "same" if (a_start, a_end) == (b_start, b_end) and a.stride() == b.stride() else "partial"


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """Some element shares memory with another (an expanded tensor), as at::has_internal_overlap
    answers Yes."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


class KernelLayout(NamedTuple):
    operands: Tuple[torch.Tensor, ...]  # as the kernels walk them
    writes_directly: bool  # the written tensors take the kernels' writes (else temporaries do)


def kernel_layout(op: str, operands: Sequence[Named], written: Sequence[Named] = ()) -> KernelLayout:
    """The operands as the kernels walk them, and whether the written tensors take the kernels'
    writes directly. A RuntimeError names op and the tensors when a written tensor has elements
    that share memory, partially overlaps an operand, or shares memory with another one."""
    tensors = tuple(t for _, t in operands)
    if not _walks_as_it_lies(tensors[0], tensors[1:]):
        tensors = tuple(t.contiguous() for t in tensors)
    if not written or written[0][1].numel() == 0:
        return KernelLayout(tensors, True)
    for index, (name, target) in enumerate(written):
        if _has_internal_overlap(target):
            raise RuntimeError(f"{op}: {name} has elements that share memory (an expanded tensor?): "
                               "pass a dense one")
        for (operand_name, _), operand in zip(operands, tensors):
            if overlap(target, operand) == "partial":
                raise RuntimeError(f"{op}: {name} partially overlaps {operand_name} (it may be the "
                                   "very same tensor, or share no memory with it)")
        for other_name, other in written[index + 1:]:
            if overlap(target, other) != "none":
                raise RuntimeError(f"{op}: {name} and {other_name} are both written: they need "
                                   "separate memory")
    direct = all(is_non_overlapping_and_dense(t) and t.stride() == tensors[0].stride()
                 for _, t in written)
    return KernelLayout(tensors, direct)

"""The multi-teacher loss in plain PyTorch: the specification every other backend is tested
against, written as the formulas read (and differentiated by autograd).

Arguments arrive already validated by robust_fast.ops.multi_teacher_loss: student (B, D) or
(B, K, D); teachers (K, B, D) in the student's dtype and device; weights None, (K,) or (B, K).
fp16/bf16 inputs are computed in float32 and the loss returned in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("cosine", "l2", "l2_normalized", "l1", "mse", "kl")
REDUCTIONS = ("mean", "sum", "none")


def row_losses_reference(student: torch.Tensor, teachers: torch.Tensor, kind: str,
                         temperature: float = 1.0) -> torch.Tensor:
    """The unweighted loss of every (sample, teacher) pair, (B, K)."""
    t = teachers.transpose(0, 1)                        # (B, K, D), a view
    s = student.unsqueeze(1) if student.dim() == 2 else student  # broadcasts over K
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1)    # its eps semantics (1e-8)
    if kind == "l2":
        return torch.linalg.vector_norm(s - t, dim=-1)
    if kind == "l2_normalized":
        return torch.linalg.vector_norm(s - t, dim=-1) / torch.linalg.vector_norm(t, dim=-1)
    if kind == "l1":
        return (s - t).abs().sum(-1)
    if kind == "mse":
        return ((s - t) ** 2).mean(-1)
    if kind == "kl":
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        kl = F.kl_div(log_p_s.expand_as(log_p_t), log_p_t, reduction="none", log_target=True).sum(-1)
        return temperature * temperature * kl
    raise ValueError(f"unknown kind {kind!r}")


def multi_teacher_loss_reference(student: torch.Tensor, teachers: torch.Tensor, *,
                                 weights: Optional[torch.Tensor] = None, kind: str = "cosine",
                                 temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """mean: mean over samples of sum_k w_bk loss_bk; sum: the sum over both; none: (B, K) w_bk loss_bk."""
    dtype = student.dtype
    if dtype in (torch.float16, torch.bfloat16):  # accumulate in float32
        student, teachers = student.float(), teachers.float()
    rows = row_losses_reference(student, teachers, kind, temperature)
    if weights is not None:
        rows = rows * weights.to(rows.dtype)  # (K,) broadcasts over samples
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum(1).mean()
    return loss.to(dtype)

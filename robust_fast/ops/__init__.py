from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.ops.pgd import pgd_step

__all__ = ["multi_teacher_loss", "pgd_step"]

from robust_fast.ops.apgd import apgd_step
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.ops.pgd import pgd_step

__all__ = ["apgd_step", "multi_teacher_loss", "pgd_step"]

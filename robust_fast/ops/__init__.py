from robust_fast.ops.apgd import apgd_step
from robust_fast.ops.ibp import ibp_conv2d, ibp_linear, ibp_relu
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.ops.noise import gaussian_copies
from robust_fast.ops.pgd import pgd_step

__all__ = ["apgd_step", "gaussian_copies", "ibp_conv2d", "ibp_linear", "ibp_relu", "multi_teacher_loss", "pgd_step"]

"""robust_fast: fused kernels for adversarial robustness and robustness transfer in PyTorch."""
from robust_fast._backend import BACKENDS, BackendUnavailableError, get_backend, set_backend, use_backend
from robust_fast.ops.apgd import apgd_step
from robust_fast.ops.ibp import ibp_conv2d, ibp_linear, ibp_relu
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.ops.noise import gaussian_copies
from robust_fast.ops.pgd import pgd_step

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "get_backend", "set_backend", "use_backend",
    "apgd_step", "gaussian_copies", "ibp_conv2d", "ibp_linear", "ibp_relu", "multi_teacher_loss", "pgd_step", "__version__",
]

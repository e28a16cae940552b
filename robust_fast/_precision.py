"""Full fp32 products on CUDA, whatever the global TF32 flags say.

cuBLAS and cuDNN run fp32 matmuls and convolutions in TF32 when torch.backends.cuda.matmul /
torch.backends.cudnn allow it (cuDNN's default): a 10-bit mantissa, ~1e-3 relative error. An
interval bound computed that way is off by more than rounding, so the IBP products on the
Python side (the reference backend, the elided last layer of margin_bounds) run inside
full_fp32(); the C++ ops do the same around their products (csrc/ibp_problem.cpp).
"""
import contextlib

import torch


@contextlib.contextmanager
def full_fp32(t: torch.Tensor):
    """TF32 off for cuBLAS and cuDNN while the block runs, when t is a float32 CUDA tensor; the
    flags restored afterwards (a no-op elsewhere)."""
    if t.device.type != "cuda" or t.dtype != torch.float32:
        yield
        return
    matmul = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic,
                                        allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)

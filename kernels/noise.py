"""Triton kernel of gaussian_copies (robust_fast.kernels.noise), with the semantics of
robust_fast/reference/noise.py: out row b * copies + j = x[b] + sigma * N(0, I).

One elementwise pass over the output: each program reads its elements' x values (a sample is
read once per copy, mostly from cache) and writes x + sigma * tl.randn(seed, element index).
The normals depend only on the seed and the element's index, so a run repeats exactly.

Layout: x and out contiguous (robust_fast.ops.noise sees to it). The seed is read from an int64 tensor
on the device (no host synchronisation) or taken as an int.
"""
import torch
import triton
import triton.language as tl

from ._common import flat_block, on_device_of, tl_accumulation_dtype

BLOCK = 1024


@triton.jit
def _gaussian_copies_kernel(x_ptr, out_ptr, seed_ptr, seed_value, numel, sample_numel, copies,
                            sigma: tl.float64, SEED_ON_DEVICE: tl.constexpr,
                            COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                            BLOCK: tl.constexpr):
    offsets, mask = flat_block(numel, BLOCK, WIDE_INDEX)
    row = offsets // sample_numel
    source = (row // copies) * sample_numel + (offsets - row * sample_numel)
    x = tl.load(x_ptr + source, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if SEED_ON_DEVICE:
        seed = tl.load(seed_ptr)
    else:
        seed = seed_value
    noise = tl.randn(seed, offsets.to(tl.int64))
    # sigma in fp64 (the interpreter passes a Python float), then in the compute dtype
    scale = tl.full([], sigma, tl.float64).to(COMPUTE_DTYPE)
    result = x + scale * noise.to(COMPUTE_DTYPE)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


def gaussian_copies_triton(x: torch.Tensor, copies: int, sigma: float, seed, out: torch.Tensor) -> torch.Tensor:
    """Fills out (B * copies, ...) and returns it; x and out contiguous (robust_fast.ops.noise
    sees to both). seed: an int64 tensor of one
    element on x's device, or an int."""
    numel = out.numel()
    if numel == 0:
        return out
    on_device = isinstance(seed, torch.Tensor)
    sample_numel = numel // out.shape[0]
    with on_device_of(x):
        _gaussian_copies_kernel[(triton.cdiv(numel, BLOCK),)](
            x, out, seed if on_device else x, 0 if on_device else _as_int64(seed), numel,
            sample_numel, copies, float(sigma), SEED_ON_DEVICE=on_device,
            COMPUTE_DTYPE=tl_accumulation_dtype(x.dtype), WIDE_INDEX=numel + BLOCK >= 2**31,
            BLOCK=BLOCK)
    return out


def _as_int64(seed: int) -> int:
    """The seed as a signed 64-bit int (how the kernel argument takes it)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= (1 << 63) else seed

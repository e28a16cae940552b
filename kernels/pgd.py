"""Triton kernels of the PGD step (robust_fast.kernels.pgd), with the semantics of
robust_fast/reference/pgd.py and the per-element expressions of csrc/include/robust_fast/pgd_math.h.

linf: one elementwise pass, bit-identical to the reference in fp32 and fp64.
l2:   each sample's <g,g>, <d,g>, <d,d> (d = x_adv - x_nat) before its write. When the batch fills
      the device, or a sample fits in one block, one program per sample sums, then writes. Else
      each sample is split into blocks: pass 1 writes per-block sums (no atomics, so the result is
      deterministic), a finalize program per sample turns them into the step scale
      s = alpha/||g|| and the projection factor min(1, eps/||d + s g||)
      (||d + s g||^2 = <d,d> + 2 s <d,g> + s^2 <g,g>), and pass 2 writes.

Element math runs in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs; each element's
products are taken in that type and summed in fp64, as the C++ kernels do.

Layout: the launcher walks its operands as flat memory, as they lie: robust_fast.ops.pgd has put
them in one dense layout whose samples are contiguous blocks (robust_fast/_layout.py) and gives
an out in the same strides. Scalars (eps, alpha, the clip bounds) are fp64 kernel arguments
(kernels/_projection.py). Kernels launch on the operands' device, whichever device is current.
"""
import torch
import triton
import triton.language as tl

from ._common import flat_block, on_device_of, tl_accumulation_dtype
from ._projection import (PARTIALS_BLOCK, as_fp64, block_sums, box_arguments, clamp_like_torch,
                          clamp_to_radius, l2_block, l2_coefficients, l2_coefficients_kernel,
                          l2_partial_sums_kernel, launch, needs_int64,
                          radius_arguments, signed_radii, smallest_reliable_grad_sq,
                          split_l2, split_piece, store_result)

@triton.jit
def _pgd_step_linf_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, numel, sample_numel,
                          eps: tl.float64, alpha: tl.float64, clip_lo: tl.float64,
                          clip_hi: tl.float64, eps_ptr, alpha_ptr,
                          EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                          TARGETED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                          COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                          BLOCK: tl.constexpr):
    offsets, mask = flat_block(numel, BLOCK, WIDE_INDEX)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)

    sample = offsets // sample_numel
    eps_v, alpha_v = signed_radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                                   ALPHA_PER_SAMPLE, TARGETED, mask)
    eps_v = eps_v.to(COMPUTE_DTYPE)
    alpha_v = alpha_v.to(COMPUTE_DTYPE)
    # alpha * sign(g) without a multiply; a NaN (or zero) gradient makes no move.
    step = tl.where(g > 0, alpha_v, tl.where(g < 0, -alpha_v, 0.0))
    stepped = x + step
    delta = clamp_to_radius(stepped - x_nat, eps_v)
    result = clamp_like_torch(x_nat + delta, as_fp64(clip_lo).to(COMPUTE_DTYPE),
                               as_fp64(clip_hi).to(COMPUTE_DTYPE), HAS_LO, HAS_HI)
    store_result(out_ptr, offsets, result, mask)


@triton.jit
def _l2_write(x_ptr, grad_ptr, x_nat_ptr, out_ptr, offsets, mask, step_scale, factor,
              clip_lo, clip_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              COMPUTE_DTYPE: tl.constexpr):
    # l2_step of pgd_math.h, in COMPUTE_DTYPE.
    scale_c = step_scale.to(COMPUTE_DTYPE)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if scale_c != 0.0:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        stepped = x + scale_c * g
    else:
        stepped = x
    result = clamp_like_torch(x_nat + (stepped - x_nat) * factor.to(COMPUTE_DTYPE),
                               as_fp64(clip_lo).to(COMPUTE_DTYPE), as_fp64(clip_hi).to(COMPUTE_DTYPE),
                               HAS_LO, HAS_HI)
    store_result(out_ptr, offsets, result, mask)


@triton.jit
def _pgd_step_l2_sample_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, sample_numel,
                               eps: tl.float64, alpha: tl.float64, clip_lo: tl.float64,
                               clip_hi: tl.float64, min_grad_sq: tl.float64, eps_ptr, alpha_ptr,
                               EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                               TARGETED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                               COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                               BLOCK: tl.constexpr):
    # One program per sample: its sums (lanes in COMPUTE_DTYPE, added in fp64), then its write.
    # Every read of the sums comes before the first write, so out may alias x_adv.
    sample = tl.program_id(0)
    if WIDE_INDEX:
        sample = sample.to(tl.int64)
    first = sample * sample_numel
    grad_sq = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    delta_dot_grad = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    delta_sq = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        gg, dg, dd = block_sums(x_ptr, grad_ptr, x_nat_ptr, first + within,
                                 within < sample_numel, COMPUTE_DTYPE)
        grad_sq += gg
        delta_dot_grad += dg
        delta_sq += dd
    eps_v, alpha_v = signed_radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                                   ALPHA_PER_SAMPLE, TARGETED, True)
    step_scale, factor = l2_coefficients(
        tl.sum(grad_sq.to(tl.float64), axis=0), tl.sum(delta_dot_grad.to(tl.float64), axis=0),
        tl.sum(delta_sq.to(tl.float64), axis=0), eps_v, alpha_v, as_fp64(min_grad_sq))
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        _l2_write(x_ptr, grad_ptr, x_nat_ptr, out_ptr, first + within, within < sample_numel,
                  step_scale, factor, clip_lo, clip_hi, HAS_LO, HAS_HI, COMPUTE_DTYPE)


@triton.jit
def _pgd_step_l2_apply_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, coefficients_ptr,
                              sample_numel, blocks_per_sample, clip_lo: tl.float64,
                              clip_hi: tl.float64, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                              COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                              BLOCK: tl.constexpr):
    # Split pass 2: program (sample, block) writes its block with the sample's coefficients.
    _, sample, within, step_scale, factor = split_piece(coefficients_ptr, blocks_per_sample, WIDE_INDEX, BLOCK)
    _l2_write(x_ptr, grad_ptr, x_nat_ptr, out_ptr, sample * sample_numel + within,
              within < sample_numel, step_scale, factor, clip_lo, clip_hi, HAS_LO, HAS_HI,
              COMPUTE_DTYPE)


def pgd_step_triton(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                    out: torch.Tensor, eps, alpha, norm: str, clip_min, clip_max,
                    targeted: bool) -> torch.Tensor:
    """One PGD step (see robust_fast.pgd_step) into out, which it returns; arguments validated
    and laid out by robust_fast.ops.pgd: the operands walkable as they lie, out in their strides
    (it may be x_adv itself). eps, alpha: floats, or float64 (B,) tensors on the operands'
    device."""
    if x_adv.numel() > 0:
        with on_device_of(x_adv):
            _launch(x_adv, grad, x_nat, out, eps, alpha, norm, clip_min, clip_max, targeted)
    return out


def _launch(x_adv, grad, x_nat, out, eps, alpha, norm, clip_min, clip_max, targeted) -> None:
    radii = dict(**radius_arguments("eps", eps, out), **radius_arguments("alpha", alpha, out),
                 TARGETED=bool(targeted))
    operands = dict(x_ptr=x_adv, grad_ptr=grad, x_nat_ptr=x_nat, out_ptr=out)
    if norm != "l2":
        launch(_pgd_step_linf_kernel, x_adv, clip_min=clip_min, clip_max=clip_max, **operands, **radii)
        return
    batch = x_adv.shape[0]
    sample_numel = x_adv.numel() // batch
    block = l2_block(sample_numel)
    blocks_per_sample = triton.cdiv(sample_numel, block)
    if not split_l2(batch, blocks_per_sample, x_adv.device):
        launch(_pgd_step_l2_sample_kernel, x_adv, clip_min=clip_min, clip_max=clip_max,
               per_sample=True, **operands, **radii)
        return
    # Few samples larger than a block: each is split among programs.
    partials = torch.empty((batch, blocks_per_sample, 3), device=x_adv.device, dtype=torch.float64)
    coefficients = torch.empty((batch, 2), device=x_adv.device, dtype=torch.float64)
    grid = (batch * blocks_per_sample,)
    wide = needs_int64(max(x_adv.numel() + block, partials.numel()))
    compute_dtype = tl_accumulation_dtype(x_adv.dtype)
    l2_partial_sums_kernel[grid](x_adv, grad, x_nat, partials, sample_numel, blocks_per_sample,
                                   COMPUTE_DTYPE=compute_dtype, WIDE_INDEX=wide, BLOCK=block)
    l2_coefficients_kernel[(batch,)](
        partials, coefficients, blocks_per_sample,
        min_grad_sq=smallest_reliable_grad_sq(sample_numel, x_adv.dtype), **radii,
        PARTIALS_BLOCK=PARTIALS_BLOCK)
    _pgd_step_l2_apply_kernel[grid](x_adv, grad, x_nat, out, coefficients, sample_numel,
                                    blocks_per_sample, **box_arguments(clip_min, clip_max),
                                    COMPUTE_DTYPE=compute_dtype, WIDE_INDEX=wide, BLOCK=block)

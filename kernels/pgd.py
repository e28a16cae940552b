"""Triton kernels of the PGD step (robust_fast.kernels.pgd), with the semantics of
robust_fast/reference/pgd.py and the per-element expressions of csrc/include/robust_fast/pgd_math.h.

linf: one elementwise pass, bit-identical to the reference in fp32 and fp64.
l2:   pass 1 writes per-(sample, block) partial sums <g,g>, <d,g>, <d,d> (d = x_adv - x_nat) into a
      (B, blocks_per_sample, 3) buffer, without atomics, so the result is deterministic; pass 2 sums
      its sample's partials in float64, derives the step scale s = alpha/||g|| and the projection
      factor min(1, eps/||d + s g||) (||d + s g||^2 = <d,d> + 2 s <d,g> + s^2 <g,g>), and writes.

Element math runs in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs; the L2 sums
accumulate in the same type and are combined per sample in fp64.

Layout: as the C++ kernels (csrc/pgd_problem.cpp): a dense layout whose samples are contiguous
blocks, shared by all three operands (contiguous, channels_last), is walked as it lies and the result
has its strides; anything else is packed to contiguous once and the result is contiguous.

Scalars: a Python float reaches a compiled Triton kernel as fp32, so for fp64 inputs eps, alpha and
the clip bounds travel in a small float64 tensor instead (SCALARS_IN_MEMORY). For other inputs the
L2 coefficients start from the fp32-rounded scalar eps/alpha (per-sample tensors stay float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from robust_fast._layout import walks_as_it_lies

LINF_BLOCK = 1024
L2_MAX_BLOCK = 1024
L2_MIN_BLOCK = 128
PARTIALS_BLOCK = 128  # partial sums reduced at a time in pass 2


@triton.jit
def _clamp_like_torch(value, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    # torch.clamp: max with lo, then min with hi; a NaN stays NaN.
    if HAS_LO:
        value = tl.where(value < lo, lo, value)
    if HAS_HI:
        value = tl.where(value > hi, hi, value)
    return value


@triton.jit
def _fp32_to_bf16_rne(value):
    # Round to nearest even by hand (as c10::round_to_nearest_even): a GPU's cast does the same,
    # while the interpreter's fp32 -> bf16 cast truncates.
    bits = value.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = tl.where(value != value, bits | 0x400000, rounded)  # a NaN stays a quiet NaN
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_result(out_ptr, offsets, result, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + offsets, _fp32_to_bf16_rne(result), mask=mask)
    else:
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_scalars(eps, alpha, clip_lo, clip_hi, scalars_ptr, SCALARS_IN_MEMORY: tl.constexpr,
                  DTYPE: tl.constexpr):
    # eps, alpha (sign of the step included), clip low, clip high in DTYPE.
    if SCALARS_IN_MEMORY:
        eps_v = tl.load(scalars_ptr + 0).to(DTYPE)
        alpha_v = tl.load(scalars_ptr + 1).to(DTYPE)
        lo_v = tl.load(scalars_ptr + 2).to(DTYPE)
        hi_v = tl.load(scalars_ptr + 3).to(DTYPE)
    else:
        eps_v = tl.cast(eps, DTYPE)
        alpha_v = tl.cast(alpha, DTYPE)
        lo_v = tl.cast(clip_lo, DTYPE)
        hi_v = tl.cast(clip_hi, DTYPE)
    return eps_v, alpha_v, lo_v, hi_v


@triton.jit
def _pgd_step_linf_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, numel, sample_numel,
                          eps, alpha, clip_lo, clip_hi, eps_ptr, alpha_ptr, scalars_ptr,
                          EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                          TARGETED: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr,
                          HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                          COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)

    eps_v, alpha_v, lo, hi = _load_scalars(eps, alpha, clip_lo, clip_hi, scalars_ptr,
                                           SCALARS_IN_MEMORY, COMPUTE_DTYPE)
    if EPS_PER_SAMPLE or ALPHA_PER_SAMPLE:
        sample = offsets // sample_numel
        if EPS_PER_SAMPLE:
            eps_v = tl.load(eps_ptr + sample, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if ALPHA_PER_SAMPLE:
            alpha_v = tl.load(alpha_ptr + sample, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            if TARGETED:
                alpha_v = -alpha_v

    # alpha * sign(g) without a multiply; a NaN (or zero) gradient makes no move.
    step = tl.where(g > 0, alpha_v, tl.where(g < 0, -alpha_v, 0.0))
    stepped = x + step
    delta = stepped - x_nat
    delta = tl.where(delta < -eps_v, -eps_v, delta)
    delta = tl.where(delta > eps_v, eps_v, delta)
    result = _clamp_like_torch(x_nat + delta, lo, hi, HAS_LO, HAS_HI)
    _store_result(out_ptr, offsets, result, mask)


@triton.jit
def _pgd_step_l2_sums_kernel(x_ptr, grad_ptr, x_nat_ptr, partials_ptr, sample_numel,
                             blocks_per_sample, ACC_DTYPE: tl.constexpr,
                             WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (sample, block of the sample): its <g,g>, <d,g>, <d,d>.
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    within = block * BLOCK + tl.arange(0, BLOCK)
    mask = within < sample_numel
    offsets = sample * sample_numel + within
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    d = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
         - tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE))
    tl.store(partials_ptr + pid * 3 + 0, tl.sum(g * g, axis=0))
    tl.store(partials_ptr + pid * 3 + 1, tl.sum(d * g, axis=0))
    tl.store(partials_ptr + pid * 3 + 2, tl.sum(d * d, axis=0))


@triton.jit
def _pgd_step_l2_apply_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, partials_ptr, sample_numel,
                              blocks_per_sample, eps, alpha, clip_lo, clip_hi,
                              eps_ptr, alpha_ptr, scalars_ptr,
                              EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                              TARGETED: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr,
                              HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                              COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                              BLOCK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample

    # The sample's sums, from its partials, in float64.
    grad_sq_acc = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    dot_acc = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    delta_sq_acc = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    first = sample * blocks_per_sample
    for start in range(0, blocks_per_sample, PARTIALS_BLOCK):
        index = start + tl.arange(0, PARTIALS_BLOCK)
        keep = index < blocks_per_sample
        row = partials_ptr + (first + index) * 3
        grad_sq_acc += tl.load(row + 0, mask=keep, other=0.0).to(tl.float64)
        dot_acc += tl.load(row + 1, mask=keep, other=0.0).to(tl.float64)
        delta_sq_acc += tl.load(row + 2, mask=keep, other=0.0).to(tl.float64)
    grad_sq = tl.sum(grad_sq_acc, axis=0)
    delta_dot_grad = tl.sum(dot_acc, axis=0)
    delta_sq = tl.sum(delta_sq_acc, axis=0)

    eps_v, alpha_v, lo, hi = _load_scalars(eps, alpha, clip_lo, clip_hi, scalars_ptr,
                                           SCALARS_IN_MEMORY, tl.float64)
    if EPS_PER_SAMPLE:
        eps_v = tl.load(eps_ptr + sample).to(tl.float64)
    if ALPHA_PER_SAMPLE:
        alpha_v = tl.load(alpha_ptr + sample).to(tl.float64)
        if TARGETED:
            alpha_v = -alpha_v

    # l2_coefficients of pgd_math.h, in float64. A zero, infinite or NaN gradient norm means no
    # move; the where()s keep the unselected branches free of 0*inf and x/0.
    grad_norm = tl.sqrt(grad_sq)
    moves = (grad_norm > 0.0) & (grad_norm < float("inf"))
    step_scale = tl.where(moves, alpha_v / tl.where(moves, grad_norm, 1.0), 0.0)
    moved_sq = (2.0 * step_scale * tl.where(moves, delta_dot_grad, 0.0)
                + step_scale * step_scale * tl.where(moves, grad_sq, 0.0))
    stepped_sq = tl.where(moves, delta_sq + moved_sq, delta_sq)
    stepped_norm = tl.sqrt(tl.where(stepped_sq > 0.0, stepped_sq, 0.0))
    outside = stepped_norm > eps_v
    factor = tl.where(outside, eps_v / tl.where(outside, stepped_norm, 1.0), 1.0)

    # l2_step of pgd_math.h, in COMPUTE_DTYPE.
    scale_c = step_scale.to(COMPUTE_DTYPE)
    factor_c = factor.to(COMPUTE_DTYPE)
    lo_c = lo.to(COMPUTE_DTYPE)
    hi_c = hi.to(COMPUTE_DTYPE)
    within = block * BLOCK + tl.arange(0, BLOCK)
    mask = within < sample_numel
    offsets = sample * sample_numel + within
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    step_moves = scale_c != 0.0
    if step_moves:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        stepped = x + scale_c * g
    else:
        stepped = x
    result = _clamp_like_torch(x_nat + (stepped - x_nat) * factor_c, lo_c, hi_c, HAS_LO, HAS_HI)
    _store_result(out_ptr, offsets, result, mask)


def _needs_int64(largest_offset: int) -> bool:
    """Offsets are computed in int32 unless one (with a block's slack) may pass 2**31 - 1."""
    return largest_offset >= 2**31


def _per_sample(value: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    return value.to(device=device, dtype=torch.float64).contiguous()


def pgd_step_triton(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: float,
                    alpha: float, eps_per_sample: Optional[torch.Tensor],
                    alpha_per_sample: Optional[torch.Tensor], norm: str,
                    clip_min: Optional[float], clip_max: Optional[float],
                    targeted: bool) -> torch.Tensor:
    """One PGD step (see robust_fast.pgd_step), arguments already validated by robust_fast.ops.pgd.

    eps_per_sample / alpha_per_sample: float64 tensors of shape (B,), or None for the floats.
    Returns a new tensor; no input is modified.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"pgd_step_triton: norm must be 'linf' or 'l2', got {norm!r}")
    if not walks_as_it_lies(x_adv, grad, x_nat):
        x_adv, grad, x_nat = x_adv.contiguous(), grad.contiguous(), x_nat.contiguous()
    out = torch.empty_like(x_adv)  # the operands' strides, as run_pgd_step in C++
    batch = x_adv.shape[0]
    numel = x_adv.numel()
    if batch == 0 or numel == 0:
        return out
    sample_numel = numel // batch
    device = x_adv.device

    alpha_signed = -float(alpha) if targeted else float(alpha)
    eps_t = _per_sample(eps_per_sample, device)
    alpha_t = _per_sample(alpha_per_sample, device)
    fp64 = x_adv.dtype == torch.float64
    compute_dtype = tl.float64 if fp64 else tl.float32
    inf = float("inf")
    lo = -inf if clip_min is None else float(clip_min)
    hi = inf if clip_max is None else float(clip_max)
    # A Python float reaches a compiled kernel as fp32: fp64 scalars go through memory.
    scalars = (torch.tensor([float(eps), alpha_signed, lo, hi], dtype=torch.float64, device=device)
               if fp64 else None)
    # Unused pointers still need a tensor argument.
    placeholder = out
    common = dict(
        eps=float(eps), alpha=alpha_signed, clip_lo=lo, clip_hi=hi,
        eps_ptr=eps_t if eps_t is not None else placeholder,
        alpha_ptr=alpha_t if alpha_t is not None else placeholder,
        scalars_ptr=scalars if scalars is not None else placeholder,
        EPS_PER_SAMPLE=eps_t is not None, ALPHA_PER_SAMPLE=alpha_t is not None,
        TARGETED=bool(targeted), SCALARS_IN_MEMORY=fp64,
        HAS_LO=clip_min is not None, HAS_HI=clip_max is not None,
        COMPUTE_DTYPE=compute_dtype,
    )

    if norm == "linf":
        grid = (triton.cdiv(numel, LINF_BLOCK),)
        _pgd_step_linf_kernel[grid](x_adv, grad, x_nat, out, numel, sample_numel,
                                    WIDE_INDEX=_needs_int64(numel + LINF_BLOCK),
                                    BLOCK=LINF_BLOCK, **common)
        return out

    block = min(L2_MAX_BLOCK, max(L2_MIN_BLOCK, triton.next_power_of_2(sample_numel)))
    blocks_per_sample = triton.cdiv(sample_numel, block)
    partials = torch.empty((batch, blocks_per_sample, 3), device=device,
                           dtype=torch.float64 if fp64 else torch.float32)
    grid = (batch * blocks_per_sample,)
    wide = _needs_int64(max(numel + block, partials.numel() + 3 * PARTIALS_BLOCK))
    _pgd_step_l2_sums_kernel[grid](x_adv, grad, x_nat, partials, sample_numel, blocks_per_sample,
                                   ACC_DTYPE=compute_dtype, WIDE_INDEX=wide, BLOCK=block)
    _pgd_step_l2_apply_kernel[grid](x_adv, grad, x_nat, out, partials, sample_numel,
                                    blocks_per_sample, WIDE_INDEX=wide, BLOCK=block,
                                    PARTIALS_BLOCK=PARTIALS_BLOCK, **common)
    return out

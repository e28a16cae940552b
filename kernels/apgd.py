"""Triton kernels of the APGD step (robust_fast.kernels.apgd), with the semantics of
robust_fast/reference/apgd.py and the per-element expressions of
csrc/include/robust_fast/pgd_math.h (linf_step / l2_step for z, momentum_point, then the
projection again).

linf: one elementwise pass.
l2:   one program per sample, three loops over it: the sums <g,g>, <d,g>, <d,d> that give z's
      step scale and projection factor (as in pgd_step), the squared distance of the momentum
      point from x_nat, then the write. Products in the compute type, sums in fp64.

The launcher walks its operands as flat memory, as they lie (robust_fast.ops.apgd has laid them
out: robust_fast/_layout.py) and writes x_new into out and, in place, the old x into prev_out;
out may be x and prev_out x_prev: each element is read before it is written, by the same program.
"""
import torch
import triton
import triton.language as tl

from ._common import flat_block, on_device_of
from ._projection import (as_fp64, block_sums, clamp_like_torch, clamp_to_radius, l2_coefficients,
                          launch, radius_arguments, sample_radius, store_result)


@triton.jit
def _momentum_point(x, z, x_prev, a, one_minus_a):
    # momentum_point of pgd_math.h: (x + a*(z - x)) + (1 - a)*(x - x_prev).
    towards = x + a * (z - x)
    last_move = one_minus_a * (x - x_prev)
    return towards + last_move


@triton.jit
def _apgd_step_linf_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, out_ptr, prev_out_ptr, numel,
                           sample_numel, eta: tl.float64, eps: tl.float64, eta_ptr, eps_ptr,
                           a: tl.float64, one_minus_a: tl.float64, clip_lo: tl.float64,
                           clip_hi: tl.float64, ETA_PER_SAMPLE: tl.constexpr,
                           EPS_PER_SAMPLE: tl.constexpr, WRITE_PREV: tl.constexpr,
                           HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                           COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                           BLOCK: tl.constexpr):
    offsets, mask = flat_block(numel, BLOCK, WIDE_INDEX)
    x_raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    x = x_raw.to(COMPUTE_DTYPE)
    x_prev = tl.load(x_prev_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    sample = offsets // sample_numel
    eta_v = sample_radius(sample, eta, eta_ptr, ETA_PER_SAMPLE, mask).to(COMPUTE_DTYPE)
    eps_v = sample_radius(sample, eps, eps_ptr, EPS_PER_SAMPLE, mask).to(COMPUTE_DTYPE)
    lo = as_fp64(clip_lo).to(COMPUTE_DTYPE)
    hi = as_fp64(clip_hi).to(COMPUTE_DTYPE)
    # z: pgd_step's L-inf step (a NaN or zero gradient makes no move).
    step = tl.where(g > 0, eta_v, tl.where(g < 0, -eta_v, 0.0))
    z = clamp_like_torch(x_nat + clamp_to_radius(x + step - x_nat, eps_v), lo, hi, HAS_LO, HAS_HI)
    moved = _momentum_point(x, z, x_prev, as_fp64(a).to(COMPUTE_DTYPE),
                            as_fp64(one_minus_a).to(COMPUTE_DTYPE))
    delta = clamp_to_radius(moved - x_nat, eps_v)
    result = clamp_like_torch(x_nat + delta, lo, hi, HAS_LO, HAS_HI)
    store_result(out_ptr, offsets, result, mask)
    if WRITE_PREV:
        tl.store(prev_out_ptr + offsets, x_raw, mask=mask)


@triton.jit
def _l2_moved(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, offsets, mask, step_scale, factor, a,
              one_minus_a, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              COMPUTE_DTYPE: tl.constexpr):
    # (x, x_nat, the momentum point rounded to the input dtype) of one block of a sample.
    x_raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    x = x_raw.to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_prev = tl.load(x_prev_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    scale_c = step_scale.to(COMPUTE_DTYPE)
    stepped = tl.where(scale_c != 0.0, x + scale_c * g, x)
    z = clamp_like_torch(x_nat + (stepped - x_nat) * factor.to(COMPUTE_DTYPE), lo, hi, HAS_LO, HAS_HI)
    moved = _momentum_point(x, z, x_prev, a, one_minus_a)
    return x_raw, x_nat, moved.to(x_raw.dtype).to(COMPUTE_DTYPE)


@triton.jit
def _apgd_step_l2_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, out_ptr, prev_out_ptr,
                         sample_numel, eta: tl.float64, eps: tl.float64, eta_ptr, eps_ptr,
                         a: tl.float64, one_minus_a: tl.float64, clip_lo: tl.float64,
                         clip_hi: tl.float64, min_grad_sq: tl.float64,
                         ETA_PER_SAMPLE: tl.constexpr, EPS_PER_SAMPLE: tl.constexpr,
                         WRITE_PREV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                         COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                         BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    if WIDE_INDEX:
        sample = sample.to(tl.int64)
    first = sample * sample_numel
    eta_v = sample_radius(sample, eta, eta_ptr, ETA_PER_SAMPLE, True)
    eps_v = sample_radius(sample, eps, eps_ptr, EPS_PER_SAMPLE, True)
    # Pass 1: z's coefficients, as pgd_step computes them.
    grad_sq = tl.zeros([BLOCK], dtype=tl.float64)
    delta_dot_grad = tl.zeros([BLOCK], dtype=tl.float64)
    delta_sq = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        gg, dg, dd = block_sums(x_ptr, grad_ptr, x_nat_ptr, first + within,
                                 within < sample_numel, COMPUTE_DTYPE)
        grad_sq += gg.to(tl.float64)
        delta_dot_grad += dg.to(tl.float64)
        delta_sq += dd.to(tl.float64)
    step_scale, factor = l2_coefficients(tl.sum(grad_sq, axis=0), tl.sum(delta_dot_grad, axis=0),
                                          tl.sum(delta_sq, axis=0), eps_v, eta_v, as_fp64(min_grad_sq))
    a_c = as_fp64(a).to(COMPUTE_DTYPE)
    one_minus_a_c = as_fp64(one_minus_a).to(COMPUTE_DTYPE)
    lo = as_fp64(clip_lo).to(COMPUTE_DTYPE)
    hi = as_fp64(clip_hi).to(COMPUTE_DTYPE)
    # Pass 2: the squared distance of the momentum point from x_nat.
    moved_sq = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        mask = within < sample_numel
        x_raw, x_nat, moved = _l2_moved(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, first + within, mask,
                                        step_scale, factor, a_c, one_minus_a_c, lo, hi, HAS_LO,
                                        HAS_HI, COMPUTE_DTYPE)
        d = (moved - x_nat).to(x_raw.dtype).to(COMPUTE_DTYPE)
        moved_sq += tl.where(mask, d * d, 0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(moved_sq, axis=0))
    outside = norm > eps_v
    projection = tl.where(outside, eps_v / tl.where(outside, norm, 1.0), 1.0).to(COMPUTE_DTYPE)
    # Pass 3: project and write; each element is read before it is written.
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        mask = within < sample_numel
        x_raw, x_nat, moved = _l2_moved(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, first + within, mask,
                                        step_scale, factor, a_c, one_minus_a_c, lo, hi, HAS_LO,
                                        HAS_HI, COMPUTE_DTYPE)
        result = clamp_like_torch(x_nat + (moved - x_nat) * projection, lo, hi, HAS_LO, HAS_HI)
        store_result(out_ptr, first + within, result, mask)
        if WRITE_PREV:
            tl.store(prev_out_ptr + first + within, x_raw, mask=mask)


def apgd_step_triton(x: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                     out: torch.Tensor, prev_out, eta, eps, momentum: float, norm: str, clip_min,
                     clip_max) -> torch.Tensor:
    """One APGD step (see robust_fast.apgd_step): x_new into out, which it returns, and, when
    prev_out is a tensor, x into prev_out. Arguments validated and laid out by
    robust_fast.ops.apgd: the operands walkable as they lie, out and prev_out in their strides.
    eta, eps: floats, or float64 (B,) tensors on the operands' device."""
    if x.numel() > 0:
        with on_device_of(x):
            launch(_apgd_step_l2_kernel if norm == "l2" else _apgd_step_linf_kernel, x,
                   clip_min=clip_min, clip_max=clip_max, per_sample=norm == "l2",
                   x_ptr=x, x_prev_ptr=x_prev, grad_ptr=grad, x_nat_ptr=x_nat, out_ptr=out,
                   prev_out_ptr=out if prev_out is None else prev_out,
                   WRITE_PREV=prev_out is not None, a=float(momentum),
                   one_minus_a=1.0 - float(momentum), **radius_arguments("eta", eta, out),
                   **radius_arguments("eps", eps, out))
    return out

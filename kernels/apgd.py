"""Triton kernels of the APGD step (robust_fast.kernels.apgd), with the semantics of
robust_fast/reference/apgd.py and the per-element expressions of
csrc/include/robust_fast/pgd_math.h (linf_step / l2_step for z, momentum_point, then the
projection again).

linf: one elementwise pass.
l2:   one program per sample, three loops over it: the sums <g,g>, <d,g>, <d,d> that give z's
      step scale and projection factor (as in pgd_step), the squared distance of the momentum
      point from x_nat, then the write. Products in the compute type, sums in fp64. When few
      samples span several blocks (a small batch would leave most of the device idle), each
      sample is split among programs as in pgd_step: per-block sums, z's coefficients per
      sample, per-block squared distances, the projection factor per sample, then the write;
      five launches, no atomics (deterministic).

The launcher walks its operands as flat memory, as they lie (robust_fast.ops.apgd has laid them
out: robust_fast/_layout.py) and writes x_new into out and, in place, the old x into prev_out;
out may be x and prev_out x_prev: each element is read before it is written, by the same program.
"""
import torch
import triton
import triton.language as tl

from ._common import flat_block, on_device_of, tl_accumulation_dtype
from ._projection import (PARTIALS_BLOCK, as_fp64, block_sums, box_arguments, clamp_like_torch,
                          clamp_to_radius, l2_block, l2_coefficients, l2_coefficients_kernel,
                          l2_partial_sums_kernel, launch, needs_int64, radius_arguments, sample_radius,
                          smallest_reliable_grad_sq, split_l2, split_piece, store_result)


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


@triton.jit
def _apgd_step_l2_moved_sums_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, coefficients_ptr, partials_ptr,
                                    sample_numel, blocks_per_sample, a: tl.float64,
                                    one_minus_a: tl.float64, clip_lo: tl.float64, clip_hi: tl.float64,
                                    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                                    COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                                    BLOCK: tl.constexpr):
    # Split pass 2: program (sample, block) writes its block's squared distance of the momentum
    # point from x_nat, in fp64.
    pid, sample, within, step_scale, factor = split_piece(coefficients_ptr, blocks_per_sample, WIDE_INDEX, BLOCK)
    mask = within < sample_numel
    x_raw, x_nat, moved = _l2_moved(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, sample * sample_numel + within,
                                    mask, step_scale, factor, as_fp64(a).to(COMPUTE_DTYPE),
                                    as_fp64(one_minus_a).to(COMPUTE_DTYPE), as_fp64(clip_lo).to(COMPUTE_DTYPE),
                                    as_fp64(clip_hi).to(COMPUTE_DTYPE), HAS_LO, HAS_HI, COMPUTE_DTYPE)
    d = (moved - x_nat).to(x_raw.dtype).to(COMPUTE_DTYPE)
    tl.store(partials_ptr + pid, tl.sum(tl.where(mask, d * d, 0.0).to(tl.float64), axis=0))


@triton.jit
def _apgd_step_l2_projection_kernel(partials_ptr, projection_ptr, blocks_per_sample, eps: tl.float64, eps_ptr,
                                    EPS_PER_SAMPLE: tl.constexpr, PARTIALS_BLOCK: tl.constexpr):
    # One program per sample: its squared distances in a fixed order, then the factor
    # min(1, eps / ||moved - x_nat||).
    sample = tl.program_id(0).to(tl.int64)
    moved_sq = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    for start in range(0, blocks_per_sample, PARTIALS_BLOCK):
        index = start + tl.arange(0, PARTIALS_BLOCK)
        moved_sq += tl.load(partials_ptr + sample * blocks_per_sample + index, mask=index < blocks_per_sample,
                            other=0.0)
    eps_v = sample_radius(sample, eps, eps_ptr, EPS_PER_SAMPLE, True)
    norm = tl.sqrt(tl.sum(moved_sq, axis=0))
    outside = norm > eps_v
    tl.store(projection_ptr + sample, tl.where(outside, eps_v / tl.where(outside, norm, 1.0), 1.0))


@triton.jit
def _apgd_step_l2_apply_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, out_ptr, prev_out_ptr, coefficients_ptr,
                               projection_ptr, sample_numel, blocks_per_sample, a: tl.float64,
                               one_minus_a: tl.float64, clip_lo: tl.float64, clip_hi: tl.float64,
                               WRITE_PREV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                               COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    # Split pass 3: program (sample, block) projects and writes its block; each element is read
    # before it is written, by this program.
    _, sample, within, step_scale, factor = split_piece(coefficients_ptr, blocks_per_sample, WIDE_INDEX, BLOCK)
    projection = tl.load(projection_ptr + sample).to(COMPUTE_DTYPE)
    lo = as_fp64(clip_lo).to(COMPUTE_DTYPE)
    hi = as_fp64(clip_hi).to(COMPUTE_DTYPE)
    mask = within < sample_numel
    offsets = sample * sample_numel + within
    x_raw, x_nat, moved = _l2_moved(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, offsets, mask, step_scale, factor,
                                    as_fp64(a).to(COMPUTE_DTYPE), as_fp64(one_minus_a).to(COMPUTE_DTYPE), lo, hi,
                                    HAS_LO, HAS_HI, COMPUTE_DTYPE)
    result = clamp_like_torch(x_nat + (moved - x_nat) * projection, lo, hi, HAS_LO, HAS_HI)
    store_result(out_ptr, offsets, result, mask)
    if WRITE_PREV:
        tl.store(prev_out_ptr + offsets, x_raw, mask=mask)


def _apgd_step_l2_split(x, x_prev, grad, x_nat, out, prev_out, eta, eps, momentum, clip_min, clip_max,
                        block: int, blocks_per_sample: int) -> None:
    """The split L2 path: few samples larger than a block, each spread over programs."""
    batch = x.shape[0]
    sample_numel = x.numel() // batch
    device = x.device
    partials = torch.empty((batch, blocks_per_sample, 3), device=device, dtype=torch.float64)
    coefficients = torch.empty((batch, 2), device=device, dtype=torch.float64)
    moved_partials = torch.empty((batch, blocks_per_sample), device=device, dtype=torch.float64)
    projection = torch.empty((batch,), device=device, dtype=torch.float64)
    grid = (batch * blocks_per_sample,)
    wide = needs_int64(max(x.numel() + block, partials.numel()))
    compute = dict(COMPUTE_DTYPE=tl_accumulation_dtype(x.dtype), WIDE_INDEX=wide, BLOCK=block)
    box = box_arguments(clip_min, clip_max)
    momentum_args = dict(a=float(momentum), one_minus_a=1.0 - float(momentum))
    eps_args = radius_arguments("eps", eps, out)
    l2_partial_sums_kernel[grid](x, grad, x_nat, partials, sample_numel, blocks_per_sample, **compute)
    # z's step scale and factor, as pgd_step's (eta in alpha's place, never targeted).
    l2_coefficients_kernel[(batch,)](
        partials, coefficients, blocks_per_sample, min_grad_sq=smallest_reliable_grad_sq(sample_numel, x.dtype),
        **eps_args, **radius_arguments("alpha", eta, out), TARGETED=False, PARTIALS_BLOCK=PARTIALS_BLOCK)
    _apgd_step_l2_moved_sums_kernel[grid](x, x_prev, grad, x_nat, coefficients, moved_partials, sample_numel,
                                          blocks_per_sample, **momentum_args, **box, **compute)
    _apgd_step_l2_projection_kernel[(batch,)](moved_partials, projection, blocks_per_sample, **eps_args,
                                              PARTIALS_BLOCK=PARTIALS_BLOCK)
    _apgd_step_l2_apply_kernel[grid](x, x_prev, grad, x_nat, out, out if prev_out is None else prev_out,
                                     coefficients, projection, sample_numel, blocks_per_sample, **momentum_args,
                                     **box, WRITE_PREV=prev_out is not None, **compute)


def apgd_step_triton(x: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                     out: torch.Tensor, prev_out, eta, eps, momentum: float, norm: str, clip_min,
                     clip_max) -> torch.Tensor:
    """One APGD step (see robust_fast.apgd_step): x_new into out, which it returns, and, when
    prev_out is a tensor, x into prev_out. Arguments validated and laid out by
    robust_fast.ops.apgd: the operands walkable as they lie, out and prev_out in their strides.
    eta, eps: floats, or float64 (B,) tensors on the operands' device."""
    if x.numel() > 0 and norm == "l2":
        batch = x.shape[0]
        block = l2_block(x.numel() // batch)
        blocks_per_sample = triton.cdiv(x.numel() // batch, block)
        if split_l2(batch, blocks_per_sample, x.device):
            with on_device_of(x):
                _apgd_step_l2_split(x, x_prev, grad, x_nat, out, prev_out, eta, eps, momentum, clip_min,
                                    clip_max, block, blocks_per_sample)
            return out
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

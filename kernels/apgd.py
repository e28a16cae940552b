"""Triton kernels of the APGD step (robust_fast.kernels.apgd), with the semantics of
robust_fast/reference/apgd.py and the per-element expressions of
csrc/include/robust_fast/pgd_math.h (linf_step / l2_step for z, momentum_point, then the
projection again).

linf: one elementwise pass.
l2:   one program per sample, three loops over it: the sums <g,g>, <d,g>, <d,d> that give z's
      step scale and projection factor (as in pgd_step), the squared distance of the momentum
      point from x_nat, then the write. Products in the compute type, sums in fp64.

in place: the result goes into x and the old x into x_prev; each element is read before it is
written, by the same program. Operands that are not in one shared dense layout are packed to
contiguous first (and written back when in place).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from robust_fast._layout import walks_as_it_lies
from robust_fast.kernels.pgd import (_block_sums, _clamp_like_torch, _fp64, _l2_coefficients,
                                     _launch_device, _needs_int64, _smallest_reliable_grad_sq,
                                     _store_result)

LINF_BLOCK = 1024
L2_MAX_BLOCK = 1024
L2_MIN_BLOCK = 128


@triton.jit
def _momentum_point(x, z, x_prev, a, one_minus_a):
    # momentum_point of pgd_math.h: (x + a*(z - x)) + (1 - a)*(x - x_prev).
    towards = x + a * (z - x)
    last_move = one_minus_a * (x - x_prev)
    return towards + last_move


@triton.jit
def _apgd_step_linf_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, eta_ptr, eps_ptr, out_ptr,
                           prev_out_ptr, numel, sample_numel, eps: tl.float64, a: tl.float64,
                           one_minus_a: tl.float64, clip_lo: tl.float64, clip_hi: tl.float64,
                           EPS_PER_SAMPLE: tl.constexpr, WRITE_PREV: tl.constexpr,
                           HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                           COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x_raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    x = x_raw.to(COMPUTE_DTYPE)
    x_prev = tl.load(x_prev_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    sample = offsets // sample_numel
    eta = tl.load(eta_ptr + sample, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if EPS_PER_SAMPLE:
        eps_v = tl.load(eps_ptr + sample, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        eps_v = _fp64(eps).to(COMPUTE_DTYPE)
    lo = _fp64(clip_lo).to(COMPUTE_DTYPE)
    hi = _fp64(clip_hi).to(COMPUTE_DTYPE)
    # z: pgd_step's L-inf step (a NaN or zero gradient makes no move).
    step = tl.where(g > 0, eta, tl.where(g < 0, -eta, 0.0))
    delta = x + step - x_nat
    delta = tl.where(delta < -eps_v, -eps_v, delta)
    delta = tl.where(delta > eps_v, eps_v, delta)
    z = _clamp_like_torch(x_nat + delta, lo, hi, HAS_LO, HAS_HI)
    moved = _momentum_point(x, z, x_prev, _fp64(a).to(COMPUTE_DTYPE),
                            _fp64(one_minus_a).to(COMPUTE_DTYPE))
    delta = moved - x_nat
    delta = tl.where(delta < -eps_v, -eps_v, delta)
    delta = tl.where(delta > eps_v, eps_v, delta)
    result = _clamp_like_torch(x_nat + delta, lo, hi, HAS_LO, HAS_HI)
    _store_result(out_ptr, offsets, result, mask)
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
    z = _clamp_like_torch(x_nat + (stepped - x_nat) * factor.to(COMPUTE_DTYPE), lo, hi, HAS_LO, HAS_HI)
    moved = _momentum_point(x, z, x_prev, a, one_minus_a)
    return x_raw, x_nat, moved.to(x_raw.dtype).to(COMPUTE_DTYPE)


@triton.jit
def _apgd_step_l2_kernel(x_ptr, x_prev_ptr, grad_ptr, x_nat_ptr, eta_ptr, eps_ptr, out_ptr,
                         prev_out_ptr, sample_numel, eps: tl.float64, a: tl.float64,
                         one_minus_a: tl.float64, clip_lo: tl.float64, clip_hi: tl.float64,
                         min_grad_sq: tl.float64, EPS_PER_SAMPLE: tl.constexpr,
                         WRITE_PREV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                         COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                         BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    if WIDE_INDEX:
        sample = sample.to(tl.int64)
    first = sample * sample_numel
    eta = tl.load(eta_ptr + sample)
    if EPS_PER_SAMPLE:
        eps_v = tl.load(eps_ptr + sample)
    else:
        eps_v = _fp64(eps)
    # Pass 1: z's coefficients, as pgd_step computes them.
    grad_sq = tl.zeros([BLOCK], dtype=tl.float64)
    delta_dot_grad = tl.zeros([BLOCK], dtype=tl.float64)
    delta_sq = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        gg, dg, dd = _block_sums(x_ptr, grad_ptr, x_nat_ptr, first + within,
                                 within < sample_numel, COMPUTE_DTYPE)
        grad_sq += gg.to(tl.float64)
        delta_dot_grad += dg.to(tl.float64)
        delta_sq += dd.to(tl.float64)
    step_scale, factor = _l2_coefficients(tl.sum(grad_sq, axis=0), tl.sum(delta_dot_grad, axis=0),
                                          tl.sum(delta_sq, axis=0), eps_v, eta, _fp64(min_grad_sq))
    a_c = _fp64(a).to(COMPUTE_DTYPE)
    one_minus_a_c = _fp64(one_minus_a).to(COMPUTE_DTYPE)
    lo = _fp64(clip_lo).to(COMPUTE_DTYPE)
    hi = _fp64(clip_hi).to(COMPUTE_DTYPE)
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
        result = _clamp_like_torch(x_nat + (moved - x_nat) * projection, lo, hi, HAS_LO, HAS_HI)
        _store_result(out_ptr, first + within, result, mask)
        if WRITE_PREV:
            tl.store(prev_out_ptr + first + within, x_raw, mask=mask)


def apgd_step_triton(x: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                     eta: torch.Tensor, eps: float, eps_per_sample: Optional[torch.Tensor],
                     momentum: float, norm: str, clip_min: Optional[float],
                     clip_max: Optional[float], in_place: bool) -> torch.Tensor:
    """One APGD step (see robust_fast.apgd_step), arguments already validated by
    robust_fast.ops.apgd. eta: float64 (B,) on the operands' device; eps_per_sample the same or
    None. in_place: x <- x_new and x_prev <- x, and x is returned; else a new tensor."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"apgd_step_triton: norm must be 'linf' or 'l2', got {norm!r}")
    as_they_lie = walks_as_it_lies(x, x_prev, grad, x_nat)
    xs, xps, gs, xns = (x, x_prev, grad, x_nat) if as_they_lie else \
        (x.contiguous(), x_prev.contiguous(), grad.contiguous(), x_nat.contiguous())
    if in_place:
        # Written directly when walked as they lie; else into packed copies, copied back.
        out = x if as_they_lie else xs.clone()
        prev_out = x_prev if as_they_lie else xps.clone()
    else:
        out, prev_out = torch.empty_like(xs), None
    if x.numel() > 0:
        with _launch_device(x):
            _launch(xs, xps, gs, xns, eta, eps, eps_per_sample, momentum, norm, clip_min,
                    clip_max, out, prev_out)
    if not in_place:
        return out
    if not as_they_lie:
        x.copy_(out)
        x_prev.copy_(prev_out)
    return x


def _launch(x, x_prev, grad, x_nat, eta, eps, eps_per_sample, momentum, norm, clip_min, clip_max,
            out, prev_out) -> None:
    batch, numel = x.shape[0], x.numel()
    sample_numel = numel // batch
    fp64 = x.dtype == torch.float64
    inf = float("inf")
    common = dict(eps=float(eps), a=float(momentum), one_minus_a=1.0 - float(momentum),
                  clip_lo=-inf if clip_min is None else float(clip_min),
                  clip_hi=inf if clip_max is None else float(clip_max),
                  EPS_PER_SAMPLE=eps_per_sample is not None, WRITE_PREV=prev_out is not None,
                  HAS_LO=clip_min is not None, HAS_HI=clip_max is not None,
                  COMPUTE_DTYPE=tl.float64 if fp64 else tl.float32)
    # Unused pointers still need a tensor argument.
    pointers = (x, x_prev, grad, x_nat, eta, eta if eps_per_sample is None else eps_per_sample,
                out, out if prev_out is None else prev_out)
    if norm == "linf":
        grid = (triton.cdiv(numel, LINF_BLOCK),)
        _apgd_step_linf_kernel[grid](*pointers, numel, sample_numel, **common,
                                     WIDE_INDEX=_needs_int64(numel + LINF_BLOCK), BLOCK=LINF_BLOCK)
        return
    block = min(L2_MAX_BLOCK, max(L2_MIN_BLOCK, triton.next_power_of_2(sample_numel)))
    _apgd_step_l2_kernel[(batch,)](*pointers, sample_numel,
                                   min_grad_sq=_smallest_reliable_grad_sq(sample_numel, fp64),
                                   **common, WIDE_INDEX=_needs_int64(numel + block), BLOCK=block)

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

Layout: as the C++ kernels (csrc/pgd_problem.cpp): a dense layout whose samples are contiguous
blocks, shared by all three operands (contiguous, channels_last), is walked as it lies and the result
has its strides; anything else is packed to contiguous once and the result is contiguous.

Scalars (eps, alpha, the clip bounds) are fp64 kernel arguments (annotated tl.float64; a plain Python
float would reach a compiled kernel as fp32). Kernels launch on the operands' device, whichever
device is current.
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from robust_fast._layout import is_non_overlapping_and_dense, walks_as_it_lies

LINF_BLOCK = 1024
L2_MAX_BLOCK = 1024
L2_MIN_BLOCK = 128
PARTIALS_BLOCK = 128  # partial sums a finalize program adds at a time
INTERPRETER_PROGRAMS = 8  # "the device's width" under the interpreter, where there is no device


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
def _fp64(value):
    # A scalar argument in fp64. Compiled, it already is one (annotated tl.float64); the
    # interpreter passes a Python float, which tl.cast would round through fp32 on the way.
    return tl.full([], value, tl.float64)


@triton.jit
def _radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE: tl.constexpr,
           ALPHA_PER_SAMPLE: tl.constexpr, TARGETED: tl.constexpr, mask):
    # eps and alpha of `sample` (a scalar or a block of indices) in fp64; alpha carries the sign.
    eps_v = _fp64(eps)
    alpha_v = _fp64(alpha)
    if EPS_PER_SAMPLE:
        eps_v = tl.load(eps_ptr + sample, mask=mask, other=0.0)
    if ALPHA_PER_SAMPLE:
        alpha_v = tl.load(alpha_ptr + sample, mask=mask, other=0.0)
    if TARGETED:
        alpha_v = -alpha_v
    return eps_v, alpha_v


@triton.jit
def _pgd_step_linf_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, numel, sample_numel,
                          eps: tl.float64, alpha: tl.float64, clip_lo: tl.float64,
                          clip_hi: tl.float64, eps_ptr, alpha_ptr,
                          EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                          TARGETED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
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

    sample = offsets // sample_numel
    eps_v, alpha_v = _radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                            ALPHA_PER_SAMPLE, TARGETED, mask)
    eps_v = eps_v.to(COMPUTE_DTYPE)
    alpha_v = alpha_v.to(COMPUTE_DTYPE)
    # alpha * sign(g) without a multiply; a NaN (or zero) gradient makes no move.
    step = tl.where(g > 0, alpha_v, tl.where(g < 0, -alpha_v, 0.0))
    stepped = x + step
    delta = stepped - x_nat
    delta = tl.where(delta < -eps_v, -eps_v, delta)
    delta = tl.where(delta > eps_v, eps_v, delta)
    result = _clamp_like_torch(x_nat + delta, _fp64(clip_lo).to(COMPUTE_DTYPE),
                               _fp64(clip_hi).to(COMPUTE_DTYPE), HAS_LO, HAS_HI)
    _store_result(out_ptr, offsets, result, mask)


@triton.jit
def _block_sums(x_ptr, grad_ptr, x_nat_ptr, offsets, mask, COMPUTE_DTYPE: tl.constexpr):
    # Each element's products in COMPUTE_DTYPE (d rounded to the input dtype, as in C++).
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    d = (x.to(COMPUTE_DTYPE) - tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE))
    d = d.to(x.dtype).to(COMPUTE_DTYPE)
    return g * g, d * g, d * d


@triton.jit
def _l2_coefficients(grad_sq, delta_dot_grad, delta_sq, eps, alpha, min_grad_sq):
    # l2_coefficients of pgd_math.h, in fp64. A norm that under- or overflowed (or is NaN) means
    # no move; the where()s keep the unselected branches free of 0*inf and x/0.
    moves = (grad_sq >= min_grad_sq) & (grad_sq > 0.0) & (grad_sq < float("inf"))
    grad_norm = tl.sqrt(tl.where(moves, grad_sq, 1.0))
    step_scale = tl.where(moves, alpha / grad_norm, 0.0)
    moved_sq = (2.0 * step_scale * tl.where(moves, delta_dot_grad, 0.0)
                + step_scale * step_scale * tl.where(moves, grad_sq, 0.0))
    stepped_sq = tl.where(moves, delta_sq + moved_sq, delta_sq)
    stepped_norm = tl.sqrt(tl.where(stepped_sq > 0.0, stepped_sq, 0.0))
    outside = stepped_norm > eps
    factor = tl.where(outside, eps / tl.where(outside, stepped_norm, 1.0), 1.0)
    return step_scale, factor


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
    result = _clamp_like_torch(x_nat + (stepped - x_nat) * factor.to(COMPUTE_DTYPE),
                               _fp64(clip_lo).to(COMPUTE_DTYPE), _fp64(clip_hi).to(COMPUTE_DTYPE),
                               HAS_LO, HAS_HI)
    _store_result(out_ptr, offsets, result, mask)


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
        gg, dg, dd = _block_sums(x_ptr, grad_ptr, x_nat_ptr, first + within,
                                 within < sample_numel, COMPUTE_DTYPE)
        grad_sq += gg
        delta_dot_grad += dg
        delta_sq += dd
    eps_v, alpha_v = _radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                            ALPHA_PER_SAMPLE, TARGETED, True)
    step_scale, factor = _l2_coefficients(
        tl.sum(grad_sq.to(tl.float64), axis=0), tl.sum(delta_dot_grad.to(tl.float64), axis=0),
        tl.sum(delta_sq.to(tl.float64), axis=0), eps_v, alpha_v, _fp64(min_grad_sq))
    for start in range(0, sample_numel, BLOCK):
        within = start + tl.arange(0, BLOCK)
        _l2_write(x_ptr, grad_ptr, x_nat_ptr, out_ptr, first + within, within < sample_numel,
                  step_scale, factor, clip_lo, clip_hi, HAS_LO, HAS_HI, COMPUTE_DTYPE)


@triton.jit
def _pgd_step_l2_sums_kernel(x_ptr, grad_ptr, x_nat_ptr, partials_ptr, sample_numel,
                             blocks_per_sample, COMPUTE_DTYPE: tl.constexpr,
                             WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    # Split pass 1: program (sample, block) writes its block's sums, in fp64.
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    within = block * BLOCK + tl.arange(0, BLOCK)
    gg, dg, dd = _block_sums(x_ptr, grad_ptr, x_nat_ptr, sample * sample_numel + within,
                             within < sample_numel, COMPUTE_DTYPE)
    tl.store(partials_ptr + pid * 3 + 0, tl.sum(gg.to(tl.float64), axis=0))
    tl.store(partials_ptr + pid * 3 + 1, tl.sum(dg.to(tl.float64), axis=0))
    tl.store(partials_ptr + pid * 3 + 2, tl.sum(dd.to(tl.float64), axis=0))


@triton.jit
def _pgd_step_l2_finalize_kernel(partials_ptr, coefficients_ptr, blocks_per_sample,
                                 eps: tl.float64, alpha: tl.float64, min_grad_sq: tl.float64,
                                 eps_ptr, alpha_ptr, EPS_PER_SAMPLE: tl.constexpr,
                                 ALPHA_PER_SAMPLE: tl.constexpr, TARGETED: tl.constexpr,
                                 PARTIALS_BLOCK: tl.constexpr):
    # One program per sample: its partials in a fixed order, then (step scale, factor).
    sample = tl.program_id(0).to(tl.int64)
    grad_sq = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    delta_dot_grad = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    delta_sq = tl.zeros([PARTIALS_BLOCK], dtype=tl.float64)
    for start in range(0, blocks_per_sample, PARTIALS_BLOCK):
        index = start + tl.arange(0, PARTIALS_BLOCK)
        keep = index < blocks_per_sample
        row = partials_ptr + (sample * blocks_per_sample + index) * 3
        grad_sq += tl.load(row + 0, mask=keep, other=0.0)
        delta_dot_grad += tl.load(row + 1, mask=keep, other=0.0)
        delta_sq += tl.load(row + 2, mask=keep, other=0.0)
    eps_v, alpha_v = _radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                            ALPHA_PER_SAMPLE, TARGETED, True)
    step_scale, factor = _l2_coefficients(tl.sum(grad_sq, axis=0), tl.sum(delta_dot_grad, axis=0),
                                          tl.sum(delta_sq, axis=0), eps_v, alpha_v, _fp64(min_grad_sq))
    tl.store(coefficients_ptr + sample * 2 + 0, step_scale)
    tl.store(coefficients_ptr + sample * 2 + 1, factor)


@triton.jit
def _pgd_step_l2_apply_kernel(x_ptr, grad_ptr, x_nat_ptr, out_ptr, coefficients_ptr,
                              sample_numel, blocks_per_sample, clip_lo: tl.float64,
                              clip_hi: tl.float64, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                              COMPUTE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
                              BLOCK: tl.constexpr):
    # Split pass 2: program (sample, block) writes its block with the sample's coefficients.
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    step_scale = tl.load(coefficients_ptr + sample * 2 + 0)
    factor = tl.load(coefficients_ptr + sample * 2 + 1)
    within = block * BLOCK + tl.arange(0, BLOCK)
    _l2_write(x_ptr, grad_ptr, x_nat_ptr, out_ptr, sample * sample_numel + within,
              within < sample_numel, step_scale, factor, clip_lo, clip_hi, HAS_LO, HAS_HI,
              COMPUTE_DTYPE)


def _needs_int64(largest_offset: int) -> bool:
    """Offsets are computed in int32 unless one (with a block's slack) may pass 2**31 - 1."""
    return largest_offset >= 2**31


def _launch_device(t: torch.Tensor):
    """Launch on t's device: Triton launches on the current one, which may be another GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _programs_in_flight(device: torch.device) -> int:
    """About how many programs the device runs at once (a few per SM)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _smallest_reliable_grad_sq(sample_numel: int, fp64: bool) -> float:
    """pgd_math.h's smallest_reliable_grad_sq: below it, a sample makes no L2 move."""
    return sample_numel * torch.finfo(torch.float64 if fp64 else torch.float32).tiny


def _writes_in_place(out: torch.Tensor, operands) -> bool:
    """Whether the kernels may write into out directly: the operands' strides, dense, and
    either the very memory of an operand (each element is read before it is written) or none
    of it. A partial overlap would let one sample's write clobber another's input."""
    def memory(t):
        start = t.data_ptr()
        return start, start + t.numel() * t.element_size()

    lies_alike = out.stride() == operands[0].stride() and is_non_overlapping_and_dense(out)
    out_start, out_end = memory(out)
    for name, operand in zip(("x_adv", "grad", "x_nat"), operands):
        start, end = memory(operand)
        if out_end <= start or end <= out_start:
            continue
        if not (start == out_start and operand.stride() == out.stride() and lies_alike):
            raise RuntimeError(f"pgd_step: out partially overlaps {name} (it may be the very "
                               "same tensor, or share no memory with it)")
    return lies_alike


def pgd_step_triton(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: float,
                    alpha: float, eps_per_sample: Optional[torch.Tensor],
                    alpha_per_sample: Optional[torch.Tensor], norm: str,
                    clip_min: Optional[float], clip_max: Optional[float],
                    targeted: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One PGD step (see robust_fast.pgd_step), arguments already validated by robust_fast.ops.pgd.

    eps_per_sample / alpha_per_sample: float64 tensors of shape (B,) on the operands' device, or
    None for the floats. out: written directly when it has the operands' layout (it may be
    x_adv itself), else through a temporary. Only out is modified.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"pgd_step_triton: norm must be 'linf' or 'l2', got {norm!r}")
    if not walks_as_it_lies(x_adv, grad, x_nat):
        x_adv, grad, x_nat = x_adv.contiguous(), grad.contiguous(), x_nat.contiguous()
    if out is None:
        result = torch.empty_like(x_adv)  # the operands' strides, as run_pgd_step in C++
    elif out.numel() == 0 or _writes_in_place(out, (x_adv, grad, x_nat)):
        result = out
    else:
        out.copy_(pgd_step_triton(x_adv, grad, x_nat, eps, alpha, eps_per_sample,
                                  alpha_per_sample, norm, clip_min, clip_max, targeted))
        return out
    batch = x_adv.shape[0]
    numel = x_adv.numel()
    if batch == 0 or numel == 0:
        return result
    with _launch_device(x_adv):
        _launch(x_adv, grad, x_nat, result, eps, alpha, eps_per_sample, alpha_per_sample, norm,
                clip_min, clip_max, targeted)
    return result


def _launch(x_adv, grad, x_nat, out, eps, alpha, eps_per_sample, alpha_per_sample, norm,
            clip_min, clip_max, targeted) -> None:
    batch, numel = x_adv.shape[0], x_adv.numel()
    sample_numel = numel // batch
    fp64 = x_adv.dtype == torch.float64
    inf = float("inf")
    # Unused pointers still need a tensor argument.
    radii = dict(eps=float(eps), alpha=float(alpha),
                 eps_ptr=out if eps_per_sample is None else eps_per_sample,
                 alpha_ptr=out if alpha_per_sample is None else alpha_per_sample,
                 EPS_PER_SAMPLE=eps_per_sample is not None,
                 ALPHA_PER_SAMPLE=alpha_per_sample is not None, TARGETED=bool(targeted))
    box = dict(clip_lo=-inf if clip_min is None else float(clip_min),
               clip_hi=inf if clip_max is None else float(clip_max),
               HAS_LO=clip_min is not None, HAS_HI=clip_max is not None)
    compute_dtype = tl.float64 if fp64 else tl.float32

    if norm == "linf":
        grid = (triton.cdiv(numel, LINF_BLOCK),)
        _pgd_step_linf_kernel[grid](x_adv, grad, x_nat, out, numel, sample_numel, **radii, **box,
                                    COMPUTE_DTYPE=compute_dtype,
                                    WIDE_INDEX=_needs_int64(numel + LINF_BLOCK), BLOCK=LINF_BLOCK)
        return

    min_grad_sq = _smallest_reliable_grad_sq(sample_numel, fp64)
    block = min(L2_MAX_BLOCK, max(L2_MIN_BLOCK, triton.next_power_of_2(sample_numel)))
    blocks_per_sample = triton.cdiv(sample_numel, block)
    if blocks_per_sample == 1 or batch >= _programs_in_flight(x_adv.device):
        _pgd_step_l2_sample_kernel[(batch,)](
            x_adv, grad, x_nat, out, sample_numel, min_grad_sq=min_grad_sq, **radii, **box,
            COMPUTE_DTYPE=compute_dtype, WIDE_INDEX=_needs_int64(numel + block), BLOCK=block)
        return
    partials = torch.empty((batch, blocks_per_sample, 3), device=x_adv.device, dtype=torch.float64)
    coefficients = torch.empty((batch, 2), device=x_adv.device, dtype=torch.float64)
    grid = (batch * blocks_per_sample,)
    wide = _needs_int64(max(numel + block, partials.numel()))
    _pgd_step_l2_sums_kernel[grid](x_adv, grad, x_nat, partials, sample_numel, blocks_per_sample,
                                   COMPUTE_DTYPE=compute_dtype, WIDE_INDEX=wide, BLOCK=block)
    _pgd_step_l2_finalize_kernel[(batch,)](partials, coefficients, blocks_per_sample,
                                           min_grad_sq=min_grad_sq, **radii,
                                           PARTIALS_BLOCK=PARTIALS_BLOCK)
    _pgd_step_l2_apply_kernel[grid](x_adv, grad, x_nat, out, coefficients, sample_numel,
                                    blocks_per_sample, **box, COMPUTE_DTYPE=compute_dtype,
                                    WIDE_INDEX=wide, BLOCK=block)

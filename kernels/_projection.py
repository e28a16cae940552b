"""What the Triton kernels of pgd_step and apgd_step share: the per-element expressions of
csrc/include/robust_fast/pgd_math.h (the box, the radii, the L2 sums and coefficients, the
store), and the one launcher of their kernels.

A radius (eps, alpha, eta) reaches a launcher as the ops hold it: a float, or a float64 (B,)
tensor on the operands' device. A kernel takes it as an fp64 scalar (annotated tl.float64; a
plain Python float would reach a compiled kernel as fp32), a pointer, and a constexpr saying
which of the two to read.
"""
import torch
import triton
import triton.language as tl

from ._common import accumulation_dtype, program_index, tl_accumulation_dtype

LINF_BLOCK = 1024
L2_MAX_BLOCK = 1024
L2_MIN_BLOCK = 128
PARTIALS_BLOCK = 128  # partial sums a finalize program adds at a time
INTERPRETER_PROGRAMS = 8  # "the device's width" under the interpreter, where there is no device


@triton.jit
def clamp_like_torch(value, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    # torch.clamp: max with lo, then min with hi; a NaN stays NaN.
    if HAS_LO:
        value = tl.where(value < lo, lo, value)
    if HAS_HI:
        value = tl.where(value > hi, hi, value)
    return value


@triton.jit
def clamp_to_radius(delta, radius):
    # linf_project of pgd_math.h: the difference clamped to [-radius, radius].
    delta = tl.where(delta < -radius, -radius, delta)
    return tl.where(delta > radius, radius, delta)


@triton.jit
def fp32_to_bf16_rne(value):
    # Round to nearest even by hand (as c10::round_to_nearest_even): a GPU's cast does the same,
    # while the interpreter's fp32 -> bf16 cast truncates.
    bits = value.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = tl.where(value != value, bits | 0x400000, rounded)  # a NaN stays a quiet NaN
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_result(out_ptr, offsets, result, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + offsets, fp32_to_bf16_rne(result), mask=mask)
    else:
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def as_fp64(value):
    # A scalar argument in fp64. Compiled, it already is one (annotated tl.float64); the
    # interpreter passes a Python float, which tl.cast would round through fp32 on the way.
    return tl.full([], value, tl.float64)


@triton.jit
def sample_radius(sample, value, ptr, PER_SAMPLE: tl.constexpr, mask):
    # A radius of `sample` (a scalar or a block of indices) in fp64.
    radius = as_fp64(value)
    if PER_SAMPLE:
        radius = tl.load(ptr + sample, mask=mask, other=0.0)
    return radius


@triton.jit
def block_sums(x_ptr, grad_ptr, x_nat_ptr, offsets, mask, COMPUTE_DTYPE: tl.constexpr):
    # Each element's products in COMPUTE_DTYPE (d rounded to the input dtype, as in C++).
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    d = (x.to(COMPUTE_DTYPE) - tl.load(x_nat_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE))
    d = d.to(x.dtype).to(COMPUTE_DTYPE)
    return g * g, d * g, d * d


@triton.jit
def l2_coefficients(grad_sq, delta_dot_grad, delta_sq, eps, alpha, min_grad_sq):
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


def needs_int64(largest_offset: int) -> bool:
    """Offsets are computed in int32 unless one (with a block's slack) may pass 2**31 - 1."""
    return largest_offset >= 2**31


def l2_block(sample_numel: int) -> int:
    """The block a program walks one sample with."""
    return min(L2_MAX_BLOCK, max(L2_MIN_BLOCK, triton.next_power_of_2(sample_numel)))


def radius_arguments(name: str, radius, placeholder: torch.Tensor) -> dict:
    """A radius as a kernel's three arguments: name (fp64 scalar), name_ptr and
    NAME_PER_SAMPLE. Unused pointers still need a tensor argument: placeholder."""
    per_sample = isinstance(radius, torch.Tensor)
    return {name: 0.0 if per_sample else float(radius),
            f"{name}_ptr": radius if per_sample else placeholder,
            f"{name.upper()}_PER_SAMPLE": per_sample}


def box_arguments(clip_min, clip_max) -> dict:
    """The box as a kernel's arguments: clip_lo, clip_hi (fp64, +-inf where open), HAS_LO, HAS_HI."""
    inf = float("inf")
    return dict(clip_lo=-inf if clip_min is None else float(clip_min),
                clip_hi=inf if clip_max is None else float(clip_max),
                HAS_LO=clip_min is not None, HAS_HI=clip_max is not None)


def launch(kernel, x: torch.Tensor, *, clip_min, clip_max, per_sample: bool = False,
           **arguments) -> None:
    """Launches a step kernel over x's batch with the arguments every one of them takes:
    sample_numel, the box (box_arguments), COMPUTE_DTYPE (the accumulation dtype), WIDE_INDEX
    and BLOCK. One program per LINF_BLOCK elements (which also gets numel), or, with
    per_sample, one per sample (which also gets min_grad_sq). The caller has made x's device
    current (on_device_of); an empty batch launches nothing."""
    batch, numel = x.shape[0], x.numel()
    if batch == 0 or numel == 0:
        return
    sample_numel = numel // batch
    if per_sample:
        block = l2_block(sample_numel)
        grid = (batch,)
        arguments.update(min_grad_sq=smallest_reliable_grad_sq(sample_numel, x.dtype))
    else:
        block = LINF_BLOCK
        grid = (triton.cdiv(numel, block),)
        arguments.update(numel=numel)
    kernel[grid](sample_numel=sample_numel, **box_arguments(clip_min, clip_max),
                 COMPUTE_DTYPE=tl_accumulation_dtype(x.dtype),
                 WIDE_INDEX=needs_int64(numel + block), BLOCK=block, **arguments)


def smallest_reliable_grad_sq(sample_numel: int, dtype: torch.dtype) -> float:
    """pgd_math.h's smallest_reliable_grad_sq: below it, a sample makes no L2 move."""
    return sample_numel * torch.finfo(accumulation_dtype(dtype)).tiny


@triton.jit
def signed_radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE: tl.constexpr,
                  ALPHA_PER_SAMPLE: tl.constexpr, TARGETED: tl.constexpr, mask):
    # eps and alpha of `sample` in fp64; alpha carries the sign of the step.
    alpha_v = sample_radius(sample, alpha, alpha_ptr, ALPHA_PER_SAMPLE, mask)
    if TARGETED:
        alpha_v = -alpha_v
    return sample_radius(sample, eps, eps_ptr, EPS_PER_SAMPLE, mask), alpha_v


# --- the split L2 path: few samples larger than a block, each spread over programs

@triton.jit
def l2_partial_sums_kernel(x_ptr, grad_ptr, x_nat_ptr, partials_ptr, sample_numel,
                             blocks_per_sample, COMPUTE_DTYPE: tl.constexpr,
                             WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    # Split pass 1 of an L2 step: program (sample, block) writes its block's sums, in fp64.
    pid = program_index(WIDE_INDEX)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    within = block * BLOCK + tl.arange(0, BLOCK)
    gg, dg, dd = block_sums(x_ptr, grad_ptr, x_nat_ptr, sample * sample_numel + within,
                             within < sample_numel, COMPUTE_DTYPE)
    tl.store(partials_ptr + pid * 3 + 0, tl.sum(gg.to(tl.float64), axis=0))
    tl.store(partials_ptr + pid * 3 + 1, tl.sum(dg.to(tl.float64), axis=0))
    tl.store(partials_ptr + pid * 3 + 2, tl.sum(dd.to(tl.float64), axis=0))


@triton.jit
def l2_coefficients_kernel(partials_ptr, coefficients_ptr, blocks_per_sample,
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
    eps_v, alpha_v = signed_radii(sample, eps, alpha, eps_ptr, alpha_ptr, EPS_PER_SAMPLE,
                                   ALPHA_PER_SAMPLE, TARGETED, True)
    step_scale, factor = l2_coefficients(tl.sum(grad_sq, axis=0), tl.sum(delta_dot_grad, axis=0),
                                          tl.sum(delta_sq, axis=0), eps_v, alpha_v, as_fp64(min_grad_sq))
    tl.store(coefficients_ptr + sample * 2 + 0, step_scale)
    tl.store(coefficients_ptr + sample * 2 + 1, factor)


@triton.jit
def split_piece(coefficients_ptr, blocks_per_sample, WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    # A later split pass's program (sample, block): its index, its sample, its elements' offsets
    # within the sample, and the sample's (step scale, factor) the coefficients pass wrote.
    pid = program_index(WIDE_INDEX)
    sample = pid // blocks_per_sample
    within = (pid - sample * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    step_scale = tl.load(coefficients_ptr + sample * 2 + 0)
    factor = tl.load(coefficients_ptr + sample * 2 + 1)
    return pid, sample, within, step_scale, factor


def programs_in_flight(device: torch.device) -> int:
    """About how many programs the device runs at once (a few per SM)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def split_l2(batch: int, blocks_per_sample: int, device: torch.device) -> bool:
    """Whether an L2 step spreads each sample over programs: when a sample spans several blocks
    and the batch alone would leave most of the device idle."""
    return blocks_per_sample > 1 and batch < programs_in_flight(device)

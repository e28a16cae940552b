"""Triton kernel of the multi-teacher loss (robust_fast.kernels.multi_teacher_loss), with the
semantics of robust_fast/reference/multi_teacher_loss.py and the row math of
csrc/include/robust_fast/multi_teacher_loss_math.h.

One program per sample: for each of its K teachers, pass 1 sums over the row in blocks of BLOCK
(the kind's sums; for kl the maxima, then the sums of exponentials), the row's loss and gradient
coefficients follow, and pass 2 writes the gradient (a shared (B, D) student's gradient summed
over the teachers in the accumulation dtype, in place, by the program that owns the sample).
Sums and the gradient run in float32 (float64 for float64 inputs). No atomics: deterministic.

The launchers return what the C++ ops return (multi_teacher_loss_triton as
torch.ops.robust_fast.multi_teacher_loss, _multi_teacher_loss_backward_triton as
_multi_teacher_loss_backward); robust_fast/ops/multi_teacher_loss.py validates the arguments,
gives every row a unit stride, and owns the autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import accumulation_dtype, on_device_of, tl_accumulation_dtype
from ._projection import as_fp64

KIND_CODES = {"cosine": 0, "l2": 1, "l2_normalized": 2, "l1": 3, "mse": 4, "kl": 5}
MAX_BLOCK = 1024
MIN_BLOCK = 16
COSINE_EPS = 1e-8


@triton.jit
def _multi_teacher_loss_kernel(s_ptr, t_ptr, coef_ptr, rows_ptr, gs_ptr, gt_ptr,
                               temperature: tl.float64, B, K, D, s_stride_b, s_stride_k, t_stride_k, t_stride_b,
                               KIND: tl.constexpr, SHARED: tl.constexpr, HAS_ROWS: tl.constexpr,
                               STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                               ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # A scalar argument (fp64): no tensor to copy to the device per call.
    temperature = as_fp64(temperature).to(ACC)
    inv_t = 1.0 / temperature
    cols = tl.arange(0, BLOCK)
    for k32 in range(K):
        k = tl.full([], k32, tl.int64)  # k * t_stride_k and k * B pass 2**31 for large teacher stacks
        s_row = s_ptr + b * s_stride_b + k * s_stride_k
        t_row = t_ptr + k * t_stride_k + b * t_stride_b
        if SHARED:
            gs_row = gs_ptr + b * D
        else:
            gs_row = gs_ptr + (b * K + k) * D
        gt_row = gt_ptr + (k * B + b) * D
        coef = 0.0
        if STUDENT_GRAD or TEACHER_GRAD:
            coef = tl.load(coef_ptr + b * K + k).to(ACC)
        if KIND == 5:
            # kl: maxima, sums of exponentials, then KL and the student's gradient, then the teacher's.
            max_s_v = tl.full([BLOCK], float("-inf"), ACC)
            max_t_v = tl.full([BLOCK], float("-inf"), ACC)
            for start in range(0, D, BLOCK):
                m = start + cols < D
                s = tl.load(s_row + start + cols, mask=m, other=float("-inf")).to(ACC)
                t = tl.load(t_row + start + cols, mask=m, other=float("-inf")).to(ACC)
                max_s_v = tl.maximum(max_s_v, s)
                max_t_v = tl.maximum(max_t_v, t)
            max_s = tl.max(max_s_v, axis=0)
            max_t = tl.max(max_t_v, axis=0)
            zs_v = tl.zeros([BLOCK], ACC)
            zt_v = tl.zeros([BLOCK], ACC)
            for start in range(0, D, BLOCK):
                m = start + cols < D
                s = tl.load(s_row + start + cols, mask=m, other=0.0).to(ACC)
                t = tl.load(t_row + start + cols, mask=m, other=0.0).to(ACC)
                zs_v += tl.where(m, tl.exp((s - max_s) * inv_t), 0.0)
                zt_v += tl.where(m, tl.exp((t - max_t) * inv_t), 0.0)
            sum_s = tl.sum(zs_v, axis=0)
            sum_t = tl.sum(zt_v, axis=0)
            shift = tl.log(sum_s) - tl.log(sum_t)
            inv_zs = 1.0 / sum_s
            inv_zt = 1.0 / sum_t
            scale = coef * temperature
            kl_v = tl.zeros([BLOCK], ACC)
            for start in range(0, D, BLOCK):
                m = start + cols < D
                s = tl.load(s_row + start + cols, mask=m, other=0.0).to(ACC)
                t = tl.load(t_row + start + cols, mask=m, other=0.0).to(ACC)
                e_t = tl.exp((t - max_t) * inv_t)
                diff = ((t - max_t) - (s - max_s)) * inv_t + shift
                kl_v += tl.where(m, e_t * inv_zt * diff, 0.0)
                if STUDENT_GRAD:
                    e_s = tl.exp((s - max_s) * inv_t)
                    g = scale * (e_s * inv_zs - e_t * inv_zt)
                    if SHARED:  # teacher k > 0: add to the gradient of the teachers before
                        g += tl.load(gs_row + start + cols, mask=m & (k32 > 0), other=0.0).to(ACC)
                    tl.store(gs_row + start + cols, g.to(gs_ptr.dtype.element_ty), mask=m)
            kl = tl.sum(kl_v, axis=0)
            loss = temperature * temperature * kl
            if TEACHER_GRAD:
                for start in range(0, D, BLOCK):
                    m = start + cols < D
                    s = tl.load(s_row + start + cols, mask=m, other=0.0).to(ACC)
                    t = tl.load(t_row + start + cols, mask=m, other=0.0).to(ACC)
                    e_t = tl.exp((t - max_t) * inv_t)
                    diff = ((t - max_t) - (s - max_s)) * inv_t + shift
                    g = scale * e_t * inv_zt * (diff - kl)
                    tl.store(gt_row + start + cols, g.to(gt_ptr.dtype.element_ty), mask=m)
        else:
            xs = tl.zeros([BLOCK], ACC)
            ys = tl.zeros([BLOCK], ACC)
            zs = tl.zeros([BLOCK], ACC)
            for start in range(0, D, BLOCK):
                m = start + cols < D
                s = tl.load(s_row + start + cols, mask=m, other=0.0).to(ACC)
                t = tl.load(t_row + start + cols, mask=m, other=0.0).to(ACC)
                d = s - t
                if KIND == 0:
                    xs += s * s
                    ys += t * t
                    zs += s * t
                elif KIND == 2:
                    xs += d * d
                    ys += t * t
                elif KIND == 3:
                    xs += tl.abs(d)
                else:
                    xs += d * d
            x = tl.sum(xs, axis=0)
            y = tl.sum(ys, axis=0)
            z = tl.sum(zs, axis=0)
            # grad_s = gs_s s + gs_t t + gs_d d, grad_t = gt_s s + gt_t t + gt_d d (as the C++ finalize)
            gs_s = 0.0
            gs_t = 0.0
            gs_d = 0.0
            gt_s = 0.0
            gt_t = 0.0
            if KIND == 0:
                ns = tl.sqrt(x)
                nt = tl.sqrt(y)
                # max(norm, eps) keeping a NaN norm NaN (tl.maximum may drop it), as the C++ math.
                ns_c = tl.where(ns > COSINE_EPS, ns, tl.where(ns != ns, ns, COSINE_EPS))
                nt_c = tl.where(nt > COSINE_EPS, nt, tl.where(nt != nt, nt, COSINE_EPS))
                inv = 1.0 / (ns_c * nt_c)
                cosine = z * inv
                loss = 1.0 - cosine
                gs_t = -coef * inv
                gs_s = tl.where(ns > 0, coef * cosine / (ns_c * tl.where(ns > 0, ns, 1.0)), 0.0)
                gt_s = -coef * inv
                gt_t = tl.where(nt > 0, coef * cosine / (nt_c * tl.where(nt > 0, nt, 1.0)), 0.0)
            elif KIND == 1:
                n = tl.sqrt(x)
                loss = n
                gs_d = tl.where(n == 0, 0.0, coef / tl.where(n == 0, 1.0, n))  # a NaN row stays NaN
            elif KIND == 2:
                n = tl.sqrt(x)
                nt = tl.sqrt(y)
                loss = n / nt
                gs_d = tl.where(n == 0, 0.0, coef / (tl.where(n == 0, 1.0, n) * nt))
                gt_t = -coef * loss / (nt * nt)
            elif KIND == 3:
                loss = x
                gs_d = coef
            else:
                loss = x / D
                gs_d = 2.0 * coef / D
            if STUDENT_GRAD or TEACHER_GRAD:
                for start in range(0, D, BLOCK):
                    m = start + cols < D
                    s = tl.load(s_row + start + cols, mask=m, other=0.0).to(ACC)
                    t = tl.load(t_row + start + cols, mask=m, other=0.0).to(ACC)
                    d = s - t
                    if KIND == 3:
                        d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(ACC)
                    if STUDENT_GRAD:
                        if KIND == 0:
                            g = gs_s * s + gs_t * t
                        else:
                            g = gs_d * d
                        if SHARED:
                            g += tl.load(gs_row + start + cols, mask=m & (k32 > 0), other=0.0).to(ACC)
                        tl.store(gs_row + start + cols, g.to(gs_ptr.dtype.element_ty), mask=m)
                    if TEACHER_GRAD:
                        if KIND == 0:
                            g_t = gt_s * s + gt_t * t
                        elif KIND == 2:
                            g_t = -gs_d * d + gt_t * t
                        else:
                            g_t = -gs_d * d
                        tl.store(gt_row + start + cols, g_t.to(gt_ptr.dtype.element_ty), mask=m)
        if HAS_ROWS:
            tl.store(rows_ptr + b * K + k, loss.to(rows_ptr.dtype.element_ty))


def _launch(student, teachers, coef, want_rows, student_grad, teacher_grad, kind, temperature):
    """(row_losses or None, grad_student or None, grad_teachers or None). Rows have a unit stride."""
    count, batch, dim = teachers.shape
    shared = student.dim() == 2
    acc = accumulation_dtype(student.dtype)
    rows = torch.empty((batch, count), dtype=acc, device=student.device) if want_rows else None
    # A shared student's gradient sums over the teachers: in the accumulation dtype.
    gs_dtype = acc if (shared and count > 1) else student.dtype
    gs = torch.empty(student.shape, dtype=gs_dtype, device=student.device) if student_grad else None
    gt = torch.empty(teachers.shape, dtype=teachers.dtype, device=teachers.device) if teacher_grad else None
    if batch > 0 and count > 0:
        placeholder = student  # an unused pointer argument still needs a tensor
        block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(dim)))
        with on_device_of(student):
            _multi_teacher_loss_kernel[(batch,)](
                student, teachers, coef if coef is not None else placeholder,
                rows if rows is not None else placeholder, gs if gs is not None else placeholder,
                gt if gt is not None else placeholder, float(temperature),
                batch, count, dim, student.stride(0), 0 if shared else student.stride(1),
                teachers.stride(0), teachers.stride(1),
                KIND=KIND_CODES[kind], SHARED=shared, HAS_ROWS=want_rows, STUDENT_GRAD=student_grad,
                TEACHER_GRAD=teacher_grad, ACC=tl_accumulation_dtype(student.dtype), BLOCK=block)
    if gs is not None and gs.dtype != student.dtype:
        gs = gs.to(student.dtype)
    return rows, gs, gt


def multi_teacher_loss_triton(student: torch.Tensor, teachers: torch.Tensor,
                              weights: Optional[torch.Tensor], kind: str, temperature: float,
                              reduction: str, student_grad: bool, teacher_grad: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What torch.ops.robust_fast.multi_teacher_loss returns, computed by the Triton kernel:
    (loss, row_losses, grad_student, grad_teachers). Rows with a unit stride (robust_fast.ops
    packs any other)."""
    count, batch, _ = teachers.shape
    acc = accumulation_dtype(student.dtype)
    w = None if weights is None else weights.to(acc).expand(batch, count)
    reduced = reduction != "none"
    scale = 1.0 / batch if reduction == "mean" and batch > 0 else 1.0
    coef = None
    if reduced and (student_grad or teacher_grad):
        coef = (w * scale).contiguous() if w is not None else torch.full(
            (batch, count), scale, dtype=acc, device=student.device)
    rows, gs, gt = _launch(student, teachers, coef, True, reduced and student_grad,
                           reduced and teacher_grad, kind, temperature)
    weighted = rows * w if w is not None else rows
    if reduction == "none":
        loss = weighted.clone() if w is None else weighted  # never the rows tensor itself
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.sum(1).mean()
    empty = student.new_empty((0,))
    return (loss.to(student.dtype), rows, gs if gs is not None else empty,
            gt if gt is not None else teachers.new_empty((0,)))


def _multi_teacher_loss_backward_triton(grad_rows: torch.Tensor, student: torch.Tensor,
                                        teachers: torch.Tensor, kind: str, temperature: float,
                                        student_grad: bool, teacher_grad: bool
                                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """What torch.ops.robust_fast._multi_teacher_loss_backward returns."""
    coef = grad_rows.to(accumulation_dtype(student.dtype)).contiguous()
    _, gs, gt = _launch(student, teachers, coef, False, student_grad, teacher_grad, kind, temperature)
    return (gs if gs is not None else student.new_empty((0,)),
            gt if gt is not None else teachers.new_empty((0,)))


"""robust_fast.multi_teacher_loss: a student's rows against K teachers' rows, fused.

One pass over each student row and its K teacher rows gives the per-(sample, teacher) losses
and, when the student requires grad, the gradient of the reduced loss (Liger-Kernel's trick):
backward then only scales the saved gradient by the upstream gradient. Reduction "none" (whose
upstream gradient is only known in backward) computes the gradients in backward, by the same
kernel, from the (B, K) upstream gradient.

This file owns the op: the checks, the layout (rows with a unit stride), the dispatch, the
fake kernels of the C++ op (torch.ops.robust_fast.multi_teacher_loss, and its backward
_multi_teacher_loss_backward) and its autograd, defined once (_save, backward) and registered
on the op. Eager calls on either backend (C++, or the Triton launchers of
kernels/multi_teacher_loss.py) enter that same autograd through _EagerLoss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from robust_fast import _backend, _build
from robust_fast._checks import check_choice, check_floating_tensor, check_positive_finite
from robust_fast._layout import unit_stride_rows
from robust_fast._profiling import op_range
from robust_fast.reference.multi_teacher_loss import KINDS, REDUCTIONS, multi_teacher_loss_reference

OP = "multi_teacher_loss"
# torch's own guard for calling an op from inside its autograd (a no-op where it is missing).
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)
Teachers = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------
# arguments

def _stack_teachers(teachers: Teachers, needs_grad: bool) -> torch.Tensor:
    """A (K, B, D) tensor. A list of (B, D) tensors that are equally spaced views of one storage
    (the slices of a stacked tensor) becomes a strided view of it, not a copy."""
    if isinstance(teachers, torch.Tensor):
        check_floating_tensor("teachers", teachers, OP)
        if teachers.dim() != 3:
            raise ValueError(f"{OP}: teachers as a tensor must be (K, B, D), got {tuple(teachers.shape)}")
        return teachers
    if not isinstance(teachers, (list, tuple)) or len(teachers) == 0:
        raise TypeError(f"{OP}: teachers must be a (K, B, D) tensor or a non-empty list of (B, D) "
                        f"tensors, got {type(teachers).__name__}")
    for k, t in enumerate(teachers):
        check_floating_tensor(f"teachers[{k}]", t, OP)
        if t.dim() != 2:
            raise ValueError(f"{OP}: teachers[{k}] must be (B, D), got {tuple(t.shape)}")
        if t.shape != teachers[0].shape:
            raise ValueError(f"{OP}: teachers[{k}] has shape {tuple(t.shape)}, teachers[0] "
                             f"{tuple(teachers[0].shape)}: every teacher must be (B, D)")
        if t.device != teachers[0].device:
            raise ValueError(f"{OP}: teachers[{k}] is on {t.device}, teachers[0] on {teachers[0].device}")
        if t.dtype != teachers[0].dtype:
            raise TypeError(f"{OP}: teachers[{k}] has dtype {t.dtype}, teachers[0] {teachers[0].dtype}")
    first = teachers[0]
    if len(teachers) == 1:
        return first.unsqueeze(0)
    if not needs_grad and not torch.compiler.is_compiling():
        offsets = [t.storage_offset() for t in teachers]
        step = offsets[1] - offsets[0]
        same_storage = all(t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                           and t.stride() == first.stride() for t in teachers)
        if same_storage and step >= 0 and all(b - a == step for a, b in zip(offsets, offsets[1:])):
            return first.as_strided((len(teachers),) + tuple(first.shape), (step,) + first.stride(),
                                    first.storage_offset())
    return torch.stack(list(teachers))


def _check_weights(weights, batch: int, count: int, device: torch.device) -> Optional[torch.Tensor]:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{OP}: weights must be None or a tensor of shape ({count},) or "
                        f"({batch}, {count}), got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{OP}: weights must have a floating-point dtype, got {weights.dtype}")
    if tuple(weights.shape) not in ((count,), (batch, count)):
        raise ValueError(f"{OP}: weights must have shape ({count},) (per teacher) or ({batch}, {count}) "
                         f"(per sample and teacher), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"{OP}: weights must be on the student's device {device}, got {weights.device}")
    # A value check reads the tensor: only where that costs no host-device synchronisation.
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():
        detached = weights.detach()
        if bool(torch.isnan(detached).any()) or bool((detached < 0).any()):
            raise ValueError(f"{OP}: weights must be >= 0 and not NaN")
    return weights


# --------------------------------------------------------------------------------------------
# the public function

def multi_teacher_loss(student: torch.Tensor, teachers: Teachers, *,
                       weights: Optional[torch.Tensor] = None, kind: str = "cosine",
                       temperature: float = 1.0, reduction: str = "mean",
                       backend: Optional[str] = None) -> torch.Tensor:
    """The student's distance to K teachers, per sample and teacher, weighted and reduced.

    student: (B, D), or (B, K, D) when each teacher has its own slice of the student's output.
    teachers: a (K, B, D) tensor, or a list of K (B, D) tensors.
    weights: None (each teacher 1), (K,) per teacher, or (B, K) per sample and teacher.
    kind (s the student row, t the teacher row):
      "cosine" 1 - cos(s, t) (F.cosine_similarity, eps 1e-8); "l2" ||s - t||;
      "l2_normalized" ||s - t|| / ||t||; "l1" ||s - t||_1; "mse" mean_D (s - t)^2;
      "kl" T^2 KL(softmax(t/T) || softmax(s/T)).
    reduction: "mean" (over samples of the weighted sum over teachers), "sum", or "none"
    (the (B, K) weighted losses).
    Differentiable in student and teachers (a teacher's gradient is computed only when it
    requires grad) and in weights. fp16/bf16 inputs accumulate in float32; the loss has the
    student's dtype (mixed student/teacher dtypes are promoted).
    backend: "auto", "cpp", "triton" or "reference" (see robust_fast.use_backend).
    """
    check_floating_tensor("student", student, OP)
    if student.dim() not in (2, 3):
        raise ValueError(f"{OP}: student must be (B, D) or (B, K, D), got {tuple(student.shape)}")
    grad_on = torch.is_grad_enabled()
    teachers_need_grad = grad_on and (
        teachers.requires_grad if isinstance(teachers, torch.Tensor)
        else isinstance(teachers, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                         for t in teachers))
    teachers = _stack_teachers(teachers, teachers_need_grad)
    count, batch, dim = teachers.shape
    if teachers.device != student.device:
        raise ValueError(f"{OP}: teachers must be on the student's device {student.device}, "
                         f"got {teachers.device}")
    if student.shape[0] != batch:
        raise ValueError(f"{OP}: student has {student.shape[0]} samples (B), teachers {batch}")
    if student.shape[-1] != dim:
        raise ValueError(f"{OP}: student rows have D={student.shape[-1]}, teachers D={dim}")
    if student.dim() == 3 and student.shape[1] != count:
        raise ValueError(f"{OP}: student (B, K, D) has K={student.shape[1]} slices, teachers K={count}")
    if count == 0:
        raise ValueError(f"{OP}: teachers must hold at least one teacher (K >= 1)")
    if dim == 0:
        raise ValueError(f"{OP}: rows must have D >= 1 features")
    kind = check_choice("kind", kind, KINDS, OP)
    reduction = check_choice("reduction", reduction, REDUCTIONS, OP)
    temperature = check_positive_finite("temperature", temperature, OP)
    weights = _check_weights(weights, batch, count, student.device)
    if student.dtype != teachers.dtype:  # e.g. bf16 features under autocast, fp32 cached teachers
        common = torch.promote_types(student.dtype, teachers.dtype)
        student, teachers = student.to(common), teachers.to(common)

    chosen = _backend.resolve(backend, student.device.type)
    with op_range(OP):
        if chosen == "cpp":
            launchers = _cpp_launchers
        elif chosen == "triton":
            student, teachers = unit_stride_rows(student), unit_stride_rows(teachers)
            kernels = _backend.triton_kernels(OP)
            launchers = (kernels.multi_teacher_loss_triton, kernels._multi_teacher_loss_backward_triton)
        else:
            return multi_teacher_loss_reference(student, teachers, weights=weights, kind=kind,
                                                temperature=temperature, reduction=reduction)
        student_grad = grad_on and student.requires_grad
        teacher_grad = teachers_need_grad
        args = (student, teachers, weights, kind, temperature, reduction, student_grad, teacher_grad)
        if chosen == "cpp" and torch.compiler.is_compiling():
            return _cpp_op(*args)[0]  # traced through the op's fake kernel and registered autograd
        if student_grad or teacher_grad or (grad_on and weights is not None and weights.requires_grad):
            return _EagerLoss.apply(*args, launchers)
        with _below_autograd():  # nothing to differentiate: straight to the kernel
            return launchers[0](*args)[0]


# --------------------------------------------------------------------------------------------
# autograd: defined once (_save, backward) for every backend and route

def _save(ctx, inputs, output, backward_rows: Callable) -> None:
    """Keeps what backward reads. backward_rows is the backend's _multi_teacher_loss_backward
    (the C++ op or the Triton launcher), for gradients the forward pass did not compute."""
    student, teachers, weights, kind, temperature, reduction, student_grad, teacher_grad = inputs
    _, row_losses, grad_student, grad_teachers = output
    need_student, need_teachers, need_weights = ctx.needs_input_grad[:3]
    # The saved-gradient fast path: a reduced loss whose every wanted gradient came with the
    # forward pass (the usual training step) keeps only those; backward only scales them.
    ctx.from_forward = (reduction != "none" and not need_weights and (student_grad or not need_student)
                        and (teacher_grad or not need_teachers))
    if ctx.from_forward:
        ctx.save_for_backward(grad_student, grad_teachers)
        return
    ctx.backward_rows = backward_rows
    ctx.kind, ctx.temperature, ctx.reduction = kind, temperature, reduction
    ctx.student_grad, ctx.teacher_grad = student_grad, teacher_grad
    ctx.batch = teachers.shape[1]
    ctx.weights_shape = None if weights is None else tuple(weights.shape)
    ctx.save_for_backward(student, teachers, weights, row_losses, grad_student, grad_teachers)


def backward(ctx, grad_loss, *unused):
    """Gradients of (student, teachers, weights) and None for the other five arguments."""
    if grad_loss is None:
        return (None,) * 8
    need_student, need_teachers, need_weights = ctx.needs_input_grad[:3]
    if ctx.from_forward:
        grad_student, grad_teachers = ctx.saved_tensors
        return ((_scaled(grad_student, grad_loss) if need_student else None,
                 _scaled(grad_teachers, grad_loss) if need_teachers else None) + (None,) * 6)
    student, teachers, weights, row_losses, grad_student, grad_teachers = ctx.saved_tensors
    out_student = out_teachers = out_weights = None
    reduced = ctx.reduction != "none"
    scale = 1.0 / ctx.batch if ctx.reduction == "mean" and ctx.batch > 0 else 1.0
    # A gradient saved in the forward pass is only scaled (e.g. when weights need one too).
    have_student = reduced and ctx.student_grad and grad_student.numel() == student.numel()
    have_teachers = reduced and ctx.teacher_grad and grad_teachers.numel() == teachers.numel()
    if need_student and have_student:
        out_student = _scaled(grad_student, grad_loss)
    if need_teachers and have_teachers:
        out_teachers = _scaled(grad_teachers, grad_loss)
    missing_student = need_student and out_student is None
    missing_teachers = need_teachers and out_teachers is None
    if missing_student or missing_teachers:
        coef = grad_loss.to(row_losses.dtype) * scale
        coef = coef.expand(row_losses.shape) if reduced else coef
        if weights is not None:
            coef = coef * weights.to(row_losses.dtype)
        gs, gt = ctx.backward_rows(coef.contiguous(), student, teachers, ctx.kind, ctx.temperature,
                                   missing_student, missing_teachers)
        out_student = gs if missing_student else out_student
        out_teachers = gt if missing_teachers else out_teachers
    if need_weights:
        g = grad_loss.to(row_losses.dtype) * scale
        per_row = g * row_losses
        if len(ctx.weights_shape) == 1:
            per_row = per_row.sum(0)
        out_weights = per_row.to(weights.dtype)
    return out_student, out_teachers, out_weights, None, None, None, None, None


def setup_context(ctx, inputs, output) -> None:
    """The registered autograd's (torch.compile, direct torch.ops calls): four outputs, the loss
    the only differentiable one."""
    ctx.mark_non_differentiable(*output[1:])
    # No zero tensors for the outputs nobody differentiates (grad_student alone is (B, D)).
    ctx.set_materialize_grads(False)
    _save(ctx, inputs, output, _cpp_backward_op)


class _EagerLoss(torch.autograd.Function):
    """An eager call's entry into the autograd above: apply(*op arguments, (forward launcher,
    backward launcher)). It returns the loss alone and calls the C++ op below the autograd
    keys, skipping the op's registered autograd (a Python layer that would only redispatch,
    with four outputs to set up): measurably less per call than entering through the op
    (docs/architecture.md, things that bite)."""

    @staticmethod
    def forward(ctx, *args):  # (not a separate setup_context: apply then skips binding the arguments)
        inputs, (forward_launcher, backward_launcher) = args[:-1], args[-1]
        if forward_launcher is _cpp_op:
            with _below_autograd():
                output = _cpp_op(*inputs)
        else:  # a Triton launcher reaches no autograd key (and torch.compile can trace it)
            output = forward_launcher(*inputs)
        _save(ctx, inputs, output, backward_launcher)
        # Referenced (not saved: nothing is kept that backward reads) so that a create_graph
        # backward can tie its gradients to them.
        ctx.graph_inputs = tuple(t for t in inputs[:2] if t.requires_grad)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved gradient is a constant: a second derivative would be wrong, so the first is
        # computed without a graph and, under create_graph, differentiating it again raises.
        with torch.no_grad():
            grads = backward(ctx, grad_loss) + (None,)
        return _refuse_double_backward(grads, ctx.graph_inputs) if torch.is_grad_enabled() else grads


_DOUBLE_BACKWARD = ("multi_teacher_loss supports one backward only (its gradient comes from the fused "
                    "kernel): a gradient of its gradient (create_graph=True, then backward again) is not "
                    "available; use backend='reference' for higher derivatives")


class _NoDoubleBackward(torch.autograd.Function):
    """A first-order gradient tied to the loss's inputs (so a second backward reaches it) whose
    own backward raises _DOUBLE_BACKWARD instead of returning a silently wrong zero."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(_DOUBLE_BACKWARD)


def _refuse_double_backward(grads, inputs):
    return tuple(_NoDoubleBackward.apply(g, *inputs) if isinstance(g, torch.Tensor) else g for g in grads)


# The C++ op's overloads, looked up once (through the overload packet a call costs more); set
# when robust_fast._C loaded.
_cpp_op: Optional[Callable] = None
_cpp_backward_op: Optional[Callable] = None
_cpp_launchers: Optional[Tuple[Callable, Callable]] = None


def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    # Only for a plain CPU tensor: not while torch.compile or opcheck trace (fake tensors).
    if (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu"
            and not torch.compiler.is_compiling() and grad_loss.numel() == 1
            and float(grad_loss) == 1.0):
        return saved
    return saved * grad_loss.to(saved.dtype)


def grads_shapes(student, teachers, reduction, student_grad, teacher_grad):
    """The empty outputs of the fake kernel, as the C++ op allocates them."""
    reduced = reduction != "none"
    gs = (torch.empty(student.shape, dtype=student.dtype, device=student.device)
          if reduced and student_grad else student.new_empty((0,)))
    gt = (torch.empty(teachers.shape, dtype=teachers.dtype, device=teachers.device)
          if reduced and teacher_grad else teachers.new_empty((0,)))
    return gs, gt


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake_and_autograd() -> None:
    global _cpp_op, _cpp_backward_op, _cpp_launchers
    if _build.compiled_library_error() is not None:
        return
    _cpp_op = torch.ops.robust_fast.multi_teacher_loss.default
    _cpp_backward_op = torch.ops.robust_fast._multi_teacher_loss_backward.default
    _cpp_launchers = (_cpp_op, _cpp_backward_op)

    @torch.library.register_fake("robust_fast::multi_teacher_loss")
    def _(student, teachers, weights, kind, temperature, reduction, student_grad, teacher_grad):
        count, batch, _dim = teachers.shape
        loss_shape = (batch, count) if reduction == "none" else ()
        loss = student.new_empty(loss_shape)
        rows = student.new_empty((batch, count), dtype=_accumulation_dtype(student.dtype))
        return (loss, rows) + grads_shapes(student, teachers, reduction, student_grad, teacher_grad)

    @torch.library.register_fake("robust_fast::_multi_teacher_loss_backward")
    def _(grad_rows, student, teachers, kind, temperature, student_grad, teacher_grad):
        return grads_shapes(student, teachers, "sum", student_grad, teacher_grad)

    torch.library.register_autograd("robust_fast::multi_teacher_loss", backward, setup_context=setup_context)


_register_fake_and_autograd()

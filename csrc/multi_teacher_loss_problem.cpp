#include "robust_fast/multi_teacher_loss_problem.h"
#include "robust_fast/layout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <limits>

namespace robust_fast {

at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

LossKind parse_loss_kind(c10::string_view kind) {
  if (kind == "cosine") return LossKind::kCosine;
  if (kind == "l2") return LossKind::kL2;
  if (kind == "l2_normalized") return LossKind::kL2Normalized;
  if (kind == "l1") return LossKind::kL1;
  if (kind == "mse") return LossKind::kMse;
  if (kind == "kl") return LossKind::kKl;
  TORCH_CHECK(false, "multi_teacher_loss: kind must be one of cosine, l2, l2_normalized, l1, mse, kl");
}

LossProblem make_loss_problem(const at::Tensor& student, const at::Tensor& teachers,
                              c10::string_view kind, double temperature) {
  TORCH_CHECK(student.dim() == 2 || student.dim() == 3,
              "multi_teacher_loss: student must be (B, D) or (B, K, D), got ", student.sizes());
  TORCH_CHECK(teachers.dim() == 3, "multi_teacher_loss: teachers must be (K, B, D), got ",
              teachers.sizes());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()),
              "multi_teacher_loss: student must be a floating-point tensor");
  TORCH_CHECK(teachers.scalar_type() == student.scalar_type(),
              "multi_teacher_loss: student and teachers must have the same dtype");
  TORCH_CHECK(teachers.device() == student.device(),
              "multi_teacher_loss: student and teachers must be on the same device");
  TORCH_CHECK(temperature > 0, "multi_teacher_loss: temperature must be > 0");
  LossProblem p;
  p.kind = parse_loss_kind(kind);
  p.temperature = temperature;
  p.teachers_count = teachers.size(0);
  p.batch = teachers.size(1);
  p.dim = teachers.size(2);
  p.shared = student.dim() == 2;
  TORCH_CHECK(student.size(0) == p.batch && student.size(-1) == p.dim &&
                  (p.shared || student.size(1) == p.teachers_count),
              "multi_teacher_loss: student ", student.sizes(), " does not match teachers ",
              teachers.sizes());
  p.student = unit_stride_rows(student);
  p.teachers = unit_stride_rows(teachers);
  p.student_stride_b = p.student.stride(0);
  p.student_stride_k = p.shared ? 0 : p.student.stride(1);
  p.teacher_stride_k = p.teachers.stride(0);
  p.teacher_stride_b = p.teachers.stride(1);
  return p;
}

namespace {

void allocate_grads(LossProblem& p, bool student_grad, bool teacher_grad) {
  if (student_grad) p.grad_student = at::empty(p.student.sizes(), p.student.options());
  if (teacher_grad) p.grad_teachers = at::empty(p.teachers.sizes(), p.teachers.options());
}

at::Tensor empty_or(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_multi_teacher_loss(
    const at::Tensor& student, const at::Tensor& teachers, const c10::optional<at::Tensor>& weights,
    c10::string_view kind, double temperature, c10::string_view reduction, bool student_grad,
    bool teacher_grad, LossKernel kernel) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "multi_teacher_loss: reduction must be mean, sum or none");
  LossProblem p = make_loss_problem(student, teachers, kind, temperature);
  const auto acc = accumulation_dtype(student.scalar_type());
  const auto acc_options = student.options().dtype(acc);
  at::Tensor w;  // (B, K) in the accumulation dtype, or undefined for all ones
  if (weights.has_value() && weights->defined()) {
    const at::Tensor& given = *weights;
    TORCH_CHECK((given.dim() == 1 && given.size(0) == p.teachers_count) ||
                    (given.dim() == 2 && given.size(0) == p.batch &&
                     given.size(1) == p.teachers_count),
                "multi_teacher_loss: weights must be (K,) or (B, K), got ", given.sizes());
    w = given.to(student.device(), acc).expand({p.batch, p.teachers_count});
  }
  // Gradients come with the forward pass only when the reduction makes them one scalar away.
  const bool grads = reduction != "none";
  const double scale = reduction == "mean" && p.batch > 0 ? 1.0 / static_cast<double>(p.batch) : 1.0;
  if (grads && (student_grad || teacher_grad)) {
    if (w.defined()) {
      p.coef = (w * scale).contiguous();
    } else {
      p.uniform_coef = scale;
    }
  }
  allocate_grads(p, grads && student_grad, grads && teacher_grad);
  p.row_losses = at::empty({p.batch, p.teachers_count}, acc_options);
  if (p.batch > 0 && p.teachers_count > 0) kernel(p);

  if (student.device().is_cpu() && reduction != "none") {
    // The (B, K) reduction in one loop: a few ATen calls would cost more than the sum itself.
    double value = 0;
    AT_DISPATCH_FLOATING_TYPES(acc, "multi_teacher_loss_reduce", [&] {
      const scalar_t* rows = p.row_losses.const_data_ptr<scalar_t>();
      const at::Tensor w_dense = w.defined() ? w.contiguous() : w;
      const scalar_t* weight = w.defined() ? w_dense.const_data_ptr<scalar_t>() : nullptr;
      const int64_t n = p.batch * p.teachers_count;
      scalar_t total = 0;
      for (int64_t i = 0; i < n; ++i) total += weight != nullptr ? rows[i] * weight[i] : rows[i];
      // mean over no samples is NaN, as torch.mean of an empty tensor
      value = reduction == "sum" ? total
              : (p.batch > 0 ? total / static_cast<scalar_t>(p.batch)
                             : std::numeric_limits<scalar_t>::quiet_NaN());
    });
    // Written in place, not by fill_: one dispatch less on every call.
    at::Tensor loss = at::empty({}, student.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "multi_teacher_loss_store", [&] {
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
    });
    return {loss, p.row_losses, empty_or(p.grad_student, student), empty_or(p.grad_teachers, teachers)};
  }
  at::Tensor weighted = w.defined() ? p.row_losses * w : p.row_losses;
  at::Tensor loss;
  if (reduction == "none") {
    // A new tensor even when weighted is row_losses itself: outputs never alias.
    loss = weighted.to(student.scalar_type(), /*non_blocking=*/false, /*copy=*/!w.defined());
  } else if (reduction == "sum") {
    loss = weighted.sum().to(student.scalar_type());
  } else {
    loss = weighted.sum(1).mean().to(student.scalar_type());
  }
  return {loss, p.row_losses, empty_or(p.grad_student, student), empty_or(p.grad_teachers, teachers)};
}

std::tuple<at::Tensor, at::Tensor> run_multi_teacher_loss_backward(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teachers,
    c10::string_view kind, double temperature, bool student_grad, bool teacher_grad,
    LossKernel kernel) {
  LossProblem p = make_loss_problem(student, teachers, kind, temperature);
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == p.batch &&
                  grad_rows.size(1) == p.teachers_count,
              "_multi_teacher_loss_backward: grad_rows must be (B, K), got ", grad_rows.sizes());
  p.coef = grad_rows.to(student.device(), accumulation_dtype(student.scalar_type())).contiguous();
  allocate_grads(p, student_grad, teacher_grad);
  if (p.batch > 0 && p.teachers_count > 0 && (student_grad || teacher_grad)) kernel(p);
  return {empty_or(p.grad_student, student), empty_or(p.grad_teachers, teachers)};
}

}  // namespace robust_fast

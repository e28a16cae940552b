// Host-side preparation of the multi-teacher loss shared by the CPU and CUDA kernels: checks,
// the row layout the kernels walk (any strides with a unit stride along D), the outputs, and the
// reduction of the per-row losses. Kept free of kernel code so nvcc and the C++ compiler both
// include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "robust_fast/multi_teacher_loss_math.h"

namespace robust_fast {

struct LossProblem {
  at::Tensor student;   // (B, D) shared by the teachers, or (B, K, D) a slice per teacher
  at::Tensor teachers;  // (K, B, D)
  int64_t batch = 0, teachers_count = 0, dim = 0;
  bool shared = true;   // student is (B, D)
  // Element strides of the rows (the stride along D is 1).
  int64_t student_stride_b = 0, student_stride_k = 0;  // student_stride_k = 0 when shared
  int64_t teacher_stride_k = 0, teacher_stride_b = 0;
  LossKind kind = LossKind::kCosine;
  double temperature = 1.0;
  at::Tensor coef;           // (B, K) contiguous, accumulation dtype: gradient scale per row,
  double uniform_coef = 0;   // or, when coef is undefined, every row's scale
  at::Tensor row_losses;     // (B, K) contiguous, accumulation dtype, or undefined
  at::Tensor grad_student;   // contiguous, the student's shape and dtype, or undefined
  at::Tensor grad_teachers;  // (K, B, D) contiguous, the teachers' dtype, or undefined
};

// The dtype sums and losses are kept in: double for double inputs, float otherwise.
at::ScalarType accumulation_dtype(at::ScalarType input);

LossKind parse_loss_kind(c10::string_view kind);

LossProblem make_loss_problem(const at::Tensor& student, const at::Tensor& teachers,
                              c10::string_view kind, double temperature);

// The kernels' view of coef / uniform_coef.
template <typename acc_t>
RowCoefs<acc_t> row_coefs(const LossProblem& p) {
  return {p.coef.defined() ? p.coef.const_data_ptr<acc_t>() : nullptr,
          static_cast<acc_t>(p.uniform_coef)};
}

using LossKernel = void (*)(const LossProblem&);

// robust_fast::multi_teacher_loss on one device, around that device's kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_multi_teacher_loss(
    const at::Tensor& student, const at::Tensor& teachers, const c10::optional<at::Tensor>& weights,
    c10::string_view kind, double temperature, c10::string_view reduction, bool student_grad,
    bool teacher_grad, LossKernel kernel);

// robust_fast::_multi_teacher_loss_backward: the gradients for per-row upstream scales.
std::tuple<at::Tensor, at::Tensor> run_multi_teacher_loss_backward(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teachers,
    c10::string_view kind, double temperature, bool student_grad, bool teacher_grad,
    LossKernel kernel);

template <LossKernel Kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_teacher_loss_entry(
    const at::Tensor& student, const at::Tensor& teachers, const c10::optional<at::Tensor>& weights,
    c10::string_view kind, double temperature, c10::string_view reduction, bool student_grad,
    bool teacher_grad) {
  return run_multi_teacher_loss(student, teachers, weights, kind, temperature, reduction,
                                student_grad, teacher_grad, Kernel);
}

template <LossKernel Kernel>
std::tuple<at::Tensor, at::Tensor> multi_teacher_loss_backward_entry(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teachers,
    c10::string_view kind, double temperature, bool student_grad, bool teacher_grad) {
  return run_multi_teacher_loss_backward(grad_rows, student, teachers, kind, temperature,
                                         student_grad, teacher_grad, Kernel);
}

}  // namespace robust_fast

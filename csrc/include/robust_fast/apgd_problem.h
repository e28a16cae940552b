// Host-side preparation of an APGD step shared by the CPU and CUDA kernels: checks, the memory
// layout the kernels walk (x, x_prev, grad and x_nat in one dense layout, each sample one
// contiguous block) and the in-place update. Free of kernel code, so nvcc and the C++ compiler
// both include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace robust_fast {

struct ApgdProblem {
  at::Tensor x, x_prev, grad, x_nat;  // same sizes and strides; samples are contiguous blocks
  at::Tensor eta;                     // float64 (B,) contiguous on the device: the step sizes
  at::Tensor eps_per_sample;          // float64 (B,) contiguous, or undefined for eps
  int64_t batch = 0;
  int64_t sample_numel = 0;
  bool l2 = false;
  double eps = 0.0;
  double momentum = 1.0;                // a: the weight of the new step
  double clip_lo = 0.0, clip_hi = 0.0;  // +-infinity where the box is open
  double min_grad_sq = 0.0;             // L2: a smaller <g,g> makes no move (pgd_math.h)
};

// A kernel writes x_new into `x_out` and, when `prev_out` is defined, x into `prev_out`.
// x_out may be problem.x and prev_out problem.x_prev: every element is read before it is
// written, by the same thread.
using ApgdKernel = void (*)(const ApgdProblem&, at::Tensor& x_out, at::Tensor& prev_out);

ApgdProblem make_apgd_problem(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, const at::Tensor& eta, double eps,
                              const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                              c10::string_view norm, c10::optional<double> clip_min,
                              c10::optional<double> clip_max);

// x_new as a new tensor in the operands' layout.
at::Tensor run_apgd_step(const ApgdProblem& problem, ApgdKernel kernel);

// x <- x_new and x_prev <- x, in place (through temporaries when the layout asks for them).
void run_apgd_step_in_place(const ApgdProblem& problem, at::Tensor& x, at::Tensor& x_prev,
                            ApgdKernel kernel);

// The registered entry points of one device (apgd_step and apgd_step_), around its kernel.
template <ApgdKernel Kernel>
at::Tensor apgd_step_entry(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                           const at::Tensor& x_nat, const at::Tensor& eta, double eps,
                           const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                           c10::string_view norm, c10::optional<double> clip_min,
                           c10::optional<double> clip_max) {
  return run_apgd_step(make_apgd_problem(x, x_prev, grad, x_nat, eta, eps, eps_per_sample,
                                         momentum, norm, clip_min, clip_max),
                       Kernel);
}

template <ApgdKernel Kernel>
void apgd_step_in_place_entry(at::Tensor x, at::Tensor x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, const at::Tensor& eta, double eps,
                              const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                              c10::string_view norm, c10::optional<double> clip_min,
                              c10::optional<double> clip_max) {
  run_apgd_step_in_place(make_apgd_problem(x, x_prev, grad, x_nat, eta, eps, eps_per_sample,
                                           momentum, norm, clip_min, clip_max),
                         x, x_prev, Kernel);
}

}  // namespace robust_fast

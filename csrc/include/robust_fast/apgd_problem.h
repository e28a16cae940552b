// The APGD step's problem: everything a device kernel reads and writes, prepared on the host and
// shared by the CPU and CUDA kernels (checks, the operands laid out by layout.h, the radii, the
// momentum, the box), and the registered entry points around a device's kernel. Kept free of
// kernel code so nvcc and the C++ compiler both include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace robust_fast {

struct ApgdProblem {
  at::Tensor x, x_prev, grad, x_nat;  // same sizes and strides; samples are contiguous blocks
  at::Tensor out;        // x_new, in the operands' strides; may be x itself
  at::Tensor prev_out;   // receives x (in place; may be x_prev itself), or undefined
  int64_t batch = 0;
  int64_t sample_numel = 0;
  bool l2 = false;
  double eta = 0.0;           // the step size,
  at::Tensor eta_per_sample;  // or float64 (B,) contiguous on the device, one per sample
  double eps = 0.0;
  at::Tensor eps_per_sample;  // same, for eps
  double momentum = 1.0;                // a: the weight of the new step
  double clip_lo = 0.0, clip_hi = 0.0;  // +-infinity where the box is open
  double min_grad_sq = 0.0;             // L2: a smaller <g,g> makes no move (pgd_math.h)
};

// A device's kernel: writes x_new into problem.out and, when prev_out is defined, x into
// problem.prev_out. Every element is read before it is written, by the same thread.
using ApgdKernel = void (*)(const ApgdProblem&);

// Checks the arguments and lays out the operands; out and prev_out are left undefined.
ApgdProblem make_apgd_problem(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, double eta, double eps,
                              const c10::optional<at::Tensor>& eta_per_sample,
                              const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                              c10::string_view norm, c10::optional<double> clip_min,
                              c10::optional<double> clip_max);

// x_new as a new tensor in the layout of the walked operands.
at::Tensor run_apgd_step(ApgdProblem problem, ApgdKernel kernel);

// x <- x_new and x_prev <- x: directly when layout.h allows it, else through temporaries.
void run_apgd_step_in_place(ApgdProblem problem, const at::Tensor& x, const at::Tensor& x_prev,
                            ApgdKernel kernel);

// The registered entry points of one device (apgd_step and apgd_step_), around its kernel.
template <ApgdKernel Kernel>
at::Tensor apgd_step_entry(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                           const at::Tensor& x_nat, double eta, double eps,
                           const c10::optional<at::Tensor>& eta_per_sample,
                           const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                           c10::string_view norm, c10::optional<double> clip_min,
                           c10::optional<double> clip_max) {
  return run_apgd_step(make_apgd_problem(x, x_prev, grad, x_nat, eta, eps, eta_per_sample,
                                         eps_per_sample, momentum, norm, clip_min, clip_max),
                       Kernel);
}

template <ApgdKernel Kernel>
void apgd_step_in_place_entry(at::Tensor x, at::Tensor x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, double eta, double eps,
                              const c10::optional<at::Tensor>& eta_per_sample,
                              const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                              c10::string_view norm, c10::optional<double> clip_min,
                              c10::optional<double> clip_max) {
  run_apgd_step_in_place(make_apgd_problem(x, x_prev, grad, x_nat, eta, eps, eta_per_sample,
                                           eps_per_sample, momentum, norm, clip_min, clip_max),
                         x, x_prev, Kernel);
}

}  // namespace robust_fast

// The PGD step's problem: everything a device kernel reads and writes, prepared on the host and
// shared by the CPU and CUDA kernels (checks, the operands laid out by layout.h, the radii, the
// box), and the registered entry points around a device's kernel. Kept free of kernel code so
// nvcc and the C++ compiler both include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace robust_fast {

struct PgdProblem {
  at::Tensor x_adv, grad, x_nat;  // same sizes and strides; samples are contiguous blocks
  at::Tensor out;                 // the result, in the operands' strides; may be x_adv itself
  int64_t batch = 0;
  int64_t sample_numel = 0;
  bool l2 = false;
  double eps = 0.0;
  double alpha = 0.0;
  double alpha_sign = 1.0;          // -1 for a targeted step
  at::Tensor eps_per_sample;        // float64 (B,) contiguous on the device, or undefined for eps
  at::Tensor alpha_per_sample;      // same, for alpha
  double clip_lo = 0.0, clip_hi = 0.0;  // +-infinity where the box is open
  double min_grad_sq = 0.0;         // L2: a smaller <g,g> makes no move (pgd_math.h)
};

// A device's kernel: writes the step of problem's operands into problem.out. Every element is
// read before it is written, by the same thread.
using PgdKernel = void (*)(const PgdProblem&);

// Checks the arguments and lays out the operands; out is left undefined.
PgdProblem make_pgd_problem(const at::Tensor& x_adv, const at::Tensor& grad,
                            const at::Tensor& x_nat, double eps, double alpha,
                            const c10::optional<at::Tensor>& eps_per_sample,
                            const c10::optional<at::Tensor>& alpha_per_sample,
                            c10::string_view norm, c10::optional<double> clip_min,
                            c10::optional<double> clip_max, bool targeted);

// A new tensor in the layout of the walked operands, filled by `kernel`.
at::Tensor run_pgd_step(PgdProblem problem, PgdKernel kernel);

// Fills `out` (which may be x_adv): directly when layout.h allows it, else through a temporary.
void run_pgd_step_out(PgdProblem problem, const at::Tensor& out, PgdKernel kernel);

// The two registered entry points of one device (pgd_step and pgd_step_out), around the
// device's kernel: m.impl("pgd_step", &pgd_step_entry<pgd_step_cpu>).
template <PgdKernel Kernel>
at::Tensor pgd_step_entry(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                          double eps, double alpha, const c10::optional<at::Tensor>& eps_per_sample,
                          const c10::optional<at::Tensor>& alpha_per_sample, c10::string_view norm,
                          c10::optional<double> clip_min, c10::optional<double> clip_max,
                          bool targeted) {
  return run_pgd_step(make_pgd_problem(x_adv, grad, x_nat, eps, alpha, eps_per_sample,
                                       alpha_per_sample, norm, clip_min, clip_max, targeted),
                      Kernel);
}

template <PgdKernel Kernel>
void pgd_step_out_entry(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                        double eps, double alpha, const c10::optional<at::Tensor>& eps_per_sample,
                        const c10::optional<at::Tensor>& alpha_per_sample, c10::string_view norm,
                        c10::optional<double> clip_min, c10::optional<double> clip_max,
                        bool targeted, at::Tensor out) {
  run_pgd_step_out(make_pgd_problem(x_adv, grad, x_nat, eps, alpha, eps_per_sample,
                                    alpha_per_sample, norm, clip_min, clip_max, targeted),
                   out, Kernel);
}

}  // namespace robust_fast

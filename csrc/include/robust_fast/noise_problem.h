// gaussian_copies' problem: x laid out for the kernels, the output, the seed, prepared on the
// host and shared by the CPU and CUDA kernels, and the registered entry points around a device's
// kernel. Kept free of kernel code so nvcc and the C++ compiler both include it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace robust_fast {

struct NoiseProblem {
  at::Tensor x;        // contiguous (packed once when x is not)
  at::Tensor x_given;  // x as passed: out must share no memory with it
  at::Tensor out;      // (B * copies, ...) contiguous: row b * copies + j = x[b] + sigma * noise
  int64_t batch = 0;
  int64_t copies = 1;
  int64_t sample_numel = 0;
  double sigma = 1.0;
  // The Philox key: seed_value, or (seed_on_device not null) the int64 that it points to on the
  // device, read by the kernel itself so that drawing the seed costs no host synchronisation.
  uint64_t seed_value = 0;
  const int64_t* seed_on_device = nullptr;
};

using NoiseKernel = void (*)(const NoiseProblem&);

// Checks the arguments (TORCH_CHECK errors name gaussian_copies and the argument) and lays out x;
// out is left undefined.
NoiseProblem make_noise_problem(const at::Tensor& x, int64_t copies, double sigma,
                                const at::Tensor& seed);

// A new contiguous tensor, filled by `kernel`.
at::Tensor run_gaussian_copies(NoiseProblem problem, NoiseKernel kernel);

// Fills `out` (which must share no memory with x): directly when contiguous, else through a
// temporary.
void run_gaussian_copies_out(NoiseProblem problem, const at::Tensor& out, NoiseKernel kernel);

template <NoiseKernel Kernel>
at::Tensor gaussian_copies_entry(const at::Tensor& x, int64_t copies, double sigma,
                                 const at::Tensor& seed) {
  return run_gaussian_copies(make_noise_problem(x, copies, sigma, seed), Kernel);
}

template <NoiseKernel Kernel>
void gaussian_copies_out_entry(const at::Tensor& x, int64_t copies, double sigma,
                               const at::Tensor& seed, at::Tensor out) {
  run_gaussian_copies_out(make_noise_problem(x, copies, sigma, seed), out, Kernel);
}

}  // namespace robust_fast

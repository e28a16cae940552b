#include "robust_fast/noise_problem.h"

#include "robust_fast/layout.h"  // overlap

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace robust_fast {
namespace {

std::vector<int64_t> out_sizes(const NoiseProblem& p) {
  std::vector<int64_t> sizes(p.x.sizes().begin(), p.x.sizes().end());
  sizes[0] = p.batch * p.copies;
  return sizes;
}

}  // namespace

NoiseProblem make_noise_problem(const at::Tensor& x, int64_t copies, double sigma,
                                const at::Tensor& seed) {
  TORCH_CHECK(x.dim() >= 1, "gaussian_copies: x must have a batch dimension");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gaussian_copies: x must be a floating-point tensor");
  TORCH_CHECK(copies >= 1, "gaussian_copies: copies must be >= 1, got ", copies);
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "gaussian_copies: sigma must be > 0 and finite, got ", sigma);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "gaussian_copies: seed must be an int64 tensor with one element");
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == x.device(),
              "gaussian_copies: seed must be on the CPU or on x's device");
  NoiseProblem p;
  p.x_given = x;
  p.x = x.contiguous();  // a no-op for a contiguous x; x is the smaller tensor by copies
  p.batch = x.size(0);
  p.copies = copies;
  p.sample_numel = 1;
  for (int64_t d = 1; d < x.dim(); ++d) p.sample_numel *= x.size(d);
  p.sigma = sigma;
  if (seed.device().is_cpu()) {
    p.seed_value = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
  } else {
    p.seed_on_device = seed.const_data_ptr<int64_t>();
  }
  return p;
}

at::Tensor run_gaussian_copies(NoiseProblem problem, NoiseKernel kernel) {
  problem.out = at::empty(out_sizes(problem), problem.x.options());
  if (problem.out.numel() > 0) kernel(problem);
  return problem.out;
}

void run_gaussian_copies_out(NoiseProblem problem, const at::Tensor& out, NoiseKernel kernel) {
  const std::vector<int64_t> sizes = out_sizes(problem);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(sizes), "gaussian_copies: out must have shape ",
              at::IntArrayRef(sizes), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == problem.x.scalar_type() && out.device() == problem.x.device(),
              "gaussian_copies: out must match x in dtype and device");
  if (out.numel() == 0) return;
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "gaussian_copies: out has elements that share memory (an expanded tensor?): pass a dense one");
  TORCH_CHECK(overlap(out, problem.x_given) == Overlap::kNone, "gaussian_copies: out must share no memory with x");
  if (!out.is_contiguous()) {
    out.copy_(run_gaussian_copies(std::move(problem), kernel));
    return;
  }
  problem.out = out;
  kernel(problem);
}

}  // namespace robust_fast

// CPU kernels of the PGD step: at::parallel_for over the flattened batch, inner loops over the
// shared scalar math that the compiler vectorizes (-O3 with the ISA flags of setup.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "robust_fast/cpu_sample_loops.h"
#include "robust_fast/pgd_math.h"
#include "robust_fast/pgd_problem.h"

namespace robust_fast {
namespace {

using namespace cpu_loops;  // shared loops and sums

constexpr int64_t kGrainSize = kCpuGrainSize;

// Plain loops that the compiler vectorizes (masked selects for the ternaries of pgd_math.h);
// ivdep: out may alias x_adv, but element i is read before it is written, never later.
template <typename scalar_t>
void linf_piece(const scalar_t* x, const scalar_t* g, const scalar_t* xn, scalar_t* out,
                int64_t n, double eps_d, double alpha_d, double lo_d, double hi_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto eps = static_cast<opmath_t>(eps_d), alpha = static_cast<opmath_t>(alpha_d);
  const auto lo = static_cast<opmath_t>(lo_d), hi = static_cast<opmath_t>(hi_d);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(linf_step<opmath_t>(x[i], g[i], xn[i], eps, alpha, lo, hi));
  }
}

void linf_kernel(const PgdProblem& p) {
  const at::Tensor& out = p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pgd_step_cpu", [&] {
    const scalar_t* x = p.x_adv.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    const scalar_t* xn = p.x_nat.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_sample_piece(out.numel(), p.sample_numel, [&](int64_t s, int64_t b, int64_t e) {
      const double eps = value_for_sample(p.eps_per_sample, p.eps, s);
      const double alpha = p.alpha_sign * value_for_sample(p.alpha_per_sample, p.alpha, s);
      linf_piece(x + b, g + b, xn + b, o + b, e - b, eps, alpha, p.clip_lo, p.clip_hi);
    });
  });
}

template <typename scalar_t>
void l2_piece(const scalar_t* x, const scalar_t* g, const scalar_t* xn, scalar_t* out, int64_t n,
              double step_scale_d, double factor_d, double lo_d, double hi_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto step_scale = static_cast<opmath_t>(step_scale_d);
  const auto factor = static_cast<opmath_t>(factor_d);
  const auto lo = static_cast<opmath_t>(lo_d), hi = static_cast<opmath_t>(hi_d);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(l2_step<opmath_t>(x[i], g[i], xn[i], step_scale, factor, lo, hi));
  }
}

L2Coefficients<double> sample_coefficients(const PgdProblem& p, int64_t sample, const L2Sums& sums) {
  const double eps = value_for_sample(p.eps_per_sample, p.eps, sample);
  const double alpha = p.alpha_sign * value_for_sample(p.alpha_per_sample, p.alpha, sample);
  return l2_coefficients<double>(sums.grad_sq, sums.delta_dot_grad, sums.delta_sq, eps, alpha,
                                p.min_grad_sq);
}

void l2_kernel(const PgdProblem& p) {
  const at::Tensor& out = p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pgd_step_l2_cpu", [&] {
    const scalar_t* x = p.x_adv.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    const scalar_t* xn = p.x_nat.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t n = p.sample_numel;
    const int64_t blocks = (n + kAccumulateBlock - 1) / kAccumulateBlock;
    const auto block_sums = [&](int64_t sample, int64_t block) {
      const int64_t begin = sample * n + block * kAccumulateBlock;
      const int64_t size = std::min(kAccumulateBlock, n - block * kAccumulateBlock);
      return l2_block_sums(x + begin, g + begin, xn + begin, size);
    };
    if (p.batch >= at::get_num_threads()) {
      // One thread per sample, both passes back to back: the second pass reads the sample
      // from the core's cache instead of memory.
      at::parallel_for(0, p.batch, 1, [&](int64_t first, int64_t last) {
        for (int64_t s = first; s < last; ++s) {
          L2Sums sums;
          for (int64_t b = 0; b < blocks; ++b) sums += block_sums(s, b);
          const L2Coefficients<double> c = sample_coefficients(p, s, sums);
          l2_piece(x + s * n, g + s * n, xn + s * n, o + s * n, n, c.step_scale, c.factor,
                   p.clip_lo, p.clip_hi);
        }
      });
      return;
    }
    // Fewer samples than threads: split each sample's blocks among the threads, then write.
    std::vector<L2Sums> partial(p.batch * blocks);
    const int64_t blocks_per_task = std::max<int64_t>(1, kGrainSize / kAccumulateBlock);
    at::parallel_for(0, p.batch * blocks, blocks_per_task, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) partial[i] = block_sums(i / blocks, i % blocks);
    });
    std::vector<L2Coefficients<double>> coefficients(p.batch);
    for (int64_t s = 0; s < p.batch; ++s) {
      L2Sums sums;
      for (int64_t b = 0; b < blocks; ++b) sums += partial[s * blocks + b];
      coefficients[s] = sample_coefficients(p, s, sums);
    }
    for_each_sample_piece(out.numel(), n, [&](int64_t s, int64_t b, int64_t e) {
      l2_piece(x + b, g + b, xn + b, o + b, e - b, coefficients[s].step_scale,
               coefficients[s].factor, p.clip_lo, p.clip_hi);
    });
  });
}

void pgd_step_cpu(const PgdProblem& problem) {
  if (problem.l2) {
    l2_kernel(problem);
  } else {
    linf_kernel(problem);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("pgd_step", &pgd_step_entry<pgd_step_cpu>);
  m.impl("pgd_step_out", &pgd_step_out_entry<pgd_step_cpu>);
}

}  // namespace robust_fast

// CPU kernels of the APGD step. L-inf is one elementwise pass over pieces of the flattened batch.
// L2 takes one sample per task and three passes over it (from cache after the first): the sums
// that give the projected step z, the norm of the momentum point, then the write.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "robust_fast/apgd_problem.h"
#include "robust_fast/cpu_sample_loops.h"
#include "robust_fast/pgd_math.h"

namespace robust_fast {
namespace {

using namespace cpu_loops;  // shared loops and sums

template <typename scalar_t>
struct Rows {
  const scalar_t *x, *x_prev, *grad, *x_nat;
  scalar_t* out;   // may alias x
  scalar_t* prev;  // receives x (may alias x_prev), or nullptr
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const ApgdProblem& p) {
  return {p.x.const_data_ptr<scalar_t>(), p.x_prev.const_data_ptr<scalar_t>(),
          p.grad.const_data_ptr<scalar_t>(), p.x_nat.const_data_ptr<scalar_t>(),
          p.out.mutable_data_ptr<scalar_t>(),
          p.prev_out.defined() ? p.prev_out.mutable_data_ptr<scalar_t>() : nullptr};
}

// ivdep: out may alias x and prev x_prev, but element i is read before it is written.
template <typename scalar_t, bool kWritePrev>
void linf_piece(const Rows<scalar_t>& r, int64_t begin, int64_t end, double eps_d, double eta_d,
                double a_d, double lo_d, double hi_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto eps = static_cast<opmath_t>(eps_d), eta = static_cast<opmath_t>(eta_d);
  const auto a = static_cast<opmath_t>(a_d), one_minus_a = static_cast<opmath_t>(1.0 - a_d);
  const auto lo = static_cast<opmath_t>(lo_d), hi = static_cast<opmath_t>(hi_d);
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t x = r.x[i], xp = r.x_prev[i], xn = r.x_nat[i];
    const opmath_t z = linf_step<opmath_t>(x, r.grad[i], xn, eps, eta, lo, hi);
    const opmath_t w = momentum_point<opmath_t>(x, z, xp, a, one_minus_a);
    r.out[i] = static_cast<scalar_t>(linf_project<opmath_t>(w, xn, eps, lo, hi));
    if constexpr (kWritePrev) r.prev[i] = static_cast<scalar_t>(x);
  }
}

void linf_kernel(const ApgdProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out.scalar_type(), "apgd_step_cpu", [&] {
    const Rows<scalar_t> r = rows_of<scalar_t>(p);
    for_each_sample_piece(p.out.numel(), p.sample_numel, [&](int64_t s, int64_t b, int64_t e) {
      const double eps = value_for_sample(p.eps_per_sample, p.eps, s);
      const double eta = value_for_sample(p.eta_per_sample, p.eta, s);
      if (r.prev != nullptr) {
        linf_piece<scalar_t, true>(r, b, e, eps, eta, p.momentum, p.clip_lo, p.clip_hi);
      } else {
        linf_piece<scalar_t, false>(r, b, e, eps, eta, p.momentum, p.clip_lo, p.clip_hi);
      }
    });
  });
}

// The sum of squares of value(i) for i in [begin, begin + n), n <= kAccumulateBlock: lanes in
// opmath_t (the compiler keeps them in vector registers), then double.
template <typename opmath_t, typename ValueFn>
double block_square_sum(int64_t begin, int64_t n, const ValueFn& value) {
  constexpr int kLanes = 64 / sizeof(opmath_t);
  opmath_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const opmath_t v = value(begin + i + lane);
      lanes[lane] += v * v;
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    const opmath_t v = value(begin + i);
    lanes[lane] += v * v;
  }
  double total = 0;
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  return total;
}

// One sample of the L2 step, elements [first, first + n).
template <typename scalar_t>
void l2_sample(const Rows<scalar_t>& r, int64_t first, int64_t n, double eps, double eta,
               const ApgdProblem& p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t *x = r.x + first, *xp = r.x_prev + first, *g = r.grad + first, *xn = r.x_nat + first;
  // Pass 1: <g,g>, <d,g>, <d,d> with d = x - x_nat, as pgd_step sums them (lanes in opmath_t,
  // flushed to double every kAccumulateBlock elements).
  L2Sums sums;
  for (int64_t b = 0; b < n; b += kAccumulateBlock) {
    sums += l2_block_sums(x + b, g + b, xn + b, std::min(kAccumulateBlock, n - b));
  }
  const double grad_sq = sums.grad_sq, delta_dot_grad = sums.delta_dot_grad, delta_sq = sums.delta_sq;
  const L2Coefficients<double> c =
      l2_coefficients<double>(grad_sq, delta_dot_grad, delta_sq, eps, eta, p.min_grad_sq);
  const auto step_scale = static_cast<opmath_t>(c.step_scale), factor = static_cast<opmath_t>(c.factor);
  const auto a = static_cast<opmath_t>(p.momentum);
  const auto one_minus_a = static_cast<opmath_t>(1.0 - p.momentum);
  const auto lo = static_cast<opmath_t>(p.clip_lo), hi = static_cast<opmath_t>(p.clip_hi);
  const auto momentum_point_at = [&](int64_t i) {
    const opmath_t xi = x[i];
    const opmath_t z = l2_step<opmath_t>(xi, g[i], xn[i], step_scale, factor, lo, hi);
    // Rounded to the input dtype, as the reference holds it.
    return static_cast<opmath_t>(static_cast<scalar_t>(momentum_point<opmath_t>(xi, z, xp[i], a, one_minus_a)));
  };
  // Pass 2: the squared norm of the momentum point's distance from x_nat, summed the same way.
  const auto distance_at = [&](int64_t i) {
    return static_cast<opmath_t>(static_cast<scalar_t>(momentum_point_at(i) - static_cast<opmath_t>(xn[i])));
  };
  double moved_sq = 0;
  for (int64_t b = 0; b < n; b += kAccumulateBlock) {
    moved_sq += block_square_sum<opmath_t>(b, std::min(kAccumulateBlock, n - b), distance_at);
  }
  const auto projection = static_cast<opmath_t>(l2_projection_factor<double>(moved_sq, eps));
  // Pass 3: project and write; x (and x_prev) are read before they are written.
  scalar_t* out = r.out + first;
  scalar_t* prev = r.prev == nullptr ? nullptr : r.prev + first;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t xi = x[i];
    const opmath_t w = momentum_point_at(i);
    out[i] = static_cast<scalar_t>(l2_project<opmath_t>(w, xn[i], projection, lo, hi));
    if (prev != nullptr) prev[i] = xi;
  }
}

void l2_kernel(const ApgdProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out.scalar_type(), "apgd_step_l2_cpu", [&] {
    const Rows<scalar_t> r = rows_of<scalar_t>(p);
    const int64_t n = p.sample_numel;
    // Whole samples per task: the three passes over a sample stay in one core's cache.
    const int64_t samples_per_task = std::max<int64_t>(1, kCpuGrainSize / std::max<int64_t>(n, 1));
    at::parallel_for(0, p.batch, samples_per_task, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        l2_sample(r, s * n, n, value_for_sample(p.eps_per_sample, p.eps, s),
                  value_for_sample(p.eta_per_sample, p.eta, s), p);
      }
    });
  });
}

void apgd_step_cpu(const ApgdProblem& problem) {
  if (problem.l2) {
    l2_kernel(problem);
  } else {
    linf_kernel(problem);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("apgd_step", &apgd_step_entry<apgd_step_cpu>);
  m.impl("apgd_step_", &apgd_step_in_place_entry<apgd_step_cpu>);
}

}  // namespace robust_fast

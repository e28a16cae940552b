// CPU kernels of the PGD step: at::parallel_for over the flattened batch, vectorized inner
// loops (at::vec) for float and double, a scalar loop in float for half and bfloat16.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "robust_fast/pgd_math.h"
#include "robust_fast/pgd_problem.h"

namespace robust_fast {
namespace {

constexpr int64_t kGrainSize = 1 << 15;      // elements per task: big enough to pay for a thread
constexpr int64_t kAccumulateBlock = 1 << 10;  // fp32 partial sums are flushed to double this often

template <typename scalar_t>
constexpr bool kVectorized = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// Calls fn(sample, begin, end) on pieces of [0, numel) that never cross a sample boundary.
template <typename Fn>
void for_each_sample_piece(int64_t numel, int64_t sample_numel, const Fn& fn) {
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / sample_numel;
      const int64_t piece_end = std::min(end, (sample + 1) * sample_numel);
      fn(sample, i, piece_end);
      i = piece_end;
    }
  });
}

double value_for_sample(const at::Tensor& per_sample, double scalar, int64_t sample) {
  return per_sample.defined() ? per_sample.const_data_ptr<double>()[sample] : scalar;
}

template <typename scalar_t>
void linf_piece(const scalar_t* x, const scalar_t* g, const scalar_t* xn, scalar_t* out,
                int64_t n, double eps_d, double alpha_d, double lo_d, double hi_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto eps = static_cast<opmath_t>(eps_d), alpha = static_cast<opmath_t>(alpha_d);
  const auto lo = static_cast<opmath_t>(lo_d), hi = static_cast<opmath_t>(hi_d);
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec zero(0), step_up(alpha), step_down(-alpha), eps_hi(eps), eps_lo(-eps);
    const Vec box_lo(lo), box_hi(hi);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec vg = Vec::loadu(g + i);
      // alpha * sign(g) without a multiply; NaN compares false and makes no move.
      Vec step = Vec::blendv(zero, step_up, vg > zero);
      step = Vec::blendv(step, step_down, vg < zero);
      const Vec vxn = Vec::loadu(xn + i);
      const Vec delta = at::vec::clamp(Vec::loadu(x + i) + step - vxn, eps_lo, eps_hi);
      at::vec::clamp(vxn + delta, box_lo, box_hi).store(out + i);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(linf_step<opmath_t>(x[i], g[i], xn[i], eps, alpha, lo, hi));
  }
}

void linf_kernel(const PgdProblem& p, at::Tensor& out) {
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

struct L2Sums {
  double grad_sq = 0, delta_dot_grad = 0, delta_sq = 0;
};

// <g,g>, <d,g>, <d,d> of one sample, d = x - xn, accumulated in double.
template <typename scalar_t>
L2Sums l2_sums(const scalar_t* x, const scalar_t* g, const scalar_t* xn, int64_t n) {
  L2Sums sums;
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    while (i + Vec::size() <= n) {
      // fp32 lanes accumulate a short block, then the block's total goes into double.
      Vec gg(0), dg(0), dd(0);
      const int64_t block_end = std::min(n, i + kAccumulateBlock);
      for (; i + Vec::size() <= block_end; i += Vec::size()) {
        const Vec vg = Vec::loadu(g + i);
        const Vec vd = Vec::loadu(x + i) - Vec::loadu(xn + i);
        gg = at::vec::fmadd(vg, vg, gg);
        dg = at::vec::fmadd(vd, vg, dg);
        dd = at::vec::fmadd(vd, vd, dd);
      }
      scalar_t lanes[3][Vec::size()];
      gg.store(lanes[0]);
      dg.store(lanes[1]);
      dd.store(lanes[2]);
      for (int lane = 0; lane < Vec::size(); ++lane) {
        sums.grad_sq += lanes[0][lane];
        sums.delta_dot_grad += lanes[1][lane];
        sums.delta_sq += lanes[2][lane];
      }
    }
  }
  for (; i < n; ++i) {
    const double gi = static_cast<double>(g[i]);
    const double di = static_cast<double>(static_cast<scalar_t>(x[i] - xn[i]));
    sums.grad_sq += gi * gi;
    sums.delta_dot_grad += di * gi;
    sums.delta_sq += di * di;
  }
  return sums;
}

template <typename scalar_t>
void l2_piece(const scalar_t* x, const scalar_t* g, const scalar_t* xn, scalar_t* out, int64_t n,
              double step_scale_d, double factor_d, double lo_d, double hi_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto step_scale = static_cast<opmath_t>(step_scale_d);
  const auto factor = static_cast<opmath_t>(factor_d);
  const auto lo = static_cast<opmath_t>(lo_d), hi = static_cast<opmath_t>(hi_d);
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec vscale(step_scale), vfactor(factor), box_lo(lo), box_hi(hi);
    const bool moves = step_scale != opmath_t(0);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec stepped = Vec::loadu(x + i);
      if (moves) stepped = stepped + vscale * Vec::loadu(g + i);
      const Vec vxn = Vec::loadu(xn + i);
      at::vec::clamp(vxn + (stepped - vxn) * vfactor, box_lo, box_hi).store(out + i);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(l2_step<opmath_t>(x[i], g[i], xn[i], step_scale, factor, lo, hi));
  }
}

void l2_kernel(const PgdProblem& p, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pgd_step_l2_cpu", [&] {
    const scalar_t* x = p.x_adv.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    const scalar_t* xn = p.x_nat.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t n = p.sample_numel;
    // Pass 1: per-sample sums, from which each sample's step and projection follow.
    std::vector<L2Coefficients<double>> coefficients(p.batch);
    const int64_t samples_per_task = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(n, 1));
    at::parallel_for(0, p.batch, samples_per_task, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const L2Sums sums = l2_sums(x + s * n, g + s * n, xn + s * n, n);
        const double eps = value_for_sample(p.eps_per_sample, p.eps, s);
        const double alpha = p.alpha_sign * value_for_sample(p.alpha_per_sample, p.alpha, s);
        coefficients[s] =
            l2_coefficients<double>(sums.grad_sq, sums.delta_dot_grad, sums.delta_sq, eps, alpha);
      }
    });
    // Pass 2: the write.
    for_each_sample_piece(out.numel(), n, [&](int64_t s, int64_t b, int64_t e) {
      l2_piece(x + b, g + b, xn + b, o + b, e - b, coefficients[s].step_scale,
               coefficients[s].factor, p.clip_lo, p.clip_hi);
    });
  });
}

void pgd_kernel_cpu(const PgdProblem& problem, at::Tensor& out) {
  if (problem.l2) {
    l2_kernel(problem, out);
  } else {
    linf_kernel(problem, out);
  }
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                        double eps, double alpha, const c10::optional<at::Tensor>& eps_per_sample,
                        const c10::optional<at::Tensor>& alpha_per_sample, c10::string_view norm,
                        c10::optional<double> clip_min, c10::optional<double> clip_max,
                        bool targeted) {
  const PgdProblem problem = make_pgd_problem(x_adv, grad, x_nat, eps, alpha, eps_per_sample,
                                              alpha_per_sample, norm, clip_min, clip_max, targeted);
  return run_pgd_step(problem, pgd_kernel_cpu);
}

void pgd_step_out_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                      double eps, double alpha, const c10::optional<at::Tensor>& eps_per_sample,
                      const c10::optional<at::Tensor>& alpha_per_sample, c10::string_view norm,
                      c10::optional<double> clip_min, c10::optional<double> clip_max,
                      bool targeted, at::Tensor out) {
  const PgdProblem problem = make_pgd_problem(x_adv, grad, x_nat, eps, alpha, eps_per_sample,
                                              alpha_per_sample, norm, clip_min, clip_max, targeted);
  run_pgd_step_out(problem, out, pgd_kernel_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("pgd_step", &pgd_step_cpu);
  m.impl("pgd_step_out", &pgd_step_out_cpu);
}

}  // namespace robust_fast

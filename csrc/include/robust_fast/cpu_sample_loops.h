// Loops over a batch whose samples are contiguous blocks, and the L2 sums, shared by the CPU
// kernels of the attack steps (pgd_step, apgd_step).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

namespace robust_fast {
namespace cpu_loops {

constexpr int64_t kCpuGrainSize = 1 << 15;  // elements per task: big enough to pay for a thread
constexpr int64_t kAccumulateBlock = 1 << 10;  // fp32 lane sums are flushed to double this often

// Calls fn(sample, begin, end) on pieces of [0, numel) that never cross a sample boundary.
template <typename Fn>
void for_each_sample_piece(int64_t numel, int64_t sample_numel, const Fn& fn) {
  at::parallel_for(0, numel, kCpuGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / sample_numel;
      const int64_t piece_end = std::min(end, (sample + 1) * sample_numel);
      fn(sample, i, piece_end);
      i = piece_end;
    }
  });
}

// A per-sample value (a float64 (B,) tensor) when given, else the scalar.
inline double value_for_sample(const at::Tensor& per_sample, double scalar, int64_t sample) {
  return per_sample.defined() ? per_sample.const_data_ptr<double>()[sample] : scalar;
}

struct L2Sums {
  double grad_sq = 0, delta_dot_grad = 0, delta_sq = 0;

  L2Sums& operator+=(const L2Sums& other) {
    grad_sq += other.grad_sq;
    delta_dot_grad += other.delta_dot_grad;
    delta_sq += other.delta_sq;
    return *this;
  }
};

// <g,g>, <d,g>, <d,d> of one block of at most kAccumulateBlock elements, d = x - xn. Every
// element is squared and summed in opmath_t (float for half, bfloat16 and float), the tail
// too, as in the CUDA and Triton kernels; the lane sums then go into double. A sample's sums
// are its block sums added in order, whichever thread computed each block, so the result
// never depends on the thread count.
template <typename scalar_t>
L2Sums l2_block_sums(const scalar_t* x, const scalar_t* g, const scalar_t* xn, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  // kLanes independent accumulators: the compiler keeps them in vector registers.
  constexpr int kLanes = 64 / sizeof(opmath_t);
  opmath_t gg[kLanes] = {}, dg[kLanes] = {}, dd[kLanes] = {};
  const auto accumulate = [&](int lane, int64_t i) {
    const opmath_t gi = g[i];
    // d rounds to the input dtype, as the CUDA kernel's d does (a no-op for float, double).
    const opmath_t di = static_cast<scalar_t>(static_cast<opmath_t>(x[i]) -
                                              static_cast<opmath_t>(xn[i]));
    gg[lane] += gi * gi;
    dg[lane] += di * gi;
    dd[lane] += di * di;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) accumulate(lane, i + lane);
  }
  for (int lane = 0; i < n; ++i, ++lane) accumulate(lane, i);
  L2Sums sums;
  for (int lane = 0; lane < kLanes; ++lane) {
    sums.grad_sq += gg[lane];
    sums.delta_dot_grad += dg[lane];
    sums.delta_sq += dd[lane];
  }
  return sums;
}

}  // namespace cpu_loops
}  // namespace robust_fast

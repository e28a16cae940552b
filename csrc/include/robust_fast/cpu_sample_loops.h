// Loops over a batch whose samples are contiguous blocks, shared by the CPU kernels of the
// attack steps (pgd_step, apgd_step).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

namespace robust_fast {

constexpr int64_t kCpuGrainSize = 1 << 15;  // elements per task: big enough to pay for a thread

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

}  // namespace robust_fast

// CPU kernel of gaussian_copies: at::parallel_for over blocks of 256 output elements. A block's
// normals come from its 64 Philox counters (cpu_philox_lanes.h, in SIMD registers) and Box-Muller
// (normal_math.h, in plain loops that the compiler vectorizes), then its elements are written as
// x + sigma * z in one pass. The numbers depend only on (seed, element index): never on the
// thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "robust_fast/cpu_philox_lanes.h"
#include "robust_fast/noise_problem.h"
#include "robust_fast/normal_math.h"

namespace robust_fast {
namespace {

using namespace normal_math;

constexpr int64_t kLanes = cpu_philox::kLanes;  // Philox counters per block
constexpr int64_t kBlock = 4 * kLanes;           // output elements per block
constexpr int64_t kBlocksPerTask = 64;           // 16K elements: enough to pay for a thread

// z[4 i + m] = normal m of counter first_group + i.
void block_normals(uint64_t first_group, uint64_t seed, float* z) {
  cpu_philox::LaneWords words;
  cpu_philox::philox_lanes(first_group, seed, words);
  alignas(64) float a0[kLanes], a1[kLanes], b0[kLanes], b1[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    box_muller(words.words[0][i], words.words[1][i], a0[i], a1[i]);
    box_muller(words.words[2][i], words.words[3][i], b0[i], b1[i]);
  }
  for (int64_t i = 0; i < kLanes; ++i) {
    z[4 * i + 0] = a0[i];
    z[4 * i + 1] = a1[i];
    z[4 * i + 2] = b0[i];
    z[4 * i + 3] = b1[i];
  }
}

template <typename scalar_t>
void write_block(const NoiseProblem& p, const scalar_t* x, scalar_t* out, int64_t begin,
                 int64_t end, const float* z) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto sigma = static_cast<opmath_t>(p.sigma);
  const int64_t n = p.sample_numel;
  for (int64_t e = begin; e < end;) {
    const int64_t row = e / n;
    const int64_t piece_end = std::min(end, (row + 1) * n);
    // out row `row` is a copy of x's sample row / copies
    const scalar_t* src = x + (row / p.copies) * n + (e - row * n);
    const float* noise = z + (e - begin);
    scalar_t* dst = out + e;
    const int64_t size = piece_end - e;
    for (int64_t i = 0; i < size; ++i) {
      dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[i]) +
                                     sigma * static_cast<opmath_t>(noise[i]));
    }
    e = piece_end;
  }
}

void gaussian_copies_cpu(const NoiseProblem& p) {
  const int64_t numel = p.out.numel();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out.scalar_type(), "gaussian_copies_cpu", [&] {
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    scalar_t* out = p.out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t first, int64_t last) {
      alignas(64) float z[kBlock];
      for (int64_t b = first; b < last; ++b) {
        block_normals(static_cast<uint64_t>(b * kLanes), p.seed_value, z);
        write_block(p, x, out, b * kBlock, std::min(numel, (b + 1) * kBlock), z);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("gaussian_copies", &gaussian_copies_entry<gaussian_copies_cpu>);
  m.impl("gaussian_copies_out", &gaussian_copies_out_entry<gaussian_copies_cpu>);
}

}  // namespace robust_fast

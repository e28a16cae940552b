// Deterministic block-wide sums for the CUDA kernels of the attack steps (pgd_step, apgd_step):
// a fixed order of additions, so results do not vary from run to run.
#pragma once

namespace robust_fast {
namespace cuda_reduce {

constexpr int kWarpSize = 32;

// <g,g>, <d,g>, <d,d> of a piece of a sample, d = x - x_nat (other kernels use fewer fields).
struct L2Sums {
  double grad_sq, delta_dot_grad, delta_sq;
};

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

__device__ __forceinline__ L2Sums warp_sum(L2Sums sums) {
  return {warp_sum(sums.grad_sq), warp_sum(sums.delta_dot_grad), warp_sum(sums.delta_sq)};
}

// Sum over the block in a fixed order. The total is valid in thread 0. blockDim.x must be a
// multiple of the warp size.
__device__ inline L2Sums block_sum(L2Sums sums) {
  __shared__ L2Sums warp_totals[1024 / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  sums = warp_sum(sums);
  if (lane == 0) warp_totals[warp] = sums;
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x) / kWarpSize;
    sums = lane < warps ? warp_totals[lane] : L2Sums{0.0, 0.0, 0.0};
    sums = warp_sum(sums);
  }
  __syncthreads();  // warp_totals is free for the next call
  return sums;
}

}  // namespace cuda_reduce
}  // namespace robust_fast

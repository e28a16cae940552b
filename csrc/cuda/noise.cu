// CUDA kernel of gaussian_copies: a grid-stride loop over groups of four output elements; each
// thread turns its group's Philox counter into four normals (normal_math.h, the CPU kernel's
// numbers) and writes x + sigma * z for the four, x read through the cache. The seed is a kernel
// argument, or read by the kernel from device memory (no host synchronisation to draw it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "robust_fast/noise_problem.h"
#include "robust_fast/normal_math.h"

namespace robust_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void gaussian_copies_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                       int64_t numel, int64_t sample_numel, int64_t copies,
                                       double sigma_d, uint64_t seed_value,
                                       const int64_t* seed_on_device) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint64_t seed =
      seed_on_device != nullptr ? static_cast<uint64_t>(*seed_on_device) : seed_value;
  const auto sigma = static_cast<opmath_t>(sigma_d);
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    float z[4];
    normal_math::normals4(static_cast<uint64_t>(g), seed, z);
    int64_t e = 4 * g;
    int64_t row = e / sample_numel;
    int64_t within = e - row * sample_numel;
#pragma unroll
    for (int m = 0; m < 4; ++m, ++e, ++within) {
      if (within == sample_numel) {  // the group runs into the next row
        within = 0;
        ++row;
      }
      if (e < numel) {
        const opmath_t value = static_cast<opmath_t>(x[(row / copies) * sample_numel + within]);
        out[e] = static_cast<scalar_t>(value + sigma * static_cast<opmath_t>(z[m]));
      }
    }
  }
}

void gaussian_copies_cuda(const NoiseProblem& p) {
  const int64_t numel = p.out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard device_guard(p.out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t groups = (numel + 3) / 4;
  const int64_t resident =
      static_cast<int64_t>(props->multiProcessorCount) * (props->maxThreadsPerMultiProcessor / kThreads);
  const auto blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min((groups + kThreads - 1) / kThreads, resident)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out.scalar_type(), "gaussian_copies_cuda", [&] {
    gaussian_copies_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(), p.out.mutable_data_ptr<scalar_t>(), numel, p.sample_numel,
        p.copies, p.sigma, p.seed_value, p.seed_on_device);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CUDA, m) {
  m.impl("gaussian_copies", &gaussian_copies_entry<gaussian_copies_cuda>);
  m.impl("gaussian_copies_out", &gaussian_copies_out_entry<gaussian_copies_cuda>);
}

}  // namespace robust_fast

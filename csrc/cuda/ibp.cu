// CUDA kernels of interval bound propagation. The products are the vendor's (cuBLAS through
// at::addmm, cuDNN through at::convolution, called from csrc/ibp_problem.cpp); here are the
// elementwise interval ReLU (also the products' epilogue, in place on their fresh outputs) and
// its backward: grid-stride loops over one shared dense layout, int64 indices, the current
// stream, half/bfloat16 computed in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "robust_fast/ibp_math.h"
#include "robust_fast/ibp_problem.h"

namespace robust_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t>
__global__ void ibp_relu_kernel(const scalar_t* c, const scalar_t* r, scalar_t* c_out,
                                scalar_t* r_out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    acc_t co, ro;
    interval_relu<acc_t>(static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), co, ro);
    c_out[i] = static_cast<scalar_t>(co);
    r_out[i] = static_cast<scalar_t>(ro);
  }
}

template <typename scalar_t>
__global__ void ibp_relu_backward_kernel(const scalar_t* gco, const scalar_t* gro, const scalar_t* c,
                                         const scalar_t* r, scalar_t* gc, scalar_t* gr, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    acc_t a, b;
    interval_relu_backward<acc_t>(static_cast<acc_t>(gco[i]), static_cast<acc_t>(gro[i]),
                                  static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), a, b);
    gc[i] = static_cast<scalar_t>(a);
    gr[i] = static_cast<scalar_t>(b);
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

void ibp_relu_cuda(const at::Tensor& center, const at::Tensor& radius, const at::Tensor& center_out,
                   const at::Tensor& radius_out) {
  const int64_t n = center.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(center.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, center.scalar_type(), "ibp_relu_cuda", [&] {
    ibp_relu_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        center.const_data_ptr<scalar_t>(), radius.const_data_ptr<scalar_t>(),
        center_out.mutable_data_ptr<scalar_t>(), radius_out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void _ibp_relu_backward_cuda(const at::Tensor& grad_center_out, const at::Tensor& grad_radius_out,
                             const at::Tensor& center, const at::Tensor& radius,
                             const at::Tensor& grad_center, const at::Tensor& grad_radius) {
  const int64_t n = center.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(center.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, center.scalar_type(), "_ibp_relu_backward_cuda", [&] {
    ibp_relu_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad_center_out.const_data_ptr<scalar_t>(), grad_radius_out.const_data_ptr<scalar_t>(),
        center.const_data_ptr<scalar_t>(), radius.const_data_ptr<scalar_t>(),
        grad_center.mutable_data_ptr<scalar_t>(), grad_radius.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CUDA, m) {
  m.impl("ibp_relu", &ibp_relu_entry<ibp_relu_cuda>);
  m.impl("_ibp_relu_backward", &ibp_relu_backward_entry<_ibp_relu_backward_cuda>);
  m.impl("ibp_linear", &ibp_linear_entry<ibp_relu_cuda>);
  m.impl("ibp_conv2d", &ibp_conv2d_entry<ibp_relu_cuda>);
}

}  // namespace robust_fast

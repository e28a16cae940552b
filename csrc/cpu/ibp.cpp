// CPU kernels of interval bound propagation. The products are the vendor's (at::addmm,
// at::convolution, called from csrc/ibp_problem.cpp); here are the elementwise interval ReLU
// (also the products' epilogue, in place on their fresh outputs) and its backward: flat loops
// over one shared dense layout, at::parallel_for over chunks, half/bfloat16 computed in float.
// The loops are branch-free selects, which -O3 vectorizes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "robust_fast/ibp_math.h"
#include "robust_fast/ibp_problem.h"

namespace robust_fast {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per task: enough to pay for a thread

template <typename scalar_t>
void relu_range(const scalar_t* c, const scalar_t* r, scalar_t* c_out, scalar_t* r_out,
                int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    acc_t co, ro;
    interval_relu<acc_t>(static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), co, ro);
    c_out[i] = static_cast<scalar_t>(co);
    r_out[i] = static_cast<scalar_t>(ro);
  }
}

void ibp_relu_cpu(const at::Tensor& center, const at::Tensor& radius, const at::Tensor& center_out,
                  const at::Tensor& radius_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, center.scalar_type(), "ibp_relu_cpu", [&] {
    // A dense tensor's element 0 is its lowest address: the block runs numel() from there.
    const scalar_t* c = center.const_data_ptr<scalar_t>();
    const scalar_t* r = radius.const_data_ptr<scalar_t>();
    scalar_t* co = center_out.mutable_data_ptr<scalar_t>();
    scalar_t* ro = radius_out.mutable_data_ptr<scalar_t>();
    // In place (the products' epilogue) each element is read before it is written.
    at::parallel_for(0, center.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      relu_range<scalar_t>(c, r, co, ro, begin, end);
    });
  });
}

void ibp_relu_backward_cpu(const at::Tensor& grad_center_out, const at::Tensor& grad_radius_out,
                           const at::Tensor& center, const at::Tensor& radius,
                           const at::Tensor& grad_center, const at::Tensor& grad_radius) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, center.scalar_type(), "ibp_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gco = grad_center_out.const_data_ptr<scalar_t>();
    const scalar_t* gro = grad_radius_out.const_data_ptr<scalar_t>();
    const scalar_t* c = center.const_data_ptr<scalar_t>();
    const scalar_t* r = radius.const_data_ptr<scalar_t>();
    scalar_t* gc = grad_center.mutable_data_ptr<scalar_t>();
    scalar_t* gr = grad_radius.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, center.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t a, b;
        interval_relu_backward<acc_t>(static_cast<acc_t>(gco[i]), static_cast<acc_t>(gro[i]),
                                      static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), a, b);
        gc[i] = static_cast<scalar_t>(a);
        gr[i] = static_cast<scalar_t>(b);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ibp_linear_backward_cpu(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, const at::Tensor& weight, const c10::optional<at::Tensor>& abs_weight,
    std::array<bool, 3> output_mask) {
  return run_ibp_linear_backward(grad_center, grad_radius, center, radius, weight, abs_weight, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ibp_conv2d_backward_cpu(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, const at::Tensor& weight, const c10::optional<at::Tensor>& abs_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  return run_ibp_conv2d_backward(grad_center, grad_radius, center, radius, weight, abs_weight, stride,
                                 padding, dilation, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("ibp_relu", &ibp_relu_entry<ibp_relu_cpu>);
  m.impl("_ibp_relu_backward", &ibp_relu_backward_entry<ibp_relu_backward_cpu>);
  m.impl("ibp_linear", &ibp_linear_entry<ibp_relu_cpu>);
  m.impl("_ibp_linear_backward", &ibp_linear_backward_cpu);
  m.impl("ibp_conv2d", &ibp_conv2d_entry<ibp_relu_cpu>);
  m.impl("_ibp_conv2d_backward", &ibp_conv2d_backward_cpu);
}

}  // namespace robust_fast

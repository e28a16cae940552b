// CPU kernels of interval bound propagation. The products are the vendor's (at::addmm,
// at::convolution, called from csrc/ibp_problem.cpp); here are the elementwise interval ReLU
// (also the products' epilogue, in place on their fresh outputs) and its backward: flat loops
// over one shared dense layout, at::parallel_for over chunks. float and double run on
// at::vec::Vectorized (NaN-propagating maximum, as torch.relu), the tail and half/bfloat16 on
// the scalar math of ibp_math.h in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "robust_fast/ibp_math.h"
#include "robust_fast/ibp_problem.h"

namespace robust_fast {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per task: enough to pay for a thread

template <typename scalar_t>
void relu_range(const scalar_t* c, const scalar_t* r, scalar_t* c_out, scalar_t* r_out,
                int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec zero(scalar_t(0)), half(scalar_t(0.5));
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec center = Vec::loadu(c + i), radius = Vec::loadu(r + i);
      const Vec lo = at::vec::maximum(center - radius, zero);
      const Vec hi = at::vec::maximum(center + radius, zero);
      ((hi + lo) * half).store(c_out + i);
      ((hi - lo) * half).store(r_out + i);
    }
  }
  for (; i < end; ++i) {
    acc_t co, ro;
    interval_relu<acc_t>(static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), co, ro);
    c_out[i] = static_cast<scalar_t>(co);
    r_out[i] = static_cast<scalar_t>(ro);
  }
}

template <typename scalar_t>
void relu_backward_range(const scalar_t* gco, const scalar_t* gro, const scalar_t* c, const scalar_t* r,
                         scalar_t* gc, scalar_t* gr, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec zero(scalar_t(0)), half(scalar_t(0.5));
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec g_c = Vec::loadu(gco + i), g_r = Vec::loadu(gro + i);
      const Vec center = Vec::loadu(c + i), radius = Vec::loadu(r + i);
      const Vec grad_hi = g_c * half + g_r * half;
      const Vec grad_lo = g_c * half - g_r * half;
      // A comparison sets every bit of a lane where it holds: the AND keeps or zeroes the lane.
      const Vec through_hi = (center + radius > zero) & grad_hi;
      const Vec through_lo = (center - radius > zero) & grad_lo;
      (through_hi + through_lo).store(gc + i);
      (through_hi - through_lo).store(gr + i);
    }
  }
  for (; i < end; ++i) {
    acc_t a, b;
    interval_relu_backward<acc_t>(static_cast<acc_t>(gco[i]), static_cast<acc_t>(gro[i]),
                                  static_cast<acc_t>(c[i]), static_cast<acc_t>(r[i]), a, b);
    gc[i] = static_cast<scalar_t>(a);
    gr[i] = static_cast<scalar_t>(b);
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

void _ibp_relu_backward_cpu(const at::Tensor& grad_center_out, const at::Tensor& grad_radius_out,
                            const at::Tensor& center, const at::Tensor& radius,
                            const at::Tensor& grad_center, const at::Tensor& grad_radius) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, center.scalar_type(), "_ibp_relu_backward_cpu", [&] {
    const scalar_t* gco = grad_center_out.const_data_ptr<scalar_t>();
    const scalar_t* gro = grad_radius_out.const_data_ptr<scalar_t>();
    const scalar_t* c = center.const_data_ptr<scalar_t>();
    const scalar_t* r = radius.const_data_ptr<scalar_t>();
    scalar_t* gc = grad_center.mutable_data_ptr<scalar_t>();
    scalar_t* gr = grad_radius.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, center.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      relu_backward_range<scalar_t>(gco, gro, c, r, gc, gr, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("ibp_relu", &ibp_relu_entry<ibp_relu_cpu>);
  m.impl("_ibp_relu_backward", &ibp_relu_backward_entry<_ibp_relu_backward_cpu>);
  m.impl("ibp_linear", &ibp_linear_entry<ibp_relu_cpu>);
  m.impl("ibp_conv2d", &ibp_conv2d_entry<ibp_relu_cpu>);
}

}  // namespace robust_fast

// Host-side part of interval bound propagation shared by the CPU and CUDA kernels: checks, the
// vendor products (at::addmm / at::mm, at::convolution) on the center and the radius, the |W|
// of a weight when the caller has none cached, and the ReLU epilogue through the device's
// elementwise kernel. Kept free of kernel code so nvcc and the C++ compiler both include it.
// The backwards of the products (_ibp_linear_backward, _ibp_conv2d_backward) need no device
// kernel: csrc/ibp_problem.cpp registers them once, for every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace robust_fast {

// The device's elementwise interval ReLU: reads (center, radius), writes (center_out,
// radius_out). All four have the same shape and the same dense strides; an output may be its
// input (in place).
using IntervalReluKernel = void (*)(const at::Tensor& center, const at::Tensor& radius,
                                    const at::Tensor& center_out, const at::Tensor& radius_out);
// Its backward: the gradients with respect to (center, radius), same layout rules.
using IntervalReluBackwardKernel = void (*)(const at::Tensor& grad_center_out,
                                            const at::Tensor& grad_radius_out,
                                            const at::Tensor& center, const at::Tensor& radius,
                                            const at::Tensor& grad_center,
                                            const at::Tensor& grad_radius);

std::tuple<at::Tensor, at::Tensor> run_ibp_relu(const at::Tensor& center, const at::Tensor& radius,
                                                IntervalReluKernel kernel);
std::tuple<at::Tensor, at::Tensor> run_ibp_relu_backward(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, IntervalReluBackwardKernel kernel);

std::tuple<at::Tensor, at::Tensor> run_ibp_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight, bool relu,
    IntervalReluKernel kernel);

std::tuple<at::Tensor, at::Tensor> run_ibp_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, IntervalReluKernel kernel);

// Entry points with the schemas' signatures, one instantiation per device kernel.
template <IntervalReluKernel Kernel>
std::tuple<at::Tensor, at::Tensor> ibp_relu_entry(const at::Tensor& center, const at::Tensor& radius) {
  return run_ibp_relu(center, radius, Kernel);
}

template <IntervalReluBackwardKernel Kernel>
std::tuple<at::Tensor, at::Tensor> ibp_relu_backward_entry(const at::Tensor& grad_center,
                                                           const at::Tensor& grad_radius,
                                                           const at::Tensor& center,
                                                           const at::Tensor& radius) {
  return run_ibp_relu_backward(grad_center, grad_radius, center, radius, Kernel);
}

template <IntervalReluKernel Kernel>
std::tuple<at::Tensor, at::Tensor> ibp_linear_entry(const at::Tensor& center, const at::Tensor& radius,
                                                    const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const c10::optional<at::Tensor>& abs_weight,
                                                    bool relu) {
  return run_ibp_linear(center, radius, weight, bias, abs_weight, relu, Kernel);
}

template <IntervalReluKernel Kernel>
std::tuple<at::Tensor, at::Tensor> ibp_conv2d_entry(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu) {
  return run_ibp_conv2d(center, radius, weight, bias, abs_weight, stride, padding, dilation, groups,
                        relu, Kernel);
}

}  // namespace robust_fast

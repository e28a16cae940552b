// Scalar math of interval bound propagation in center/radius form, shared by the CPU and CUDA
// kernels so that both compute the reference's expression (robust_fast/reference/ibp.py) in
// the same order.
#pragma once

#include "robust_fast/host_device.h"

namespace robust_fast {

// The interval [c - r, c + r] through ReLU: [relu(c - r), relu(c + r)] back in center/radius
// form. relu as torch.relu: max(v, 0) (a NaN stays NaN).
template <typename T>
RF_HOST_DEVICE void interval_relu(T center, T radius, T& center_out, T& radius_out) {
  const T lower = center - radius;
  const T upper = center + radius;
  const T lo = lower > T(0) ? lower : (lower != lower ? lower : T(0));
  const T hi = upper > T(0) ? upper : (upper != upper ? upper : T(0));
  center_out = (hi + lo) * T(0.5);
  radius_out = (hi - lo) * T(0.5);
}

// Gradients of interval_relu with respect to (center, radius), as autograd takes them through
// the reference: the upstream gradients go to hi and lo (each half of them), then through relu
// (gradient 1 where its input is > 0, else 0).
template <typename T>
RF_HOST_DEVICE void interval_relu_backward(T grad_center_out, T grad_radius_out, T center,
                                           T radius, T& grad_center, T& grad_radius) {
  const T grad_hi = grad_center_out * T(0.5) + grad_radius_out * T(0.5);
  const T grad_lo = grad_center_out * T(0.5) - grad_radius_out * T(0.5);
  const T through_hi = center + radius > T(0) ? grad_hi : T(0);
  const T through_lo = center - radius > T(0) ? grad_lo : T(0);
  grad_center = through_hi + through_lo;
  grad_radius = through_hi - through_lo;
}

}  // namespace robust_fast

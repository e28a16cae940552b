// Scalar math of the PGD step, shared by the CPU and CUDA kernels so that both compute the
// same expression in the same order (the order of the reference, robust_fast/reference/pgd.py).
#pragma once

#include <cmath>

#include "robust_fast/host_device.h"

namespace robust_fast {

// torch.clamp semantics: max with lo, then min with hi; a NaN stays NaN.
template <typename T>
RF_HOST_DEVICE T clamp_like_torch(T value, T lo, T hi) {
  value = value < lo ? lo : value;
  return value > hi ? hi : value;
}

// sign(g) with NaN (and 0) mapped to 0: a NaN gradient makes no move.
template <typename T>
RF_HOST_DEVICE T sign_or_zero(T g) {
  return g > T(0) ? T(1) : (g < T(0) ? T(-1) : T(0));
}

// The L-inf projection of one element: onto [x_nat - eps, x_nat + eps], then into the box.
template <typename T>
RF_HOST_DEVICE T linf_project(T point, T x_nat, T eps, T clip_lo, T clip_hi) {
  const T delta = clamp_like_torch(point - x_nat, -eps, eps);
  return clamp_like_torch(x_nat + delta, clip_lo, clip_hi);
}

// One L-inf step for one element. `alpha` carries the sign of the step (negated for targeted).
// Every operation rounds to T, exactly as the eager expression does in T.
template <typename T>
RF_HOST_DEVICE T linf_step(T x_adv, T grad, T x_nat, T eps, T alpha, T clip_lo, T clip_hi) {
  return linf_project(x_adv + alpha * sign_or_zero(grad), x_nat, eps, clip_lo, clip_hi);
}

// min(1, eps / norm) from a squared norm: the factor of l2_project (1 inside the ball).
template <typename acc_t>
RF_HOST_DEVICE acc_t l2_projection_factor(acc_t squared_norm, acc_t eps) {
  const acc_t norm = std::sqrt(squared_norm > acc_t(0) ? squared_norm : acc_t(0));
  return norm > eps ? eps / norm : acc_t(1);
}

// Per-sample coefficients of the L2 step, from the sums of one pass over the sample:
// grad_sq = <g, g>, delta_dot_grad = <d, g>, delta_sq = <d, d>, with d = x_adv - x_nat.
// The stepped delta is d + s*g with s = alpha / ||g||, so its squared norm is
// <d,d> + 2 s <d,g> + s^2 <g,g>, and no second pass is needed to project it.
template <typename acc_t>
struct L2Coefficients {
  acc_t step_scale;  // s, or 0 when the sample does not move
  acc_t factor;      // min(1, eps / ||d + s*g||)
};

// Every kernel squares and sums g in one accumulation type for every element (float for
// half, bfloat16 and float inputs, double for double). Squares below that type's smallest
// normal number lose digits or vanish, so a sum under sample_numel * that number
// understates ||g|| and a step alpha/||g|| * g would be longer than alpha: such a sample,
// like one whose sum overflowed, does not move.
template <typename accum_t>
RF_HOST_DEVICE double smallest_reliable_grad_sq(long long sample_numel) {
  return static_cast<double>(sample_numel) * static_cast<double>(
      sizeof(accum_t) == sizeof(double) ? 2.2250738585072014e-308 : 1.1754943508222875e-38);
}

template <typename acc_t>
RF_HOST_DEVICE L2Coefficients<acc_t> l2_coefficients(acc_t grad_sq, acc_t delta_dot_grad,
                                                     acc_t delta_sq, acc_t eps, acc_t alpha,
                                                     acc_t min_grad_sq) {
  // A gradient norm that under- or overflowed (or is NaN) means no move, never NaN.
  const bool moves = grad_sq >= min_grad_sq && grad_sq > acc_t(0) && grad_sq < acc_t(INFINITY);
  const acc_t grad_norm = std::sqrt(moves ? grad_sq : acc_t(1));
  const acc_t step_scale = moves ? alpha / grad_norm : acc_t(0);
  acc_t stepped_sq = delta_sq;
  if (moves) {
    stepped_sq += acc_t(2) * step_scale * delta_dot_grad + step_scale * step_scale * grad_sq;
  }
  return {step_scale, l2_projection_factor(stepped_sq, eps)};
}

// The L2 projection of one element, given its sample's factor min(1, eps / ||point - x_nat||):
// scale the difference, then clamp into the box.
template <typename T>
RF_HOST_DEVICE T l2_project(T point, T x_nat, T factor, T clip_lo, T clip_hi) {
  return clamp_like_torch(x_nat + (point - x_nat) * factor, clip_lo, clip_hi);
}

// One L2 step for one element, given its sample's coefficients.
template <typename T>
RF_HOST_DEVICE T l2_step(T x_adv, T grad, T x_nat, T step_scale, T factor, T clip_lo, T clip_hi) {
  const T stepped = step_scale != T(0) ? x_adv + step_scale * grad : x_adv;
  return l2_project(stepped, x_nat, factor, clip_lo, clip_hi);
}

// APGD's momentum combination of one element (Croce & Hein 2020): from x towards the projected
// step z with weight a, plus (1 - a) of the last move x - x_prev, in this order:
// (x + a*(z - x)) + (1 - a)*(x - x_prev). `one_minus_a` is 1 - a rounded once, as the reference
// computes it. The result is projected again by the caller.
template <typename T>
RF_HOST_DEVICE T momentum_point(T x, T z, T x_prev, T a, T one_minus_a) {
  const T towards = x + a * (z - x);
  const T last_move = one_minus_a * (x - x_prev);
  return towards + last_move;
}

}  // namespace robust_fast

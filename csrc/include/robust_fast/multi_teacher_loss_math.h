// Scalar math of the multi-teacher loss, shared by the CPU and CUDA kernels so that both compute
// the same expressions (those of robust_fast/reference/multi_teacher_loss.py).
//
// One row is a student row s and a teacher row t of length D. A row's loss needs a few sums over
// the row (pass 1); from them come the loss and the coefficients of its gradient (finalize), and
// the gradient of each element is a linear expression of s_i, t_i (pass 2):
//   grad_s_i = gs_s * s_i + gs_t * t_i + gs_d * d_i,   grad_t_i = gt_s * s_i + gt_t * t_i + gt_d * d_i
// with d_i = s_i - t_i (sign(s_i - t_i) for l1). The coefficients already carry the row's
// weight (coef: the weight times the reduction factor, or the upstream gradient). KL has its
// own passes in each kernel (max, sum of exponentials, then the log-probabilities):
//   loss = T^2 sum p_t (lt - ls),  d/ds = T (p_s - p_t),  d/dt = T p_t (lt - ls - KL)
// with ls, lt the log-probabilities of s/T and t/T.
#pragma once

#include <cmath>
#include <cstdint>

#include "robust_fast/host_device.h"

namespace robust_fast {

enum class LossKind : int { kCosine = 0, kL2 = 1, kL2Normalized = 2, kL1 = 3, kMse = 4, kKl = 5 };

// F.cosine_similarity's default eps: each norm is clamped to at least this.
constexpr double kCosineEps = 1e-8;

// max(v, lo) that keeps a NaN v NaN (as torch's clamp_min): a NaN norm must not become eps.
template <typename acc_t>
RF_HOST_DEVICE acc_t clamp_min_keep_nan(acc_t v, acc_t lo) {
  return v > lo ? v : (v != v ? v : lo);
}

// The sums one row needs (each kind uses some of them).
template <typename acc_t>
struct RowSums {
  acc_t ss = 0, tt = 0, st = 0;  // <s,s>, <t,t>, <s,t>        (cosine; tt also l2_normalized)
  acc_t dd = 0;                  // <s-t, s-t>                 (l2, l2_normalized, mse)
  acc_t ad = 0;                  // sum |s - t|                (l1)

  RF_HOST_DEVICE RowSums& operator+=(const RowSums& o) {
    ss += o.ss; tt += o.tt; st += o.st; dd += o.dd; ad += o.ad;
    return *this;
  }
};

template <LossKind Kind, typename acc_t>
RF_HOST_DEVICE void accumulate(RowSums<acc_t>& r, acc_t s, acc_t t) {
  if constexpr (Kind == LossKind::kCosine) {
    r.ss += s * s;
    r.tt += t * t;
    r.st += s * t;
  } else if constexpr (Kind == LossKind::kL2 || Kind == LossKind::kMse) {
    const acc_t d = s - t;
    r.dd += d * d;
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    const acc_t d = s - t;
    r.dd += d * d;
    r.tt += t * t;
  } else if constexpr (Kind == LossKind::kL1) {
    const acc_t d = s - t;
    r.ad += d < acc_t(0) ? -d : d;
  }
}

// The gradient scale of each (sample, teacher) row: from a (B, K) array when rows have their
// own weights, else one value for all (no array to allocate and fill on every call).
template <typename acc_t>
struct RowCoefs {
  const acc_t* per_row = nullptr;  // (B, K) contiguous, or null
  acc_t uniform = 0;

  RF_HOST_DEVICE acc_t at(int64_t b, int64_t k, int64_t count) const {
    return per_row != nullptr ? per_row[b * count + k] : uniform;
  }
};

template <typename acc_t>
struct RowGrad {
  acc_t loss = 0;
  acc_t gs_s = 0, gs_t = 0, gs_d = 0;  // student gradient coefficients
  acc_t gt_s = 0, gt_t = 0, gt_d = 0;  // teacher gradient coefficients
};

// Loss and gradient coefficients of one row from its sums; coef scales the gradient.
template <LossKind Kind, typename acc_t>
RF_HOST_DEVICE RowGrad<acc_t> finalize(const RowSums<acc_t>& r, acc_t coef, int64_t dim) {
  RowGrad<acc_t> g;
  if constexpr (Kind == LossKind::kCosine) {
    // cos = <s,t> / (max(|s|, eps) max(|t|, eps)); its gradient is autograd's of
    // F.cosine_similarity: t/(ns' nt') - cos s/(ns' |s|), the second term 0 when |s| = 0.
    const acc_t eps = static_cast<acc_t>(kCosineEps);
    const acc_t ns = std::sqrt(r.ss), nt = std::sqrt(r.tt);
    const acc_t ns_c = clamp_min_keep_nan(ns, eps), nt_c = clamp_min_keep_nan(nt, eps);
    const acc_t inv = acc_t(1) / (ns_c * nt_c);
    const acc_t cosine = r.st * inv;
    g.loss = acc_t(1) - cosine;
    g.gs_t = -coef * inv;
    g.gs_s = ns > acc_t(0) ? coef * cosine / (ns_c * ns) : acc_t(0);
    g.gt_s = -coef * inv;
    g.gt_t = nt > acc_t(0) ? coef * cosine / (nt_c * nt) : acc_t(0);
  } else if constexpr (Kind == LossKind::kL2) {
    const acc_t n = std::sqrt(r.dd);
    g.loss = n;
    g.gs_d = n == acc_t(0) ? acc_t(0) : coef / n;  // s = t: gradient 0; a NaN row stays NaN
    g.gt_d = -g.gs_d;
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    const acc_t n = std::sqrt(r.dd), nt = std::sqrt(r.tt);
    g.loss = n / nt;
    g.gs_d = n == acc_t(0) ? acc_t(0) : coef / (n * nt);
    g.gt_d = -g.gs_d;
    g.gt_t = -coef * g.loss / (nt * nt);
  } else if constexpr (Kind == LossKind::kL1) {
    g.loss = r.ad;
    g.gs_d = coef;  // times sign(s - t)
    g.gt_d = -coef;
  } else if constexpr (Kind == LossKind::kMse) {
    g.loss = r.dd / static_cast<acc_t>(dim);
    g.gs_d = acc_t(2) * coef / static_cast<acc_t>(dim);
    g.gt_d = -g.gs_d;
  }
  return g;
}

template <LossKind Kind, typename acc_t>
RF_HOST_DEVICE acc_t difference_term(acc_t s, acc_t t) {
  const acc_t d = s - t;
  if constexpr (Kind == LossKind::kL1) {
    return d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
  } else {
    return d;
  }
}

template <LossKind Kind, typename acc_t>
RF_HOST_DEVICE acc_t student_grad(const RowGrad<acc_t>& g, acc_t s, acc_t t) {
  if constexpr (Kind == LossKind::kCosine) {
    return g.gs_s * s + g.gs_t * t;
  } else {
    return g.gs_d * difference_term<Kind>(s, t);
  }
}

template <LossKind Kind, typename acc_t>
RF_HOST_DEVICE acc_t teacher_grad(const RowGrad<acc_t>& g, acc_t s, acc_t t) {
  if constexpr (Kind == LossKind::kCosine) {
    return g.gt_s * s + g.gt_t * t;
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    return g.gt_d * (s - t) + g.gt_t * t;
  } else {
    return g.gt_d * difference_term<Kind>(s, t);
  }
}

}  // namespace robust_fast

// CPU kernels of the multi-teacher loss: at::parallel_for over samples; for each sample, each
// teacher's row in two passes (the sums, then the gradient). The gradient of a shared (B, D)
// student sums over its teachers in an accumulation-dtype buffer before its one write. With
// frozen teachers (at most kGroup) the passes are pipelined across samples: the sweep that
// writes a sample's gradient from cache takes the next sample's sums from memory. Sweeps
// prefetch the rows of a later sample into L2. float and double rows run on
// at::vec::Vectorized (the widest vectors the ISA flags of setup.py allow; exp from ATen's
// vectorized math); half and bfloat16 rows on scalar loops in float, sums kept in kLanes
// independent accumulators.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "robust_fast/multi_teacher_loss_math.h"
#include "robust_fast/multi_teacher_loss_problem.h"

namespace robust_fast {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per task: enough to pay for a thread

// How many of the three lane sums a kind uses, and what they are (see to_sums).
template <LossKind Kind>
constexpr int kSumCount = Kind == LossKind::kCosine ? 3 : (Kind == LossKind::kL2Normalized ? 2 : 1);

template <LossKind Kind, typename acc_t>
inline void element_terms(acc_t s, acc_t t, acc_t& x, acc_t& y, acc_t& z) {
  const acc_t d = s - t;
  if constexpr (Kind == LossKind::kCosine) {
    x = s * s; y = t * t; z = s * t;
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    x = d * d; y = t * t; z = 0;
  } else if constexpr (Kind == LossKind::kL1) {
    x = std::abs(d); y = 0; z = 0;
  } else {  // l2, mse
    x = d * d; y = 0; z = 0;
  }
}

template <LossKind Kind, typename acc_t>
inline RowSums<acc_t> to_sums(acc_t x, acc_t y, acc_t z) {
  RowSums<acc_t> r;
  if constexpr (Kind == LossKind::kCosine) {
    r.ss = x; r.tt = y; r.st = z;
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    r.dd = x; r.tt = y;
  } else if constexpr (Kind == LossKind::kL1) {
    r.ad = x;
  } else {
    r.dd = x;
  }
  return r;
}

template <LossKind Kind, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RowSums<acc_t> row_sums(const scalar_t* s, const scalar_t* t, int64_t n) {
  constexpr int kLanes = 64 / sizeof(acc_t);
  constexpr int kCount = kSumCount<Kind>;
  acc_t xs[kLanes] = {}, ys[kLanes] = {}, zs[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      acc_t x, y, z;
      element_terms<Kind, acc_t>(static_cast<acc_t>(s[i + lane]), static_cast<acc_t>(t[i + lane]), x, y, z);
      xs[lane] += x;
      if constexpr (kCount > 1) ys[lane] += y;
      if constexpr (kCount > 2) zs[lane] += z;
    }
  }
  acc_t x_total = 0, y_total = 0, z_total = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    x_total += xs[lane];
    y_total += ys[lane];
    z_total += zs[lane];
  }
  for (; i < n; ++i) {
    acc_t x, y, z;
    element_terms<Kind, acc_t>(static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i]), x, y, z);
    x_total += x;
    y_total += y;
    z_total += z;
  }
  return to_sums<Kind, acc_t>(x_total, y_total, z_total);
}

template <typename acc_t>
struct KlScratch {
  std::vector<acc_t> exp_s, exp_t;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t row_max(const scalar_t* x, int64_t n) {
  constexpr int kLanes = 64 / sizeof(acc_t);
  acc_t lanes[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const acc_t v = static_cast<acc_t>(x[i + lane]);
      lanes[lane] = v > lanes[lane] ? v : lanes[lane];
    }
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int lane = 0; lane < kLanes; ++lane) m = lanes[lane] > m ? lanes[lane] : m;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

// exp((x - m) / T) into out; returns their sum.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t shifted_exp(const scalar_t* x, int64_t n, acc_t m, acc_t inv_t, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp((static_cast<acc_t>(x[i]) - m) * inv_t);
  constexpr int kLanes = 64 / sizeof(acc_t);
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += out[i + lane];
  }
  acc_t total = 0;
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  for (; i < n; ++i) total += out[i];
  return total;
}

// One KL row: returns the loss T^2 KL; writes (or adds, when accumulate) the student's gradient
// into grad_s (acc_t or scalar_t), the teacher's into grad_t.
template <typename scalar_t, typename acc_t, typename grad_s_t>
acc_t kl_row_kernel(const scalar_t* s, const scalar_t* t, int64_t n, acc_t temperature, acc_t coef,
                    grad_s_t* grad_s, bool accumulate, scalar_t* grad_t, KlScratch<acc_t>& scratch) {
  const acc_t inv_t = acc_t(1) / temperature;
  scratch.exp_s.resize(n);
  scratch.exp_t.resize(n);
  acc_t* es = scratch.exp_s.data();
  acc_t* et = scratch.exp_t.data();
  const acc_t max_s = row_max(s, n), max_t = row_max(t, n);
  const acc_t sum_s = shifted_exp(s, n, max_s, inv_t, es);
  const acc_t sum_t = shifted_exp(t, n, max_t, inv_t, et);
  const acc_t log_s = std::log(sum_s), log_t = std::log(sum_t);
  const acc_t inv_sum_s = acc_t(1) / sum_s, inv_sum_t = acc_t(1) / sum_t;
  // KL = sum p_t (lt - ls), lt - ls = ((t - max_t) - (s - max_s)) / T - log_t + log_s.
  constexpr int kLanes = 64 / sizeof(acc_t);
  acc_t lanes[kLanes] = {};
  const acc_t shift = log_s - log_t;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const int64_t j = i + lane;
      const acc_t diff = ((static_cast<acc_t>(t[j]) - max_t) - (static_cast<acc_t>(s[j]) - max_s)) * inv_t + shift;
      lanes[lane] += et[j] * inv_sum_t * diff;
    }
  }
  acc_t kl = 0;
  for (int lane = 0; lane < kLanes; ++lane) kl += lanes[lane];
  for (; i < n; ++i) {
    const acc_t diff = ((static_cast<acc_t>(t[i]) - max_t) - (static_cast<acc_t>(s[i]) - max_s)) * inv_t + shift;
    kl += et[i] * inv_sum_t * diff;
  }
  const acc_t scale = coef * temperature;
  if (grad_s != nullptr) {
    if (accumulate) {
      for (int64_t j = 0; j < n; ++j) {
        grad_s[j] = static_cast<grad_s_t>(static_cast<acc_t>(grad_s[j]) + scale * (es[j] * inv_sum_s - et[j] * inv_sum_t));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        grad_s[j] = static_cast<grad_s_t>(scale * (es[j] * inv_sum_s - et[j] * inv_sum_t));
      }
    }
  }
  if (grad_t != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t diff = ((static_cast<acc_t>(t[j]) - max_t) - (static_cast<acc_t>(s[j]) - max_s)) * inv_t + shift;
      grad_t[j] = static_cast<scalar_t>(scale * et[j] * inv_sum_t * (diff - kl));
    }
  }
  return temperature * temperature * kl;
}


// ---- float and double rows: explicit vectors -------------------------------------------------

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vec_exp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // ATen softmax's exp
  } else {
    return x.exp();
  }
}

template <typename T>
inline T reduce_sum(const Vec<T>& v) {
  alignas(64) T lanes[Vec<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) total += lanes[i];
  return total;
}

template <typename T>
inline T reduce_max(const Vec<T>& v) {
  alignas(64) T lanes[Vec<T>::size()];
  v.store(lanes);
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < Vec<T>::size(); ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

template <LossKind Kind, typename T>
inline void vec_terms(const Vec<T>& s, const Vec<T>& t, Vec<T>& x, Vec<T>& y, Vec<T>& z) {
  if constexpr (Kind == LossKind::kCosine) {
    x = at::vec::fmadd(s, s, x);
    y = at::vec::fmadd(t, t, y);
    z = at::vec::fmadd(s, t, z);
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    const Vec<T> d = s - t;
    x = at::vec::fmadd(d, d, x);
    y = at::vec::fmadd(t, t, y);
  } else if constexpr (Kind == LossKind::kL1) {
    x = x + (s - t).abs();
  } else {
    const Vec<T> d = s - t;
    x = at::vec::fmadd(d, d, x);
  }
}

template <LossKind Kind, typename T>
RowSums<T> row_sums_vec(const T* s, const T* t, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> x0(T(0)), y0(T(0)), z0(T(0)), x1(T(0)), y1(T(0)), z1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {  // two independent chains
    vec_terms<Kind, T>(Vec<T>::loadu(s + i), Vec<T>::loadu(t + i), x0, y0, z0);
    vec_terms<Kind, T>(Vec<T>::loadu(s + i + W), Vec<T>::loadu(t + i + W), x1, y1, z1);
  }
  if (i < n) {  // the rest, zero-padded (every term of a zero pair is 0)
    const int64_t rest = std::min<int64_t>(n - i, W);
    vec_terms<Kind, T>(Vec<T>::loadu(s + i, rest), Vec<T>::loadu(t + i, rest), x0, y0, z0);
    i += rest;
    if (i < n) {
      vec_terms<Kind, T>(Vec<T>::loadu(s + i, n - i), Vec<T>::loadu(t + i, n - i), x1, y1, z1);
    }
  }
  return to_sums<Kind, T>(reduce_sum<T>(x0 + x1), reduce_sum<T>(y0 + y1), reduce_sum<T>(z0 + z1));
}

template <LossKind Kind, typename T>
inline Vec<T> vec_difference_term(const Vec<T>& s, const Vec<T>& t) {
  const Vec<T> d = s - t;
  if constexpr (Kind == LossKind::kL1) {
    const Vec<T> zero(T(0)), one(T(1));
    return ((d > zero) & one) - ((d < zero) & one);  // sign, 0 at 0
  } else {
    return d;
  }
}

template <LossKind Kind, typename T>
inline Vec<T> vec_student_grad(const RowGrad<T>& g, const Vec<T>& s, const Vec<T>& t) {
  if constexpr (Kind == LossKind::kCosine) {
    return at::vec::fmadd(Vec<T>(g.gs_s), s, Vec<T>(g.gs_t) * t);
  } else {
    return Vec<T>(g.gs_d) * vec_difference_term<Kind, T>(s, t);
  }
}

template <LossKind Kind, typename T>
inline Vec<T> vec_teacher_grad(const RowGrad<T>& g, const Vec<T>& s, const Vec<T>& t) {
  if constexpr (Kind == LossKind::kCosine) {
    return at::vec::fmadd(Vec<T>(g.gt_s), s, Vec<T>(g.gt_t) * t);
  } else if constexpr (Kind == LossKind::kL2Normalized) {
    return at::vec::fmadd(Vec<T>(g.gt_d), s - t, Vec<T>(g.gt_t) * t);
  } else {
    return Vec<T>(g.gt_d) * vec_difference_term<Kind, T>(s, t);
  }
}

// out = f(s_i, t_i) (or out += f when accumulate), vector by vector.
template <typename T, typename VecFn, typename ScalarFn>
inline void write_row(T* out, const T* s, const T* t, int64_t n, bool accumulate, const VecFn& vf,
                      const ScalarFn& sf) {
  constexpr int64_t W = Vec<T>::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec<T> v = vf(Vec<T>::loadu(s + i), Vec<T>::loadu(t + i));
    if (accumulate) v = v + Vec<T>::loadu(out + i);
    v.store(out + i);
  }
  for (; i < n; ++i) out[i] = accumulate ? out[i] + sf(s[i], t[i]) : sf(s[i], t[i]);
}

template <typename T>
T row_max_vec(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec<T> m(neg_inf);
  int64_t i = 0;
  for (; i + W <= n; i += W) m = at::vec::maximum(m, Vec<T>::loadu(x + i));
  T result = reduce_max<T>(m);
  for (; i < n; ++i) result = x[i] > result ? x[i] : result;
  return result;
}

// exp((x - m) / T) into out; returns their sum.
template <typename T>
T shifted_exp_vec(const T* x, int64_t n, T m, T inv_t, T* out) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> mv(m), iv(inv_t);
  Vec<T> total(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec<T> e = vec_exp<T>((Vec<T>::loadu(x + i) - mv) * iv);
    e.store(out + i);
    total = total + e;
  }
  T sum = reduce_sum<T>(total);
  for (; i < n; ++i) {
    out[i] = std::exp((x[i] - m) * inv_t);
    sum += out[i];
  }
  return sum;
}

// kl_row_kernel for float and double rows.
template <typename T>
T kl_row_vec(const T* s, const T* t, int64_t n, T temperature, T coef, T* grad_s, bool accumulate,
             T* grad_t, KlScratch<T>& scratch) {
  constexpr int64_t W = Vec<T>::size();
  const T inv_t = T(1) / temperature;
  scratch.exp_s.resize(n);
  scratch.exp_t.resize(n);
  T* es = scratch.exp_s.data();
  T* et = scratch.exp_t.data();
  const T max_s = row_max_vec(s, n), max_t = row_max_vec(t, n);
  const T sum_s = shifted_exp_vec(s, n, max_s, inv_t, es);
  const T sum_t = shifted_exp_vec(t, n, max_t, inv_t, et);
  const T shift = std::log(sum_s) - std::log(sum_t);
  const T inv_sum_s = T(1) / sum_s, inv_sum_t = T(1) / sum_t;
  const auto diff_of = [&](T sv, T tv) { return ((tv - max_t) - (sv - max_s)) * inv_t + shift; };
  const Vec<T> ms(max_s), mt(max_t), iv(inv_t), sh(shift), izs(inv_sum_s), izt(inv_sum_t);
  const auto vec_diff = [&](const Vec<T>& sv, const Vec<T>& tv) { return at::vec::fmadd((tv - mt) - (sv - ms), iv, sh); };
  // KL = sum p_t (lt - ls)
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    acc = at::vec::fmadd(Vec<T>::loadu(et + i) * izt, vec_diff(Vec<T>::loadu(s + i), Vec<T>::loadu(t + i)), acc);
  }
  T kl = reduce_sum<T>(acc);
  for (; i < n; ++i) kl += et[i] * inv_sum_t * diff_of(s[i], t[i]);
  const T scale = coef * temperature;
  if (grad_s != nullptr) {
    // d/ds = T (p_s - p_t), from the stored exponentials (the rows are not read again).
    const Vec<T> sc(scale);
    i = 0;
    for (; i + W <= n; i += W) {
      Vec<T> g = sc * (Vec<T>::loadu(es + i) * izs - Vec<T>::loadu(et + i) * izt);
      if (accumulate) g = g + Vec<T>::loadu(grad_s + i);
      g.store(grad_s + i);
    }
    for (; i < n; ++i) {
      const T g = scale * (es[i] * inv_sum_s - et[i] * inv_sum_t);
      grad_s[i] = accumulate ? grad_s[i] + g : g;
    }
  }
  if (grad_t != nullptr) {
    const Vec<T> sc(scale), klv(kl);
    i = 0;
    for (; i + W <= n; i += W) {
      const Vec<T> d = vec_diff(Vec<T>::loadu(s + i), Vec<T>::loadu(t + i));
      (sc * Vec<T>::loadu(et + i) * izt * (d - klv)).store(grad_t + i);
    }
    for (; i < n; ++i) grad_t[i] = scale * et[i] * inv_sum_t * (diff_of(s[i], t[i]) - kl);
  }
  return temperature * temperature * kl;
}

// One row of a non-KL kind, float or double: sums, then the gradients.
template <LossKind Kind, typename T>
T loss_row_vec(const T* s, const T* t, int64_t n, T coef, T* grad_s, bool accumulate, T* grad_t) {
  const RowGrad<T> g = finalize<Kind, T>(row_sums_vec<Kind, T>(s, t, n), coef, n);
  if (grad_s != nullptr) {
    write_row<T>(grad_s, s, t, n, accumulate,
                 [&](const Vec<T>& sv, const Vec<T>& tv) { return vec_student_grad<Kind, T>(g, sv, tv); },
                 [&](T sv, T tv) { return student_grad<Kind, T>(g, sv, tv); });
  }
  if (grad_t != nullptr) {
    write_row<T>(grad_t, s, t, n, false,
                 [&](const Vec<T>& sv, const Vec<T>& tv) { return vec_teacher_grad<Kind, T>(g, sv, tv); },
                 [&](T sv, T tv) { return teacher_grad<Kind, T>(g, sv, tv); });
  }
  return g.loss;
}


// A shared (B, D) student row against up to kGroup teachers at once (float, double, non-KL):
// pass 1 reads the student vector once per step with the G teachers' vectors beside it, pass 2
// writes the student's gradient summed over the G teachers once (added to the groups before
// when there are more than kGroup).
template <typename T>
inline void store_streaming(const Vec<T>& v, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(out, static_cast<__m512>(v));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(out, static_cast<__m256>(v));
    return;
  }
#endif
  v.store(out);
}

constexpr int kGroup = 4;

// How far ahead of the rows being summed a sweep asks for rows, into L2: at least this many
// bytes of each stream. The hardware prefetchers alone keep too few lines of the
// G + 1 streams in flight: 12% faster from cold caches on a Zen 4 VM (16 to 64 KB alike; a
// prefetch into L1 gained nothing).
constexpr int64_t kPrefetchBytes = 16 << 10;

inline void prefetch_to_l2(const void* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address, /*rw=*/0, /*locality=*/2);  // prefetcht1
#else
  (void)address;
#endif
}

// Samples ahead of the one being summed whose rows are prefetched: kPrefetchBytes of rows.
inline int64_t samples_ahead(int64_t dim, int64_t element_bytes) {
  const int64_t row_bytes = std::max<int64_t>(1, dim * element_bytes);
  return std::max<int64_t>(1, (kPrefetchBytes + row_bytes - 1) / row_bytes);
}


// Pass 1 of a group: each teacher's sums, its row read beside the student row in one sweep (G + 1
// streams, which the hardware prefetchers follow together). The accumulators are named members,
// which stay in registers: GCC kept an array of vectors in memory and stored all of it every
// step (nine stores a step for three teachers).
template <LossKind Kind, typename T, int G>
struct GroupSums {
  static_assert(G >= 1 && G <= kGroup, "a group holds 1 to kGroup teachers");
  Vec<T> x0{T(0)}, y0{T(0)}, z0{T(0)}, x1{T(0)}, y1{T(0)}, z1{T(0)};
  Vec<T> x2{T(0)}, y2{T(0)}, z2{T(0)}, x3{T(0)}, y3{T(0)}, z3{T(0)};

  // load(row) gives the vector of this step of a row; t holds the group's kGroup row pointers.
  // Cosine's <s, s> is the same for every teacher of the group: only x0 takes it.
  static constexpr bool kSharedNorm = Kind == LossKind::kCosine;

  template <typename Load>
  inline void add(const Load& load, const T* s, const T* const* t) {
    const Vec<T> sv = load(s);
    const auto teacher = [&](const Vec<T>& tv, Vec<T>& x, Vec<T>& y, Vec<T>& z) {
      if constexpr (kSharedNorm) {
        y = at::vec::fmadd(tv, tv, y);
        z = at::vec::fmadd(sv, tv, z);
      } else {
        vec_terms<Kind, T>(sv, tv, x, y, z);
      }
    };
    if constexpr (kSharedNorm) x0 = at::vec::fmadd(sv, sv, x0);
    teacher(load(t[0]), x0, y0, z0);
    if constexpr (G > 1) teacher(load(t[1]), x1, y1, z1);
    if constexpr (G > 2) teacher(load(t[2]), x2, y2, z2);
    if constexpr (G > 3) teacher(load(t[3]), x3, y3, z3);
  }

  // A whole sweep from step `from` on, the last partial step zero-padded (every term of a zero
  // pair is 0).
  // later_s, later_t: a later sample's rows to prefetch along the way, or null.
  inline void add_rows(const T* s, const T* const* t, int64_t from, int64_t n,
                       const T* later_s = nullptr, const T* const* later_t = nullptr) {
    constexpr int64_t W = Vec<T>::size();
    int64_t i = from;
    for (; i + W <= n; i += W) {
      if (later_s != nullptr) {
        prefetch_to_l2(later_s + i);
        for (int j = 0; j < G; ++j) prefetch_to_l2(later_t[j] + i);
      }
      add([&](const T* row) { return Vec<T>::loadu(row + i); }, s, t);
    }
    if (i < n) add([&](const T* row) { return Vec<T>::loadu(row + i, n - i); }, s, t);
  }

  void finish(RowSums<T>* out) const {
    const auto sums = [](const Vec<T>& x, const Vec<T>& y, const Vec<T>& z) {
      return to_sums<Kind, T>(reduce_sum<T>(x), reduce_sum<T>(y), reduce_sum<T>(z));
    };
    out[0] = sums(x0, y0, z0);
    if constexpr (G > 1) out[1] = sums(kSharedNorm ? x0 : x1, y1, z1);
    if constexpr (G > 2) out[2] = sums(kSharedNorm ? x0 : x2, y2, z2);
    if constexpr (G > 3) out[3] = sums(kSharedNorm ? x0 : x3, y3, z3);
  }
};

// The student's gradient summed over a group, one vector step at a time. Every kind but l1 has
// a student gradient linear in its rows, a s + b t: summed over the group it is
// (sum of a) s + sum of b t, G + 1 multiply-adds a step instead of 2G.
template <LossKind Kind, typename T, int G>
struct GroupStudentGrad {
  static constexpr bool kLinear = Kind != LossKind::kL1;
  const RowGrad<T>* g;
  T a_sum = 0, b[G];

  explicit GroupStudentGrad(const RowGrad<T>* grads) : g(grads) {
    for (int j = 0; j < G; ++j) {
      a_sum += Kind == LossKind::kCosine ? g[j].gs_s : g[j].gs_d;
      b[j] = Kind == LossKind::kCosine ? g[j].gs_t : -g[j].gs_d;
    }
  }

  // sum + the gradient at this step; load(row) as for GroupSums::add.
  template <typename Load>
  inline Vec<T> add(Vec<T> sum, const Vec<T>& sv, const Load& load, const T* const* t) const {
    if constexpr (kLinear) sum = at::vec::fmadd(Vec<T>(a_sum), sv, sum);
    for (int j = 0; j < G; ++j) {
      if constexpr (kLinear) {
        sum = at::vec::fmadd(Vec<T>(b[j]), load(t[j]), sum);
      } else {
        sum = sum + vec_student_grad<Kind, T>(g[j], sv, load(t[j]));
      }
    }
    return sum;
  }

  // Elements from..n-1 one by one (the part after the last whole vector).
  void add_tail(const T* s, const T* const* t, int64_t from, int64_t n, T* grad_s,
                bool accumulate) const {
    for (int64_t i = from; i < n; ++i) {
      T sum = accumulate ? grad_s[i] : T(0);
      for (int j = 0; j < G; ++j) sum += student_grad<Kind, T>(g[j], s[i], t[j][i]);
      grad_s[i] = sum;
    }
  }
};

template <typename T>
inline void store_row_step(const Vec<T>& v, T* out, bool streaming) {
  if (streaming) {
    store_streaming<T>(v, out);
  } else {
    v.store(out);
  }
}

// Pass 2 of a group: grad_s (and, when TeacherGrads, each grad_t[j]) from the rows, which are in
// cache after pass 1. A separate instance per TeacherGrads keeps the usual case (frozen
// teachers) free of branches in the loop.
template <LossKind Kind, typename T, int G, bool TeacherGrads>
void write_group_grads(const T* s, const T* const* t, int64_t n, const RowGrad<T>* g, T* grad_s,
                       bool accumulate, bool stream_s, T* const* grad_t) {
  constexpr int64_t W = Vec<T>::size();
  const GroupStudentGrad<Kind, T, G> student(g);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const auto load = [&](const T* row) { return Vec<T>::loadu(row + i); };
    const Vec<T> sv = load(s);
    if constexpr (TeacherGrads) {
      for (int j = 0; j < G; ++j) vec_teacher_grad<Kind, T>(g[j], sv, load(t[j])).store(grad_t[j] + i);
    }
    if (grad_s == nullptr) continue;
    const Vec<T> sum = student.add(accumulate ? load(grad_s) : Vec<T>(T(0)), sv, load, t);
    store_row_step<T>(sum, grad_s + i, stream_s);
  }
  if (grad_s != nullptr) student.add_tail(s, t, i, n, grad_s, accumulate);
  if constexpr (TeacherGrads) {
    for (int j = 0; j < G; ++j) {
      for (int64_t e = i; e < n; ++e) grad_t[j][e] = teacher_grad<Kind, T>(g[j], s[e], t[j][e]);
    }
  }
}

template <LossKind Kind, typename T, int G>
void shared_group_vec(const T* s, const T* const* t, int64_t n, const T* coef, T* rows, T* grad_s,
                      bool accumulate, bool accumulate_later, T* const* grad_t, const T* later_s,
                      const T* const* later_t) {
  GroupSums<Kind, T, G> acc;
  acc.add_rows(s, t, 0, n, later_s, later_t);
  RowSums<T> sums[G];
  acc.finish(sums);
  RowGrad<T> g[G];
  for (int j = 0; j < G; ++j) {
    g[j] = finalize<Kind, T>(sums[j], coef[j], n);
    if (rows != nullptr) rows[j] = g[j].loss;
  }
  // The last group's write of the gradient row goes around the caches (no read for ownership):
  // nothing reads it again in this call.
  const bool stream_s = !accumulate_later && grad_s != nullptr &&
                        reinterpret_cast<uintptr_t>(grad_s) % sizeof(Vec<T>) == 0;
  if (grad_t != nullptr) {
    write_group_grads<Kind, T, G, true>(s, t, n, g, grad_s, accumulate, stream_s, grad_t);
  } else if (grad_s != nullptr) {
    write_group_grads<Kind, T, G, false>(s, t, n, g, grad_s, accumulate, stream_s, grad_t);
  }
}

// All K teachers of one sample b, shared student, in groups of kGroup.
template <LossKind Kind, typename T>
void shared_sample_vec(const LossProblem& p, int64_t b, const T* student, const T* teachers,
                       const RowCoefs<T>& coefs, T* rows, T* grad_student, T* grad_teachers) {
  const int64_t B = p.batch, K = p.teachers_count, D = p.dim;
  const T* s = student + b * p.student_stride_b;
  T* gs = grad_student != nullptr ? grad_student + b * D : nullptr;
  const int64_t later_b = b + samples_ahead(D, sizeof(T));  // its rows are prefetched
  const T* later_s = later_b < B ? student + later_b * p.student_stride_b : nullptr;
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    const int group = static_cast<int>(std::min<int64_t>(kGroup, K - k0));
    const T* t[kGroup];
    const T* later_t[kGroup];
    T* gt[kGroup];
    for (int j = 0; j < group; ++j) {
      t[j] = teachers + (k0 + j) * p.teacher_stride_k + b * p.teacher_stride_b;
      later_t[j] = later_s != nullptr ? teachers + (k0 + j) * p.teacher_stride_k + later_b * p.teacher_stride_b
                                      : nullptr;
      gt[j] = grad_teachers != nullptr ? grad_teachers + ((k0 + j) * B + b) * D : nullptr;
    }
    T c[kGroup];
    for (int j = 0; j < group; ++j) c[j] = coefs.at(b, k0 + j, K);
    T* r = rows != nullptr ? rows + b * K + k0 : nullptr;
    T* const* gtp = grad_teachers != nullptr ? gt : nullptr;
    const bool acc = k0 > 0, acc_later = k0 + kGroup < K;
    switch (group) {
      case 1: shared_group_vec<Kind, T, 1>(s, t, D, c, r, gs, acc, acc_later, gtp, later_s, later_t); break;
      case 2: shared_group_vec<Kind, T, 2>(s, t, D, c, r, gs, acc, acc_later, gtp, later_s, later_t); break;
      case 3: shared_group_vec<Kind, T, 3>(s, t, D, c, r, gs, acc, acc_later, gtp, later_s, later_t); break;
      default: shared_group_vec<Kind, T, 4>(s, t, D, c, r, gs, acc, acc_later, gtp, later_s, later_t); break;
    }
  }
}

// Samples first..last-1 of a shared student against K <= kGroup frozen teachers, software
// pipelined: the sweep that writes sample b's gradient (from its rows, in cache since its sums
// were taken) also takes the sums of sample b + 1, whose rows stream in from memory meanwhile.
// Done one after the other, memory would sit idle while each gradient is written.
template <LossKind Kind, typename T, int G>
void shared_samples_pipelined(const LossProblem& p, int64_t first, int64_t last, const T* student,
                              const T* teachers, const RowCoefs<T>& coefs, T* rows, T* grad_student) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t K = p.teachers_count, n = p.dim;
  struct Sample {
    const T* s;
    const T* t[kGroup];
    RowGrad<T> g[G];
  };
  const auto locate = [&](int64_t b, Sample& x) {
    x.s = student + b * p.student_stride_b;
    for (int j = 0; j < G; ++j) x.t[j] = teachers + j * p.teacher_stride_k + b * p.teacher_stride_b;
  };
  const auto finish = [&](int64_t b, const GroupSums<Kind, T, G>& acc, Sample& x) {
    RowSums<T> sums[G];
    acc.finish(sums);
    for (int j = 0; j < G; ++j) {
      x.g[j] = finalize<Kind, T>(sums[j], coefs.at(b, j, K), n);
      if (rows != nullptr) rows[b * K + j] = x.g[j].loss;
    }
  };
  const int64_t ahead = samples_ahead(n, sizeof(T));
  Sample current, next, later;
  locate(first, current);
  {
    GroupSums<Kind, T, G> acc;
    acc.add_rows(current.s, current.t, 0, n);
    finish(first, acc, current);
  }
  for (int64_t b = first; b < last; ++b) {
    T* gs = grad_student + b * n;
    const bool stream = reinterpret_cast<uintptr_t>(gs) % sizeof(Vec<T>) == 0;
    if (b + 1 == last) {  // nothing left to take the sums of
      write_group_grads<Kind, T, G, false>(current.s, current.t, n, current.g, gs, false, stream, nullptr);
      break;
    }
    const GroupStudentGrad<Kind, T, G> grad(current.g);
    locate(b + 1, next);
    const bool prefetch = b + 1 + ahead < last;
    if (prefetch) locate(b + 1 + ahead, later);
    GroupSums<Kind, T, G> acc;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const auto load = [&](const T* row) { return Vec<T>::loadu(row + i); };
      if (prefetch) {
        prefetch_to_l2(later.s + i);
        for (int j = 0; j < G; ++j) prefetch_to_l2(later.t[j] + i);
      }
      acc.add(load, next.s, next.t);
      store_row_step<T>(grad.add(Vec<T>(T(0)), load(current.s), load, current.t), gs + i, stream);
    }
    acc.add_rows(next.s, next.t, i, n);
    grad.add_tail(current.s, current.t, i, n, gs, false);
    finish(b + 1, acc, next);
    current = next;
  }
}

template <typename scalar_t, LossKind Kind>
void loss_rows_cpu(const LossProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student = p.student.const_data_ptr<scalar_t>();
  const scalar_t* teachers = p.teachers.const_data_ptr<scalar_t>();
  acc_t* rows = p.row_losses.defined() ? p.row_losses.mutable_data_ptr<acc_t>() : nullptr;
  const RowCoefs<acc_t> coefs = row_coefs<acc_t>(p);
  scalar_t* grad_student = p.grad_student.defined() ? p.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_teachers = p.grad_teachers.defined() ? p.grad_teachers.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t B = p.batch, K = p.teachers_count, D = p.dim;
  // A shared half/bfloat16 student's gradient sums over K teachers in acc_t, written once.
  const bool sum_over_teachers =
      !std::is_same_v<scalar_t, acc_t> && grad_student != nullptr && p.shared && K > 1;
  const acc_t temperature = static_cast<acc_t>(p.temperature);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, K * D));
  at::parallel_for(0, B, grain, [&](int64_t first, int64_t last) {
    std::vector<acc_t> summed(sum_over_teachers ? D : 0);
    KlScratch<acc_t> scratch;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    struct Fence {  // streaming stores become visible before the task ends
      ~Fence() { _mm_sfence(); }
    } fence;
#endif
    if constexpr (std::is_same_v<scalar_t, acc_t> && Kind != LossKind::kKl) {
      // The common training step: one group of frozen teachers and the student's gradient.
      if (p.shared && K <= kGroup && grad_student != nullptr && grad_teachers == nullptr) {
        switch (K) {
          case 1: return shared_samples_pipelined<Kind, acc_t, 1>(p, first, last, student, teachers, coefs, rows, grad_student);
          case 2: return shared_samples_pipelined<Kind, acc_t, 2>(p, first, last, student, teachers, coefs, rows, grad_student);
          case 3: return shared_samples_pipelined<Kind, acc_t, 3>(p, first, last, student, teachers, coefs, rows, grad_student);
          default: return shared_samples_pipelined<Kind, acc_t, 4>(p, first, last, student, teachers, coefs, rows, grad_student);
        }
      }
    }
    for (int64_t b = first; b < last; ++b) {
      if constexpr (std::is_same_v<scalar_t, acc_t> && Kind != LossKind::kKl) {
        if (p.shared) {
          shared_sample_vec<Kind, acc_t>(p, b, student, teachers, coefs, rows, grad_student, grad_teachers);
          continue;
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* s = student + b * p.student_stride_b + k * p.student_stride_k;
        const scalar_t* t = teachers + k * p.teacher_stride_k + b * p.teacher_stride_b;
        const acc_t c = coefs.at(b, k, K);
        scalar_t* gt = grad_teachers != nullptr ? grad_teachers + (k * B + b) * D : nullptr;
        scalar_t* gs = grad_student == nullptr ? nullptr
                       : grad_student + (p.shared ? b * D : (b * K + k) * D);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {  // float, double: vectors
          // A shared student's gradient sums in place over its teachers (it is acc_t already).
          const acc_t loss = Kind == LossKind::kKl
              ? kl_row_vec<acc_t>(s, t, D, temperature, c, gs, p.shared && k > 0, gt, scratch)
              : loss_row_vec<Kind, acc_t>(s, t, D, c, gs, p.shared && k > 0, gt);
          if (rows != nullptr) rows[b * K + k] = loss;
        } else if constexpr (Kind == LossKind::kKl) {
          acc_t loss;
          if (sum_over_teachers) {
            loss = kl_row_kernel<scalar_t, acc_t, acc_t>(s, t, D, temperature, c, summed.data(), k > 0, gt, scratch);
          } else {
            loss = kl_row_kernel<scalar_t, acc_t, scalar_t>(s, t, D, temperature, c, gs, false, gt, scratch);
          }
          if (rows != nullptr) rows[b * K + k] = loss;
        } else {
          const RowGrad<acc_t> g = finalize<Kind, acc_t>(row_sums<Kind>(s, t, D), c, D);
          if (rows != nullptr) rows[b * K + k] = g.loss;
          if (sum_over_teachers) {
            acc_t* out = summed.data();
            if (k == 0) {
              for (int64_t i = 0; i < D; ++i) {
                out[i] = student_grad<Kind, acc_t>(g, static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i]));
              }
            } else {
              for (int64_t i = 0; i < D; ++i) {
                out[i] += student_grad<Kind, acc_t>(g, static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i]));
              }
            }
          } else if (gs != nullptr) {
            for (int64_t i = 0; i < D; ++i) {
              gs[i] = static_cast<scalar_t>(
                  student_grad<Kind, acc_t>(g, static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i])));
            }
          }
          if (gt != nullptr) {
            for (int64_t i = 0; i < D; ++i) {
              gt[i] = static_cast<scalar_t>(
                  teacher_grad<Kind, acc_t>(g, static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i])));
            }
          }
        }
      }
      if (sum_over_teachers) {
        scalar_t* out = grad_student + b * D;
        for (int64_t i = 0; i < D; ++i) out[i] = static_cast<scalar_t>(summed[i]);
      }
    }
  });
}

void multi_teacher_loss_cpu(const LossProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.student.scalar_type(),
                                  "multi_teacher_loss_cpu", [&] {
    switch (p.kind) {
      case LossKind::kCosine: return loss_rows_cpu<scalar_t, LossKind::kCosine>(p);
      case LossKind::kL2: return loss_rows_cpu<scalar_t, LossKind::kL2>(p);
      case LossKind::kL2Normalized: return loss_rows_cpu<scalar_t, LossKind::kL2Normalized>(p);
      case LossKind::kL1: return loss_rows_cpu<scalar_t, LossKind::kL1>(p);
      case LossKind::kMse: return loss_rows_cpu<scalar_t, LossKind::kMse>(p);
      case LossKind::kKl: return loss_rows_cpu<scalar_t, LossKind::kKl>(p);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CPU, m) {
  m.impl("multi_teacher_loss", &multi_teacher_loss_entry<multi_teacher_loss_cpu>);
  m.impl("_multi_teacher_loss_backward", &multi_teacher_loss_backward_entry<multi_teacher_loss_cpu>);
}

}  // namespace robust_fast

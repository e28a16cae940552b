// CUDA kernels of the multi-teacher loss. One block per sample: for each of its K teachers the
// block sums over the row (warp shuffles, then one value per warp through shared memory, in a
// fixed order: deterministic), derives the row's loss and gradient coefficients with the shared
// math of multi_teacher_loss_math.h, and writes the gradient. Each thread owns the same elements
// of the sample for every teacher, so a shared (B, D) student's gradient sums over the teachers
// in place without atomics. On the current stream, int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "robust_fast/multi_teacher_loss_math.h"
#include "robust_fast/multi_teacher_loss_problem.h"

namespace robust_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Sums (or maxima) of three values over the block, broadcast to every thread. blockDim.x is a
// multiple of the warp size.
template <typename T, bool kMax>
__device__ void block_reduce3(T& a, T& b, T& c) {
  __shared__ T partial[3][kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  if (kMax) {
    a = warp_max(a); b = warp_max(b); c = warp_max(c);
  } else {
    a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
  }
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
    partial[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const T fill = kMax ? -std::numeric_limits<T>::infinity() : T(0);
    a = lane < warps ? partial[0][lane] : fill;
    b = lane < warps ? partial[1][lane] : fill;
    c = lane < warps ? partial[2][lane] : fill;
    if (kMax) {
      a = warp_max(a); b = warp_max(b); c = warp_max(c);
    } else {
      a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
    }
    if (lane == 0) {
      partial[0][0] = a;
      partial[1][0] = b;
      partial[2][0] = c;
    }
  }
  __syncthreads();
  a = partial[0][0];
  b = partial[1][0];
  c = partial[2][0];
  __syncthreads();  // partial is free for the next call
}

template <typename scalar_t, typename grad_s_t>
struct Rows {
  const scalar_t* student;
  const scalar_t* teachers;
  RowCoefs<at::opmath_type<scalar_t>> coefs;
  at::opmath_type<scalar_t>* row_losses;  // (B, K) or null
  grad_s_t* grad_student;                 // or null
  scalar_t* grad_teachers;                // (K, B, D) or null
  int64_t batch, count, dim;
  int64_t student_stride_b, student_stride_k, teacher_stride_k, teacher_stride_b;
  bool shared;
  at::opmath_type<scalar_t> temperature;
};

template <typename scalar_t, typename grad_s_t, LossKind Kind>
__global__ void multi_teacher_loss_kernel(Rows<scalar_t, grad_s_t> r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t D = r.dim, K = r.count;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* s = r.student + b * r.student_stride_b + k * r.student_stride_k;
    const scalar_t* t = r.teachers + k * r.teacher_stride_k + b * r.teacher_stride_b;
    const acc_t coef = r.coefs.at(b, k, K);
    grad_s_t* gs = r.grad_student == nullptr ? nullptr
                   : r.grad_student + (r.shared ? b * D : (b * K + k) * D);
    scalar_t* gt = r.grad_teachers == nullptr ? nullptr : r.grad_teachers + (k * r.batch + b) * D;
    const bool add = r.shared && k > 0;  // a shared student's gradient sums over the teachers
    acc_t loss;
    if constexpr (Kind == LossKind::kKl) {
      const acc_t inv_t = acc_t(1) / r.temperature;
      acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s, unused = max_s;
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        const acc_t sv = static_cast<acc_t>(s[i]), tv = static_cast<acc_t>(t[i]);
        max_s = sv > max_s ? sv : max_s;
        max_t = tv > max_t ? tv : max_t;
      }
      block_reduce3<acc_t, true>(max_s, max_t, unused);
      acc_t sum_s = 0, sum_t = 0, zero = 0;
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        sum_s += std::exp((static_cast<acc_t>(s[i]) - max_s) * inv_t);
        sum_t += std::exp((static_cast<acc_t>(t[i]) - max_t) * inv_t);
      }
      block_reduce3<acc_t, false>(sum_s, sum_t, zero);
      // lt - ls = ((t - max_t) - (s - max_s)) / T + log(sum_s) - log(sum_t)
      const acc_t shift = std::log(sum_s) - std::log(sum_t);
      const acc_t inv_zs = acc_t(1) / sum_s, inv_zt = acc_t(1) / sum_t;
      const acc_t scale = coef * r.temperature;
      acc_t kl = 0, zero2 = 0, zero3 = 0;
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        const acc_t sv = static_cast<acc_t>(s[i]), tv = static_cast<acc_t>(t[i]);
        const acc_t e_t = std::exp((tv - max_t) * inv_t);
        kl += e_t * inv_zt * (((tv - max_t) - (sv - max_s)) * inv_t + shift);
        if (gs != nullptr) {
          acc_t g = scale * (std::exp((sv - max_s) * inv_t) * inv_zs - e_t * inv_zt);
          if (add) g += static_cast<acc_t>(gs[i]);
          gs[i] = static_cast<grad_s_t>(g);
        }
      }
      block_reduce3<acc_t, false>(kl, zero2, zero3);
      if (gt != nullptr) {
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
          const acc_t sv = static_cast<acc_t>(s[i]), tv = static_cast<acc_t>(t[i]);
          const acc_t e_t = std::exp((tv - max_t) * inv_t);
          const acc_t diff = ((tv - max_t) - (sv - max_s)) * inv_t + shift;
          gt[i] = static_cast<scalar_t>(scale * e_t * inv_zt * (diff - kl));
        }
      }
      loss = r.temperature * r.temperature * kl;
    } else {
      RowSums<acc_t> sums;
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        accumulate<Kind, acc_t>(sums, static_cast<acc_t>(s[i]), static_cast<acc_t>(t[i]));
      }
      // The kind's sums, three at a time (cosine: ss, tt, st; the others: dd or ad, and tt).
      acc_t x = Kind == LossKind::kCosine ? sums.ss : (Kind == LossKind::kL1 ? sums.ad : sums.dd);
      acc_t y = sums.tt;
      acc_t z = sums.st;
      block_reduce3<acc_t, false>(x, y, z);
      RowSums<acc_t> total;
      if (Kind == LossKind::kCosine) {
        total.ss = x; total.tt = y; total.st = z;
      } else if (Kind == LossKind::kL1) {
        total.ad = x;
      } else {
        total.dd = x; total.tt = y;
      }
      const RowGrad<acc_t> g = finalize<Kind, acc_t>(total, coef, D);
      loss = g.loss;
      if (gs != nullptr || gt != nullptr) {
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
          const acc_t sv = static_cast<acc_t>(s[i]), tv = static_cast<acc_t>(t[i]);
          if (gs != nullptr) {
            acc_t value = student_grad<Kind, acc_t>(g, sv, tv);
            if (add) value += static_cast<acc_t>(gs[i]);
            gs[i] = static_cast<grad_s_t>(value);
          }
          if (gt != nullptr) gt[i] = static_cast<scalar_t>(teacher_grad<Kind, acc_t>(g, sv, tv));
        }
      }
    }
    if (threadIdx.x == 0 && r.row_losses != nullptr) r.row_losses[b * K + k] = loss;
  }
}

int threads_for(int64_t dim) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads < dim) threads *= 2;
  return threads;
}

template <typename scalar_t, typename grad_s_t>
void launch(const LossProblem& p, grad_s_t* grad_student, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<scalar_t, grad_s_t> r{
      p.student.const_data_ptr<scalar_t>(),
      p.teachers.const_data_ptr<scalar_t>(),
      row_coefs<acc_t>(p),
      p.row_losses.defined() ? p.row_losses.mutable_data_ptr<acc_t>() : nullptr,
      grad_student,
      p.grad_teachers.defined() ? p.grad_teachers.mutable_data_ptr<scalar_t>() : nullptr,
      p.batch, p.teachers_count, p.dim,
      p.student_stride_b, p.student_stride_k, p.teacher_stride_k, p.teacher_stride_b,
      p.shared, static_cast<acc_t>(p.temperature)};
  TORCH_CHECK(p.batch <= std::numeric_limits<int32_t>::max(),
              "multi_teacher_loss: too many samples for the CUDA grid");
  const dim3 grid(static_cast<unsigned>(p.batch));
  const dim3 block(threads_for(p.dim));
  switch (p.kind) {
#define RF_LAUNCH(KIND)                                                                     \
  case KIND:                                                                                \
    multi_teacher_loss_kernel<scalar_t, grad_s_t, KIND><<<grid, block, 0, stream>>>(r);     \
    break;
    RF_LAUNCH(LossKind::kCosine)
    RF_LAUNCH(LossKind::kL2)
    RF_LAUNCH(LossKind::kL2Normalized)
    RF_LAUNCH(LossKind::kL1)
    RF_LAUNCH(LossKind::kMse)
    RF_LAUNCH(LossKind::kKl)
#undef RF_LAUNCH
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multi_teacher_loss_cuda(const LossProblem& p) {
  if (p.batch == 0 || p.teachers_count == 0) return;
  const c10::cuda::CUDAGuard device_guard(p.student.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.student.scalar_type(),
                                  "multi_teacher_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool summed = p.grad_student.defined() && p.shared && p.teachers_count > 1;
    if (summed && !std::is_same<scalar_t, acc_t>::value) {
      // A shared half/bfloat16 student's gradient sums over the teachers in float32.
      at::Tensor work = at::empty(p.grad_student.sizes(), p.grad_student.options().dtype(
                                                              c10::CppTypeToScalarType<acc_t>::value));
      launch<scalar_t, acc_t>(p, work.mutable_data_ptr<acc_t>(), stream);
      p.grad_student.copy_(work);
    } else {
      launch<scalar_t, scalar_t>(
          p, p.grad_student.defined() ? p.grad_student.mutable_data_ptr<scalar_t>() : nullptr,
          stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CUDA, m) {
  m.impl("multi_teacher_loss", &multi_teacher_loss_entry<multi_teacher_loss_cuda>);
  m.impl("_multi_teacher_loss_backward", &multi_teacher_loss_backward_entry<multi_teacher_loss_cuda>);
}

}  // namespace robust_fast

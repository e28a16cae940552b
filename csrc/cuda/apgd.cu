// CUDA kernels of the APGD step. The operands are walked as flat memory (make_apgd_problem
// guarantees one shared dense layout with each sample a contiguous block). L-inf is one
// grid-stride elementwise pass. L2 runs one block per sample, three passes over it (the second
// and third mostly from cache): the sums that give z's step scale and projection factor (as in
// pgd_step), the squared distance of the momentum point from x_nat, then the write. When the
// batch alone would leave the device idle, each sample is split among blocks as in pgd_step:
// three launches (the pieces' sums; z's coefficients from them and the pieces' squared
// distances; the projection factor and the write), partial sums added in a fixed order (no
// atomics: deterministic).
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

#include "robust_fast/apgd_problem.h"
#include "robust_fast/cuda_block_sum.cuh"
#include "robust_fast/pgd_math.h"

namespace robust_fast {
namespace {

using namespace cuda_reduce;  // the shared block sums

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;
// The smallest piece of a sample one block of the split L2 kernels takes (as pgd_step's).
constexpr int64_t kMinPieceElements = kThreads * 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
struct ApgdOperands {
  const scalar_t *x, *x_prev, *grad, *x_nat;
  scalar_t* out;   // may alias x: each element is read, then written, by the same thread
  scalar_t* prev;  // receives x (may alias x_prev), or nullptr
  const double* eta_per_sample;  // or nullptr for eta
  const double* eps_per_sample;  // or nullptr for eps
};

struct ApgdScalars {
  double eta, eps, a, one_minus_a, clip_lo, clip_hi, min_grad_sq;
};

template <typename scalar_t>
__global__ void apgd_linf_kernel(ApgdOperands<scalar_t> op, int64_t numel, int64_t sample_numel,
                                 ApgdScalars s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto a = static_cast<opmath_t>(s.a), one_minus_a = static_cast<opmath_t>(s.one_minus_a);
  const auto lo = static_cast<opmath_t>(s.clip_lo), hi = static_cast<opmath_t>(s.clip_hi);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t sample = i / sample_numel;
    const auto eta =
        static_cast<opmath_t>(op.eta_per_sample != nullptr ? op.eta_per_sample[sample] : s.eta);
    const auto eps = static_cast<opmath_t>(op.eps_per_sample != nullptr ? op.eps_per_sample[sample] : s.eps);
    const scalar_t x_raw = op.x[i];
    const opmath_t x = x_raw, xn = op.x_nat[i];
    const opmath_t z = linf_step<opmath_t>(x, op.grad[i], xn, eps, eta, lo, hi);
    const opmath_t w = momentum_point<opmath_t>(x, z, op.x_prev[i], a, one_minus_a);
    op.out[i] = static_cast<scalar_t>(linf_project<opmath_t>(w, xn, eps, lo, hi));
    if (op.prev != nullptr) op.prev[i] = x_raw;
  }
}

// The momentum point of element i, rounded to the input dtype (as the reference holds it).
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t moved_point(const ApgdOperands<scalar_t>& op, int64_t i,
                                                opmath_t step_scale, opmath_t factor, opmath_t a,
                                                opmath_t one_minus_a, opmath_t lo, opmath_t hi) {
  const opmath_t x = op.x[i];
  const opmath_t z = l2_step<opmath_t>(x, op.grad[i], op.x_nat[i], step_scale, factor, lo, hi);
  return static_cast<scalar_t>(momentum_point<opmath_t>(x, z, op.x_prev[i], a, one_minus_a));
}

// Thread 0's value of a double, handed to every thread of the block.
__device__ double broadcast_from_thread0(double value) {
  __shared__ double shared;
  if (threadIdx.x == 0) shared = value;
  __syncthreads();
  const double result = shared;
  __syncthreads();  // shared is free for the next call
  return result;
}

template <typename scalar_t>
__global__ void apgd_l2_kernel(ApgdOperands<scalar_t> op, int64_t batch, int64_t sample_numel,
                               ApgdScalars s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto a = static_cast<opmath_t>(s.a), one_minus_a = static_cast<opmath_t>(s.one_minus_a);
  const auto lo = static_cast<opmath_t>(s.clip_lo), hi = static_cast<opmath_t>(s.clip_hi);
  for (int64_t sample = blockIdx.x; sample < batch; sample += gridDim.x) {
    const int64_t begin = sample * sample_numel, end = begin + sample_numel;
    const double eps = op.eps_per_sample != nullptr ? op.eps_per_sample[sample] : s.eps;
    const double eta = op.eta_per_sample != nullptr ? op.eta_per_sample[sample] : s.eta;
    // Pass 1: <g,g>, <d,g>, <d,d>; products in opmath_t, sums in double.
    L2Sums sums{0.0, 0.0, 0.0};
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const opmath_t g = op.grad[i];
      const opmath_t d = static_cast<scalar_t>(static_cast<opmath_t>(op.x[i]) -
                                               static_cast<opmath_t>(op.x_nat[i]));
      sums.grad_sq += static_cast<double>(g * g);
      sums.delta_dot_grad += static_cast<double>(d * g);
      sums.delta_sq += static_cast<double>(d * d);
    }
    sums = block_sum(sums);
    const L2Coefficients<double> c = l2_coefficients<double>(
        sums.grad_sq, sums.delta_dot_grad, sums.delta_sq, eps, eta, s.min_grad_sq);
    const auto step_scale = static_cast<opmath_t>(broadcast_from_thread0(c.step_scale));
    const auto factor = static_cast<opmath_t>(broadcast_from_thread0(c.factor));
    // Pass 2: the squared distance of the momentum point from x_nat.
    L2Sums moved{0.0, 0.0, 0.0};
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const opmath_t w = moved_point<scalar_t>(op, i, step_scale, factor, a, one_minus_a, lo, hi);
      const opmath_t d = static_cast<scalar_t>(w - static_cast<opmath_t>(op.x_nat[i]));
      moved.delta_sq += static_cast<double>(d * d);
    }
    moved = block_sum(moved);
    const auto projection = static_cast<opmath_t>(
        broadcast_from_thread0(l2_projection_factor<double>(moved.delta_sq, eps)));
    // Pass 3: project and write (every read of passes 1 and 2 came before the barrier above).
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const scalar_t x_raw = op.x[i];
      const opmath_t w = moved_point<scalar_t>(op, i, step_scale, factor, a, one_minus_a, lo, hi);
      op.out[i] = static_cast<scalar_t>(l2_project<opmath_t>(w, op.x_nat[i], projection, lo, hi));
      if (op.prev != nullptr) op.prev[i] = x_raw;
    }
    __syncthreads();  // the next sample's sums reuse the shared buffers
  }
}

// --- the split L2 path: block (b, s) of a (pieces, samples) grid takes piece b of sample s.

struct Piece {
  int64_t begin, end;  // flat indices of the piece of `sample`
};

__device__ __forceinline__ Piece piece_of(int64_t sample, int64_t sample_numel, int64_t per_block) {
  const int64_t first = sample * sample_numel;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < sample_numel ? begin + per_block : sample_numel;
  return {first + begin, first + end};
}

// z's step scale and factor of `sample`, from its pieces' sums added in a fixed order: every
// block of the sample computes the same values. Valid in every thread.
template <typename opmath_t>
__device__ L2Coefficients<opmath_t> split_coefficients(const L2Sums* partials, int64_t sample, double eps,
                                                       double eta, double min_grad_sq) {
  L2Sums sums{0.0, 0.0, 0.0};
  for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    const L2Sums part = partials[sample * gridDim.x + b];
    sums.grad_sq += part.grad_sq;
    sums.delta_dot_grad += part.delta_dot_grad;
    sums.delta_sq += part.delta_sq;
  }
  sums = block_sum(sums);
  const L2Coefficients<double> c =
      l2_coefficients<double>(sums.grad_sq, sums.delta_dot_grad, sums.delta_sq, eps, eta, min_grad_sq);
  return {static_cast<opmath_t>(broadcast_from_thread0(c.step_scale)),
          static_cast<opmath_t>(broadcast_from_thread0(c.factor))};
}

// Split pass 1: the piece's <g,g>, <d,g>, <d,d> into partials[s * gridDim.x + b].
template <typename scalar_t>
__global__ void apgd_l2_partial_sums_kernel(ApgdOperands<scalar_t> op, int64_t batch, int64_t sample_numel,
                                            int64_t per_block, L2Sums* partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t sample = blockIdx.y; sample < batch; sample += gridDim.y) {
    const Piece piece = piece_of(sample, sample_numel, per_block);
    L2Sums sums{0.0, 0.0, 0.0};
    for (int64_t i = piece.begin + threadIdx.x; i < piece.end; i += blockDim.x) {
      const opmath_t g = op.grad[i];
      const opmath_t d = static_cast<scalar_t>(static_cast<opmath_t>(op.x[i]) -
                                               static_cast<opmath_t>(op.x_nat[i]));
      sums.grad_sq += static_cast<double>(g * g);
      sums.delta_dot_grad += static_cast<double>(d * g);
      sums.delta_sq += static_cast<double>(d * d);
    }
    sums = block_sum(sums);
    if (threadIdx.x == 0) partials[sample * gridDim.x + blockIdx.x] = sums;
  }
}

// Split pass 2: the piece's squared distance of the momentum point from x_nat into
// moved[s * gridDim.x + b].
template <typename scalar_t>
__global__ void apgd_l2_moved_sums_kernel(ApgdOperands<scalar_t> op, int64_t batch, int64_t sample_numel,
                                          int64_t per_block, const L2Sums* partials, double* moved,
                                          ApgdScalars s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto a = static_cast<opmath_t>(s.a), one_minus_a = static_cast<opmath_t>(s.one_minus_a);
  const auto lo = static_cast<opmath_t>(s.clip_lo), hi = static_cast<opmath_t>(s.clip_hi);
  for (int64_t sample = blockIdx.y; sample < batch; sample += gridDim.y) {
    const double eps = op.eps_per_sample != nullptr ? op.eps_per_sample[sample] : s.eps;
    const double eta = op.eta_per_sample != nullptr ? op.eta_per_sample[sample] : s.eta;
    const L2Coefficients<opmath_t> c = split_coefficients<opmath_t>(partials, sample, eps, eta, s.min_grad_sq);
    const Piece piece = piece_of(sample, sample_numel, per_block);
    L2Sums sums{0.0, 0.0, 0.0};
    for (int64_t i = piece.begin + threadIdx.x; i < piece.end; i += blockDim.x) {
      const opmath_t w = moved_point<scalar_t>(op, i, c.step_scale, c.factor, a, one_minus_a, lo, hi);
      const opmath_t d = static_cast<scalar_t>(w - static_cast<opmath_t>(op.x_nat[i]));
      sums.delta_sq += static_cast<double>(d * d);
    }
    sums = block_sum(sums);
    if (threadIdx.x == 0) moved[sample * gridDim.x + blockIdx.x] = sums.delta_sq;
  }
}

// Split pass 3: the projection factor from the sample's squared distances (fixed order), then
// the piece's write. Stream order puts it after every read of passes 1 and 2, so out may alias
// x and prev x_prev.
template <typename scalar_t>
__global__ void apgd_l2_apply_pieces_kernel(ApgdOperands<scalar_t> op, int64_t batch, int64_t sample_numel,
                                            int64_t per_block, const L2Sums* partials, const double* moved,
                                            ApgdScalars s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto a = static_cast<opmath_t>(s.a), one_minus_a = static_cast<opmath_t>(s.one_minus_a);
  const auto lo = static_cast<opmath_t>(s.clip_lo), hi = static_cast<opmath_t>(s.clip_hi);
  for (int64_t sample = blockIdx.y; sample < batch; sample += gridDim.y) {
    const double eps = op.eps_per_sample != nullptr ? op.eps_per_sample[sample] : s.eps;
    const double eta = op.eta_per_sample != nullptr ? op.eta_per_sample[sample] : s.eta;
    const L2Coefficients<opmath_t> c = split_coefficients<opmath_t>(partials, sample, eps, eta, s.min_grad_sq);
    L2Sums distance{0.0, 0.0, 0.0};
    for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
      distance.delta_sq += moved[sample * gridDim.x + b];
    }
    distance = block_sum(distance);
    const auto projection = static_cast<opmath_t>(
        broadcast_from_thread0(l2_projection_factor<double>(distance.delta_sq, eps)));
    const Piece piece = piece_of(sample, sample_numel, per_block);
    for (int64_t i = piece.begin + threadIdx.x; i < piece.end; i += blockDim.x) {
      const scalar_t x_raw = op.x[i];
      const opmath_t w = moved_point<scalar_t>(op, i, c.step_scale, c.factor, a, one_minus_a, lo, hi);
      op.out[i] = static_cast<scalar_t>(l2_project<opmath_t>(w, op.x_nat[i], projection, lo, hi));
      if (op.prev != nullptr) op.prev[i] = x_raw;
    }
    __syncthreads();  // the next sample's sums reuse the shared buffers
  }
}

// Blocks of `kernel` that the whole device holds at once, from the occupancy API.
template <typename KernelT>
int64_t resident_blocks(KernelT kernel) {
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return std::max<int64_t>(1, static_cast<int64_t>(blocks_per_sm) * props->multiProcessorCount);
}

template <typename scalar_t>
void launch_l2(const ApgdOperands<scalar_t>& op, const ApgdProblem& p, const ApgdScalars& scalars,
               cudaStream_t stream) {
  // Split a sample only when the batch alone leaves the device idle, into as many pieces as
  // fill it, none smaller than kMinPieceElements.
  const int64_t resident = resident_blocks(apgd_l2_partial_sums_kernel<scalar_t>);
  const int64_t most_pieces = std::max<int64_t>(1, p.sample_numel / kMinPieceElements);
  const int64_t blocks_per_sample = std::min({ceil_div(resident, p.batch), most_pieces, kMaxGridX});
  if (blocks_per_sample == 1) {
    const auto blocks = static_cast<unsigned>(std::min(p.batch, kMaxGridX));
    apgd_l2_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(op, p.batch, p.sample_numel, scalars);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t per_block = ceil_div(p.sample_numel, blocks_per_sample);
  const auto doubles = p.out.options().dtype(at::kDouble);
  at::Tensor partials = at::empty({p.batch * blocks_per_sample * 3}, doubles);
  at::Tensor moved = at::empty({p.batch * blocks_per_sample}, doubles);
  auto* partials_ptr = reinterpret_cast<L2Sums*>(partials.mutable_data_ptr<double>());
  const dim3 grid(static_cast<unsigned>(blocks_per_sample), static_cast<unsigned>(std::min(p.batch, kMaxGridY)));
  apgd_l2_partial_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(op, p.batch, p.sample_numel, per_block,
                                                                       partials_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  apgd_l2_moved_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      op, p.batch, p.sample_numel, per_block, partials_ptr, moved.mutable_data_ptr<double>(), scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  apgd_l2_apply_pieces_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      op, p.batch, p.sample_numel, per_block, partials_ptr, moved.const_data_ptr<double>(), scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t elementwise_blocks(int64_t numel) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = static_cast<int64_t>(props->multiProcessorCount) *
                           (props->maxThreadsPerMultiProcessor / kThreads);
  return std::max<int64_t>(1, std::min((numel + kThreads - 1) / kThreads, resident));
}

void apgd_step_cuda(const ApgdProblem& p) {
  const at::Tensor& x_out = p.out;
  if (p.batch == 0 || x_out.numel() == 0) return;
  // Launch on the operands' device (make_apgd_problem has checked they share one).
  const c10::cuda::CUDAGuard device_guard(x_out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ApgdScalars scalars{p.eta, p.eps, p.momentum, 1.0 - p.momentum, p.clip_lo, p.clip_hi, p.min_grad_sq};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_out.scalar_type(), "apgd_step_cuda", [&] {
    const ApgdOperands<scalar_t> op{
        p.x.const_data_ptr<scalar_t>(), p.x_prev.const_data_ptr<scalar_t>(),
        p.grad.const_data_ptr<scalar_t>(), p.x_nat.const_data_ptr<scalar_t>(),
        x_out.mutable_data_ptr<scalar_t>(),
        p.prev_out.defined() ? p.prev_out.mutable_data_ptr<scalar_t>() : nullptr,
        p.eta_per_sample.defined() ? p.eta_per_sample.const_data_ptr<double>() : nullptr,
        p.eps_per_sample.defined() ? p.eps_per_sample.const_data_ptr<double>() : nullptr};
    if (p.l2) {
      launch_l2<scalar_t>(op, p, scalars, stream);
    } else {
      const int64_t numel = x_out.numel();
      apgd_linf_kernel<scalar_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          op, numel, p.sample_numel, scalars);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CUDA, m) {
  m.impl("apgd_step", &apgd_step_entry<apgd_step_cuda>);
  m.impl("apgd_step_", &apgd_step_in_place_entry<apgd_step_cuda>);
}

}  // namespace robust_fast

// CUDA kernels of the PGD step. The operands are walked as flat memory (make_pgd_problem
// guarantees one shared dense layout with each sample a contiguous block), 16 bytes at a time
// when the pointers allow it. L-inf is one elementwise pass. L2 needs each sample's sums before
// it can write: one block per sample sums, then writes, when the batch fills the device;
// otherwise each sample is split among blocks (as many as the occupancy API says fit), which
// write partial sums, and a second pass adds its sample's partials, then writes its piece.
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

#include "robust_fast/cuda_block_sum.cuh"
#include "robust_fast/pgd_math.h"
#include "robust_fast/pgd_problem.h"

namespace robust_fast {
namespace {

using namespace cuda_reduce;  // the shared block sums

constexpr int kThreads = 256;
// The smallest piece of a sample one block of the L2 kernels takes: 16 elements per thread,
// so splitting pays for its partial sums.
constexpr int64_t kMinPieceElements = kThreads * 16;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements per 16-byte load.
template <typename scalar_t>
constexpr int kPackSize = 16 / sizeof(scalar_t);

template <typename scalar_t, int kPack>
struct alignas(sizeof(scalar_t) * kPack) Pack {
  scalar_t v[kPack];
};

template <int kPack, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, kPack> load_pack(const scalar_t* base, int64_t index) {
  return reinterpret_cast<const Pack<scalar_t, kPack>*>(base)[index];
}

template <typename scalar_t>
struct Operands {
  const scalar_t* x_adv;
  const scalar_t* grad;
  const scalar_t* x_nat;
  // May alias x_adv: each element is read, then written, by the same thread.
  scalar_t* out;
};

const double* data_or_null(const at::Tensor& per_sample) {
  return per_sample.defined() ? per_sample.const_data_ptr<double>() : nullptr;
}

// L-inf step of one sample; the per-sample tensors, when given, override the scalars.
template <typename opmath_t>
struct LinfStep {
  opmath_t eps, alpha, clip_lo, clip_hi;  // alpha already carries the sign of the step
  const double* eps_per_sample;
  const double* alpha_per_sample;
  double alpha_sign;

  __device__ LinfStep for_pack(int64_t pack, int64_t sample_packs) const {
    if (eps_per_sample == nullptr && alpha_per_sample == nullptr) return *this;  // no division
    const int64_t sample = pack / sample_packs;
    LinfStep step = *this;
    if (eps_per_sample != nullptr) step.eps = static_cast<opmath_t>(eps_per_sample[sample]);
    if (alpha_per_sample != nullptr) {
      step.alpha = static_cast<opmath_t>(alpha_sign * alpha_per_sample[sample]);
    }
    return step;
  }

  __device__ opmath_t operator()(opmath_t x, opmath_t g, opmath_t xn) const {
    return linf_step<opmath_t>(x, g, xn, eps, alpha, clip_lo, clip_hi);
  }
};

// L2 step of one sample, given its coefficients.
template <typename opmath_t>
struct L2SampleStep {
  opmath_t step_scale, factor, clip_lo, clip_hi;

  __device__ opmath_t operator()(opmath_t x, opmath_t g, opmath_t xn) const {
    return l2_step<opmath_t>(x, g, xn, step_scale, factor, clip_lo, clip_hi);
  }
};

// Grid-stride over packs of kPack elements; a pack never crosses a sample boundary.
template <typename scalar_t, int kPack, typename Step>
__global__ void pgd_elementwise_kernel(Operands<scalar_t> op, int64_t num_packs,
                                       int64_t sample_packs, Step step) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, kPack>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_packs;
       p += stride) {
    const auto sample_step = step.for_pack(p, sample_packs);
    const PackT x = load_pack<kPack>(op.x_adv, p);
    const PackT g = load_pack<kPack>(op.grad, p);
    const PackT xn = load_pack<kPack>(op.x_nat, p);
    PackT result;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      result.v[k] = static_cast<scalar_t>(sample_step(
          static_cast<opmath_t>(x.v[k]), static_cast<opmath_t>(g.v[k]),
          static_cast<opmath_t>(xn.v[k])));
    }
    reinterpret_cast<PackT*>(op.out)[p] = result;
  }
}

// Packs of 16 bytes need every pointer aligned to them and samples made of whole packs.
template <typename scalar_t>
bool can_use_packs(const Operands<scalar_t>& op, int64_t sample_numel) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return sample_numel % kPackSize<scalar_t> == 0 && aligned(op.x_adv) && aligned(op.grad) &&
         aligned(op.x_nat) && aligned(op.out);
}

// Enough blocks to fill the device once; the grid-stride loop covers the rest.
int64_t elementwise_blocks(int64_t work_items) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks_per_sm = props->maxThreadsPerMultiProcessor / kThreads;
  const int64_t resident = static_cast<int64_t>(props->multiProcessorCount) * blocks_per_sm;
  return std::max<int64_t>(1, std::min(ceil_div(work_items, kThreads), resident));
}

template <typename scalar_t, typename Step>
void launch_elementwise(const Operands<scalar_t>& op, int64_t numel, int64_t sample_numel,
                        const Step& step, cudaStream_t stream) {
  constexpr int kPack = kPackSize<scalar_t>;
  if (can_use_packs(op, sample_numel)) {
    const int64_t num_packs = numel / kPack;
    pgd_elementwise_kernel<scalar_t, kPack><<<elementwise_blocks(num_packs), kThreads, 0, stream>>>(
        op, num_packs, sample_numel / kPack, step);
  } else {
    pgd_elementwise_kernel<scalar_t, 1><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        op, numel, sample_numel, step);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The per-sample scalars of an L2 step.
struct L2Params {
  double eps, alpha, alpha_sign, min_grad_sq;
  const double* eps_per_sample;    // or nullptr for eps
  const double* alpha_per_sample;  // or nullptr for alpha
};

// <g,g>, <d,g>, <d,d> of packs [begin, end): each thread sums in opmath_t (the type of the CPU
// and Triton kernels' sums), the block adds the threads' sums in double. Valid in thread 0.
template <typename scalar_t, int kPack>
__device__ L2Sums piece_sums(const Operands<scalar_t>& op, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, kPack>;
  opmath_t grad_sq = 0, delta_dot_grad = 0, delta_sq = 0;
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const PackT x = load_pack<kPack>(op.x_adv, p);
    const PackT g = load_pack<kPack>(op.grad, p);
    const PackT xn = load_pack<kPack>(op.x_nat, p);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const auto gi = static_cast<opmath_t>(g.v[k]);
      // d rounds to the input dtype first, as the CPU kernel's d does.
      const auto di = static_cast<opmath_t>(static_cast<scalar_t>(
          static_cast<opmath_t>(x.v[k]) - static_cast<opmath_t>(xn.v[k])));
      grad_sq += gi * gi;
      delta_dot_grad += di * gi;
      delta_sq += di * di;
    }
  }
  return block_sum({static_cast<double>(grad_sq), static_cast<double>(delta_dot_grad),
                    static_cast<double>(delta_sq)});
}

// The sample's step scale and projection factor, computed by thread 0 from the block's sums
// and handed to every thread.
__device__ L2Coefficients<double> block_coefficients(const L2Params& params, int64_t sample,
                                                     const L2Sums& sums) {
  __shared__ L2Coefficients<double> shared;
  if (threadIdx.x == 0) {
    const double eps = params.eps_per_sample != nullptr ? params.eps_per_sample[sample] : params.eps;
    const double alpha = params.alpha_sign * (params.alpha_per_sample != nullptr
                                                  ? params.alpha_per_sample[sample]
                                                  : params.alpha);
    shared = l2_coefficients<double>(sums.grad_sq, sums.delta_dot_grad, sums.delta_sq, eps,
                                     alpha, params.min_grad_sq);
  }
  __syncthreads();
  const L2Coefficients<double> coefficients = shared;
  __syncthreads();  // shared is free for the next sample
  return coefficients;
}

// Writes packs [begin, end) of one sample. Each element is read, then written, by one thread.
template <typename scalar_t, int kPack>
__device__ void apply_piece(const Operands<scalar_t>& op, int64_t begin, int64_t end,
                            const L2Coefficients<double>& c, double clip_lo, double clip_hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, kPack>;
  const L2SampleStep<opmath_t> step{static_cast<opmath_t>(c.step_scale),
                                    static_cast<opmath_t>(c.factor),
                                    static_cast<opmath_t>(clip_lo), static_cast<opmath_t>(clip_hi)};
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const PackT x = load_pack<kPack>(op.x_adv, p);
    const PackT g = load_pack<kPack>(op.grad, p);
    const PackT xn = load_pack<kPack>(op.x_nat, p);
    PackT result;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      result.v[k] = static_cast<scalar_t>(step(static_cast<opmath_t>(x.v[k]),
                                               static_cast<opmath_t>(g.v[k]),
                                               static_cast<opmath_t>(xn.v[k])));
    }
    reinterpret_cast<PackT*>(op.out)[p] = result;
  }
}

// One block per sample: its sums, then its write (the second read mostly hits the cache). All
// reads of the sums come before the block's first write, so out may alias x_adv.
template <typename scalar_t, int kPack>
__global__ void l2_block_per_sample_kernel(Operands<scalar_t> op, int64_t batch,
                                           int64_t sample_packs, L2Params params,
                                           double clip_lo, double clip_hi) {
  for (int64_t sample = blockIdx.x; sample < batch; sample += gridDim.x) {
    const int64_t begin = sample * sample_packs, end = begin + sample_packs;
    const L2Sums sums = piece_sums<scalar_t, kPack>(op, begin, end);
    const L2Coefficients<double> c = block_coefficients(params, sample, sums);
    apply_piece<scalar_t, kPack>(op, begin, end, c, clip_lo, clip_hi);
  }
}

// Split pass 1: block (b, s) sums piece b of sample s into partials[s * gridDim.x + b].
template <typename scalar_t, int kPack>
__global__ void l2_partial_sums_kernel(Operands<scalar_t> op, int64_t batch, int64_t sample_packs,
                                       int64_t packs_per_block, L2Sums* partials) {
  const int64_t piece_begin = static_cast<int64_t>(blockIdx.x) * packs_per_block;
  const int64_t piece_end =
      piece_begin + packs_per_block < sample_packs ? piece_begin + packs_per_block : sample_packs;
  // Batches beyond the grid's y limit are looped over.
  for (int64_t sample = blockIdx.y; sample < batch; sample += gridDim.y) {
    const int64_t first = sample * sample_packs;
    const L2Sums total = piece_sums<scalar_t, kPack>(op, first + piece_begin, first + piece_end);
    if (threadIdx.x == 0) partials[sample * gridDim.x + blockIdx.x] = total;
  }
}

// Split pass 2: block (b, s) adds sample s's partials in a fixed order (no atomics: every
// block of the sample gets the same coefficients, run after run), then writes piece b. Stream
// order puts it after every read of pass 1, so out may alias x_adv.
template <typename scalar_t, int kPack>
__global__ void l2_apply_pieces_kernel(Operands<scalar_t> op, int64_t batch, int64_t sample_packs,
                                       int64_t packs_per_block, const L2Sums* partials,
                                       L2Params params, double clip_lo, double clip_hi) {
  const int64_t piece_begin = static_cast<int64_t>(blockIdx.x) * packs_per_block;
  const int64_t piece_end =
      piece_begin + packs_per_block < sample_packs ? piece_begin + packs_per_block : sample_packs;
  for (int64_t sample = blockIdx.y; sample < batch; sample += gridDim.y) {
    L2Sums sums{0.0, 0.0, 0.0};
    for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
      const L2Sums part = partials[sample * gridDim.x + b];
      sums.grad_sq += part.grad_sq;
      sums.delta_dot_grad += part.delta_dot_grad;
      sums.delta_sq += part.delta_sq;
    }
    const L2Coefficients<double> c = block_coefficients(params, sample, block_sum(sums));
    const int64_t first = sample * sample_packs;
    apply_piece<scalar_t, kPack>(op, first + piece_begin, first + piece_end, c, clip_lo, clip_hi);
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

template <typename scalar_t, int kPack>
void launch_l2(const Operands<scalar_t>& op, const PgdProblem& p, cudaStream_t stream) {
  const int64_t sample_packs = p.sample_numel / kPack;
  const L2Params params{p.eps, p.alpha, p.alpha_sign, p.min_grad_sq,
                        data_or_null(p.eps_per_sample), data_or_null(p.alpha_per_sample)};
  // Split a sample only when the batch alone leaves the device idle, into as many pieces as
  // fill it, none smaller than kMinPieceElements.
  const int64_t resident = resident_blocks(l2_partial_sums_kernel<scalar_t, kPack>);
  const int64_t most_pieces = std::max<int64_t>(1, sample_packs / (kMinPieceElements / kPack));
  const int64_t blocks_per_sample =
      std::min({ceil_div(resident, p.batch), most_pieces, kMaxGridX});
  if (blocks_per_sample == 1) {
    const auto blocks = static_cast<unsigned>(std::min(p.batch, kMaxGridX));
    l2_block_per_sample_kernel<scalar_t, kPack><<<blocks, kThreads, 0, stream>>>(
        op, p.batch, sample_packs, params, p.clip_lo, p.clip_hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t packs_per_block = ceil_div(sample_packs, blocks_per_sample);
  at::Tensor partials = at::empty({p.batch * blocks_per_sample * 3},
                                  p.x_adv.options().dtype(at::kDouble));
  auto* partials_ptr = reinterpret_cast<L2Sums*>(partials.mutable_data_ptr<double>());
  const dim3 grid(static_cast<unsigned>(blocks_per_sample),
                  static_cast<unsigned>(std::min(p.batch, kMaxGridY)));
  l2_partial_sums_kernel<scalar_t, kPack><<<grid, kThreads, 0, stream>>>(
      op, p.batch, sample_packs, packs_per_block, partials_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  l2_apply_pieces_kernel<scalar_t, kPack><<<grid, kThreads, 0, stream>>>(
      op, p.batch, sample_packs, packs_per_block, partials_ptr, params, p.clip_lo, p.clip_hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pgd_step_cuda(const PgdProblem& p) {
  const at::Tensor& out = p.out;
  if (p.batch == 0 || out.numel() == 0) return;
  // Launch on the operands' device (make_pgd_problem has checked they share one).
  const c10::cuda::CUDAGuard device_guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pgd_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Operands<scalar_t> op{p.x_adv.const_data_ptr<scalar_t>(),
                                p.grad.const_data_ptr<scalar_t>(),
                                p.x_nat.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>()};
    const auto clip_lo = static_cast<opmath_t>(p.clip_lo);
    const auto clip_hi = static_cast<opmath_t>(p.clip_hi);
    if (!p.l2) {
      const LinfStep<opmath_t> step{static_cast<opmath_t>(p.eps),
                                    static_cast<opmath_t>(p.alpha_sign * p.alpha),
                                    clip_lo,
                                    clip_hi,
                                    data_or_null(p.eps_per_sample),
                                    data_or_null(p.alpha_per_sample),
                                    p.alpha_sign};
      launch_elementwise(op, out.numel(), p.sample_numel, step, stream);
      return;
    }
    if (can_use_packs(op, p.sample_numel)) {
      launch_l2<scalar_t, kPackSize<scalar_t>>(op, p, stream);
    } else {
      launch_l2<scalar_t, 1>(op, p, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CUDA, m) {
  m.impl("pgd_step", &pgd_step_entry<pgd_step_cuda>);
  m.impl("pgd_step_out", &pgd_step_out_entry<pgd_step_cuda>);
}

}  // namespace robust_fast

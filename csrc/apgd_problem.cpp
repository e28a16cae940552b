#include "robust_fast/apgd_problem.h"

#include "robust_fast/pgd_math.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <limits>
#include <utility>

namespace robust_fast {
namespace {

// Dense, with dim 0 outermost: every sample is one contiguous block of memory.
bool samples_are_contiguous_blocks(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

at::Tensor per_sample(const at::Tensor& value, int64_t batch, const at::Tensor& like,
                      const char* name) {
  TORCH_CHECK(value.dim() == 1 && value.size(0) == batch, "apgd_step: ", name,
              " must have shape (", batch, ",), got ", value.sizes());
  return value.to(like.device(), at::kDouble).contiguous();
}

}  // namespace

ApgdProblem make_apgd_problem(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, const at::Tensor& eta, double eps,
                              const c10::optional<at::Tensor>& eps_per_sample, double momentum,
                              c10::string_view norm, c10::optional<double> clip_min,
                              c10::optional<double> clip_max) {
  TORCH_CHECK(norm == "linf" || norm == "l2", "apgd_step: norm must be 'linf' or 'l2'");
  TORCH_CHECK(x.dim() >= 1, "apgd_step: x must have a batch dimension");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "apgd_step: x must be a floating-point tensor");
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"x_prev", &x_prev}, {"grad", &grad}, {"x_nat", &x_nat}};
  for (const auto& [name, other] : others) {
    TORCH_CHECK(other->sizes() == x.sizes(), "apgd_step: ", name, " must have the shape of x");
    TORCH_CHECK(other->scalar_type() == x.scalar_type(), "apgd_step: ", name,
                " must have x's dtype");
    TORCH_CHECK(other->device() == x.device(), "apgd_step: ", name, " must be on x's device");
  }
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "apgd_step: momentum must be in [0, 1]");

  ApgdProblem problem;
  const bool shared_layout = samples_are_contiguous_blocks(x) && x_prev.strides() == x.strides() &&
                             grad.strides() == x.strides() && x_nat.strides() == x.strides();
  // Contiguous and channels_last inputs are walked as they lie; anything else is packed once.
  problem.x = shared_layout ? x : x.contiguous();
  problem.x_prev = shared_layout ? x_prev : x_prev.contiguous();
  problem.grad = shared_layout ? grad : grad.contiguous();
  problem.x_nat = shared_layout ? x_nat : x_nat.contiguous();
  problem.batch = x.size(0);
  problem.sample_numel = problem.batch == 0 ? 0 : x.numel() / problem.batch;
  problem.l2 = norm == "l2";
  problem.eta = per_sample(eta, problem.batch, x, "eta");
  problem.eps = eps;
  if (eps_per_sample.has_value() && eps_per_sample->defined()) {
    problem.eps_per_sample = per_sample(*eps_per_sample, problem.batch, x, "eps");
  }
  problem.momentum = momentum;
  const double inf = std::numeric_limits<double>::infinity();
  problem.clip_lo = clip_min.has_value() ? *clip_min : -inf;
  problem.clip_hi = clip_max.has_value() ? *clip_max : inf;
  problem.min_grad_sq = x.scalar_type() == at::kDouble
                            ? smallest_reliable_grad_sq<double>(problem.sample_numel)
                            : smallest_reliable_grad_sq<float>(problem.sample_numel);
  return problem;
}

at::Tensor run_apgd_step(const ApgdProblem& problem, ApgdKernel kernel) {
  at::Tensor out = at::empty_like(problem.x);  // preserves the operands' strides
  at::Tensor no_prev;
  if (out.numel() > 0) kernel(problem, out, no_prev);
  return out;
}

void run_apgd_step_in_place(const ApgdProblem& problem, at::Tensor& x, at::Tensor& x_prev,
                            ApgdKernel kernel) {
  if (x.numel() == 0) return;
  // x and x_prev are both read and written: they must not share memory, with each other or
  // with grad and x_nat (which are only read).
  for (const at::Tensor* written : {&x, &x_prev}) {
    TORCH_CHECK(at::has_internal_overlap(*written) != at::MemOverlap::Yes,
                "apgd_step: x and x_prev must not have elements that share memory (an expanded "
                "tensor?): pass dense ones");
  }
  const std::pair<const char*, const at::Tensor*> read_only[] = {
      {"x_prev", &x_prev}, {"grad", &problem.grad}, {"x_nat", &problem.x_nat}};
  for (const auto& [name, operand] : read_only) {
    TORCH_CHECK(at::get_overlap_status(x, *operand) == at::MemOverlapStatus::No,
                "apgd_step: x shares memory with ", name, ": the in-place step needs separate tensors");
  }
  for (const auto& [name, operand] : read_only) {
    if (operand == &x_prev) continue;
    TORCH_CHECK(at::get_overlap_status(x_prev, *operand) == at::MemOverlapStatus::No,
                "apgd_step: x_prev shares memory with ", name,
                ": the in-place step needs separate tensors");
  }
  if (problem.x.is_same(x) && problem.x_prev.is_same(x_prev)) {
    // Walked as they lie: each element is read, then written, by the same thread.
    at::Tensor x_out = x, prev_out = x_prev;
    kernel(problem, x_out, prev_out);
    return;
  }
  // Packed operands: the kernel writes into the packed copies, which then go back.
  ApgdProblem packed = problem;
  packed.x = problem.x.is_same(x) ? x.clone() : problem.x;
  at::Tensor x_out = packed.x, prev_out = packed.x_prev.is_same(x_prev) ? x_prev.clone() : packed.x_prev;
  packed.x_prev = prev_out;
  kernel(packed, x_out, prev_out);
  x.copy_(x_out);
  x_prev.copy_(prev_out);
}

}  // namespace robust_fast

#include "robust_fast/pgd_problem.h"

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

at::Tensor per_sample_or_undefined(const c10::optional<at::Tensor>& value, int64_t batch,
                                   const at::Tensor& like, const char* name) {
  if (!value.has_value() || !value->defined()) return at::Tensor();
  TORCH_CHECK(value->dim() == 1 && value->size(0) == batch, "pgd_step: ", name,
              " must have shape (", batch, ",), got ", value->sizes());
  return value->to(like.device(), at::kDouble).contiguous();
}

}  // namespace

PgdProblem make_pgd_problem(const at::Tensor& x_adv, const at::Tensor& grad,
                            const at::Tensor& x_nat, double eps, double alpha,
                            const c10::optional<at::Tensor>& eps_per_sample,
                            const c10::optional<at::Tensor>& alpha_per_sample,
                            c10::string_view norm, c10::optional<double> clip_min,
                            c10::optional<double> clip_max, bool targeted) {
  TORCH_CHECK(norm == "linf" || norm == "l2", "pgd_step: norm must be 'linf' or 'l2'");
  TORCH_CHECK(x_adv.dim() >= 1, "pgd_step: x_adv must have a batch dimension");
  TORCH_CHECK(grad.sizes() == x_adv.sizes() && x_nat.sizes() == x_adv.sizes(),
              "pgd_step: x_adv, grad and x_nat must have the same shape");
  TORCH_CHECK(grad.scalar_type() == x_adv.scalar_type() &&
                  x_nat.scalar_type() == x_adv.scalar_type(),
              "pgd_step: x_adv, grad and x_nat must have the same dtype");
  TORCH_CHECK(grad.device() == x_adv.device() && x_nat.device() == x_adv.device(),
              "pgd_step: x_adv, grad and x_nat must be on the same device");
  TORCH_CHECK(at::isFloatingType(x_adv.scalar_type()),
              "pgd_step: x_adv must be a floating-point tensor");

  PgdProblem problem;
  const bool shared_layout = samples_are_contiguous_blocks(x_adv) &&
                             grad.strides() == x_adv.strides() &&
                             x_nat.strides() == x_adv.strides();
  // Contiguous and channels_last inputs are walked as they lie; anything else is packed once.
  problem.x_adv = shared_layout ? x_adv : x_adv.contiguous();
  problem.grad = shared_layout ? grad : grad.contiguous();
  problem.x_nat = shared_layout ? x_nat : x_nat.contiguous();
  problem.batch = x_adv.size(0);
  problem.sample_numel = problem.batch == 0 ? 0 : x_adv.numel() / problem.batch;
  problem.l2 = norm == "l2";
  problem.eps = eps;
  problem.alpha = alpha;
  problem.alpha_sign = targeted ? -1.0 : 1.0;
  problem.eps_per_sample = per_sample_or_undefined(eps_per_sample, problem.batch, x_adv, "eps");
  problem.alpha_per_sample =
      per_sample_or_undefined(alpha_per_sample, problem.batch, x_adv, "alpha");
  const double inf = std::numeric_limits<double>::infinity();
  problem.clip_lo = clip_min.has_value() ? *clip_min : -inf;
  problem.clip_hi = clip_max.has_value() ? *clip_max : inf;
  problem.min_grad_sq = x_adv.scalar_type() == at::kDouble
                            ? smallest_reliable_grad_sq<double>(problem.sample_numel)
                            : smallest_reliable_grad_sq<float>(problem.sample_numel);
  return problem;
}

at::Tensor run_pgd_step(const PgdProblem& problem, const PgdKernel& kernel) {
  at::Tensor out = at::empty_like(problem.x_adv);  // preserves the operands' strides
  if (out.numel() > 0) kernel(problem, out);
  return out;
}

void run_pgd_step_out(const PgdProblem& problem, at::Tensor& out, const PgdKernel& kernel) {
  TORCH_CHECK(out.sizes() == problem.x_adv.sizes(), "pgd_step: out must have shape ",
              problem.x_adv.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == problem.x_adv.scalar_type() &&
                  out.device() == problem.x_adv.device(),
              "pgd_step: out must match x_adv in dtype and device");
  if (out.numel() == 0) return;
  // out may be x_adv itself (or grad, x_nat): every element is read before it is written. A
  // partial overlap would let one sample's write clobber another's input: refuse it.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "pgd_step: out has elements that share memory (an expanded tensor?): pass a dense one");
  const std::pair<const char*, const at::Tensor*> operands[] = {
      {"x_adv", &problem.x_adv}, {"grad", &problem.grad}, {"x_nat", &problem.x_nat}};
  for (const auto& [name, operand] : operands) {
    TORCH_CHECK(at::get_overlap_status(out, *operand) != at::MemOverlapStatus::Partial,
                "pgd_step: out partially overlaps ", name,
                " (it may be the very same tensor, or share no memory with it)");
  }
  if (out.strides() == problem.x_adv.strides() && out.is_non_overlapping_and_dense()) {
    // Each element is read before it is written, by the same thread: out may alias x_adv.
    kernel(problem, out);
    return;
  }
  at::Tensor result = run_pgd_step(problem, kernel);
  out.copy_(result);
}

}  // namespace robust_fast

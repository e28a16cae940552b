#include "robust_fast/pgd_problem.h"

#include "robust_fast/layout.h"
#include "robust_fast/pgd_math.h"
#include "robust_fast/radius.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <limits>

namespace robust_fast {

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
  const std::vector<NamedTensor> walked =
      walked_operands({{"x_adv", x_adv}, {"grad", grad}, {"x_nat", x_nat}});
  problem.x_adv = walked[0].second;
  problem.grad = walked[1].second;
  problem.x_nat = walked[2].second;
  problem.batch = x_adv.size(0);
  problem.sample_numel = problem.batch == 0 ? 0 : x_adv.numel() / problem.batch;
  problem.l2 = norm == "l2";
  problem.eps = eps;
  problem.alpha = alpha;
  problem.alpha_sign = targeted ? -1.0 : 1.0;
  problem.eps_per_sample = per_sample_radius(eps_per_sample, problem.batch, x_adv, "pgd_step", "eps");
  problem.alpha_per_sample =
      per_sample_radius(alpha_per_sample, problem.batch, x_adv, "pgd_step", "alpha");
  const double inf = std::numeric_limits<double>::infinity();
  problem.clip_lo = clip_min.has_value() ? *clip_min : -inf;
  problem.clip_hi = clip_max.has_value() ? *clip_max : inf;
  problem.min_grad_sq = x_adv.scalar_type() == at::kDouble
                            ? smallest_reliable_grad_sq<double>(problem.sample_numel)
                            : smallest_reliable_grad_sq<float>(problem.sample_numel);
  return problem;
}

at::Tensor run_pgd_step(PgdProblem problem, PgdKernel kernel) {
  problem.out = at::empty_like(problem.x_adv);  // preserves the walked operands' strides
  if (problem.out.numel() > 0) kernel(problem);
  return problem.out;
}

void run_pgd_step_out(PgdProblem problem, const at::Tensor& out, PgdKernel kernel) {
  TORCH_CHECK(out.sizes() == problem.x_adv.sizes(), "pgd_step: out must have shape ",
              problem.x_adv.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == problem.x_adv.scalar_type() &&
                  out.device() == problem.x_adv.device(),
              "pgd_step: out must match x_adv in dtype and device");
  if (out.numel() == 0) return;
  const bool direct = writes_directly(
      "pgd_step", {{"out", out}},
      {{"x_adv", problem.x_adv}, {"grad", problem.grad}, {"x_nat", problem.x_nat}});
  if (!direct) {
    out.copy_(run_pgd_step(std::move(problem), kernel));
    return;
  }
  problem.out = out;
  kernel(problem);
}

}  // namespace robust_fast

#include "robust_fast/apgd_problem.h"

#include "robust_fast/layout.h"
#include "robust_fast/pgd_math.h"
#include "robust_fast/radius.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <limits>
#include <utility>

namespace robust_fast {

ApgdProblem make_apgd_problem(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                              const at::Tensor& x_nat, double eta, double eps,
                              const c10::optional<at::Tensor>& eta_per_sample,
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
  const std::vector<NamedTensor> walked =
      walked_operands({{"x", x}, {"x_prev", x_prev}, {"grad", grad}, {"x_nat", x_nat}});
  problem.x = walked[0].second;
  problem.x_prev = walked[1].second;
  problem.grad = walked[2].second;
  problem.x_nat = walked[3].second;
  problem.batch = x.size(0);
  problem.sample_numel = problem.batch == 0 ? 0 : x.numel() / problem.batch;
  problem.l2 = norm == "l2";
  problem.eta = eta;
  problem.eta_per_sample = per_sample_radius(eta_per_sample, problem.batch, x, "apgd_step", "eta");
  problem.eps = eps;
  problem.eps_per_sample = per_sample_radius(eps_per_sample, problem.batch, x, "apgd_step", "eps");
  problem.momentum = momentum;
  const double inf = std::numeric_limits<double>::infinity();
  problem.clip_lo = clip_min.has_value() ? *clip_min : -inf;
  problem.clip_hi = clip_max.has_value() ? *clip_max : inf;
  problem.min_grad_sq = x.scalar_type() == at::kDouble
                            ? smallest_reliable_grad_sq<double>(problem.sample_numel)
                            : smallest_reliable_grad_sq<float>(problem.sample_numel);
  return problem;
}

at::Tensor run_apgd_step(ApgdProblem problem, ApgdKernel kernel) {
  problem.out = at::empty_like(problem.x);  // preserves the walked operands' strides
  if (problem.out.numel() > 0) kernel(problem);
  return problem.out;
}

void run_apgd_step_in_place(ApgdProblem problem, const at::Tensor& x, const at::Tensor& x_prev,
                            ApgdKernel kernel) {
  if (x.numel() == 0) return;
  const bool direct = writes_directly("apgd_step", {{"x", x}, {"x_prev", x_prev}},
                                      {{"x", problem.x},
                                       {"x_prev", problem.x_prev},
                                       {"grad", problem.grad},
                                       {"x_nat", problem.x_nat}});
  if (direct) {
    problem.out = x;
    problem.prev_out = x_prev;
    kernel(problem);
    return;
  }
  problem.out = at::empty_like(problem.x);
  problem.prev_out = at::empty_like(problem.x);
  kernel(problem);
  x.copy_(problem.out);
  x_prev.copy_(problem.prev_out);
}

}  // namespace robust_fast

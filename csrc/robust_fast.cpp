// Every schema of the library, in one place. Kernels register per dispatch key in
// csrc/cpu/ and csrc/cuda/; fake (meta) and autograd registrations live in robust_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(robust_fast, m) {
  // eps/alpha: the scalar values, or (when given) float64 tensors of shape (B,) per sample.
  // clip_min/clip_max: the box; None leaves that side open.
  m.def(
      "pgd_step(Tensor x_adv, Tensor grad, Tensor x_nat, float eps, float alpha, "
      "Tensor? eps_per_sample, Tensor? alpha_per_sample, str norm, float? clip_min, "
      "float? clip_max, bool targeted) -> Tensor");
  // Writes into `out`, which may be x_adv itself (the in-place update of an attack loop).
  m.def(
      "pgd_step_out(Tensor x_adv, Tensor grad, Tensor x_nat, float eps, float alpha, "
      "Tensor? eps_per_sample, Tensor? alpha_per_sample, str norm, float? clip_min, "
      "float? clip_max, bool targeted, Tensor(a!) out) -> ()");
  // One APGD step (Croce & Hein 2020): z = P(x + eta*s), x_new = P(x + a(z - x) + (1 - a)(x - x_prev)),
  // s = sign(grad) (linf) or grad/||grad|| (l2), P the projection onto the eps-ball around x_nat
  // and the box. eta/eps: as pgd_step's eps/alpha, the scalar or (when given) a float64 (B,) tensor.
  m.def(
      "apgd_step(Tensor x, Tensor x_prev, Tensor grad, Tensor x_nat, float eta, float eps, "
      "Tensor? eta_per_sample, Tensor? eps_per_sample, float momentum, str norm, float? clip_min, "
      "float? clip_max) -> Tensor");
  // The same step in place, as the attack loop takes it: x <- x_new and x_prev <- x.
  m.def(
      "apgd_step_(Tensor(a!) x, Tensor(b!) x_prev, Tensor grad, Tensor x_nat, float eta, float eps, "
      "Tensor? eta_per_sample, Tensor? eps_per_sample, float momentum, str norm, float? clip_min, "
      "float? clip_max) -> ()");
  // The multi-teacher loss and, in the same pass over each row, its gradient.
  // student (B, D) or (B, K, D); teachers (K, B, D); weights None, (K,) or (B, K).
  // Returns (loss, row_losses (B, K) unweighted in float32/float64, grad_student, grad_teachers):
  // the gradients of the reduced loss when reduction is mean or sum and the flag asks for them,
  // else empty tensors.
  m.def(
      "multi_teacher_loss(Tensor student, Tensor teachers, Tensor? weights, str kind, "
      "float temperature, str reduction, bool student_grad, bool teacher_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // The gradients of sum_bk grad_rows[b, k] * loss_bk (reduction "none", or an upstream
  // gradient on the rows): (grad_student, grad_teachers), empty where not asked for.
  m.def(
      "_multi_teacher_loss_backward(Tensor grad_rows, Tensor student, Tensor teachers, str kind, "
      "float temperature, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
  // Noisy copies for randomized smoothing: (B * copies, ...) with row b * copies + j =
  // x[b] + sigma * N(0, I), in x's layout, x read once and the output written once. The normals
  // are a function of (seed, output element) alone: seed an int64 tensor of one element, on the
  // CPU or on x's device (read there by the kernel, without a host synchronisation).
  m.def("gaussian_copies(Tensor x, int copies, float sigma, Tensor seed) -> Tensor");
  m.def("gaussian_copies_out(Tensor x, int copies, float sigma, Tensor seed, Tensor(a!) out) -> ()");
  // Interval bound propagation in center/radius form: the box [center - radius, center + radius]
  // through a layer. Linear and conv2d: center' = layer(center) (with the bias), radius' =
  // |layer|(radius) with |W| in place of W; abs_weight: |weight| when the caller has it cached,
  // else None (computed here). relu: apply ibp_relu to the result in the same call. Any leading
  // dimensions (E boxes, B samples) are one batch.
  m.def(
      "ibp_linear(Tensor center, Tensor radius, Tensor weight, Tensor? bias, Tensor? abs_weight, "
      "bool relu) -> (Tensor, Tensor)");
  m.def(
      "ibp_conv2d(Tensor center, Tensor radius, Tensor weight, Tensor? bias, Tensor? abs_weight, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor, Tensor)");
  // [relu(center - radius), relu(center + radius)] back in center/radius form.
  m.def("ibp_relu(Tensor center, Tensor radius) -> (Tensor, Tensor)");
  // Backwards (of relu=False): gradients of (center, radius), weight and bias;
  // output_mask = (center and radius, weight, bias), an empty tensor where not asked for.
  m.def(
      "_ibp_linear_backward(Tensor grad_center, Tensor grad_radius, Tensor center, Tensor radius, "
      "Tensor weight, Tensor? abs_weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_ibp_conv2d_backward(Tensor grad_center, Tensor grad_radius, Tensor center, Tensor radius, "
      "Tensor weight, Tensor? abs_weight, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_ibp_relu_backward(Tensor grad_center, Tensor grad_radius, Tensor center, Tensor radius) -> "
      "(Tensor, Tensor)");
}

// A Python module entry so that `import robust_fast._C` loads the library and runs the
// registrations above; the ops themselves are reached through torch.ops.robust_fast.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

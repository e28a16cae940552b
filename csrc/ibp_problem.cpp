#include "robust_fast/ibp_problem.h"
#include "robust_fast/layout.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace robust_fast {

namespace {

void check_pair(const char* op, const at::Tensor& center, const at::Tensor& radius) {
  TORCH_CHECK(at::isFloatingType(center.scalar_type()), op,
              ": center must be a floating-point tensor, got ", center.scalar_type());
  TORCH_CHECK(radius.scalar_type() == center.scalar_type(), op,
              ": radius must have center's dtype ", center.scalar_type(), ", got ", radius.scalar_type());
  TORCH_CHECK(radius.device() == center.device(), op, ": radius must be on center's device");
  TORCH_CHECK(radius.sizes() == center.sizes(), op, ": radius must have center's shape ",
              center.sizes(), ", got ", radius.sizes());
}

void check_weight(const char* op, const at::Tensor& center, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight) {
  TORCH_CHECK(weight.scalar_type() == center.scalar_type() && weight.device() == center.device(), op,
              ": weight must have center's dtype and device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == center.scalar_type() && bias->device() == center.device(), op,
                ": bias must have center's dtype and device");
  }
  if (abs_weight.has_value() && abs_weight->defined()) {
    TORCH_CHECK(abs_weight->sizes() == weight.sizes() &&
                    abs_weight->scalar_type() == weight.scalar_type() &&
                    abs_weight->device() == weight.device(),
                op, ": abs_weight must have weight's shape, dtype and device");
  }
}

at::Tensor abs_of(const at::Tensor& weight, const c10::optional<at::Tensor>& abs_weight) {
  return abs_weight.has_value() && abs_weight->defined() ? *abs_weight : at::abs(weight);
}

// The ReLU epilogue, in place on the two fresh outputs of a product (the radius's output moved
// to the center's layout first in the rare case the two products laid them out differently).
void relu_in_place(at::Tensor& center, at::Tensor& radius, IntervalReluKernel kernel) {
  if (!share_one_dense_layout(center, {radius})) {
    if (!center.is_non_overlapping_and_dense()) center = center.contiguous();
    radius = at::empty_like(center).copy_(radius);
  }
  if (center.numel() > 0) kernel(center, radius, center, radius);
}

// Bounds in full fp32 on CUDA whatever the global flags say: cuBLAS and cuDNN would otherwise
// run fp32 products in TF32 (10-bit mantissa, ~1e-3 relative error), and a bound that is off by
// more than rounding is not a bound. The flags are set for the products only and restored, as
// torch.backends.cudnn.flags() does; NoTF32Guard covers the cuBLAS handles of this thread too.
class FullFp32Products {
 public:
  explicit FullFp32Products(const at::Tensor& t)
      : active_(t.is_cuda() && t.scalar_type() == at::kFloat) {
    if (!active_) return;
    auto& context = at::globalContext();
    cudnn_tf32_ = context.allowTF32CuDNN();
    matmul_ = context.float32MatmulPrecision();
    context.setAllowTF32CuDNN(false);
    context.setFloat32MatmulPrecision("highest");
  }
  ~FullFp32Products() {
    if (!active_) return;
    auto& context = at::globalContext();
    context.setAllowTF32CuDNN(cudnn_tf32_);
    context.setFloat32MatmulPrecision(matmul_ == at::Float32MatmulPrecision::HIGHEST ? "highest"
                                      : matmul_ == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                                      : "medium");
  }
  FullFp32Products(const FullFp32Products&) = delete;
  FullFp32Products& operator=(const FullFp32Products&) = delete;

 private:
  bool active_;
  bool cudnn_tf32_ = false;
  at::Float32MatmulPrecision matmul_ = at::Float32MatmulPrecision::HIGHEST;
  at::NoTF32Guard no_tf32_;
};

at::Tensor empty_like_nothing(const at::Tensor& like) { return at::empty({0}, like.options()); }

// (..., C, H, W) -> (N, C, H, W): every leading dimension (E boxes, B samples) is the batch.
at::Tensor as_batch_of_images(const at::Tensor& t) {
  return t.dim() == 4 ? t : t.flatten(0, t.dim() - 4);
}

at::Tensor with_leading(const at::Tensor& t, const at::Tensor& like) {
  if (like.dim() == 4) return t;
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - 3);
  shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
  return t.view(shape);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_ibp_relu(const at::Tensor& center, const at::Tensor& radius,
                                                IntervalReluKernel kernel) {
  check_pair("ibp_relu", center, radius);
  // The kernels walk flat memory: one dense layout shared by both, else both packed.
  const bool as_they_lie = share_one_dense_layout(center, {radius});
  const at::Tensor c = as_they_lie ? center : center.contiguous();
  const at::Tensor r = as_they_lie ? radius : radius.contiguous();
  at::Tensor c_out = at::empty_like(c);
  at::Tensor r_out = at::empty_like(c);
  if (c.numel() > 0) kernel(c, r, c_out, r_out);
  return {c_out, r_out};
}

std::tuple<at::Tensor, at::Tensor> run_ibp_relu_backward(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, IntervalReluBackwardKernel kernel) {
  check_pair("_ibp_relu_backward", center, radius);
  check_pair("_ibp_relu_backward", grad_center, grad_radius);
  TORCH_CHECK(grad_center.sizes() == center.sizes() && grad_center.scalar_type() == center.scalar_type(),
              "_ibp_relu_backward: the gradients must have center's shape and dtype");
  const bool as_they_lie = share_one_dense_layout(center, {radius, grad_center, grad_radius});
  const at::Tensor c = as_they_lie ? center : center.contiguous();
  const at::Tensor r = as_they_lie ? radius : radius.contiguous();
  const at::Tensor gc = as_they_lie ? grad_center : grad_center.contiguous();
  const at::Tensor gr = as_they_lie ? grad_radius : grad_radius.contiguous();
  at::Tensor gc_in = at::empty_like(c);
  at::Tensor gr_in = at::empty_like(c);
  if (c.numel() > 0) kernel(gc, gr, c, r, gc_in, gr_in);
  return {gc_in, gr_in};
}

std::tuple<at::Tensor, at::Tensor> run_ibp_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight, bool relu,
    IntervalReluKernel kernel) {
  check_pair("ibp_linear", center, radius);
  TORCH_CHECK(weight.dim() == 2, "ibp_linear: weight must be (out_features, in_features), got ",
              weight.sizes());
  TORCH_CHECK(center.dim() >= 1 && center.size(-1) == weight.size(1), "ibp_linear: center (..., ",
              weight.size(1), ") expected for weight ", weight.sizes(), ", got ", center.sizes());
  check_weight("ibp_linear", center, weight, bias, abs_weight);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor c = center.reshape({-1, in});
  const at::Tensor r = radius.reshape({-1, in});
  // Two products into fresh outputs: the center's with the bias folded in (addmm), the
  // radius's against |W|. Both read the inputs as they lie (BLAS takes either transpose).
  std::optional<FullFp32Products> full_fp32;
  full_fp32.emplace(center);
  at::Tensor c_out = bias.has_value() && bias->defined() ? at::addmm(*bias, c, weight.t())
                                                         : at::mm(c, weight.t());
  at::Tensor r_out = at::mm(r, abs_of(weight, abs_weight).t());
  full_fp32.reset();
  if (relu) relu_in_place(c_out, r_out, kernel);
  std::vector<int64_t> shape(center.sizes().begin(), center.sizes().end());
  shape.back() = out;
  return {c_out.view(shape), r_out.view(shape)};
}

std::tuple<at::Tensor, at::Tensor> run_ibp_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& abs_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, IntervalReluKernel kernel) {
  check_pair("ibp_conv2d", center, radius);
  TORCH_CHECK(weight.dim() == 4, "ibp_conv2d: weight must be (out_channels, in_channels/groups, kH, kW), got ",
              weight.sizes());
  TORCH_CHECK(center.dim() >= 4, "ibp_conv2d: center must be (..., C, H, W), got ", center.sizes());
  check_weight("ibp_conv2d", center, weight, bias, abs_weight);
  const at::Tensor c = as_batch_of_images(center);
  const at::Tensor r = as_batch_of_images(radius);
  const c10::optional<at::Tensor> no_bias;
  std::optional<FullFp32Products> full_fp32;
  full_fp32.emplace(center);
  at::Tensor c_out = at::convolution(c, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  at::Tensor r_out = at::convolution(r, abs_of(weight, abs_weight), no_bias, stride, padding,
                                     dilation, false, {0, 0}, groups);
  full_fp32.reset();
  if (relu) {
    relu_in_place(c_out, r_out, kernel);
  } else if (!share_one_dense_layout(c_out, {r_out})) {
    r_out = at::empty_like(c_out).copy_(r_out);  // one layout for both outputs, as the fake kernel says
  }
  return {with_leading(c_out, center), with_leading(r_out, center)};
}

namespace {

// The backwards of the products are the vendor's products again (at::mm, at::convolution_backward),
// which run on any device: one kernel for every backend (registered below).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ibp_linear_backward(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, const at::Tensor& weight, const c10::optional<at::Tensor>& abs_weight,
    std::array<bool, 3> output_mask) {
  check_pair("_ibp_linear_backward", center, radius);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor gc = grad_center.reshape({-1, out});
  const at::Tensor gr = grad_radius.reshape({-1, out});
  at::Tensor grad_c = empty_like_nothing(center), grad_r = empty_like_nothing(center);
  at::Tensor grad_w = empty_like_nothing(weight), grad_b = empty_like_nothing(weight);
  if (output_mask[0]) {
    grad_c = at::mm(gc, weight).view(center.sizes());
    grad_r = at::mm(gr, abs_of(weight, abs_weight)).view(center.sizes());
  }
  if (output_mask[1]) {
    // d|W|/dW = sign(W) (0 at 0, as torch.abs's gradient).
    grad_w = at::mm(gc.t(), center.reshape({-1, in}));
    grad_w.addcmul_(at::sign(weight), at::mm(gr.t(), radius.reshape({-1, in})));
  }
  if (output_mask[2]) grad_b = gc.sum(0);
  return {grad_c, grad_r, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ibp_conv2d_backward(
    const at::Tensor& grad_center, const at::Tensor& grad_radius, const at::Tensor& center,
    const at::Tensor& radius, const at::Tensor& weight, const c10::optional<at::Tensor>& abs_weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  check_pair("_ibp_conv2d_backward", center, radius);
  const at::Tensor c = as_batch_of_images(center);
  const at::Tensor r = as_batch_of_images(radius);
  const at::Tensor gc = as_batch_of_images(grad_center);
  const at::Tensor gr = as_batch_of_images(grad_radius);
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  auto [grad_c, grad_wc, grad_b] = at::convolution_backward(
      gc, c, weight, bias_sizes, stride, padding, dilation, false, {0, 0}, groups, output_mask);
  at::Tensor grad_r, grad_wr;
  if (output_mask[0] || output_mask[1]) {
    std::tie(grad_r, grad_wr, std::ignore) = at::convolution_backward(
        gr, r, abs_of(weight, abs_weight), bias_sizes, stride, padding, dilation, false, {0, 0},
        groups, {output_mask[0], output_mask[1], false});
  }
  at::Tensor grad_w = empty_like_nothing(weight);
  if (output_mask[1]) grad_w = grad_wc.addcmul_(at::sign(weight), grad_wr);
  if (output_mask[0]) {
    grad_c = grad_c.reshape(center.sizes());
    grad_r = grad_r.reshape(center.sizes());
    if (grad_r.strides() != grad_c.strides()) grad_r = at::empty_like(grad_c).copy_(grad_r);
  } else {
    grad_c = empty_like_nothing(center);
    grad_r = empty_like_nothing(center);
  }
  if (!output_mask[2]) grad_b = empty_like_nothing(weight);
  return {grad_c, grad_r, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_fast, CompositeExplicitAutograd, m) {
  m.impl("_ibp_linear_backward", &ibp_linear_backward);
  m.impl("_ibp_conv2d_backward", &ibp_conv2d_backward);
}

}  // namespace robust_fast

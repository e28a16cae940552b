// A radius (eps, alpha, eta) at the C++ boundary: the schema's pair (float, Tensor?), the tensor
// holding one value per sample when given. Host code only, for the *_problem.cpp files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace robust_fast {

// The per-sample values as the kernels read them (float64 (B,), contiguous, on like's device),
// or an undefined tensor when the scalar holds.
inline at::Tensor per_sample_radius(const c10::optional<at::Tensor>& value, int64_t batch,
                                    const at::Tensor& like, const char* op, const char* name) {
  if (!value.has_value() || !value->defined()) return at::Tensor();
  TORCH_CHECK(value->dim() == 1 && value->size(0) == batch, op, ": ", name, " must have shape (",
              batch, ",), got ", value->sizes());
  return value->to(like.device(), at::kDouble).contiguous();
}

}  // namespace robust_fast

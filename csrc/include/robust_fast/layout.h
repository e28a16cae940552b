// The one memory-layout rule of every op's kernels; robust_fast/_layout.py says the same in
// Python for the Triton kernels. Kernels walk memory as it lies when the operands share one dense
// layout (contiguous and channels_last inputs qualify), else the operands are packed once:
// - elementwise kernels (ibp_relu and its backward): share_one_dense_layout;
// - row kernels (multi_teacher_loss): each row needs a unit stride, unit_stride_rows;
// - per-sample kernels (pgd_step, apgd_step): each sample also one contiguous block.
//
// Attack steps, in full. Operands: walked as they lie when they share one dense layout in which each sample is a
// contiguous block (contiguous and channels_last inputs qualify); anything else is packed to
// contiguous once.
//
// Written tensors (pgd_step's out, apgd_step's x and x_prev in place): each may be the very
// memory of an operand (every element is read before it is written, by the same thread) or share
// none with any; a partial overlap is refused, and two written tensors never share memory. They
// are written directly when dense with the walked operands' strides, else through temporaries
// copied into them afterwards.
//
// Host code only (ATen calls): included by the *_problem.cpp files, never by a kernel.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace robust_fast {

using NamedTensor = std::pair<const char*, at::Tensor>;

// Dense, and every other tensor with first's strides: one flat walk serves them all.
inline bool share_one_dense_layout(const at::Tensor& first, std::initializer_list<at::Tensor> others) {
  if (!first.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor& t : others) {
    if (t.strides() != first.strides()) return false;
  }
  return true;
}

// Rows along the last dimension with a unit stride (any strides between rows); else packed once.
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Dense, with dim 0 outermost: every sample is one contiguous block of memory.
inline bool samples_are_contiguous_blocks(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

// The operands as the kernels walk them: as they lie, or every one packed to contiguous.
inline std::vector<NamedTensor> walked_operands(std::initializer_list<NamedTensor> operands) {
  const at::Tensor& first = operands.begin()->second;
  bool as_they_lie = samples_are_contiguous_blocks(first);
  for (const auto& [name, t] : operands) as_they_lie = as_they_lie && t.strides() == first.strides();
  std::vector<NamedTensor> walked(operands);
  if (!as_they_lie) {
    for (auto& [name, t] : walked) t = t.contiguous();
  }
  return walked;
}

enum class Overlap { kNone, kSame, kPartial, kUnknown };

// kSame: the same memory with the same strides. kUnknown: the spans meet and one of the two is
// not dense (whether elements are shared is not worked out).
inline Overlap overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return Overlap::kNone;
  const auto span = [](const at::Tensor& t) {
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::make_pair(start, start + static_cast<uintptr_t>(extent * t.element_size()));
  };
  const auto [a_start, a_end] = span(a);
  const auto [b_start, b_end] = span(b);
  if (a_end <= b_start || b_end <= a_start) return Overlap::kNone;
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return Overlap::kUnknown;
  return a_start == b_start && a_end == b_end && a.strides() == b.strides() ? Overlap::kSame
                                                                          : Overlap::kPartial;
}

// Checks the written tensors against the walked operands and each other (TORCH_CHECK errors
// name `op` and the tensors); true when they take the kernels' writes directly.
inline bool writes_directly(const char* op, std::initializer_list<NamedTensor> written,
                            const std::vector<NamedTensor>& operands) {
  if (written.begin()->second.numel() == 0) return true;
  bool direct = true;
  for (auto target = written.begin(); target != written.end(); ++target) {
    const auto& [name, t] = *target;
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                " has elements that share memory (an expanded tensor?): pass a dense one");
    for (const auto& [operand_name, operand] : operands) {
      TORCH_CHECK(overlap(t, operand) != Overlap::kPartial, op, ": ", name, " partially overlaps ",
                  operand_name, " (it may be the very same tensor, or share no memory with it)");
    }
    for (auto other = target + 1; other != written.end(); ++other) {
      TORCH_CHECK(overlap(t, other->second) == Overlap::kNone, op, ": ", name, " and ",
                  other->first, " are both written: they need separate memory");
    }
    direct = direct && t.is_non_overlapping_and_dense() &&
             t.strides() == operands.front().second.strides();
  }
  return direct;
}

}  // namespace robust_fast

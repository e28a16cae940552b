// Standard normal numbers from a counter: Philox4x32-10 (Salmon et al. 2011) turns the counter
// (the index of a group of four output elements) and the key (the 64-bit seed) into four 32-bit
// words; two Box-Muller pairs turn them into four N(0, 1) floats. Shared by the CPU and CUDA
// kernels of gaussian_copies, so both draw the same numbers for one seed (up to the last bit of
// the transcendental functions, which are written out here rather than taken from a libm).
//
// Everything is branch-free arithmetic on 32-bit words and floats: the CPU kernel runs it over
// arrays of counters, which the compiler vectorizes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "robust_fast/host_device.h"

namespace robust_fast {
namespace normal_math {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Words {
  uint32_t x0, x1, x2, x3;
};

// The counter is (group_lo, group_hi, 0, 0): a group index below 2^64, so every output element
// of a call (B * copies * sample_numel < 2^66) has its own counter.
RF_HOST_DEVICE Words philox4x32_10(uint64_t group, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

RF_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

RF_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// -2 log(u) for u in (0, 1], u a normal float (Cephes' logf: u = m 2^e, m in [sqrt(1/2), sqrt(2)),
// log(m) by a polynomial in m - 1; relative error ~1e-7). Never negative: u = 1 gives 0.
RF_HOST_DEVICE float minus_two_log(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  // m below sqrt(1/2) is doubled (and e lowered by one); as arithmetic on masks rather than
  // selects, so that a CPU compiler vectorizes it without masked instructions
  const uint32_t low = 0u - static_cast<uint32_t>(m < 0.70710678118654752f);
  e -= static_cast<float>(low & 1u);
  m = (m + bits_float(float_bits(m) & low)) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const float log_u = (m + y) + 0.693359375f * e;
  return bits_float(float_bits(-2.0f * log_u) & (0u - static_cast<uint32_t>(log_u < 0.0f)));
}

// sqrt(y), y >= 0: IEEE-rounded on both sides (CUDA's sqrtf under nvcc's default -prec-sqrt=true;
// the CPU's square-root instruction, which the compiler vectorizes because setup.py builds with
// -fno-math-errno), so the CPU and CUDA kernels agree on it to the bit.
RF_HOST_DEVICE float sqrt_nonnegative(float y) {
#if defined(__CUDA_ARCH__)
  return sqrtf(y);
#else
  return std::sqrt(y);
#endif
}

struct SinCos {
  float s, c;
};

// sin and cos of 2 pi v for v in [0, 1): v is split into a quarter turn q and a remainder
// |r| <= 1/8 of a turn, whose angle (|a| <= pi/4) takes Cephes' sinf/cosf polynomials.
RF_HOST_DEVICE SinCos sincos_turns(float v) {
  const float q = static_cast<float>(static_cast<int32_t>(v * 4.0f + 0.5f));  // nearest quarter, 0..4
  const float a = (v - 0.25f * q) * 6.28318530717958648f;
  const float z = a * a;
  const float s = a + a * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * z +
                  z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  // sin/cos of a + quarter * pi/2: an odd quarter swaps s and c, and the signs follow the
  // quarter's bits (sin negative in quarters 2, 3; cos in 1, 2). Written as bit operations, not
  // as a chain of selects, so that a CPU compiler vectorizes it without masked instructions.
  const uint32_t quarter = static_cast<uint32_t>(q);
  const uint32_t swap = 0u - (quarter & 1u);
  const uint32_t s_bits = float_bits(s), c_bits = float_bits(c);
  const uint32_t sin_bits = ((c_bits & swap) | (s_bits & ~swap)) ^ ((quarter & 2u) << 30);
  const uint32_t cos_bits = ((s_bits & swap) | (c_bits & ~swap)) ^ (((quarter + 1u) & 2u) << 30);
  return {bits_float(sin_bits), bits_float(cos_bits)};
}

// Box-Muller: two words, two independent N(0, 1). u1 in (0, 1] (no log of 0), u2 in [0, 1),
// each from the top 24 bits of its word.
RF_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  constexpr float kUnit = 5.9604644775390625e-8f;  // 2^-24
  // through int32 (exact: below 2^25), whose conversion to float AVX2 has and uint32's lacks
  const float u1 = static_cast<float>(static_cast<int32_t>((a >> 8) + 1u)) * kUnit;
  const float u2 = static_cast<float>(static_cast<int32_t>(b >> 8)) * kUnit;
  const float r = sqrt_nonnegative(minus_two_log(u1));
  const SinCos t = sincos_turns(u2);
  z0 = r * t.c;
  z1 = r * t.s;
}

// The four normals of one group: output elements 4 * group + 0..3.
RF_HOST_DEVICE void normals4(uint64_t group, uint64_t seed, float z[4]) {
  const Words w = philox4x32_10(group, seed);
  box_muller(w.x0, w.x1, z[0], z[1]);
  box_muller(w.x2, w.x3, z[2], z[3]);
}

}  // namespace normal_math
}  // namespace robust_fast

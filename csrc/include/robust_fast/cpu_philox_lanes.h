// Philox4x32-10 of 64 consecutive counters at once, for the CPU kernel of gaussian_copies: the
// same words as normal_math::philox4x32_10 (the specification, shared with CUDA), bit for bit.
//
// Why by hand: a compiler vectorizes the 32x32->64-bit products of the scalar rounds by widening
// every lane to 64 bits and multiplying 64x64 (vpmullq), twice the instructions a round needs.
// Here the high halves come from the even/odd unsigned 32-bit products (vpmuludq) and the low
// halves from a 32-bit multiply, with AVX-512 (registers of 16 lanes) or AVX2 (of 8); any
// other build runs the scalar rounds.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "robust_fast/normal_math.h"

namespace robust_fast {
namespace cpu_philox {

constexpr int kLanes = 64;

// words[j][i] = word j of philox4x32_10(first_group + i, seed), for i < kLanes.
struct LaneWords {
  alignas(64) uint32_t words[4][kLanes];
};

// The counters' two 32-bit halves; the carry of the low half into the high one is kept, since
// consecutive groups may cross a multiple of 2^32.
inline void counter_halves(uint64_t first_group, uint32_t* low, uint32_t* high) {
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t group = first_group + static_cast<uint64_t>(i);
    low[i] = static_cast<uint32_t>(group);
    high[i] = static_cast<uint32_t>(group >> 32);
  }
}

#if defined(__AVX512F__)

using Lanes = __m512i;  // 16 lanes a register
constexpr int kRegisters = kLanes / 16;

inline Lanes load_lanes(const uint32_t* p) { return _mm512_load_si512(p); }
inline void store_lanes(uint32_t* p, Lanes v) { _mm512_store_si512(p, v); }
inline Lanes broadcast(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline Lanes multiply_low(Lanes a, Lanes m) { return _mm512_mullo_epi32(a, m); }
inline Lanes multiply_high(Lanes a, Lanes m) {
  const Lanes even = _mm512_mul_epu32(a, m);                         // products of lanes 0, 2, ...
  const Lanes odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // products of lanes 1, 3, ...
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline Lanes xor3(Lanes a, Lanes b, Lanes c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }

#elif defined(__AVX2__)

using Lanes = __m256i;  // 8 lanes a register
constexpr int kRegisters = kLanes / 8;

inline Lanes load_lanes(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_lanes(uint32_t* p, Lanes v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
inline Lanes broadcast(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline Lanes multiply_low(Lanes a, Lanes m) { return _mm256_mullo_epi32(a, m); }
inline Lanes multiply_high(Lanes a, Lanes m) {
  const Lanes even = _mm256_mul_epu32(a, m);
  const Lanes odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline Lanes xor3(Lanes a, Lanes b, Lanes c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }

#endif

#if defined(__AVX512F__) || defined(__AVX2__)

// A round's products take several cycles to arrive: kInterleaved registers go through each round
// together so that one's multiplies overlap another's, instead of waiting on one chain.
inline void philox_lanes(uint64_t first_group, uint64_t seed, LaneWords& out) {
  constexpr int kInterleaved = 4;
  static_assert(kRegisters % kInterleaved == 0, "the registers go through the rounds in groups of kInterleaved");
  constexpr int width = kLanes / kRegisters;
  alignas(64) uint32_t low[kLanes], high[kLanes];
  counter_halves(first_group, low, high);
  const Lanes m0 = broadcast(normal_math::kPhiloxM0), m1 = broadcast(normal_math::kPhiloxM1);
  for (int first = 0; first < kRegisters; first += kInterleaved) {
    Lanes c0[kInterleaved], c1[kInterleaved], c2[kInterleaved], c3[kInterleaved];
    for (int r = 0; r < kInterleaved; ++r) {
      c0[r] = load_lanes(low + (first + r) * width);
      c1[r] = load_lanes(high + (first + r) * width);
      c2[r] = c3[r] = broadcast(0);
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < normal_math::kPhiloxRounds; ++round) {
      const Lanes key0 = broadcast(k0), key1 = broadcast(k1);
      for (int r = 0; r < kInterleaved; ++r) {
        const Lanes high0 = multiply_high(c0[r], m0), high1 = multiply_high(c2[r], m1);
        const Lanes n0 = xor3(high1, c1[r], key0);
        const Lanes n2 = xor3(high0, c3[r], key1);
        c1[r] = multiply_low(c2[r], m1);
        c3[r] = multiply_low(c0[r], m0);
        c0[r] = n0;
        c2[r] = n2;
      }
      k0 += normal_math::kPhiloxW0;
      k1 += normal_math::kPhiloxW1;
    }
    for (int r = 0; r < kInterleaved; ++r) {
      store_lanes(out.words[0] + (first + r) * width, c0[r]);
      store_lanes(out.words[1] + (first + r) * width, c1[r]);
      store_lanes(out.words[2] + (first + r) * width, c2[r]);
      store_lanes(out.words[3] + (first + r) * width, c3[r]);
    }
  }
}

#else

inline void philox_lanes(uint64_t first_group, uint64_t seed, LaneWords& out) {
  for (int i = 0; i < kLanes; ++i) {
    const normal_math::Words w = normal_math::philox4x32_10(first_group + static_cast<uint64_t>(i), seed);
    out.words[0][i] = w.x0;
    out.words[1][i] = w.x1;
    out.words[2][i] = w.x2;
    out.words[3][i] = w.x3;
  }
}

#endif

}  // namespace cpu_philox
}  // namespace robust_fast

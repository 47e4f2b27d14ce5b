// What echo's vectorised CPU kernels share: one build for every x86-64 CPU with vector code for the one it
// runs on, float32 -> bfloat16 rounding written so that it vectorises, and 16-lane float32 helpers.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <utility>

// GCC/clang function multiversioning: each marked function is compiled for AVX-512, AVX2 and the baseline,
// and the loader picks the clone for the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ECHO_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ECHO_VECTOR_CLONES
#endif

#define ECHO_INLINE inline __attribute__((always_inline))

namespace echo {

// float32 bits -> bfloat16 bits (in the low 16), rounding to nearest even as torch casts; NaN stays a quiet
// NaN. For uint32_t or a GCC vector of uint32_t: c10's scalar conversion branches on NaN, which keeps the
// compiler from vectorising a loop around it.
template <typename Bits>
ECHO_INLINE Bits bfloat16_bits(Bits bits) {
  const Bits rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? Bits{} + 0x7fc0u : rounded;
}

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

ECHO_INLINE v16 splat(float value) { return v16{} + value; }

// e^x for x <= 0, vectorised (std::exp is a scalar libm call): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// Cephes' expf polynomial (relative error ~1e-7), 2^n through the exponent bits; x below -87 gives 0.
ECHO_INLINE v16 exp_nonpositive(v16 x) {
  const auto underflow = x < -87.f;
  x = underflow ? splat(-87.f) : x;
  const v16 shifted = x * 1.44269504088896341f + 0.5f;
  const v16 n = (shifted - 0.5f + 12582912.f) - 12582912.f;  // round to nearest: the 1.5 * 2^23 trick
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i32x16 exponent = (__builtin_convertvector(n, i32x16) + 127) << 23;
  v16 power;
  std::memcpy(&power, &exponent, sizeof power);
  return underflow ? v16{} : p * power;
}

// 16 consecutive values as float32, and back (bf16: rounded as torch casts, above)
ECHO_INLINE v16 load16(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
ECHO_INLINE v16 load16(const c10::BFloat16* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const i32x16 bits = __builtin_convertvector(half, i32x16) << 16;
  v16 x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
ECHO_INLINE void store16(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
ECHO_INLINE void store16(c10::BFloat16* p, v16 x) {
  u32x16 bits;
  std::memcpy(&bits, &x, sizeof bits);
  const u16x16 half = __builtin_convertvector(bfloat16_bits(bits), u16x16);
  std::memcpy(p, &half, sizeof half);
}

// One round of the transpose below: rows i and i + kStep (i & kStep == 0) swap their kStep-lane blocks.
template <int kStep, int... kLane>
ECHO_INLINE void transpose_round(v16* r, std::integer_sequence<int, kLane...>) {
  for (int i = 0; i < 16; ++i)
    if (!(i & kStep)) {
      const v16 a = r[i], b = r[i + kStep];
      r[i] = __builtin_shufflevector(a, b, ((kLane & kStep) ? 16 + kLane - kStep : kLane)...);
      r[i + kStep] = __builtin_shufflevector(a, b, ((kLane & kStep) ? 16 + kLane : kLane + kStep)...);
    }
}

// r[0..15] becomes its transpose (r[i][l] = the old r[l][i]): four rounds of two-source shuffles between rows
// 8, 4, 2 and 1 apart.
ECHO_INLINE void transpose16(v16* r) {
  constexpr auto lanes = std::make_integer_sequence<int, 16>{};
  transpose_round<8>(r, lanes);
  transpose_round<4>(r, lanes);
  transpose_round<2>(r, lanes);
  transpose_round<1>(r, lanes);
}

}  // namespace echo

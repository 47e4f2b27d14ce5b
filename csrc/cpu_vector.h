// What echo's vectorised CPU kernels share: one build for every x86-64 CPU with vector code for the one it
// runs on, and float32 -> bfloat16 rounding written so that it vectorises.
#pragma once

#include <cstdint>

// GCC/clang function multiversioning: each marked function is compiled for AVX-512, AVX2 and the baseline,
// and the loader picks the clone for the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ECHO_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ECHO_VECTOR_CLONES
#endif

namespace echo {

// float32 bits -> bfloat16 bits (in the low 16), rounding to nearest even as torch casts; NaN stays a quiet
// NaN. For uint32_t or a GCC vector of uint32_t: c10's scalar conversion branches on NaN, which keeps the
// compiler from vectorising a loop around it.
template <typename Bits>
inline __attribute__((always_inline)) Bits bfloat16_bits(Bits bits) {
  const Bits rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? Bits{} + 0x7fc0u : rounded;
}

}  // namespace echo

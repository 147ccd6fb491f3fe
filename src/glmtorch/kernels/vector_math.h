// Vector-friendly math shared by the kernels' source files.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace glmtorch_kernels_math {

#if defined(__AVX2__)
// Eight bf16 values widened to fp32 (a bf16 is the top half of an fp32): the AVX2 loops' bf16 loads, weights and
// cached keys alike.
inline __m256 widen_bf16_8(const void* p) {
  const __m128i raw = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// A register of fp32 lanes in GCC's vector types (arithmetic and comparisons lane by lane), for fast_exp below.
// Where a loop calls the scalar fast_exp GCC may leave it scalar (a chain of branches): it did in the decode
// attention's softmax, inside its parallel lambda, and in silu_mul (a third of the attention's time, 5% of a 64-row
// decode step of the demo model, AVX2, AMD EPYC Zen 3); those loops call it a register at a time.
#define GLMTORCH_VECTOR_EXP 1
#if defined(__AVX512F__)
constexpr int EXP_LANES = 16;
#else
constexpr int EXP_LANES = 8;
#endif
typedef float floats __attribute__((vector_size(4 * EXP_LANES)));
typedef int32_t ints __attribute__((vector_size(4 * EXP_LANES)));

inline floats load_floats(const float* p) {
  floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_floats(float* p, floats v) { std::memcpy(p, &v, sizeof v); }
inline floats power_of_two(floats n) {  // 2^n for whole n, built in the exponent bits
  const ints bits = (__builtin_convertvector(n, ints) + 127) << 23;
  return reinterpret_cast<const floats&>(bits);
}
#endif
inline float power_of_two(float n) {
  union { int32_t i; float f; } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return scale.f;
}

// exp(x) in plain arithmetic the compiler vectorizes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a
// degree-6 polynomial (Cephes' expf coefficients, ~1 ulp), times 2^n built in the exponent bits. n is rounded by
// adding and subtracting 1.5 * 2^23 (no library call in the loop, so it vectorizes). F: float, or floats.
template <typename F>
inline F fast_exp(F x) {
  const F zero{}, lo = zero - 87.3f, hi = zero + 88.7f;
  x = x < lo ? lo : (x > hi ? hi : x);
  const F n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * power_of_two(n);
}

// s[j] = exp(s[j] - most) over s[0 .. n), exactly 0 where s[j] is -inf (a masked slot weighs nothing, as with
// std::exp), returning their sum: a softmax's numerators.
inline float exp_shifted(float* s, int64_t n, float most) {
  float sum = 0.f;
  int64_t j = 0;
#if defined(GLMTORCH_VECTOR_EXP)
  floats sums = {};
  for (; j + EXP_LANES <= n; j += EXP_LANES) {
    const floats v = load_floats(s + j);
    const floats e = v == -INFINITY ? floats{} : fast_exp(v - most);
    store_floats(s + j, e);
    sums += e;
  }
  for (int i = 0; i < EXP_LANES; ++i) sum += sums[i];
#endif
  for (; j < n; ++j) {
    s[j] = s[j] == -INFINITY ? 0.f : fast_exp(s[j] - most);
    sum += s[j];
  }
  return sum;
}

// The largest of s[0 .. n), NaNs passed over as std::max(most, s[j]) passes them. By hand: GCC left the `omp simd
// reduction(max)` loop scalar, a chain of dependent maxss that held an eighth of the decode attention's samples
// (4-6% of its time, alternated in one process, AMD EPYC).
inline float max_of(const float* s, int64_t n) {
  float most = -INFINITY;
  int64_t j = 0;
#if defined(GLMTORCH_VECTOR_EXP)
  floats m = floats{} - INFINITY;
  for (; j + EXP_LANES <= n; j += EXP_LANES) {
    const floats v = load_floats(s + j);
    m = v > m ? v : m;  // false on a NaN: passed over
  }
  for (int i = 0; i < EXP_LANES; ++i) most = std::max(most, m[i]);
#endif
  for (; j < n; ++j) most = std::max(most, s[j]);
  return most;
}

}  // namespace glmtorch_kernels_math

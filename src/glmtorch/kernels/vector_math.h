// Vector-friendly math shared by the kernels' source files.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace glmtorch_kernels_math {

// exp(x) in plain arithmetic the compiler vectorizes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a
// degree-6 polynomial (Cephes' expf coefficients, ~1 ulp), times 2^n built in the exponent bits. n is rounded by
// adding and subtracting 1.5 * 2^23 (no library call in the loop, so it vectorizes).
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  union { int32_t i; float f; } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * scale.f;
}

// The largest of s[0 .. n), NaNs passed over as std::max(most, s[j]) passes them. By hand: GCC left the `omp simd
// reduction(max)` loop scalar, a chain of dependent maxss that held an eighth of the decode attention's samples
// (4-6% of its time, alternated in one process, AMD EPYC).
inline float max_of(const float* s, int64_t n) {
  float most = -INFINITY;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(_mm512_loadu_ps(s + j), m);  // the second operand on a NaN
  most = _mm512_reduce_max_ps(m);
#endif
  for (; j < n; ++j) most = std::max(most, s[j]);
  return most;
}

}  // namespace glmtorch_kernels_math

// Vector-friendly math shared by the kernels' source files.
#pragma once

#include <cstdint>

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

}  // namespace glmtorch_kernels_math

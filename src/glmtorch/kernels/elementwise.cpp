// The two elementwise stretches of a GLM layer, each in one pass over memory, for CPU inference:
//   rms_norm(x, w, eps)  = w * to_dtype(x / sqrt(mean(x^2) + eps)),   statistics in fp32
//   silu_mul(gate_up)    = to_dtype(up * to_dtype(silu(gate))),         gate_up = [gate | up] on the last axis
// in fp32 or bf16, rounding where the eager model rounds (so bf16 results differ from it only where the fp32
// sum of squares or exp differs in its last bit). Eagerly each is 6-7 torch ops over the whole activation, each
// reading and writing it (with fp32 copies in between for bf16): in a 2048-token prefill of "small" bf16 they
// took ~30% of the pass, 2 threads. Besides them: the rotary embedding, and each row's greedy token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "vector_math.h"

namespace {

using glmtorch_kernels_math::fast_exp;
#if defined(GLMTORCH_VECTOR_EXP)
using glmtorch_kernels_math::EXP_LANES;
using glmtorch_kernels_math::floats;
using glmtorch_kernels_math::load_floats;
using glmtorch_kernels_math::store_floats;
#endif

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// fp32 -> bf16 -> fp32, round to nearest even (as torch rounds; NaN stays NaN)
inline float round_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return v;
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const c10::BFloat16*) { return round_bf16(v); }

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {  // v is already a bf16 value: keep its top half
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bits >> 16);
}

// One row each; the loops vectorize (-O3 -march=native), the exp included (fast_exp is plain arithmetic).
template <typename T>
void rms_norm_row(const T* row, const T* w, T* out, int64_t H, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < H; ++i) {
    const float v = load(row, i);
    squares += v * v;
  }
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) store(out, i, round_to(load(w, i) * round_to(load(row, i) * inverse, row), row));
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t I) {
  int64_t i = 0;
#if defined(GLMTORCH_VECTOR_EXP)
  if constexpr (std::is_same_v<T, float>)
    for (; i + EXP_LANES <= I; i += EXP_LANES) {
      const floats g = load_floats(gate + i);
      store_floats(out + i, load_floats(up + i) * (g / (1.f + fast_exp(-g))));
    }
#endif
  const int64_t vectors = i;
#pragma omp simd
  for (int64_t i = vectors; i < I; ++i) {
    const float g = load(gate, i);
    const float act = round_to(g / (1.f + fast_exp(-g)), gate);
    store(out, i, round_to(load(up, i) * act, gate));
  }
}

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) rms_norm_row(x + m * H, w, y + m * H, H, eps);
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* y, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) silu_mul_row(gate_up + m * 2 * I, gate_up + m * 2 * I + I, y + m * I, I);
  });
}

// GLM's partial interleaved rotary embedding of q or k, out of the fused QKV product's output:
//   x: (B, T, N, D) with any strides but a contiguous last axis (a view of that output)
//   cos, sin: (B or 1, 1, T, R) contiguous, each frequency repeated for its channel pair, in x's dtype
//   out: (B, N, T, D) contiguous; pairs (2j, 2j+1) of the first R channels rotated as the eager ops round:
//   out = round(round(x * cos) + round(rotate_pairs(x) * sin)), rotate_pairs(x) = (-x1, x0, -x3, x2, ...);
//   the other D - R channels copied.
template <typename T>
void rotary_rows(const at::Tensor& x, const T* cos, const T* sin, bool per_row, T* out, int64_t R) {
  const int64_t B = x.size(0), Tn = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), st = x.stride(1), sn = x.stride(2);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      for (int64_t t = 0; t < Tn; ++t) {
        const T* row = xp + b * sb + t * st + n * sn;
        const T* c = cos + ((per_row ? b : 0) * Tn + t) * R;
        const T* s = sin + ((per_row ? b : 0) * Tn + t) * R;
        T* o = out + (bn * Tn + t) * D;
        for (int64_t i = 0; i < R; i += 2) {
          const float x0 = load(row, i), x1 = load(row, i + 1);
          const float a0 = round_to(x0 * load(c, i), row), a1 = round_to(x1 * load(c, i + 1), row);
          const float b0 = round_to(-x1 * load(s, i), row), b1 = round_to(x0 * load(s, i + 1), row);
          store(o, i, round_to(a0 + b0, row));
          store(o, i + 1, round_to(a1 + b1, row));
        }
        for (int64_t i = R; i < D; ++i) store(o, i, load(row, i));
      }
    }
  });
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be fp32 or bf16");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, "x");
  check(weight, "weight");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H && weight.scalar_type() == x.scalar_type(), "weight must be (H,) in x's dtype");
  auto y = at::empty_like(x);
  const int64_t rows = H ? x.numel() / H : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, H, eps);
  else
    rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                  rows, H, eps);
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check(gate_up, "gate_up");
  const int64_t I = gate_up.size(-1) / 2;
  TORCH_CHECK(gate_up.size(-1) == 2 * I, "gate_up's last axis must be [gate | up], even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto y = at::empty(sizes, gate_up.options());
  const int64_t rows = I ? y.numel() / I : 0;
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_rows(gate_up.data_ptr<float>(), y.data_ptr<float>(), rows, I);
  else
    silu_mul_rows(gate_up.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, I);
  return y;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1, "x must be a (B, T, N, D) CPU view with a "
              "contiguous last axis");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  check(cos, "cos");
  check(sin, "sin");
  const int64_t B = x.size(0), Tn = x.size(1), R = cos.size(-1);
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.sizes() == cos.sizes() && cos.dim() == 4 &&
              (cos.size(0) == 1 || cos.size(0) == B) && cos.size(2) == Tn && R % 2 == 0 && R <= x.size(3),
              "cos / sin must be (B or 1, 1, T, R) in x's dtype, R even and at most D");
  auto out = at::empty({B, x.size(2), Tn, x.size(3)}, x.options());
  const bool per_row = cos.size(0) == B && B > 1;
  if (x.scalar_type() == at::kFloat)
    rotary_rows(x, cos.data_ptr<float>(), sin.data_ptr<float>(), per_row, out.data_ptr<float>(), R);
  else
    rotary_rows(x, cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), per_row,
                out.data_ptr<c10::BFloat16>(), R);
  return out;
}

// Where row r[0 .. V) is largest, the first of equal places; a row holding a NaN gives its first NaN's place (what
// torch.max(dim=-1).indices gives). One vector pass for the maximum (and whether a NaN is there), then one for its
// first place (AVX-512 or AVX2 vectors; GCC left the plain loops scalar, ~0.8 ns a value, AMD EPYC Zen 3).
int64_t first_argmax(const float* r, int64_t V) {
  float most = -INFINITY;
  bool nan = false;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; j + 16 <= V; j += 16) {
    const __m512 v = _mm512_loadu_ps(r + j);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(v, m);  // the second operand on a NaN: NaNs passed over
  }
  most = _mm512_reduce_max_ps(m);
  nan = unordered != 0;
#elif defined(__AVX2__)
  __m256 m = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (; j + 8 <= V; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(v, m);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  for (float x : lanes) most = std::max(most, x);
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; j < V; ++j) {
    nan |= std::isnan(r[j]);
    most = std::max(most, r[j]);
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(most);
  for (; i + 16 <= V; i += 16) {
    const __m512 v = _mm512_loadu_ps(r + i);
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#elif defined(__AVX2__)
  const __m256 target = _mm256_set1_ps(most);
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(r + i);
    const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < V; ++i)
    if (nan ? std::isnan(r[i]) : r[i] == most) return i;
  return 0;  // not reached: some value equals the maximum (a row of -inf: the first)
}

// Each row's greedy token: torch.max(dim=-1).indices of (B, V) fp32 logits, rows over the threads. torch's
// reduction took ~1 ns a value on the AMD EPYC (0.19 ms for 64 rows of a 3,072-word vocabulary, 8.4 ms for 64 of
// 151,552), a tenth of a served demo burst's engine time.
at::Tensor greedy_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.stride(1) == 1 && logits.size(1) > 0,
              "greedy_rows: logits must be a (B, V) fp32 CPU tensor, V > 0, with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / V), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) o[b] = first_argmax(x + b * stride, V);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmtorch_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("greedy_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmtorch_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
  m.impl("greedy_rows", &greedy_rows);
}

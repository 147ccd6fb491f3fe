// Matrix-vector products for decoding on the CPU: y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m.
//
// Decoding reads every weight once per step, so these loops are written to stream W exactly once, whatever
// the number of rows (up to MAX_ROWS): each weight chunk is loaded, widened to fp32 and multiplied into every
// row's accumulators before the next chunk. The inner loops are plain C++ that the compiler vectorizes
// (-O3 -march=native); rows of W are split across torch's intra-op threads. Activations and results are fp32.
//
// Weight formats (the same tensors glmtorch keeps in its state dict):
//   f32, bf16  (N, K)
//   int8       (N, K) int8, one fp32 scale per output row
//   int4       (N, K/2) uint8, two values per byte (element 2i in the low nibble, 2i+1 in the high one),
//              stored as q + 8 with q in [-8, 7]; one fp32 scale per row and group of `group` inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t MAX_ROWS = 8;
constexpr int64_t LANES = 16;  // accumulators per row: wide enough for two AVX2 / one AVX-512 register

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Scales may be fp32 or bf16 (the model's dtype); widened one at a time, they cost nothing next to the weights.
struct Scales {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  explicit Scales(const at::Tensor& t) {
    TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
                "scales must be contiguous fp32 or bf16");
    if (t.scalar_type() == at::kFloat) f32 = t.data_ptr<float>();
    else bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr());
  }
  float operator[](int64_t i) const { return f32 ? f32[i] : bf16_to_float(bf16[i]); }
};

// Sixteen fp32 lanes: two AVX2 registers where the compiler targets AVX2 + FMA, a plain array elsewhere.
// Every weight format is widened into these once per chunk, then multiplied into each row of x.
#if defined(__AVX2__) && defined(__FMA__)
struct Vec16 {
  __m256 a, b;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Vec16 from_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16);
    __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16);
    return {_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)};
  }
  static Vec16 from_int8x16(__m128i raw) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)))};
  }
  static Vec16 from_int8(const int8_t* p) { return from_int8x16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void from_nibbles(const uint8_t* p, Vec16& low, Vec16& high) {  // 16 bytes: 16 low and 16 high values - 8
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    low = from_int8x16(_mm_sub_epi8(_mm_and_si128(raw, mask), eight));
    high = from_int8x16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), eight));
  }
  void add_product(const Vec16& x, const Vec16& w) { a = _mm256_fmadd_ps(x.a, w.a, a); b = _mm256_fmadd_ps(x.b, w.b, b); }
  void add_scaled(float s, const Vec16& v) {
    const __m256 sv = _mm256_set1_ps(s);
    a = _mm256_fmadd_ps(sv, v.a, a);
    b = _mm256_fmadd_ps(sv, v.b, b);
  }
  float sum() const {
    __m256 v = _mm256_add_ps(a, b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};
#else
struct Vec16 {
  float v[LANES];
  static Vec16 zero() { return Vec16{}; }
  static Vec16 load(const float* p) { Vec16 r; for (int j = 0; j < LANES; ++j) r.v[j] = p[j]; return r; }
  static Vec16 from_bf16(const uint16_t* p) { Vec16 r; for (int j = 0; j < LANES; ++j) r.v[j] = bf16_to_float(p[j]); return r; }
  static Vec16 from_int8(const int8_t* p) { Vec16 r; for (int j = 0; j < LANES; ++j) r.v[j] = p[j]; return r; }
  static void from_nibbles(const uint8_t* p, Vec16& low, Vec16& high) {
    for (int j = 0; j < LANES; ++j) {
      low.v[j] = static_cast<float>(static_cast<int>(p[j] & 15) - 8);
      high.v[j] = static_cast<float>(static_cast<int>(p[j] >> 4) - 8);
    }
  }
  void add_product(const Vec16& x, const Vec16& w) { for (int j = 0; j < LANES; ++j) v[j] += x.v[j] * w.v[j]; }
  void add_scaled(float s, const Vec16& o) { for (int j = 0; j < LANES; ++j) v[j] += s * o.v[j]; }
  float sum() const { float s = 0.f; for (int j = 0; j < LANES; ++j) s += v[j]; return s; }
};
#endif

template <int M, typename Load>
inline void dot_rows(const float* x, int64_t K, Load load_weight, float* out) {
  // out[m] = sum_k x[m, k] * w[k]; load_weight(k) widens the LANES weights from k on.
  Vec16 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = Vec16::zero();
  for (int64_t k = 0; k < K; k += LANES) {
    const Vec16 w = load_weight(k);
    for (int m = 0; m < M; ++m) acc[m].add_product(Vec16::load(x + m * K + k), w);
  }
  for (int m = 0; m < M; ++m) out[m] = acc[m].sum();
}

template <typename RowFn>
at::Tensor run(const at::Tensor& x, int64_t N, RowFn row_fn) {
  // row_fn(n, out[M]) computes column n of the result for every row of x.
  const int64_t M = x.size(0);
  auto y = at::empty({N, M}, x.options());  // (N, M): each weight row writes its M results together
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row_fn(n, yp + n * M);
  });
  return y.t().contiguous();
}

#define DISPATCH_ROWS(M, CALL)                                               \
  switch (M) {                                                               \
    case 1: { constexpr int R = 1; CALL; break; }                            \
    case 2: { constexpr int R = 2; CALL; break; }                            \
    case 3: { constexpr int R = 3; CALL; break; }                            \
    case 4: { constexpr int R = 4; CALL; break; }                            \
    case 5: { constexpr int R = 5; CALL; break; }                            \
    case 6: { constexpr int R = 6; CALL; break; }                            \
    case 7: { constexpr int R = 7; CALL; break; }                            \
    default: { constexpr int R = 8; CALL; break; }                           \
  }

void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "at most ", MAX_ROWS, " rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) == K && K % LANES == 0, "K must match the weight and be a multiple of ", LANES);
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "the weight must be contiguous on the CPU");
}

at::Tensor gemv_float(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, w, K);
  const float* xp = x.data_ptr<float>();
  const int64_t M = x.size(0);
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    return run(x, N, [&](int64_t n, float* out) {
      const float* row = wp + n * K;
      DISPATCH_ROWS(M, (dot_rows<R>(xp, K, [&](int64_t k) { return Vec16::load(row + k); }, out)));
    });
  }
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "weight must be fp32 or bf16");
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  return run(x, N, [&](int64_t n, float* out) {
    const uint16_t* row = wp + n * K;
    DISPATCH_ROWS(M, (dot_rows<R>(xp, K, [&](int64_t k) { return Vec16::from_bf16(row + k); }, out)));
  });
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kChar, "weight must be int8");
  TORCH_CHECK(scales.numel() == N, "scales must be (N,)");
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const Scales sp(scales);
  const int64_t M = x.size(0);
  return run(x, N, [&](int64_t n, float* out) {
    const int8_t* row = wp + n * K;
    DISPATCH_ROWS(M, (dot_rows<R>(xp, K, [&](int64_t k) { return Vec16::from_int8(row + k); }, out)));
    for (int64_t m = 0; m < M; ++m) out[m] *= sp[n];
  });
}

template <int M>
inline void int4_row(const float* xe, const float* xo, int64_t half, const uint8_t* row, const Scales& scale,
                     int64_t first_scale, int64_t group, float* out) {
  // xe / xo: the even / odd inputs of each row of x, (M, K/2), matching the low / high nibbles.
  Vec16 total[M];
  for (int m = 0; m < M; ++m) total[m] = Vec16::zero();
  const int64_t bytes_per_group = group / 2;
  for (int64_t g0 = 0; g0 < half; g0 += bytes_per_group) {
    Vec16 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = Vec16::zero();
    for (int64_t b = g0; b < g0 + bytes_per_group; b += LANES) {
      Vec16 low, high;
      Vec16::from_nibbles(row + b, low, high);
      for (int m = 0; m < M; ++m) {
        acc[m].add_product(Vec16::load(xe + m * half + b), low);
        acc[m].add_product(Vec16::load(xo + m * half + b), high);
      }
    }
    const float s = scale[first_scale + g0 / bytes_per_group];
    for (int m = 0; m < M; ++m) total[m].add_scaled(s, acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = total[m].sum();
}

at::Tensor gemv_int4(const at::Tensor& x_even, const at::Tensor& x_odd, const at::Tensor& w,
                     const at::Tensor& scales, int64_t group) {
  const int64_t N = w.size(0), half = w.size(1);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "weight must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(group % (2 * LANES) == 0 && (2 * half) % group == 0, "group must be a multiple of ", 2 * LANES,
              " that divides K");
  for (const at::Tensor* t : {&x_even, &x_odd}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(1) == half,
                "activations must be contiguous fp32 (M, K/2)");
    TORCH_CHECK(t->size(0) >= 1 && t->size(0) <= MAX_ROWS, "at most ", MAX_ROWS, " rows");
  }
  const int64_t groups = 2 * half / group;
  TORCH_CHECK(scales.numel() == N * groups, "scales must be (N, K / group)");
  const float* xe = x_even.data_ptr<float>();
  const float* xo = x_odd.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const Scales sp(scales);
  const int64_t M = x_even.size(0);
  return run(x_even, N, [&](int64_t n, float* out) {
    DISPATCH_ROWS(M, (int4_row<R>(xe, xo, half, wp + n * half, sp, n * groups, group, out)));
  });
}

}  // namespace

TORCH_LIBRARY(glmtorch_kernels, m) {
  m.def("gemv_float(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x_even, Tensor x_odd, Tensor w, Tensor scales, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmtorch_kernels, CPU, m) {
  m.impl("gemv_float", &gemv_float);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}

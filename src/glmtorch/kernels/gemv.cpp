// Matrix-vector products for decoding on the CPU: y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m.
//
// Decoding reads every weight once per step, so these loops are written to stream W exactly once, whatever
// the number of rows: each weight chunk is loaded, decoded in registers and multiplied into every row's
// accumulators (integer weights: MAX_ROWS rows at a time, further groups finding the weight row in cache; float
// weights: 1-2 rows against 4 fp32 weight rows at once, from 3 rows on register tiles of 4 rows x 3 weight rows,
// from 32 rows on a small matrix product on packed panels of weights; bf16 weights from 3 rows on with AVX512-BF16's
// dot products where the CPU has them; bf16 and row-interleaved int4 weights also on AMX tiles, gemv_amx and
// gemv_int4_amx). AVX2 + FMA intrinsics where the compiler targets them (-march=native),
// plain loops elsewhere; rows of W are split across torch's intra-op threads.
// Activations come in and results go out as fp32.
//
// Weight formats (the same tensors glmtorch keeps in its state dict):
//   f32, bf16  (N, K)
//   int8       (N, K) int8, one scale per output row
//   int4       (N, K/2) uint8, two values per byte (element 2i in the low nibble, 2i+1 in the high one),
//              stored as q + 8 with q in [-8, 7]; one scale per row and group of `group` inputs. Optionally
//              row-interleaved (`interleave` R > 1, group 32, fp16 scales): each block of R rows stores its 32-byte
//              pairs (64 weights) row by row, pair after pair, [pair 0 of rows 0..R-1 | pair 1 of rows 0..R-1 | ...],
//              and its scales the same way, two per row and pair; still (N, K/2) and (N, K/32) tensors.
// Scales are fp32, bf16 or fp16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
// AMX code is built where -march=native targets the tiles with both kinds of products (every such CPU, Sapphire
// Rapids on, also has AVX-512 and F16C, which the int4 tile kernel uses around them): one switch for all of it.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__F16C__)
#define GLMTORCH_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int64_t MAX_ROWS = 8;
// Weights stream from memory once per step; the loops ask for the bytes PREFETCH ahead of the ones they
// multiply, so the next rows are arriving while these are computed (the integer kernels do the most work per
// byte and gain most: int4 12 -> 18 GB/s on the LM head here; the hardware prefetcher alone falls behind).
#ifndef PREFETCH
#define PREFETCH 4096
#endif

inline void prefetch_ahead(const void* p) {
#if defined(__AVX2__) && defined(__FMA__)
  _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0);
#endif
}
constexpr int64_t LANES = 16;  // accumulators per row: wide enough for two AVX2 / one AVX-512 register

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float fp16_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Scales may be fp32, bf16 or fp16 (int4 keeps fp16, as llama.cpp's Q4_0 does); widened one at a time where they
// are read once per row, and in registers where they are read once per block (PairScales).
struct Scales {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  const uint16_t* f16 = nullptr;
  explicit Scales(const at::Tensor& t) {
    const auto type = t.scalar_type();
    TORCH_CHECK(t.is_contiguous() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf),
                "scales must be contiguous fp32, bf16 or fp16");
    if (type == at::kFloat) f32 = t.data_ptr<float>();
    else if (type == at::kBFloat16) bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr());
    else f16 = reinterpret_cast<const uint16_t*>(t.data_ptr());
  }
  float operator[](int64_t i) const { return f32 ? f32[i] : (bf16 ? bf16_to_float(bf16[i]) : fp16_to_float(f16[i])); }
};

// Sixteen fp32 lanes: two AVX2 registers where the compiler targets AVX2 + FMA, a plain array elsewhere.
// Float weights (fp32, bf16) are widened into these once per chunk, then multiplied into each row of x.
#if defined(__AVX2__) && defined(__FMA__)
inline float horizontal_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

struct Vec16 {
  static constexpr int WIDTH = 16;
  __m256 a, b;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Vec16 from_bf16_pairs(const uint16_t* p) {
    // Each 32-bit lane holds elements 2i (low half) and 2i + 1 (high half); a bf16 is the top half of an fp32,
    // so a shift gives the even elements and a mask the odd ones: x must be ordered evens, then odds.
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
  void add_product(const Vec16& x, const Vec16& w) { a = _mm256_fmadd_ps(x.a, w.a, a); b = _mm256_fmadd_ps(x.b, w.b, b); }
  float sum() const { return horizontal_sum(_mm256_add_ps(a, b)); }
};
// Eight lanes, one register: with 3 or more rows, one accumulator per row and a register for the weights and one
// for x leave no accumulator spilled to memory (16 lanes per row would need two registers a row).
struct Vec8 {
  static constexpr int WIDTH = 8;
  __m256 v;
  static Vec8 zero() { return {_mm256_setzero_ps()}; }
  static Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec8 from_bf16(const uint16_t* p) { return {glmtorch_kernels_math::widen_bf16_8(p)}; }
  void add_product(const Vec8& x, const Vec8& w) { v = _mm256_fmadd_ps(x.v, w.v, v); }
  float sum() const { return horizontal_sum(v); }
};
#else
struct Vec16 {
  static constexpr int WIDTH = 16;
  float v[LANES];
  static Vec16 zero() { return Vec16{}; }
  static Vec16 load(const float* p) { Vec16 r; for (int j = 0; j < LANES; ++j) r.v[j] = p[j]; return r; }
  static Vec16 from_bf16(const uint16_t* p) { Vec16 r; for (int j = 0; j < LANES; ++j) r.v[j] = bf16_to_float(p[j]); return r; }
  void add_product(const Vec16& x, const Vec16& w) { for (int j = 0; j < LANES; ++j) v[j] += x.v[j] * w.v[j]; }
  float sum() const { float s = 0.f; for (int j = 0; j < LANES; ++j) s += v[j]; return s; }
};
#endif

// Where results go: element (m, j) of a block of the (M, N) output, rows `stride` apart. The loops write the
// result in its final layout (no transposed copy after them: at 64 rows that copy took ~8% of a decode step).
struct Out {
  float* p;
  int64_t stride;
  float& operator()(int64_t m, int64_t j = 0) const { return p[m * stride + j]; }
  Out from_row(int64_t m) const { return {p + m * stride, stride}; }
  Out at(int64_t j) const { return {p + j, stride}; }
};

// With few rows, one accumulator per row would make every step wait for the previous fused multiply-add (a
// 4-cycle chain); U independent accumulators per row keep the units busy. More rows are independent already,
// and more accumulators than registers would spill.
template <int M>
constexpr int unroll() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

template <int M, typename V, typename Load>
inline void dot_rows(const float* x, int64_t K, Load load_weight, Out out) {
  // out(m) = sum_k x[m, k] * w[k]; load_weight(k) widens the V::WIDTH weights from k on.
  constexpr int U = unroll<M>(), W = V::WIDTH;
  V acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = V::zero();
  int64_t k = 0;
  for (; k + U * W <= K; k += U * W) {
    for (int u = 0; u < U; ++u) {
      const V w = load_weight(k + u * W);
      for (int m = 0; m < M; ++m) acc[u][m].add_product(V::load(x + m * K + k + u * W), w);
    }
  }
  for (; k < K; k += W) {
    const V w = load_weight(k);
    for (int m = 0; m < M; ++m) acc[0][m].add_product(V::load(x + m * K + k), w);
  }
  for (int m = 0; m < M; ++m) {
    float total = 0.f;
    for (int u = 0; u < U; ++u) total += acc[u][m].sum();
    out(m) = total;
  }
}

// The (M, N) result of a product with x's M rows: the caller's `out` where it gives one (gemv_float_out: the fused
// step's logits go into a buffer the server reuses; 64 rows of a 151,552-word vocabulary in fp32 are 39 MB, which
// glibc maps afresh at every step, ~13 ms of page faults on two cores, a tenth of the step), else a new tensor.
at::Tensor result(const at::Tensor& x, int64_t N, const at::Tensor* out) {
  if (out == nullptr) return at::empty({x.size(0), N}, x.options());
  TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == x.scalar_type() && out->is_contiguous() &&
                  out->dim() == 2 && out->size(0) == x.size(0) && out->size(1) == N,
              "out must be a contiguous (", x.size(0), ", ", N, ") CPU tensor in x's dtype");
  return *out;
}

template <typename RowFn>
at::Tensor run(const at::Tensor& x, int64_t N, RowFn row_fn, const at::Tensor* out = nullptr) {
  // row_fn(n, out) computes column n of the result, out(m), for every row m of x.
  auto y = result(x, N, out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row_fn(n, Out{yp + n, N});
  });
  return y;
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

// Rows of x in groups of MAX_ROWS against one weight row, which stays in cache between groups. CALL sees R
// (rows in this group, a constant) and g0 (the group's first row).
#define FOR_ROW_GROUPS(M, CALL)                                              \
  for (int64_t g0 = 0; g0 < (M); g0 += MAX_ROWS) {                          \
    DISPATCH_ROWS(std::min<int64_t>(MAX_ROWS, (M) - g0), CALL)               \
  }

void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  TORCH_CHECK(x.size(0) >= 1, "x has no rows");
  TORCH_CHECK(x.size(1) == K && K % LANES == 0, "K must match the weight and be a multiple of ", LANES);
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "the weight must be contiguous on the CPU");
}

// How fp32 weights meet 1-2 rows of x: STREAMS weight rows side by side (run_streams, measured faster on an AVX2
// machine), or one row at a time (f32_one_row): on an AMD EPYC (Zen 4, AVX-512) one row at a time with 512-bit
// loads read "small"'s fp32 LM head at 34 GB/s against 31 side by side. Which reads memory faster depends on the
// CPU, so glmtorch.dispatch times both once per machine (dispatch.json) and sets it here: 0 = side by side, 1 = one
// row at a time.
std::atomic<int64_t> fp32_row_order{0};

int64_t set_fp32_row_order(int64_t order) {
  TORCH_CHECK(order == 0 || order == 1, "fp32 row order is 0 (rows side by side) or 1 (one at a time)");
  return fp32_row_order.exchange(order);
}

#if !(defined(__AVX2__) && defined(__FMA__))
using Vec8 = Vec16;  // one vector type where there are no intrinsics
#endif

template <int M>
inline void f32_row(const float* x, int64_t K, const float* row, Out out) {
  // without AVX2 + FMA intrinsics (with them, fp32 weights take run_streams and the register tiles)
  dot_rows<M, Vec16>(x, K, [&](int64_t k) { prefetch_ahead(row + k); return Vec16::load(row + k); }, out);
}

template <int M>
inline void bf16_row(const float* x, int64_t K, const uint16_t* row, Out out) {
  dot_rows<M, Vec8>(x, K, [&](int64_t k) { prefetch_ahead(row + k); return Vec8::from_bf16(row + k); }, out);  // Vec16 without AVX2
}

#if defined(__AVX2__) && defined(__FMA__)
// Three rows or more: a register tile of MR rows of x against NR weight rows. With one weight row at a time, every
// weight vector meets every row of x, so each multiply-add needs its own load of x (from L2 once x outgrows L1:
// 64 rows of 1024 fp32 are 256 KB) and the loads, not the multiplies, set the pace. A 4 x 3 tile loads 7 vectors
// for 12 multiply-adds and keeps its 12 accumulators, 3 weight vectors and one x vector in the 16 registers.
constexpr int TILE_M = 4, TILE_N = 3;  // measured against 6 x 2, 3 x 4, 2 x 4: 4 x 3 and 6 x 2 lead

template <int MR, int NR, typename LoadWeights>
inline void tile(const float* x, int64_t K, LoadWeights load_weights, Out out) {
  // out(m, j) = sum_k x[m, k] * w_j[k] for m < MR, j < NR; load_weights(j, k) widens 8 weights of row j
  Vec8 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int m = 0; m < MR; ++m) acc[j][m] = Vec8::zero();
  for (int64_t k = 0; k < K; k += Vec8::WIDTH) {
    Vec8 w[NR];
    for (int j = 0; j < NR; ++j) w[j] = load_weights(j, k);
    for (int m = 0; m < MR; ++m) {
      const Vec8 xv = Vec8::load(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[j][m].add_product(xv, w[j]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int m = 0; m < MR; ++m) out(m, j) = acc[j][m].sum();
}

template <int NR, typename FirstLoad, typename Load>
inline void tile_column(const float* x, int64_t M, int64_t K, FirstLoad first_load, Load load, Out out) {
  // every row of x against NR weight rows, TILE_M rows at a time: the first tile loads the weight rows from memory
  // (first_load also asks for the next column's), the others find them in L1
  auto rows_from = [&](int64_t m0, auto load_weights) {
    const float* xm = x + m0 * K;
    switch (std::min<int64_t>(TILE_M, M - m0)) {
      case 1: tile<1, NR>(xm, K, load_weights, out.from_row(m0)); break;
      case 2: tile<2, NR>(xm, K, load_weights, out.from_row(m0)); break;
      case 3: tile<3, NR>(xm, K, load_weights, out.from_row(m0)); break;
      default: tile<TILE_M, NR>(xm, K, load_weights, out.from_row(m0)); break;
    }
  };
  rows_from(0, first_load);
  for (int64_t m0 = TILE_M; m0 < M; m0 += TILE_M) rows_from(m0, load);
}

template <typename LoadWeights>  // load_weights(n, k) -> Vec8 of weight row n from k
at::Tensor run_tiled(const at::Tensor& x, const at::Tensor& w, LoadWeights load_weights,
                     const at::Tensor* out = nullptr) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  const char* wbytes = static_cast<const char*>(w.data_ptr());
  const int64_t esize = w.element_size();
  auto y = result(x, N, out);
  float* yp = y.data_ptr<float>();
  const int64_t columns = (N + TILE_N - 1) / TILE_N;
  at::parallel_for(0, columns, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t n0 = c * TILE_N;
      auto rows_from_n0 = [&](int j, int64_t k) { return load_weights(n0 + j, k); };
      // the next column's rows start arriving while this column's are multiplied (the hardware prefetcher does
      // not follow the jump from one row to the next; ahead within the row would be this column's own bytes).
      // A step's weights from memory, 3-24 rows: fp32 1.15-1.26x, bf16 1.0-1.09x against prefetching within rows.
      auto fetching_rows_from_n0 = [&](int j, int64_t k) {
        _mm_prefetch(wbytes + (std::min(n0 + TILE_N + j, N - 1) * K + k) * esize, _MM_HINT_T0);
        return load_weights(n0 + j, k);
      };
      switch (std::min<int64_t>(TILE_N, N - n0)) {
        case 1: tile_column<1>(xp, M, K, fetching_rows_from_n0, rows_from_n0, Out{yp + n0, N}); break;
        case 2: tile_column<2>(xp, M, K, fetching_rows_from_n0, rows_from_n0, Out{yp + n0, N}); break;
        default: tile_column<3>(xp, M, K, fetching_rows_from_n0, rows_from_n0, Out{yp + n0, N}); break;
      }
    }
  });
  return y;
}

// One or two rows of fp32 weights: STREAMS weight rows side by side, one register per row of x and weight row
// (llama.cpp's fp32 tiles do the same). A loop that reads one weight row at a time keeps one stream of loads in
// flight per thread, and the memory system answers one stream more slowly than several: on a decode step's fp32
// weights here (small model, 2 threads, same process) 4 rows at once read 18-20 GB/s where one row at a time read
// 15-17 (as fast as torch.sum streams the same bytes; 8 rows: no better). bf16 gains nothing: its widening loop
// is as fast as torch.sum already.
constexpr int STREAMS = 4;

template <int M>
inline void f32_one_row(const float* x, int64_t K, const float* row, Out out) {
  // one weight row against 1-2 rows of x, two accumulators per row; no software prefetch (it only cost here)
#if defined(__AVX512F__)
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(row + k), w1 = _mm512_loadu_ps(row + k + 16);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, acc[m][1]);
    }
  }
  if (k < K) {  // K is a multiple of 16
    const __m512 w0 = _mm512_loadu_ps(row + k);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, acc[m][0]);
  }
  for (int m = 0; m < M; ++m) out(m) = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
#else
  dot_rows<M, Vec16>(x, K, [&](int64_t k) { return Vec16::load(row + k); }, out);
#endif
}

template <int MR, typename LoadWeights>
inline void stream_group(const float* x, int64_t K, int64_t n0, int64_t rows, LoadWeights load_weights, Out out) {
  // weight rows n0 .. n0 + rows - 1 (rows <= STREAMS) against the MR rows of x
  if (rows == STREAMS) return tile<MR, STREAMS>(x, K, [&](int j, int64_t k) { return load_weights(n0 + j, k); }, out);
  for (int64_t j = 0; j < rows; ++j)  // the last few rows of W
    tile<MR, 1>(x, K, [&](int, int64_t k) { return load_weights(n0 + j, k); }, out.at(j));
}

template <typename LoadWeights>  // load_weights(n, k) -> Vec8 of weight row n from k
at::Tensor run_streams(const at::Tensor& x, const at::Tensor& w, LoadWeights load_weights,
                       const at::Tensor* out = nullptr) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  auto y = result(x, N, out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + STREAMS - 1) / STREAMS, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin * STREAMS; n0 < std::min(end * STREAMS, N); n0 += STREAMS) {
      const int64_t rows = std::min<int64_t>(STREAMS, N - n0);
      if (M == 1) stream_group<1>(xp, K, n0, rows, load_weights, Out{yp + n0, N});
      else stream_group<2>(xp, K, n0, rows, load_weights, Out{yp + n0, N});
    }
  });
  return y;
}

// Many rows (a served batch's decode step): a matrix product, computed as BLAS libraries do. Weight rows are
// copied, PANEL_N at a time and PANEL_K inputs at a time, into a small transposed panel (16 outputs per input, fp32,
// stays in L1); a 6 x 16 register tile then multiplies it with 6 rows of x at once: per input, two panel loads
// and six broadcasts of x feed twelve multiply-adds, and no horizontal sums are left at the end. The weights of
// the next panel are prefetched into L2 while this one is multiplied (copying them in cold would stall).
// Measured on the "small" shapes, 2 threads, against the register tiles above: 1.15-1.35x at 48-64 rows, 1.0-1.2x at 32.
constexpr int PANEL_N = 16, PANEL_M = 6;
constexpr int64_t PANEL_K = 256;
constexpr int64_t PANEL_MIN_ROWS = 32;  // from here on panels beat the register tiles (equal at 16-28 rows)

inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

template <typename LoadWeights>  // load_weights(n, k) -> Vec8 of weight row n from k
void pack_panel(LoadWeights load_weights, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* panel) {
  // panel[k * PANEL_N + j] = W[n0 + j, k0 + k]; rows past the weight's end are zeros
  for (int g = 0; g < PANEL_N / 8; ++g)
    for (int64_t k = 0; k < kc; k += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = g * 8 + j < rows ? load_weights(n0 + g * 8 + j, k0 + k).v : _mm256_setzero_ps();
      transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k + i) * PANEL_N + g * 8, r[i]);
    }
}

template <int M>
inline void panel_tile(const float* x, int64_t K, const float* panel, int64_t kc, Out out, bool accumulate, int cols) {
  // out(m, j) (+)= sum_k x[m, k] * panel[k, j] for m < M, j < cols
  __m256 lo[M], hi[M];  // separate arrays, no address taken: GCC keeps them in registers
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w_lo = _mm256_loadu_ps(panel + k * PANEL_N), w_hi = _mm256_loadu_ps(panel + k * PANEL_N + 8);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xm = _mm256_broadcast_ss(x + m * K + k);
      lo[m] = _mm256_fmadd_ps(xm, w_lo, lo[m]);
      hi[m] = _mm256_fmadd_ps(xm, w_hi, hi[m]);
    }
  }
  if (cols == PANEL_N) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float* o = &out(m);
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(lo[m], _mm256_loadu_ps(o)) : lo[m]);
      _mm256_storeu_ps(o + 8, accumulate ? _mm256_add_ps(hi[m], _mm256_loadu_ps(o + 8)) : hi[m]);
    }
    return;
  }
  alignas(32) float sums[M][PANEL_N];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) { _mm256_store_ps(sums[m], lo[m]); _mm256_store_ps(sums[m] + 8, hi[m]); }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < cols; ++j) out(m, j) = (accumulate ? out(m, j) : 0.f) + sums[m][j];
}

// out (+)= x's M rows (from column k0: x points there, rows K apart) times one panel of kc inputs: PANEL_M rows a
// tile, then the rest; before each tile `between()` (run_panels' share of the next panel's prefetch).
template <typename Between>
inline void panel_rows(const float* x, int64_t M, int64_t K, const float* panel, int64_t kc, Out out, bool accumulate,
                       int cols, Between between) {
  int64_t m0 = 0;
  for (; m0 + PANEL_M <= M; m0 += PANEL_M) {
    between();
    panel_tile<PANEL_M>(x + m0 * K, K, panel, kc, out.from_row(m0), accumulate, cols);
  }
  between();
  const float* xr = x + m0 * K;
  switch (M - m0) {
    case 1: panel_tile<1>(xr, K, panel, kc, out.from_row(m0), accumulate, cols); break;
    case 2: panel_tile<2>(xr, K, panel, kc, out.from_row(m0), accumulate, cols); break;
    case 3: panel_tile<3>(xr, K, panel, kc, out.from_row(m0), accumulate, cols); break;
    case 4: panel_tile<4>(xr, K, panel, kc, out.from_row(m0), accumulate, cols); break;
    case 5: panel_tile<5>(xr, K, panel, kc, out.from_row(m0), accumulate, cols); break;
    default: break;
  }
}

template <typename LoadWeights>
at::Tensor run_panels(const at::Tensor& x, const at::Tensor& w, LoadWeights load_weights,
                      const at::Tensor* out = nullptr) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  const char* wbytes = static_cast<const char*>(w.data_ptr());
  const int64_t esize = w.element_size(), row_bytes = K * esize;
  auto y = result(x, N, out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + PANEL_N - 1) / PANEL_N, 4, [&](int64_t begin, int64_t end) {
    alignas(64) float panel[PANEL_K * PANEL_N];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * PANEL_N;
      const int cols = static_cast<int>(std::min<int64_t>(PANEL_N, N - n0));
      for (int64_t k0 = 0; k0 < K; k0 += PANEL_K) {
        const int64_t kc = std::min(PANEL_K, K - k0);
        pack_panel(load_weights, n0, cols, k0, kc, panel);
        // the next panel's weight bytes (this rows' next inputs, or the next rows'), into L2 a share per tile
        const int64_t next_n = k0 + kc < K ? n0 : n0 + PANEL_N, next_k = k0 + kc < K ? k0 + kc : 0;
        const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(PANEL_N, N - next_n));
        const int64_t lines_per_row = (std::min(PANEL_K, K - next_k) * esize + 63) / 64;
        const int64_t lines = next_rows * lines_per_row, tiles = (M + PANEL_M - 1) / PANEL_M;
        int64_t fetched = 0;
        auto prefetch_share = [&]() {
          for (const int64_t until = std::min(lines, fetched + (lines + tiles - 1) / tiles); fetched < until; ++fetched)
            _mm_prefetch(wbytes + (next_n + fetched / lines_per_row) * row_bytes + next_k * esize +
                         (fetched % lines_per_row) * 64, _MM_HINT_T1);
        };
        panel_rows(xp + k0, M, K, panel, kc, Out{yp + n0, N}, k0 > 0, cols, prefetch_share);
      }
    }
  });
  return y;
}

// fp32 weights kept in blocks of 16 output rows (pack_blocks: (N / 16, K, 16)) are run_panels' panels packed once:
// the same tiles read them in place, without transposing every weight into a panel at every call. Where the kernels
// have AVX2 but not AVX-512 (which has its own tiles for blocks, run_blocks). The sums are run_panels' own, in the
// same order, and each row's is the same whatever the rows beside it. The demo model's products (AMD EPYC Zen 3),
// blocks against plain: 32 rows 11-26% less time, 8 rows (plain: the register tiles) 25-40%, 64 rows 0-6%; one row
// 3-10% more (its plain stream reads a row of weights at a time).
void run_packed_panels(const float* xp, int64_t M, int64_t N, int64_t K, const float* wp, float* yp,
                       const float* bias) {
  at::parallel_for(0, N / PANEL_N, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* block = wp + p * K * PANEL_N;
      const Out out{yp + p * PANEL_N, N};
      for (int64_t k0 = 0; k0 < K; k0 += PANEL_K) {
        panel_rows(xp + k0, M, K, block + k0 * PANEL_N, std::min(PANEL_K, K - k0), out, k0 > 0, PANEL_N, [] {});
      }
      if (bias)
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < PANEL_N; ++j) out(m, j) += bias[p * PANEL_N + j];
    }
  });
}
#endif

// bf16 weights through AVX512-BF16's VDPBF16PS (AMD Zen 4 on, Intel Cooper Lake on), from 3 rows of x on: one
// instruction multiplies 32 bf16 weights of a row by 32 bf16 inputs and adds the pairs' sums into 16 fp32 lanes.
// The widening tiles spend a shift and two fp32 multiply-adds on every 16 weights instead, and from a few rows on
// that, not memory, sets their pace. x is rounded to bf16 (nearest even), as a bf16 model's own activations are;
// the products are exact in fp32 and summed in fp32, in an order that depends on K only (a row's result is the
// same alone or among others). Weights are read as stored (no repacked copy): register tiles of up to 6 rows of x
// against 4 weight rows, 32 inputs at a time (6 x 4 and 4 x 4 within noise of each other); past 6 rows the 4 weight
// rows (4 x K x 2 bytes) are taken again from L1 for each further group of x's rows. Measured on "small"'s LM head
// (AMD EPYC, 2 threads, huge pages), 8 rows: 20 ms on the widening tiles, 13 ms here (with the prefetch; 17 ms
// without: the tiles read four rows at once, which the hardware prefetcher alone follows poorly); at one row no
// faster than the widening stream (8.0 ms both).
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define GLMTORCH_BF16DOT 1
constexpr int64_t BF16DOT_MIN_ROWS = 3, BF16DOT_MR = 6, BF16DOT_NR = 4;
constexpr int64_t BF16DOT_PREFETCH = 16384;  // bytes ahead of each weight row's stream (8 KB, 32 KB: slower)

// The sums of the 16 lanes of a, b, c and d, in that order: 8 shuffles and adds for the four (one reduction each
// would take 4 x 8, ~12% of a 4 x 4 tile's instructions at K = 1024).
inline __m128 sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], the same of c and d, then [a, b, c, d] partial sums
  const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
  const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
  const __m512 lanes = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(lanes),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

template <int MR, int NR>
inline void bf16dot_tile(const uint16_t* x, int64_t K, const uint16_t* w, Out out, bool prefetch) {
  // out(m, j) = sum_k x[m, k] * w[j * K + k] for m < MR, j < NR; the first group of x's rows fetches the weights
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + BF16DOT_PREFETCH, _MM_HINT_T0);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(&out(m, 0), sums4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    } else {
      for (int j = 0; j < NR; ++j) out(m, j) = _mm512_reduce_add_ps(acc[m][j]);
    }
  }
}

template <int NR>
inline void bf16dot_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, Out out) {
  // every row of x against NR weight rows, BF16DOT_MR rows at a time
  int64_t m0 = 0;
  for (; m0 + BF16DOT_MR <= M; m0 += BF16DOT_MR)
    bf16dot_tile<BF16DOT_MR, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0);
  switch (M - m0) {
    case 1: bf16dot_tile<1, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0); break;
    case 2: bf16dot_tile<2, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0); break;
    case 3: bf16dot_tile<3, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0); break;
    case 4: bf16dot_tile<4, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0); break;
    case 5: bf16dot_tile<5, NR>(x + m0 * K, K, w, out.from_row(m0), m0 == 0); break;
    default: break;
  }
}

at::Tensor gemv_bf16dot(const at::Tensor& x, const uint16_t* wp, int64_t N, int64_t K,
                        const at::Tensor* out = nullptr) {
  const int64_t M = x.size(0);
  at::Tensor y = result(x, N, out);
  std::vector<uint16_t> xb(M * K);  // x in bf16, K a multiple of 32 (checked by the caller)
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * K; i += 32)  // 32 floats -> 32 bf16, in order
    _mm512_storeu_si512(xb.data() + i,
                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xp + i + 16), _mm512_loadu_ps(xp + i)));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + BF16DOT_NR - 1) / BF16DOT_NR, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * BF16DOT_NR;
      if (n0 + BF16DOT_NR <= N) bf16dot_rows<BF16DOT_NR>(xb.data(), M, K, wp + n0 * K, Out{yp + n0, N});
      else for (int64_t n = n0; n < N; ++n) bf16dot_rows<1>(xb.data(), M, K, wp + n * K, Out{yp + n, N});
    }
  });
  return y;
}
#endif

// Weights kept in blocks of 16 output rows (glmtorch.kernels.pack_blocks), the layout a product of any number of
// rows of x wants on AVX-512: one 64-byte load is the next input of 16 output rows (fp32: w (N / 16, K, 16),
// w[b, k, c] = W[16b + c, k]) or their next pair of inputs (bf16: w (N / 16, K / 2, 32), w[b, p, 2c + i] =
// W[16b + c, 2p + i]), multiplied against x's input (pair) broadcast to every lane (FMA; VDPBF16PS for bf16): each
// output's sum stays in its own lane (no horizontal sums), and a tile of 8 rows of x and 48 outputs keeps 24
// accumulators for 3 weight loads and 8 broadcasts a step. bf16 on an AMD EPYC (Zen 4, 2 threads), against the
// plain layout's dot tiles above: 64 x 1024 x 5632 at 387 against 244 GFLOPS, 768 rows at 391 against 258 (oneDNN:
// 361); at one row all of "small"'s bf16 products in 16.4 ms against 21.9 for the plain layout's widening stream
// (run_blocks below). One layout serves a batch-1 stream, a served batch and a prefill.
#ifdef __AVX512F__
#define GLMTORCH_BLOCKS 1
constexpr int64_t BLOCKS_MR = 8, BLOCKS_NR = 3;
constexpr int64_t BLOCKS_M_CHUNK = 128;  // rows of x per pass over the weights (they stay in cache meanwhile)

// Where a tile's sums go: fp32 rows of y, or bf16 ones (a bf16 model's activations: rounded once, to nearest even),
// each after the bias (fp32, or none) is added.
struct BlocksOut {
  void* y;
  int64_t N;
  const float* bias;
  bool bf16;
  BlocksOut at(int64_t m, int64_t n) const {
    void* p = bf16 ? static_cast<void*>(static_cast<uint16_t*>(y) + m * N + n)
                   : static_cast<void*>(static_cast<float*>(y) + m * N + n);
    return {p, N, bias ? bias + n : nullptr, bf16};
  }
  void store(int64_t m, int64_t n, __m512 v) const {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
#ifdef GLMTORCH_BF16DOT  // (bf16 rows come only with bf16 weights, which need the instruction)
    if (bf16) {  // 16 fp32 -> 16 bf16, to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + m * N + n),
                          (__m256i)_mm512_cvtneps_pbh(v));
      return;
    }
#endif
    _mm512_storeu_ps(static_cast<float*>(y) + m * N + n, v);
  }
};

// One step of a tile for each element kind: how many inputs it covers, x's broadcast, a block's load, the product.
template <typename T>
struct BlockStep;
template <>
struct BlockStep<float> {
  static constexpr int64_t inputs = 1;
  static __m512 broadcast(const float* x) { return _mm512_set1_ps(*x); }
  static __m512 load(const float* w) { return _mm512_loadu_ps(w); }
  static __m512 madd(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
};
#ifdef GLMTORCH_BF16DOT
inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <>
struct BlockStep<uint16_t> {
  static constexpr int64_t inputs = 2;
  static __m512bh broadcast(const uint16_t* x) { return (__m512bh)_mm512_set1_epi32(load_pair(x)); }
  static __m512bh load(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static __m512 madd(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
};
#endif

template <typename T, int MR, int NR>
inline void blocks_tile(const T* x, int64_t K, const T* w, const BlocksOut& y) {
  // y[m, 16j + c] = sum_k x[m, k] W[16j + c, k] for m < MR, j < NR; w at the tile's first block, blocks K * 16 apart
  using S = BlockStep<T>;
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t block = K * 16;
  for (int64_t k = 0; k < K; k += S::inputs) {
    decltype(S::load(w)) wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = S::load(w + j * block + k * 16);
    for (int m = 0; m < MR; ++m) {
      const auto xv = S::broadcast(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = S::madd(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) y.store(m, 16 * j, acc[m][j]);
}

template <typename T, int NR>
inline void blocks_rows(const T* x, int64_t M, int64_t K, const T* w, const BlocksOut& y) {
  int64_t m = 0;
  for (; m + BLOCKS_MR <= M; m += BLOCKS_MR) blocks_tile<T, BLOCKS_MR, NR>(x + m * K, K, w, y.at(m, 0));
  const T* xm = x + m * K;
  const BlocksOut ym = y.at(m, 0);
  switch (M - m) {
    case 1: blocks_tile<T, 1, NR>(xm, K, w, ym); break;
    case 2: blocks_tile<T, 2, NR>(xm, K, w, ym); break;
    case 3: blocks_tile<T, 3, NR>(xm, K, w, ym); break;
    case 4: blocks_tile<T, 4, NR>(xm, K, w, ym); break;
    case 5: blocks_tile<T, 5, NR>(xm, K, w, ym); break;
    case 6: blocks_tile<T, 6, NR>(xm, K, w, ym); break;
    case 7: blocks_tile<T, 7, NR>(xm, K, w, ym); break;
    default: break;
  }
}

template <typename T>
void run_blocks(const T* x, int64_t M, int64_t N, int64_t K, const T* w, const BlocksOut& out) {
  // One or two rows are bound by reading the weights: one block at a time, a single sequential stream per thread
  // (the LM head of "small" bf16 at one row: 32 against 30 GB/s with three blocks side by side, medians of 8
  // alternated runs; each output's sum is the same chain of products either way, so the bits do not change).
  const int64_t nr = M <= 2 ? 1 : BLOCKS_NR;
  const int64_t blocks = N / 16, groups = (blocks + nr - 1) / nr;
  for (int64_t m0 = 0; m0 < M; m0 += BLOCKS_M_CHUNK) {
    const int64_t rows = std::min(BLOCKS_M_CHUNK, M - m0);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t b = g * nr;
        const T* wg = w + b * K * 16;
        const BlocksOut yg = out.at(m0, b * 16);
        switch (std::min(nr, blocks - b)) {
          case 3: blocks_rows<T, 3>(x + m0 * K, rows, K, wg, yg); break;
          case 2: blocks_rows<T, 2>(x + m0 * K, rows, K, wg, yg); break;
          default: blocks_rows<T, 1>(x + m0 * K, rows, K, wg, yg); break;
        }
      }
    });
  }
}
#endif

int64_t block_kinds() {  // the weight kinds gemv_blocks takes here: 1 = fp32, 2 = bf16 (bits)
  int64_t kinds = 0;
#if defined(GLMTORCH_BLOCKS) || (defined(__AVX2__) && defined(__FMA__))
  kinds |= 1;  // AVX-512's tiles (run_blocks), or AVX2's panels read in place (run_packed_panels)
#endif
#ifdef GLMTORCH_BF16DOT
  kinds |= 2;
#endif
  return kinds;
}

at::Tensor blocks_product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          const at::Tensor* into) {
  const bool bf16_weights = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(w.dim() == 3 && w.size(2) == (bf16_weights ? 32 : 16) && w.is_contiguous() && w.device().is_cpu() &&
                  (bf16_weights || w.scalar_type() == at::kFloat),
              "gemv_blocks: the weight must be fp32 (N / 16, K, 16) or bf16 (N / 16, K / 2, 32) on the CPU ",
              "(pack_blocks)");
  TORCH_CHECK(block_kinds() & (bf16_weights ? 2 : 1), "gemv_blocks: these kernels were built without ",
              bf16_weights ? "AVX512-BF16" : "AVX2", " (kernels.takes_blocks() is False here)");
  const int64_t N = w.size(0) * 16, K = w.size(1) * (bf16_weights ? 2 : 1);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == K && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || (bf16_weights && x.scalar_type() == at::kBFloat16)),
              "gemv_blocks: x must be contiguous fp32", bf16_weights ? " or bf16" : "", " (M, ", K, ")");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous()), "gemv_blocks: the bias must be contiguous fp32 (", N, ",)");
  const int64_t M = x.size(0);
  at::Tensor y = result(x, N, into);  // in x's dtype
#ifdef GLMTORCH_BLOCKS
  const BlocksOut out{y.data_ptr(), N, bias ? bias->data_ptr<float>() : nullptr, x.scalar_type() == at::kBFloat16};
  if (!bf16_weights) {
    run_blocks<float>(x.data_ptr<float>(), M, N, K, w.data_ptr<float>(), out);
    return y;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (!bf16_weights) {
    run_packed_panels(x.data_ptr<float>(), M, N, K, w.data_ptr<float>(), y.data_ptr<float>(),
                      bias ? bias->data_ptr<float>() : nullptr);
    return y;
  }
#endif
#ifdef GLMTORCH_BF16DOT
  std::vector<uint16_t> rounded;
  const uint16_t* xb;
  if (x.scalar_type() == at::kBFloat16) {
    xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  } else {  // x rounded to bf16 (to nearest even, as torch's conversion), as a bf16 model's activations are
    rounded.resize(M * K);
    const float* xp = x.data_ptr<float>();
    int64_t i = 0;
    for (; i + 32 <= M * K; i += 32)
      _mm512_storeu_si512(rounded.data() + i,
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xp + i + 16), _mm512_loadu_ps(xp + i)));
    for (; i < M * K; ++i) rounded[i] = c10::BFloat16(xp[i]).x;
    xb = rounded.data();
  }
  run_blocks<uint16_t>(xb, M, N, K, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), out);
#endif
  return y;
}

int64_t bf16_dot_min_rows() {  // from how many rows of x bf16 weights meet VDPBF16PS here; 0: never (not built)
#ifdef GLMTORCH_BF16DOT
  return BF16DOT_MIN_ROWS;
#else
  return 0;
#endif
}

at::Tensor float_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor* out) {
  if (w.dim() == 3) return blocks_product(x, w, c10::nullopt, out);  // a weight in blocks of 16 rows (fused step)
  const int64_t N = w.size(0), K = w.size(1);
  check(x, w, K);
  const float* xp = x.data_ptr<float>();
  const int64_t M = x.size(0);
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
    auto load = [&](int64_t n, int64_t k) { return Vec8::load(wp + n * K + k); };
    if (M >= PANEL_MIN_ROWS) return run_panels(x, w, load, out);
    if (M >= 3) return run_tiled(x, w, load, out);
    if (fp32_row_order.load(std::memory_order_relaxed) == 1)
      return run(x, N, [&](int64_t n, Out o) {
        if (M == 1) f32_one_row<1>(xp, K, wp + n * K, o);
        else f32_one_row<2>(xp, K, wp + n * K, o);
      }, out);
    return run_streams(x, w, load, out);
#endif
    return run(x, N, [&](int64_t n, Out o) {
      FOR_ROW_GROUPS(M, (f32_row<R>(xp + g0 * K, K, wp + n * K, o.from_row(g0))));
    }, out);
  }
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "weight must be fp32 or bf16");
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
#ifdef GLMTORCH_BF16DOT
  if (M >= BF16DOT_MIN_ROWS && K % 32 == 0) return gemv_bf16dot(x, wp, N, K, out);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (M <= 2) {  // x with each chunk of 16 reordered, 8 even elements then 8 odd ones, for from_bf16_pairs
    std::vector<float> paired(M * K);
    for (int64_t i = 0; i < M * K; ++i) {
      const int64_t chunk = i / LANES, j = i % LANES;
      paired[chunk * LANES + (j % 2) * (LANES / 2) + j / 2] = xp[i];
    }
    const float* pp = paired.data();
    return run(x, N, [&](int64_t n, Out o) {
      const uint16_t* row = wp + n * K;
      auto load = [&](int64_t k) { prefetch_ahead(row + k); return Vec16::from_bf16_pairs(row + k); };
      if (M == 1) dot_rows<1, Vec16>(pp, K, load, o);
      else dot_rows<2, Vec16>(pp, K, load, o);
    }, out);
  }
  auto widen = [&](int64_t n, int64_t k) { return Vec8::from_bf16(wp + n * K + k); };
  if (M >= PANEL_MIN_ROWS) return run_panels(x, w, widen, out);
  return run_tiled(x, w, widen, out);
#endif
  return run(x, N, [&](int64_t n, Out o) {
    FOR_ROW_GROUPS(M, (bf16_row<R>(xp + g0 * K, K, wp + n * K, o.from_row(g0))));
  }, out);
}

at::Tensor gemv_blocks(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return blocks_product(x, w, bias, nullptr);
}

at::Tensor gemv_float(const at::Tensor& x, const at::Tensor& w) { return float_product(x, w, nullptr); }

// gemv_float into the caller's (M, N) fp32 buffer (see result)
void gemv_float_out(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) { float_product(x, w, &out); }

// Integer weights (int8, int4) are multiplied in integers, as llama.cpp does: each row of x is quantized to int8
// in blocks of 32 (one fp32 scale per block), a block's 32 products are summed exactly in int32, and the sum is
// scaled once. Widening every weight to fp32 instead costs more instructions than the memory system needs time
// to deliver the bytes, so that path would be compute-bound.
constexpr int64_t BLOCK = 32;
constexpr int64_t INTERLEAVE = 4;  // rows per interleaved int4 block (the CPU layout glmtorch loads int4 weights in)

#if defined(__AVX2__) && defined(__FMA__)
using Int8x32 = __m256i;
inline Int8x32 load_int8x32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Int8x32 unpack_nibbles(const uint8_t* p) {  // 16 bytes -> [16 low nibbles | 16 high nibbles] - 8
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  const __m256i both = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  return _mm256_sub_epi8(both, _mm256_set1_epi8(8));
}
struct BlockAcc {
  __m256 v = _mm256_setzero_ps();
  void add(float scale, Int8x32 w, Int8x32 x, Int8x32 x_magnitude) {
    // unsigned by signed bytes: |x| times w with x's sign (|x| <= 127: maddubs's pairs do not saturate); VNNI's
    // dpbusd sums the four products of each 32-bit lane in one instruction, maddubs + madd in two
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), x_magnitude, _mm256_sign_epi8(w, x));
#elif defined(__AVXVNNI__)
    const __m256i sums = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x_magnitude, _mm256_sign_epi8(w, x));
#else
    const __m256i pairs = _mm256_maddubs_epi16(x_magnitude, _mm256_sign_epi8(w, x));
    const __m256i sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
    v = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sums), v);
  }
  float sum() const { return horizontal_sum(v); }
};
#else
struct Int8x32 { int8_t v[BLOCK]; };
inline Int8x32 load_int8x32(const int8_t* p) { Int8x32 r; std::memcpy(r.v, p, BLOCK); return r; }
inline Int8x32 unpack_nibbles(const uint8_t* p) {
  Int8x32 r;
  for (int j = 0; j < 16; ++j) {
    r.v[j] = static_cast<int8_t>((p[j] & 15) - 8);
    r.v[16 + j] = static_cast<int8_t>((p[j] >> 4) - 8);
  }
  return r;
}
struct BlockAcc {
  float v = 0.f;
  void add(float scale, const Int8x32& w, const Int8x32& x, const Int8x32&) {
    int32_t s = 0;
    for (int j = 0; j < BLOCK; ++j) s += static_cast<int32_t>(w.v[j]) * x.v[j];
    v += scale * static_cast<float>(s);
  }
  float sum() const { return v; }
};
#endif

// x (M, K) fp32 -> int8 values (M, K), their magnitudes, and one scale per block of 32. With `nibble_order`,
// each block's values are stored evens first, then odds, matching unpack_nibbles of the int4 layout (element 2i
// low, 2i+1 high).
struct RowActivations {
  std::vector<int8_t> q, magnitude;
  std::vector<float> scale;
};

#if defined(__AVX2__) && defined(__FMA__)
// One block of 32 activations -> their int8 values in order, in one register, as the scalar loop below computes
// them (clamped, then rounded to nearest-even: cvtps_epi32 rounds as lrintf does); sets the block's scale and the
// values' sum. Every matrix-vector product quantizes its input first: the scalar loop took ~10 us of a ~20 us
// call on the small int4 matrices.
inline __m256i quantize_block(const float* v, float& scale, int32_t& sum) {
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 f[4], amax8 = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    f[i] = _mm256_loadu_ps(v + 8 * i);
    amax8 = _mm256_max_ps(amax8, _mm256_and_ps(f[i], no_sign));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  scale = amax / 127.f;
  const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(f[i], inverse))));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1)));
  // packs work within 128-bit lanes: 32-bit group d of the result holds values [4d', 4d' + 4) in the order
  // q0[0..3] q1[0..3] q2[0..3] q3[0..3] | q0[4..7] q1[4..7] q2[4..7] q3[4..7]; the permute restores 0..31
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

void quantize_rows(const at::Tensor& x, bool nibble_order, RowActivations& a) {
  const int64_t M = x.size(0), K = x.size(1), blocks = K / BLOCK;
  const float* xp = x.data_ptr<float>();
  a.q.resize(M * K);
  a.magnitude.resize(M * K);
  a.scale.resize(M * blocks);
#if defined(__AVX2__) && defined(__FMA__)
  if (!nibble_order) {
    for (int64_t b = 0; b < M * blocks; ++b) {
      int32_t sum;
      const __m256i q = quantize_block(xp + b * BLOCK, a.scale[b], sum);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + b * BLOCK), q);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.magnitude.data() + b * BLOCK), _mm256_abs_epi8(q));
    }
    return;
  }
#endif
  for (int64_t b = 0; b < M * blocks; ++b) {
    const float* v = xp + b * BLOCK;
    float amax = 0.f;
    for (int j = 0; j < BLOCK; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    a.scale[b] = scale;
    for (int j = 0; j < BLOCK; ++j) {
      const int64_t slot = b * BLOCK + (nibble_order ? (j % 2 ? BLOCK / 2 + j / 2 : j / 2) : j);
      a.q[slot] = static_cast<int8_t>(std::lrintf(std::min(127.f, std::max(-127.f, v[j] * inverse))));
      a.magnitude[slot] = static_cast<int8_t>(std::abs(a.q[slot]));
    }
  }
}

template <int M, typename LoadBlock, typename WeightScale>
inline void int_dot_rows(const RowActivations& a, int64_t m0, int64_t blocks, LoadBlock load_weights,
                         WeightScale weight_scale, Out out) {
  // rows m0 .. m0 + M - 1 of the activations. One accumulator per row whatever M is: a row's sum then comes out
  // the same alone or among others (speculative decoding's verify pass must pick what one-row steps pick), and
  // the dependency chain (one FMA per 32 weights) is shorter than the time their bytes take to arrive.
  constexpr int U = 1;
  const int8_t* xq = a.q.data() + m0 * blocks * BLOCK;
  const int8_t* xm = a.magnitude.data() + m0 * blocks * BLOCK;
  const float* xs = a.scale.data() + m0 * blocks;
  BlockAcc acc[U][M];
  int64_t c = 0;
  for (; c + U <= blocks; c += U) {
    for (int u = 0; u < U; ++u) {
      const Int8x32 w = load_weights(c + u);
      const float ws = weight_scale(c + u);
      for (int m = 0; m < M; ++m)
        acc[u][m].add(xs[m * blocks + c + u] * ws, w, load_int8x32(xq + (m * blocks + c + u) * BLOCK),
                      load_int8x32(xm + (m * blocks + c + u) * BLOCK));
    }
  }
  for (; c < blocks; ++c) {
    const Int8x32 w = load_weights(c);
    const float ws = weight_scale(c);
    for (int m = 0; m < M; ++m)
      acc[0][m].add(xs[m * blocks + c] * ws, w, load_int8x32(xq + (m * blocks + c) * BLOCK),
                    load_int8x32(xm + (m * blocks + c) * BLOCK));
  }
  for (int m = 0; m < M; ++m) {
    float total = 0.f;
    for (int u = 0; u < U; ++u) total += acc[u][m].sum();
    out(m) = total;
  }
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, w, K);
  TORCH_CHECK(K % BLOCK == 0, "K must be a multiple of ", BLOCK);
  TORCH_CHECK(w.scalar_type() == at::kChar, "weight must be int8");
  TORCH_CHECK(scales.numel() == N, "scales must be (N,)");
  RowActivations a;
  quantize_rows(x, false, a);
  const int8_t* wp = w.data_ptr<int8_t>();
  const Scales sp(scales);
  const int64_t M = x.size(0), blocks = K / BLOCK;
  return run(x, N, [&](int64_t n, Out out) {
    const int8_t* row = wp + n * K;
    FOR_ROW_GROUPS(M, (int_dot_rows<R>(a, g0, blocks, [&](int64_t c) { prefetch_ahead(row + c * BLOCK); return load_int8x32(row + c * BLOCK); },
                                       [&](int64_t) { return 1.f; }, out.from_row(g0))));
    const float row_scale = sp[n];  // one scale per output row: applied once, not per block
    for (int64_t m = 0; m < M; ++m) out(m) *= row_scale;
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// int4 two blocks at a time (64 weights, 32 bytes, K a multiple of 64): one 32-byte load holds the low nibbles
// (elements 2j) and the high nibbles (elements 2j + 1) of both blocks, so x is laid out to match (all even
// elements of the pair, then all odd ones). The nibbles stay unsigned (q + 8) for maddubs; the "- 8" comes back
// as 8 * sum(x) per block, subtracted in integers. Half the instructions of one block at a time.
struct PairActivations {
  std::vector<int8_t> q;        // per row and pair: 32 even-element values, then 32 odd-element values
  std::vector<int32_t> offset;  // per row and pair: 8 * sum(q) of block 0 in lane 0, of block 1 in lane 4
  std::vector<float> scale;     // per row and pair: block 0's scale in lanes 0-3, block 1's in lanes 4-7
};

void quantize_pairs(const at::Tensor& x, PairActivations& a) {
  const int64_t M = x.size(0), K = x.size(1), pairs = K / (2 * BLOCK);
  const float* xp = x.data_ptr<float>();
  a.q.resize(M * K);
  a.offset.resize(M * pairs * 8);
  a.scale.resize(M * pairs * 8);
  // within each 128-bit lane (16 consecutive values): its 8 even elements, then its 8 odd ones
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t p = 0; p < M * pairs; ++p) {  // (row, pair) p: values [64 p, 64 p + 64) of x
    float scale[2];
    int32_t sum[2];
    const __m256i q0 = quantize_block(xp + p * 2 * BLOCK, scale[0], sum[0]);
    const __m256i q1 = quantize_block(xp + p * 2 * BLOCK + BLOCK, scale[1], sum[1]);
    // in 8-value quarters: [E0 O0 E1 O1] and [E2 O2 E3 O3] (E0: evens of values 0-15, ...) -> [E0 E1 O0 O1],
    // [E2 E3 O2 O3] -> evens [E0 E1 E2 E3], odds [O0 O1 O2 O3]
    const __m256i s0 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q0, split), 0xD8);
    const __m256i s1 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q1, split), 0xD8);
    int8_t* out = a.q.data() + p * 2 * BLOCK;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(s0, s1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + BLOCK), _mm256_permute2x128_si256(s0, s1, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.offset.data() + p * 8),
                        _mm256_setr_epi32(8 * sum[0], 0, 0, 0, 8 * sum[1], 0, 0, 0));
    _mm256_storeu_ps(a.scale.data() + p * 8, _mm256_setr_m128(_mm_set1_ps(scale[0]), _mm_set1_ps(scale[1])));
  }
}

// The integer dot products of one weight pair (32 bytes: 64 int4 values) with one row's pair of x: block 0's
// sum in lanes 0-3, block 1's in lanes 4-7, the "- 8" of every weight already taken off (offset = 8 * sum(x)).
// From the nibbles already unpacked (low: elements 2j, high: 2j + 1, as unsigned bytes): with VNNI one dpbusd per
// half (u8 x s8 products summed by fours into 32-bit lanes), else maddubs (to 16 bits: at most 2 x 15 x 127 per
// pair of products, two of them 7620, no saturation) and madd by ones. The same integers either way.
inline __m256i int4_unpacked_sums(__m256i low, __m256i high, __m256i x_even, __m256i x_odd, __m256i offset) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  const __m256i sums = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), low, x_even), high, x_odd);
  return _mm256_sub_epi32(sums, offset);
#elif defined(__AVXVNNI__)
  const __m256i sums =
      _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), low, x_even), high, x_odd);
  return _mm256_sub_epi32(sums, offset);
#else
  const __m256i products = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_even), _mm256_maddubs_epi16(high, x_odd));
  return _mm256_sub_epi32(_mm256_madd_epi16(products, _mm256_set1_epi16(1)), offset);
#endif
}

inline void split_nibbles(__m256i raw, __m256i& low, __m256i& high) {
  const __m256i low_mask = _mm256_set1_epi8(15);
  low = _mm256_and_si256(raw, low_mask);
  high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
}

inline __m256i int4_pair_sums(__m256i raw, __m256i x_even, __m256i x_odd, __m256i offset) {
  __m256i low, high;
  split_nibbles(raw, low, high);
  return int4_unpacked_sums(low, high, x_even, x_odd, offset);
}

inline __m256i load_256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Exact block sums of four rows' pair sums (each: block 0's partial sums in lanes 0-3, block 1's in 4-7):
// [row 0..3 block 0 | row 0..3 block 1]. Integer adds, so any order gives the same sums.
inline __m256i block_sums4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
  return _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
}

// A row's int4 result, the same wherever it is computed (one row, many, the AMX tiles): per 32-value block b the
// exact integer sum, then acc[b % 2] = fma(x scale * weight scale, float(sum), acc[b % 2]) in block order, and the
// result acc[0] + acc[1]. The vector loops keep (row, parity) lanes: [rows 0-3 even blocks | rows 0-3 odd blocks].
inline void store_parity_sums(__m256 acc, float* out4) {
  _mm_storeu_ps(out4, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
}

template <int M, typename WeightScales>
inline void int4_pair_rows(const PairActivations& a, int64_t m0, int64_t pairs, const uint8_t* row,
                           WeightScales weight_scales, Out out, int64_t pair_stride = BLOCK) {
  // rows m0 .. m0 + M - 1 of the activations, four at a time; weight_scales(p) gives pair p's block scales (lanes
  // 0-3, 4-7); the weight row's pairs are pair_stride bytes apart (BLOCK, or BLOCK x R in a row-interleaved block)
  constexpr int G = (M + 3) / 4;
  const int8_t* xq = a.q.data() + m0 * pairs * 2 * BLOCK;
  const int32_t* offset = a.offset.data() + m0 * pairs * 8;
  const float* xs = a.scale.data() + m0 * pairs * 8;
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    prefetch_ahead(row + p * pair_stride);
    __m256i low, high;  // unpacked once for the M rows
    split_nibbles(load_256(row + p * pair_stride), low, high);
    const __m256 ws = weight_scales(p);
    for (int g = 0; g < G; ++g) {
      __m256i sums[4];
      __m256 x_scales[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t at = (4 * g + j < M ? 4 * g + j : 4 * g) * pairs + p;  // rows past M: row 4g again, unused
        sums[j] = int4_unpacked_sums(low, high, load_256(xq + at * 2 * BLOCK), load_256(xq + at * 2 * BLOCK + BLOCK),
                                     load_256(offset + at * 8));
        x_scales[j] = _mm256_loadu_ps(xs + at * 8);  // [block 0's scale x4 | block 1's x4]
      }
      // lanes j and 4 + j from row j's scales
      const __m256 xsv = _mm256_blend_ps(_mm256_blend_ps(x_scales[0], x_scales[1], 0x22),
                                         _mm256_blend_ps(x_scales[2], x_scales[3], 0x88), 0xCC);
      acc[g] = _mm256_fmadd_ps(_mm256_mul_ps(xsv, ws), _mm256_cvtepi32_ps(block_sums4(sums[0], sums[1], sums[2], sums[3])),
                               acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    alignas(16) float four[4];
    store_parity_sums(acc[g], four);
    for (int j = 0; j < 4 && 4 * g + j < M; ++j) out(4 * g + j) = four[j];
  }
}

// A pair's two block scales as lanes 0-3 and 4-7, read straight from the weight's scales (no per-element
// conversion calls: these run once per 64 weights, as often as the multiplies).
struct PairScales {
  // group 32, bf16: both scales in one 32-bit load; the low half shifted up is block 0's fp32, the masked
  // high half block 1's
  static __m256 bf16_pair(const uint16_t* s) {
    int32_t both;
    std::memcpy(&both, s, sizeof(both));
    const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(both), _mm256_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0));
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static __m256 f16_pair(const uint16_t* s) {
#if defined(__F16C__)
    int32_t both;
    std::memcpy(&both, s, sizeof(both));
    const __m128 wide = _mm_cvtph_ps(_mm_cvtsi32_si128(both));  // [s0, s1, 0, 0]
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(wide), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
#else
    return _mm256_set_m128(_mm_set1_ps(fp16_to_float(s[1])), _mm_set1_ps(fp16_to_float(s[0])));
#endif
  }
  static __m256 f32_pair(const float* s) {
    const __m128 both = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(both), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
};

// Eight fp16 values widened.
inline __m256 f16x8(const uint16_t* s) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#else
  return _mm256_setr_ps(fp16_to_float(s[0]), fp16_to_float(s[1]), fp16_to_float(s[2]), fp16_to_float(s[3]),
                        fp16_to_float(s[4]), fp16_to_float(s[5]), fp16_to_float(s[6]), fp16_to_float(s[7]));
#endif
}

// One row of x against a row-interleaved block of R weight rows: the block is one sequential stream, and each
// pair of x (values, offsets, scales) is loaded once for R rows. Measured on the "small" shapes against the plain
// layout, one row: 14.3 -> 11.1 ms for all int4 products of a step (the LM head 16 -> 22 GB/s).
template <int R>
void int4_interleaved_block(const PairActivations& a, int64_t pairs, const uint8_t* block, const uint16_t* scales,
                            float* out) {
  static_assert(R == 4, "one vector of (row, block parity) sums");
  __m256 acc = _mm256_setzero_ps();
  const __m256i by_parity = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i x_even = load_256(a.q.data() + p * 2 * BLOCK), x_odd = load_256(a.q.data() + p * 2 * BLOCK + BLOCK);
    const __m256i offset = load_256(a.offset.data() + p * 8);
    const __m256 xs = _mm256_loadu_ps(a.scale.data() + p * 8);
    const uint8_t* w = block + p * R * BLOCK;
    __m256i sums[R];
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * BLOCK);
      sums[r] = int4_pair_sums(load_256(w + r * BLOCK), x_even, x_odd, offset);
    }
    // the 8 fp16 scales of this pair, row by row [r0 b0, r0 b1, r1 b0, ...] -> [r0..r3 b0 | r0..r3 b1]
    const __m256 ws = _mm256_permutevar8x32_ps(f16x8(scales + p * R * 2), by_parity);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(xs, ws), _mm256_cvtepi32_ps(block_sums4(sums[0], sums[1], sums[2], sums[3])),
                          acc);
  }
  store_parity_sums(acc, out);
}
#endif

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group,
                     int64_t interleave) {
  const int64_t N = w.size(0), K = 2 * w.size(1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte, "weight must be uint8 (N, K/2)");
  TORCH_CHECK(group % BLOCK == 0 && K % group == 0 && ((group / BLOCK) & (group / BLOCK - 1)) == 0,
              "group must be ", BLOCK, " times a power of two, and divide K");
  const int64_t groups = K / group, blocks = K / BLOCK;
  int shift = 0;  // block -> group is a shift, not a division in the inner loop
  while ((BLOCK << shift) < group) ++shift;
  TORCH_CHECK(scales.numel() == N * groups, "scales must be (N, K / group)");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const Scales sp(scales);
  const int64_t M = x.size(0);
  TORCH_CHECK(interleave == 1 || (interleave == INTERLEAVE && N % INTERLEAVE == 0 && group == BLOCK && sp.f16 &&
                                  K % (2 * BLOCK) == 0),
              "row interleaving is ", INTERLEAVE, " rows, for fp16 scales, group ", BLOCK, " and N a multiple of ",
              INTERLEAVE);
#if defined(__AVX2__) && defined(__FMA__)
  if (K % (2 * BLOCK) == 0) {
    PairActivations a;
    quantize_pairs(x, a);
    const int64_t pairs = K / (2 * BLOCK);
    if (interleave > 1) {
      constexpr int IR = INTERLEAVE;
      const int64_t block_bytes = IR * (K / 2), block_scales = IR * groups;
      if (M == 1) {
        auto y = at::empty({1, N}, x.options());
        float* yp = y.data_ptr<float>();
        at::parallel_for(0, N / IR, 16, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            int4_interleaved_block<IR>(a, pairs, wp + b * block_bytes, sp.f16 + b * block_scales, yp + b * IR);
        });
        return y;
      }
      return run(x, N, [&](int64_t n, Out out) {  // row n of block b: its pairs are IR x 32 bytes apart
        const int64_t b = n / IR, r = n % IR;
        const uint16_t* s = sp.f16 + b * block_scales + r * 2;
        auto scales_of = [&](int64_t p) { return PairScales::f16_pair(s + p * IR * 2); };
        FOR_ROW_GROUPS(M, (int4_pair_rows<R>(a, g0, pairs, wp + b * block_bytes + r * BLOCK, scales_of,
                                             out.from_row(g0), IR * BLOCK)));
      });
    }
    auto with_scales = [&](auto pair_scales) {  // pair_scales(first scale of the row, pair) -> __m256
      return run(x, N, [&](int64_t n, Out out) {
        const int64_t first = n * groups;
        auto scales_of = [&](int64_t p) { return pair_scales(first, p); };
        FOR_ROW_GROUPS(M, (int4_pair_rows<R>(a, g0, pairs, wp + n * (K / 2), scales_of, out.from_row(g0))));
      });
    };
    if (group == BLOCK && sp.bf16)
      return with_scales([&](int64_t first, int64_t p) { return PairScales::bf16_pair(sp.bf16 + first + 2 * p); });
    if (group == BLOCK && sp.f16)
      return with_scales([&](int64_t first, int64_t p) { return PairScales::f16_pair(sp.f16 + first + 2 * p); });
    if (group == BLOCK)
      return with_scales([&](int64_t first, int64_t p) { return PairScales::f32_pair(sp.f32 + first + 2 * p); });
    // larger groups: both blocks of a pair share one scale
    return with_scales([&](int64_t first, int64_t p) { return _mm256_set1_ps(sp[first + ((2 * p) >> shift)]); });
  }
#endif
  TORCH_CHECK(interleave == 1, "row-interleaved int4 needs the AVX2 kernels");
  RowActivations a;
  quantize_rows(x, true, a);
  return run(x, N, [&](int64_t n, Out out) {
    const uint8_t* row = wp + n * (K / 2);
    const int64_t first = n * groups;
    FOR_ROW_GROUPS(M, (int_dot_rows<R>(a, g0, blocks,
                                       [&](int64_t c) { return unpack_nibbles(row + c * (BLOCK / 2)); },
                                       [&](int64_t c) { return sp[first + (c >> shift)]; }, out.from_row(g0))));
  });
}

// bf16 weights on AMX tiles (Sapphire Rapids on; compiled where -march=native targets AMX-BF16, used where the OS
// grants the tile registers and glmtorch.dispatch measured it faster). One TDPBF16PS multiplies a 16 x 32 block of
// W, loaded as stored (16 output rows, K apart: no repacked copy of the weights), by x's 32 inputs of up to 16 rows
// given as pairs (x[m][2i], x[m][2i + 1]), into 16 output rows x M fp32 sums. x is rounded to bf16, as a bf16
// model's own activations are; the products are exact in fp32 and summed in fp32, in an order that depends on K
// only (a row's result is the same alone or among others). 16 weight rows at a time, their K streamed once; past
// 16 rows of x, groups of 16 two at a time share each weight tile, further pairs take the 16 weight rows again from
// cache. Measured on "small"'s shapes: 16 rows per block read 24 GB/s at one row of x, 64 rows per block (four
// sums sharing each x tile) 22; software prefetch only cost.
bool amx_permitted() {
#ifdef GLMTORCH_AMX
  // Linux hands out the tile registers' state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); a VM
  // or kernel that lists the flags may still refuse it.
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

#ifdef GLMTORCH_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile 0: the sums (16 weight rows x Mg rows of x, fp32); tile 1: x pairs; tile 2: a 16 x 32 weight block; tiles 3
// and 4: a second group of x's rows, its sums and pairs.
inline void load_tile_config(int64_t rows_of_x) {
  TileConfig cfg;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = cfg.rows[3] = cfg.rows[4] = 16;
  cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[3] = cfg.colsb[4] = static_cast<uint16_t>(rows_of_x * 4);
  cfg.colsb[2] = 64;
  _tile_loadconfig(&cfg);
}

// Sums of 16 weight rows (from w, K apart) against x pairs (xp: K/2 rows of pairs, x_stride bytes apart), stored to
// c as 16 x Mg floats.
inline void amx_rows16(const uint16_t* w, int64_t K, const uint16_t* xp, int64_t x_stride, float* c, int64_t Mg) {
  _tile_zero(0);
  const int64_t step = x_stride / 2 * 16;  // x elements per 32 inputs
  for (int64_t k = 0; k < K; k += 32, xp += step) {
    _tile_loadd(1, xp, x_stride);
    _tile_loadd(2, w + k, K * 2);
    _tile_dpbf16ps(0, 2, 1);
  }
  _tile_stored(0, c, Mg * 4);
}

// Two groups of 16 rows of x against the same 16 weight rows: each weight tile loaded once for both (tiles 3 and 4
// hold the second group's sums and x).
inline void amx_rows16_twice(const uint16_t* w, int64_t K, const uint16_t* xp, int64_t x_stride, float* c) {
  _tile_zero(0);
  _tile_zero(3);
  const int64_t step = x_stride / 2 * 16;
  for (int64_t k = 0; k < K; k += 32, xp += step) {
    _tile_loadd(2, w + k, K * 2);
    _tile_loadd(1, xp, x_stride);
    _tile_dpbf16ps(0, 2, 1);
    _tile_loadd(4, xp + 32, x_stride);
    _tile_dpbf16ps(3, 2, 4);
  }
  _tile_stored(0, c, 64);
  _tile_stored(3, c + 256, 64);
}
#endif

at::Tensor gemv_amx(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && N % 16 == 0 && K % 32 == 0,
              "gemv_amx takes a bf16 weight of a multiple of 16 rows and of 32 columns");
  TORCH_CHECK(amx_permitted(), "AMX tiles are not available on this CPU or not granted by the OS");
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef GLMTORCH_AMX
  // x as (K/2, Mp, 2) bf16: input pair i of row m at (i * Mp + m) * 2; rows m0.. of pair row i are contiguous, so
  // one buffer serves every group of 16 rows (Mp * 4 bytes between pair rows). Past 16 rows, Mp is whole groups of
  // 16 (zero rows added), taken two at a time against each weight tile.
  const int64_t Mp = M <= 16 ? M : (M + 15) / 16 * 16;
  std::vector<uint16_t> pairs(Mp * K, 0);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) pairs[(k / 2 * Mp + m) * 2 + k % 2] = c10::BFloat16(xp[m * K + k]).x;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> c(2 * 16 * 16);
    const int64_t Mg = std::min<int64_t>(16, Mp);  // rows of x per group, the same for every group
    load_tile_config(Mg);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * 16;
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const bool two = m0 + 16 < Mp;
        if (two) amx_rows16_twice(wp + n0 * K, K, pairs.data() + m0 * 2, Mp * 4, c.data());
        else amx_rows16(wp + n0 * K, K, pairs.data() + m0 * 2, Mp * 4, c.data(), Mg);
        for (int64_t g = 0; g < (two ? 2 : 1); ++g)  // c holds (weight row, x row): y wants (x row, weight row),
          for (int64_t m = 0; m < Mg && m0 + 16 * g + m < M; ++m)  // 16 consecutive floats a row of y
            for (int64_t i = 0; i < 16; ++i) yp[(m0 + 16 * g + m) * N + n0 + i] = c[g * 256 + i * Mg + m];
      }
    }
    _tile_release();
  });
#endif
  return y;
}

// int4 weights (the row-interleaved CPU layout: blocks of 4 rows, group 32, fp16 scales) on AMX-INT8 tiles, for
// several rows of x (a speculative verify pass, a small batch). Per pair of blocks (64 values) of 16 weight rows:
// each 4-byte column of the 16 rows is brought into one vector (a 16 x 8 dword transpose) and split into low and
// high nibbles (signed), which makes the weight tiles of both blocks directly (8 rows of 16 x 4 bytes); x's blocks,
// quantized exactly as the vector kernels quantize them and put in the matching order, are the other tiles;
// TDPBSSD gives exact per-block integer sums for up to 16 rows of x. They are scaled and added as int4_pair_rows
// adds them (block parity accumulators, fma in block order), so every row's result is the vector kernels' bit for
// bit: a verify pass on the tiles picks what one-row steps pick.
#ifdef GLMTORCH_AMX
inline void load_int4_tile_config(int64_t rows_of_x) {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows_of_x), cfg.colsb[t] = 64;      // 0, 1: sums (x rows x 16 weight rows)
    cfg.rows[2 + t] = static_cast<uint8_t>(rows_of_x), cfg.colsb[2 + t] = 32;  // 2, 3: x's two blocks
    cfg.rows[4 + t] = 8, cfg.colsb[4 + t] = 64;  // 4, 5: the weights' two blocks, 4 values of 16 rows a row
  }
  _tile_loadconfig(&cfg);
}
#endif

at::Tensor gemv_int4_amx(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t N = w.size(0), K = 2 * w.size(1), M = x.size(0);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == N * (K / BLOCK) && N % 16 == 0 && K % (2 * BLOCK) == 0,
              "gemv_int4_amx takes row-interleaved int4 weights (N a multiple of 16, K of 64) with fp16 group-32 scales");
  TORCH_CHECK(amx_permitted(), "AMX tiles are not available on this CPU or not granted by the OS");
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef GLMTORCH_AMX
  constexpr int64_t IR = INTERLEAVE;
  const int64_t blocks = K / BLOCK, pairs = blocks / 2;
  const int64_t Mp = M <= 16 ? M : (M + 15) / 16 * 16;  // past 16 rows, whole groups of 16 (zero rows added)
  const int64_t Mg = std::min<int64_t>(16, Mp), row_groups = Mp / Mg;
  // x per block and row: 32 bytes in the weight tiles' order (4 values per tile row: rows 0-3 the low nibbles of
  // the block's bytes 0-15, four at a time, i.e. elements 8i + 2j; rows 4-7 the high nibbles, 8i + 2j + 1)
  std::vector<int8_t> xa(blocks * Mp * BLOCK, 0);
  std::vector<float> xs(blocks * Mp, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t sum;
      alignas(32) int8_t q[BLOCK];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), quantize_block(xp + m * K + b * BLOCK, xs[b * Mp + m], sum));
      int8_t* out = xa.data() + (b * Mp + m) * BLOCK;
      for (int64_t k = 0; k < BLOCK; ++k) out[k] = q[k < 16 ? 8 * (k / 4) + 2 * (k % 4) : 8 * ((k - 16) / 4) + 2 * (k % 4) + 1];
    }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const int64_t block_bytes = IR * (K / 2), block_scales = IR * (K / BLOCK);
  // 16 rows n of a tile: dword offsets of their scales' pair 0 (interleave block n / 4, row n % 4)
  alignas(64) int32_t scale_at[16];
  for (int n = 0; n < 16; ++n) scale_at[n] = static_cast<int32_t>(((n / IR) * block_scales + (n % IR) * 2) / 2);
  const __m512i scales_idx = _mm512_load_si512(scale_at);
  // The 16 x 8 dword transpose, one register bit swapped with one lane bit a round (lane l of the output of round
  // r, register bit c): rows (2i, 2i + 1) in, columns out. Round 1 swaps row bit 1 with column bit 0, round 2 row
  // bit 2 with column bit 1, round 3 row bit 3 with column bit 2 and puts the lanes in row order.
  __m512i transpose_idx[3][2];
  for (int c = 0; c < 2; ++c) {
    alignas(64) int32_t idx[3][16];
    for (int l = 0; l < 16; ++l) {
      idx[0][l] = ((l & 1) ? 16 : 0) + ((l & ~1) | c);
      idx[1][l] = (((l >> 1) & 1) ? 16 : 0) + ((l & ~2) | (c << 1));
      idx[2][l] = (((l >> 3) & 1) ? 16 : 0) + (((l & 1) << 3) | (c << 2) | (((l >> 2) & 1) << 1) | ((l >> 1) & 1));
    }
    for (int r = 0; r < 3; ++r) transpose_idx[r][c] = _mm512_load_si512(idx[r]);
  }
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 2, [&](int64_t begin, int64_t end) {
    load_int4_tile_config(Mg);
    // PB pairs at a time: their weight tiles are all unpacked before the first is multiplied, and all their sums
    // stored before the first is scaled, so vector work and tile work can overlap (measured: ~7% over one pair at
    // a time)
    constexpr int64_t PB = 4;
    alignas(64) int8_t wt[2 * PB][8 * 64];
    alignas(64) int32_t c[2 * PB][16 * 16];
    std::vector<__m512> acc(row_groups * 2 * 16);  // (group of x rows, parity, x row): 16 weight rows' sums
    const __m512i nibbles = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * 16;
      const uint8_t* base = wp + (n0 / IR) * block_bytes;
      const uint16_t* scale_base = sp + (n0 / IR) * block_scales;
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t p0 = 0; p0 < pairs; p0 += PB) {
        const int64_t np = std::min<int64_t>(PB, pairs - p0);
        __m512 ws[2 * PB];  // the 16 rows' scales of block 2 p0 + b
        for (int64_t q = 0; q < np; ++q) {
          const uint8_t* pair = base + (p0 + q) * IR * BLOCK;
          // the 16 rows' 32-byte pair: interleave block b holds rows 4b..4b+3 one after another, so 8 loads give
          // rows (2i, 2i + 1) each; three rounds of two-register permutes turn them into 8 columns of 16 rows
          __m512i z[8], t[8], col[8];
          for (int i = 0; i < 8; ++i) z[i] = _mm512_loadu_si512(pair + (i / 2) * block_bytes + (i % 2) * 64);
          for (int i = 0; i < 8; i += 2)
            for (int h = 0; h < 2; ++h) t[i | h] = _mm512_permutex2var_epi32(z[i], transpose_idx[0][h], z[i | 1]);
          for (int j = 0; j < 8; ++j)
            if (!(j & 2))
              for (int h = 0; h < 2; ++h)
                z[(j & ~2) | (h << 1)] = _mm512_permutex2var_epi32(t[j], transpose_idx[1][h], t[j | 2]);
          for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) col[j | (h << 2)] = _mm512_permutex2var_epi32(z[j], transpose_idx[2][h], z[j | 4]);
          for (int k = 0; k < 8; ++k) {  // bytes 4k..4k+3 of the 16 rows: block k / 4, tile rows k % 4 and 4 + k % 4
            const __m512i low = _mm512_sub_epi8(_mm512_and_si512(col[k], nibbles), eight);
            const __m512i high = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(col[k], 4), nibbles), eight);
            _mm512_store_si512(wt[2 * q + k / 4] + (k % 4) * 64, low);
            _mm512_store_si512(wt[2 * q + k / 4] + (4 + k % 4) * 64, high);
          }
          // the 16 rows' two scales of this pair as one dword each (fp16 even block | fp16 odd block)
          const __m512i both = _mm512_i32gather_epi32(scales_idx, scale_base + (p0 + q) * IR * 2, 4);
          ws[2 * q] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(both));
          ws[2 * q + 1] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(both, 16)));
        }
        for (int64_t g = 0; g < row_groups; ++g) {
          const int8_t* xg = xa.data() + (2 * p0 * Mp + g * 16) * BLOCK;
          for (int64_t b = 0; b < 2 * np; b += 2) {  // an even and an odd block, on tiles (0, 2, 4) and (1, 3, 5)
            _tile_loadd(2, xg + b * Mp * BLOCK, BLOCK);
            _tile_loadd(4, wt[b], 64);
            _tile_zero(0);
            _tile_dpbssd(0, 2, 4);
            _tile_loadd(3, xg + (b + 1) * Mp * BLOCK, BLOCK);
            _tile_loadd(5, wt[b + 1], 64);
            _tile_zero(1);
            _tile_dpbssd(1, 3, 5);
            _tile_stored(0, c[b], 64);
            _tile_stored(1, c[b + 1], 64);
          }
          for (int64_t b = 0; b < 2 * np; ++b) {  // in block order: each parity's fmas in the vector kernels' order
            const float* x_scales = xs.data() + (2 * p0 + b) * Mp + g * 16;
            __m512* into = acc.data() + (g * 2 + b % 2) * 16;
            for (int64_t m = 0; m < Mg; ++m) {
              const __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c[b] + m * 16));
              into[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(x_scales[m]), ws[b]), sums, into[m]);
            }
          }
        }
      }
      for (int64_t g = 0; g < row_groups; ++g)
        for (int64_t m = 0; m < Mg && g * 16 + m < M; ++m)
          _mm512_storeu_ps(yp + (g * 16 + m) * N + n0, _mm512_add_ps(acc[(g * 2) * 16 + m], acc[(g * 2 + 1) * 16 + m]));
    }
    _tile_release();
  });
#endif
  return y;
}

int64_t int4_row_interleave() {  // rows per interleaved int4 block these kernels read (1: plain layout only)
#if defined(__AVX2__) && defined(__FMA__)
  return INTERLEAVE;
#else
  return 1;
#endif
}

}  // namespace

TORCH_LIBRARY(glmtorch_kernels, m) {
  m.def("gemv_float(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_float_out(Tensor x, Tensor w, Tensor(a!) out) -> ()");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scales, int group, int interleave=1) -> Tensor");
  m.def("int4_row_interleave() -> int", &int4_row_interleave);
  m.def("gemv_blocks(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("block_kinds() -> int", &block_kinds);
  m.def("gemv_amx(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int4_amx(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("amx_available() -> bool", &amx_permitted);
  m.def("bf16_dot_min_rows() -> int", &bf16_dot_min_rows);
  m.def("set_fp32_row_order(int order) -> int", &set_fp32_row_order);
}

TORCH_LIBRARY_IMPL(glmtorch_kernels, CPU, m) {
  m.impl("gemv_float", &gemv_float);
  m.impl("gemv_float_out", &gemv_float_out);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_blocks", &gemv_blocks);
  m.impl("gemv_amx", &gemv_amx);
  m.impl("gemv_int4_amx", &gemv_int4_amx);
}

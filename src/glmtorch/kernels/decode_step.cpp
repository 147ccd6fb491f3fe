// One whole decode step of a GLM model on the CPU in a single call: embedding -> N x [RMSNorm -> fused QKV ->
// interleaved partial rotary -> KV cache write -> attention -> o_proj -> residual -> RMSNorm -> gate_up ->
// silu(gate) * up -> down -> residual] -> RMSNorm -> LM head (GLM-4-0414: an RMSNorm on each sub-layer's output
// before its residual add), for B rows of one new token each.
//
// Why: at batch 1 a step of the "small" int4 model is ~12 ms of weight streaming, and a compiled graph spent
// another ~2.7 ms around it (its Python wrapper calling ~165 kernels, guard checks, small fused loops with a
// thread barrier each). Here the matrix products are the gemv kernels (called through the dispatcher, no
// Python), and everything between them is a few loops over B x hidden values.
//
// It is the math of modeling.py in fp32, the activations' dtype of an fp32 (or fp32 int8 / int4) model (a bf16
// model's step computes in fp32 too, on its bf16 weights, embedding and cache: more precise than its eager step); the
// Python side (glmtorch/fastpath.py) builds a plan only for models this covers and checks it against the
// compiled step in the tests. Shapes: B rows, H hidden, Q query heads, KV key/value heads, D head_dim, R
// rotary_dim, I intermediate, L attended cache slots.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vector_math.h"

namespace {

using glmtorch_kernels_math::exp_shifted;
using glmtorch_kernels_math::max_of;

// A linear layer as the kernels take it (gemv.cpp): float weights (fp32 / bf16), int8 with per-row scales, or
// int4 with per-group scales and an optional row interleave.
struct Linear {
  int64_t kind = 0;  // KIND_FLOAT, KIND_INT8, KIND_INT4
  at::Tensor weight, scales, bias;  // scales / bias undefined when absent
  int64_t group = 0, interleave = 1;
  // bf16 and row-interleaved int4 weights: bit b set = products of up to 2^b rows go to the AMX tiles (measured per
  // shape and row bucket in Python, glmtorch.fastpath; set_amx_buckets), else to the vector kernels
  int64_t amx_buckets = 0;
};
constexpr int64_t KIND_FLOAT = 0, KIND_INT8 = 1, KIND_INT4 = 2;

inline int64_t row_bucket_index(int64_t rows) {  // glmtorch.dispatch.BUCKETS: 1, 2, 4, ..., 512 rows
  int64_t b = 0;
  while ((int64_t{1} << b) < rows && b < 9) ++b;
  return b;
}

// x's product with l (and its bias). `into`: a buffer for the result, taken where l's kind can write into one (float
// weights off the AMX tiles; the returned tensor is the one to read either way).
at::Tensor apply(const Linear& l, const at::Tensor& x, const c10::optional<at::Tensor>& into = c10::nullopt) {
  static auto gemv_float = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_float", "").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static auto gemv_float_out = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_float_out", "")
      .typed<void(const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  static auto gemv_int8 = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_int8", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  static auto gemv_int4 = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_int4", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  static auto gemv_amx = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_amx", "").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static auto gemv_int4_amx = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::gemv_int4_amx", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const bool amx = (l.amx_buckets >> row_bucket_index(x.size(0))) & 1;
  at::Tensor y;
  if (into && !amx && l.kind == KIND_FLOAT) {
    y = *into;
    gemv_float_out.call(x, l.weight, y);
  } else {
    y = amx && l.kind == KIND_FLOAT  ? gemv_amx.call(x, l.weight)
        : amx && l.kind == KIND_INT4 ? gemv_int4_amx.call(x, l.weight, l.scales)
        : l.kind == KIND_FLOAT       ? gemv_float.call(x, l.weight)
        : l.kind == KIND_INT8        ? gemv_int8.call(x, l.weight, l.scales)
                                     : gemv_int4.call(x, l.weight, l.scales, l.group, l.interleave);
  }
  if (l.bias.defined()) {
    const int64_t M = y.size(0), N = y.size(1);
    float* yp = y.data_ptr<float>();
    const float* bp = l.bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] += bp[n];
  }
  return y;
}

// Where the cached keys and values of batch row b live: slot j, head h at offset(b, h, j) in a layer's buffer.
// A contiguous cache ([layers,] rows, KV, capacity, D) is one block of its whole capacity per row (the row named by
// cache_rows, or b itself); a paged pool ([layers,] blocks, KV, block size, D) has a (B, blocks) table: slot j is
// in block table[b][j / block size] at offset j % block size.
// The keys' elements are either each slot's D in a row, as the values' (key_dim_stride 1), or, in a CPU pool
// (cache.PagedKVCache), each block's slots side by side per element, the block D x block size (key_dim_stride is
// the block size, the slots 1 apart): attend_cached then scores LANES slots at once with broadcast query elements
// and no horizontal sums (key_slot_scores).
struct CacheLayout {
  int64_t span = 0, per_row = 1, block_stride = 0, head_stride = 0, slot_stride = 0;
  int64_t key_slot_stride = 0, key_dim_stride = 1;
  std::vector<int64_t> blocks;
  int64_t offset(int64_t b, int64_t h, int64_t j) const {
    return blocks[b * per_row + j / span] * block_stride + h * head_stride + (j % span) * slot_stride;
  }
  int64_t key_offset(int64_t b, int64_t h, int64_t j) const {  // where slot j's first key element is
    return blocks[b * per_row + j / span] * block_stride + h * head_stride + (j % span) * key_slot_stride;
  }
  bool keys_by_element() const { return key_dim_stride != 1; }
};

CacheLayout cache_layout(const at::Tensor& keys, const at::Tensor& values, int64_t B, int64_t KV, int64_t D,
                         int64_t L, const c10::optional<at::Tensor>& cache_rows,
                         const c10::optional<at::Tensor>& block_table) {
  const int64_t n = keys.dim();
  CacheLayout c;
  const bool paged = block_table.has_value();
  c.span = keys.size(n - 2);
  c.block_stride = values.stride(n - 4), c.head_stride = values.stride(n - 3), c.slot_stride = values.stride(n - 2);
  c.key_slot_stride = keys.stride(n - 2), c.key_dim_stride = keys.stride(n - 1);
  const auto table = paged ? block_table->to(at::kLong).contiguous() : at::Tensor();
  const auto rows = cache_rows && !paged ? cache_rows->to(at::kLong).contiguous() : at::Tensor();
  c.per_row = paged ? table.size(1) : 1;
  const bool keys_like_values = keys.strides() == values.strides();
  const bool keys_by_element = c.key_dim_stride == c.span && c.key_slot_stride == 1 &&
                               keys.stride(n - 3) == c.head_stride && keys.stride(n - 4) == c.block_stride;
  TORCH_CHECK(values.stride(n - 1) == 1 && keys.sizes() == values.sizes() && (keys_like_values || keys_by_element) &&
                  (paged || cache_rows || keys.size(n - 4) == B) && keys.size(n - 3) == KV &&
                  keys.size(n - 1) == D && L <= c.span * c.per_row && (!paged || table.size(0) == B),
              "the cache must be (layers, B, KV, capacity, D) buffers covering the mask, or (layers, blocks, KV, "
              "block size, D) with a (B, blocks) table covering it (the keys' blocks may be stored D x block size)");
  c.blocks.resize(B * c.per_row);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < c.per_row; ++i) {
      int64_t& block = c.blocks[b * c.per_row + i];
      block = paged ? table.data_ptr<int64_t>()[b * c.per_row + i] : rows.defined() ? rows.data_ptr<int64_t>()[b] : b;
      TORCH_CHECK(block >= 0 && block < keys.size(n - 4), "cache row or block ", block, " is outside the cache");
    }
  return c;
}

// The attention's vector loops, written once over `vec`: sixteen fp32 lanes of an AVX-512 register, or eight of an
// AVX2 one (where the CPU has no AVX-512, the plain loops below took a 64-row step's attention at ~10 GFLOPS, a
// third of a served step of the demo model, AMD EPYC Zen 3). LANES keys are scored at a time; ACC registers hold
// the value sums of one pass (AVX2 has 16 registers, AVX-512 32), over PIECE vectors of each head at most.
#if defined(__AVX512F__)
#define GLMTORCH_ATTEND_VECTORS 1
using vec = __m512;
constexpr int LANES = 16, ACC = 16, PIECE = 8;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float x) { return _mm512_set1_ps(x); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline void vstore_first(float* p, vec v, int64_t n) {  // lanes 0 .. n - 1 only
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
// LANES keys' or values' elements widened to fp32 (a bf16 is the top half of an fp32)
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec load(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// One vector of 16 sums: lane i is the sum of v[i]'s 16 lanes. A tree of unpacks and lane shuffles with 15 adds,
// in place of 16 horizontal sums (each a chain of 4 shuffle-adds), which were most of a decode step's attention.
inline vec sum_lanes(vec v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] partial sums at positions 0, 2; v[2i + 1] at 1, 3
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the partial sums of v[4i], v[4i + 1], v[4i + 2], v[4i + 3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 128-bit lane k of the result: the four lanes of b[k] added
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define GLMTORCH_ATTEND_VECTORS 1
using vec = __m256;
constexpr int LANES = 8, ACC = 8, PIECE = 4;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float x) { return _mm256_set1_ps(x); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline void vstore_first(float* p, vec v, int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane), v);
}
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const at::BFloat16* p) { return glmtorch_kernels_math::widen_bf16_8(p); }

// One vector of 8 sums: lane i is the sum of v[i]'s 8 lanes (pairwise adds within 128-bit lanes, then the two
// halves of each sum added).
inline vec sum_lanes(vec v[8]) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  // per 128-bit lane: partial sums of v[0..3] (b0) and v[4..7] (b1), over elements 0-3 low, 4-7 high
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}
#endif

#if defined(GLMTORCH_ATTEND_VECTORS)
// f(std::integral_constant<int, C>) for the head sizes the vector loops take (D = C x LANES: 16, 32, 64, 128);
// false, nothing called, for others (the plain loops take them).
template <typename F>
inline bool with_chunks(int64_t D, F f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16 / LANES>{}); return true;
    case 32: f(std::integral_constant<int, 32 / LANES>{}); return true;
    case 64: f(std::integral_constant<int, 64 / LANES>{}); return true;
    case 128: f(std::integral_constant<int, 128 / LANES>{}); return true;
    default: return false;
  }
}

// The scores of n <= LANES consecutive keys (C x LANES values each, `stride` apart) against G query heads (q, D
// apart): scores[g * L + i] for key i. The keys are copied (a bf16 cache's widened) once into a local block, zeros
// after the n-th: the loops over it then have fixed offsets and no per-key test (reading the cache in place, the
// compiler kept LANES key addresses on the stack and reloaded them for every head: ~30% of the scores' time, AVX2).
template <int C, typename T>
inline void key_scores(const T* k, int64_t stride, int64_t n, const float* q, int64_t G, float scale,
                       float* scores, int64_t L) {
  alignas(64) float keys[LANES * LANES * C];
  for (int64_t i = 0; i < LANES; ++i)
    for (int c = 0; c < C; ++c)
      vstore(keys + (i * C + c) * LANES, i < n ? load(k + i * stride + LANES * c) : vzero());
  for (int64_t g = 0; g < G; ++g) {
    vec qv[C];
    for (int c = 0; c < C; ++c) qv[c] = load(q + g * LANES * C + LANES * c);
    vec p[LANES];
    for (int i = 0; i < LANES; ++i) {
      p[i] = vmul(qv[0], load(keys + i * C * LANES));
      for (int c = 1; c < C; ++c) p[i] = vfma(qv[c], load(keys + (i * C + c) * LANES), p[i]);
    }
    const vec s = vmul(sum_lanes(p), vset(scale));
    if (n == LANES)
      vstore(scores + g * L, s);
    else  // a masked store: on AMD CPUs several times a plain one's cost, so only at a block's end
      vstore_first(scores + g * L, s, n);
  }
}

// acc[g][d0 ..] += p[g][j] v[j][d0 ..] over the visible slots, for heads g0 .. g0 + GB - 1 (fewer at the end) and
// C vectors of each head from d0: GB x C sums held in registers for the whole pass over the values (in memory,
// each update was a load and a store).
template <int C, int GB, typename Slots, typename T>
inline void weigh_values(Slots slots, int64_t g0, int64_t count, int64_t d0, int64_t D, const float* scores,
                         int64_t L, float* acc) {
  vec a[GB][C];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) a[g][c] = vzero();
  slots([&](int64_t j, const T* v) {
    vec vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(v + d0 + LANES * c);
    for (int g = 0; g < GB; ++g) {
      if (g >= count) break;
      const vec p = vset(scores[(g0 + g) * L + j]);
      for (int c = 0; c < C; ++c) a[g][c] = vfma(p, vv[c], a[g][c]);
    }
  });
  for (int g = 0; g < GB && g < count; ++g)
    for (int c = 0; c < C; ++c) vstore(acc + (g0 + g) * D + d0 + LANES * c, a[g][c]);
}

// The scores of n <= LANES slots of a block whose keys are stored by element (element d of slot i at k[d * stride +
// i]) against GB query heads (q, D apart): scores[g * L + i]. Each head's sums are LANES slots wide, one broadcast
// query element times one load of keys per element, with no horizontal sums (key_scores spent more on its trees
// of shuffles than on its products); two sums per head, over even and odd elements, so that a head's FMAs do not
// each wait for the one before.
template <int GB, typename T>
inline void slot_scores(const T* k, int64_t stride, int64_t n, int64_t D, const float* q, float scale, float* scores,
                        int64_t L) {
  vec even[GB], odd[GB];
  for (int g = 0; g < GB; ++g) even[g] = odd[g] = vzero();
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    vec k0 = load(k + d * stride), k1 = load(k + (d + 1) * stride);
    // in registers: the products then take each query element as a broadcast operand, one load each (left to
    // itself, the compiler read the keys again for every head and broadcast the query elements separately)
    asm("" : "+v"(k0), "+v"(k1));
    for (int g = 0; g < GB; ++g) {
      even[g] = vfma(vset(q[g * D + d]), k0, even[g]);
      odd[g] = vfma(vset(q[g * D + d + 1]), k1, odd[g]);
    }
  }
  if (d < D) {
    const vec k0 = load(k + d * stride);
    for (int g = 0; g < GB; ++g) even[g] = vfma(vset(q[g * D + d]), k0, even[g]);
  }
  for (int g = 0; g < GB; ++g) {
    const vec s = vmul(vadd(even[g], odd[g]), vset(scale));
    if (n == LANES)
      vstore(scores + g * L, s);
    else
      vstore_first(scores + g * L, s, n);
  }
}

// heads a pass of slot_scores: two sums each, 16 of AVX-512's 32 registers, 8 of AVX2's 16
constexpr int SCORE_HEADS = LANES == 16 ? 8 : 4;

template <int GB = 1, typename T>
inline void slot_scores_rest(int64_t heads, const T* k, int64_t stride, int64_t n, int64_t D, const float* q,
                             float scale, float* scores, int64_t L) {
  if constexpr (GB < SCORE_HEADS) {
    if (heads == GB) return slot_scores<GB>(k, stride, n, D, q, scale, scores, L);
    slot_scores_rest<GB + 1>(heads, k, stride, n, D, q, scale, scores, L);
  }
}

// slot_scores of all G query heads, SCORE_HEADS at a time (a key vector loaded again per pass comes from L1).
template <typename T>
inline void key_slot_scores(const T* k, int64_t stride, int64_t n, int64_t D, const float* q, int64_t G, float scale,
                            float* scores, int64_t L) {
  int64_t g = 0;
  for (; g + SCORE_HEADS <= G; g += SCORE_HEADS)
    slot_scores<SCORE_HEADS>(k, stride, n, D, q + g * D, scale, scores + g * L, L);
  if (g < G) slot_scores_rest(G - g, k, stride, n, D, q + g * D, scale, scores + g * L, L);
}
#endif

// Asks for n slots' D elements each (`stride` apart; the first 32 slots at most) to be brought into the cache ahead
// of their use: a paged pool's blocks lie anywhere in memory, and the hardware prefetcher, which learns a stream from
// its first misses, is at the end of a block's few cache lines before it has learnt it (a 64-row step of the demo
// model reads ~30 MB of cache; over a pool of that size the attention took 10-20% less time, AMD EPYC Zen 3). A
// contiguous cache is one long stream the prefetcher follows: the cap keeps its whole row from being asked for.
// Into L2 (prefetcht1), not L1: a block's 64 lines of keys and values asked for at once fill the L1's few miss
// buffers, and the core then stalls at the prefetches themselves (a fifth of the attention's perf samples on
// them, AMD EPYC Zen 4); into L2 the demo's 64 rows x 210 slots over 6 layers' pools took 0.21 ms a layer
// against 0.31 (the medians of 8 alternated runs), the same to within 2% on AMD EPYC Zen 3.
template <typename T>
inline void prefetch(const T* p, int64_t n, int64_t stride, int64_t D) {
  n = std::min<int64_t>(n, 32);
  const char* at = reinterpret_cast<const char*>(p);
  const int64_t row = D * static_cast<int64_t>(sizeof(T)), step = stride * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; ++i, at += step)
    for (int64_t byte = 0; byte < row; byte += 64) __builtin_prefetch(at + byte, 0, 2);
}

// softmax(q k * scale) v of each row's Q query heads (G = Q / KV of them per key/value head) over the cached slots
// j <= last[b] that seen[b * L + j] marks (its own slot always; seen null: all of them). Query head i of row b is
// at q + b * q_stride + i * D, its output at out + b * out_stride + i * D. One task per (row, key/value head).
template <typename T>
void attend_cached(const CacheLayout& c, const T* kc, const T* vc, int64_t B, int64_t Q, int64_t KV, int64_t D,
                   int64_t L, const int64_t* last_of, const bool* seen_of, double scale, const float* q_of,
                   int64_t q_stride, float* out_of, int64_t out_stride) {
  const int64_t G = Q / KV;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * D * G));
  at::parallel_for(0, B * KV, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * L);
    std::vector<float> acc(G * D), total(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, h = task % KV, last = last_of[b];
      const bool* seen = seen_of ? seen_of + b * L : nullptr;
      const float* q = q_of + b * q_stride + h * G * D;  // the G query heads of key/value head h, one after another
      // every slot's score up to last (keys 16 at a time), then the masked ones set to -inf
      for (int64_t first = 0; first <= last; first += c.span) {  // block by block (one, unpaged)
        const T* k_block = kc + c.key_offset(b, h, first);
        const int64_t end = std::min(last, first + c.span - 1);
        prefetch(vc + c.offset(b, h, first), end - first + 1, c.slot_stride, D);  // this block's values, for later
        if (c.keys_by_element()) {  // each element's slots side by side (the block D x span)
          if (first + c.span <= last) prefetch(kc + c.key_offset(b, h, first + c.span), 1, 0, D * c.span);
#if defined(GLMTORCH_ATTEND_VECTORS)
          if (c.span % LANES == 0) {
            for (int64_t j = first; j <= end; j += LANES)
              key_slot_scores(k_block + (j - first), c.span, std::min<int64_t>(LANES, end - j + 1), D, q, G,
                              static_cast<float>(scale), scores.data() + j, L);
            continue;
          }
#endif
          for (int64_t g = 0; g < G; ++g) {  // the slots of each element in turn (the inner loop runs along them)
            float* s = scores.data() + g * L + first;
            std::fill(s, s + end - first + 1, 0.f);
            for (int64_t d = 0; d < D; ++d) {
              const float qd = q[g * D + d];
              const T* kd = k_block + d * c.span;
#pragma omp simd
              for (int64_t j = 0; j <= end - first; ++j) s[j] += qd * static_cast<float>(kd[j]);
            }
            for (int64_t j = 0; j <= end - first; ++j) s[j] *= static_cast<float>(scale);
          }
          continue;
        }
        if (first + c.span <= last)  // the next block's keys
          prefetch(kc + c.key_offset(b, h, first + c.span), std::min(c.span, last + 1 - first - c.span),
                   c.key_slot_stride, D);
#if defined(GLMTORCH_ATTEND_VECTORS)
        if (with_chunks(D, [&](auto C) {
              for (int64_t j = first; j <= end; j += LANES)
                key_scores<C()>(k_block + (j - first) * c.key_slot_stride, c.key_slot_stride,
                                std::min<int64_t>(LANES, end - j + 1), q, G, static_cast<float>(scale),
                                scores.data() + j, L);
            }))
          continue;
#endif
        for (int64_t j = first; j <= end; ++j) {
          const T* k = k_block + (j - first) * c.key_slot_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = q + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(k[d]);
            scores[g * L + j] = dot * static_cast<float>(scale);
          }
        }
      }
      if (seen)
        for (int64_t j = 0; j < last; ++j)
          if (!seen[j])
            for (int64_t g = 0; g < G; ++g) scores[g * L + j] = -INFINITY;
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        total[g] = exp_shifted(s, last + 1, max_of(s, last + 1));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
#if defined(GLMTORCH_ATTEND_VECTORS)
      auto slots = [&](auto visit) {  // every visible slot up to last with its values (masked ones: never read,
        for (int64_t first = 0; first <= last; first += c.span) {  // whatever a padding slot holds)
          const T* v_block = vc + c.offset(b, h, first);
          for (int64_t j = first; j <= std::min(last, first + c.span - 1); ++j)
            if (!seen || seen[j] || j == last) visit(j, v_block + (j - first) * c.slot_stride);
        }
      };
      auto weigh = [&](auto C) {  // a pass over the values per ACC / CP heads and CP vectors of each
        constexpr int CP = C() < PIECE ? C() : PIECE, GB = ACC / CP;
        for (int64_t d0 = 0; d0 < D; d0 += CP * LANES)
          for (int64_t g0 = 0; g0 < G; g0 += GB)
            weigh_values<CP, GB, decltype(slots), T>(slots, g0, G - g0, d0, D, scores.data(), L, acc.data());
      };
      if (!with_chunks(D, weigh))
#endif
      for (int64_t first = 0; first <= last; first += c.span) {
        const T* v_block = vc + c.offset(b, h, first);
        for (int64_t j = first; j <= std::min(last, first + c.span - 1); ++j) {
          const T* v = v_block + (j - first) * c.slot_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * L + j];
            if (p == 0.f) continue;
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(v[d]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* out = out_of + b * out_stride + (h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = acc[g * D + d] / total[g];
      }
    }
  });
}

#if defined(GLMTORCH_VECTOR_EXP) && defined(GLMTORCH_ATTEND_VECTORS)
using glmtorch_kernels_math::EXP_LANES;
using glmtorch_kernels_math::fast_exp;
using glmtorch_kernels_math::floats;
using glmtorch_kernels_math::ints;

// Prefill attention over a pool, the way flash attention tiles it: a task takes a tile of a prompt's query heads
// (those of one key/value head, token after token, up to TILE_GROUPS groups of TILE_VECTORS registers of lanes) and
// reads the prompt's slots a pass of PASS_BYTES / D at a time, widened to fp32 into a local buffer, where every query
// of the tile scores each key and weighs in each value (the softmax kept online: a running maximum and sum per
// query, the sums so far rescaled when the maximum grows). A group's queries are the lanes of its registers, so a
// score is a sum of broadcast key elements times registers of queries, with no horizontal sums. One task per query
// row, as the decode kernel attends (attend_cached), read the whole prefix again for every token of the prompt:
// 1.2-1.7x slower (scripts/bench_paged_attention.py --prefill, AMD EPYC Zen 3). Sums in registers: KEY_BLOCK x
// TILE_VECTORS, 12 of AVX2's 16 (other blockings, 3 x 4 to 2 x 5, did no better), 24 of AVX-512's 32.
constexpr int TILE_VECTORS = 3, TILE_GROUPS = 4, KEY_BLOCK = EXP_LANES == 16 ? 8 : 4;
constexpr int64_t GROUP_LANES = TILE_VECTORS * EXP_LANES, TILE_LANES = TILE_GROUPS * GROUP_LANES;
constexpr int64_t PASS_BYTES = 16384;

// out[r][lane] (+)= sum over k < n of a[r * a_row + k * a_step] x b[k][lane], for R rows of scalars (broadcast) and
// NV registers of lanes (b and out: rows GROUP_LANES apart), R x NV sums in registers for the whole loop. The
// scores (a: keys, rows D apart; b: the queries transposed; k: the head's elements) and the weighed values (a:
// values from element r, rows D apart as k goes over slots; b: the weights; out: the sums, added to).
template <int R, int NV, bool ADD>
inline void broadcast_products(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t n,
                               float* out) {
  constexpr int64_t W = GROUP_LANES;
  vec sum[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) sum[r][i] = ADD ? load(out + r * W + i * LANES) : vzero();
  for (int64_t k = 0; k < n; ++k) {
    vec bv[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) bv[i] = load(b + k * W + i * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vec ar = vset(a[r * a_row + k * a_step]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) sum[r][i] = vfma(ar, bv[i], sum[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) vstore(out + r * W + i * LANES, sum[r][i]);
}

// One group's share of a pass over n slots from j0 (keys and values fp32, D apart): its NV registers of lanes (qt: D
// rows of GROUP_LANES) score the keys, lose what they may not see (slots past their own, last[lane]; the ones their
// mask, seen[lane], hides), and their online softmax (most, total, the sums acc) takes the pass in.
template <int NV>
void group_pass(const float* keys, const float* values, int64_t n, int64_t j0, int64_t D, const float* qt,
                const int32_t* last, const bool* const* seen, float* scores, float* acc, floats* most, floats* total) {
  constexpr int64_t W = GROUP_LANES;
  for (int64_t j = 0; j < n; j += KEY_BLOCK)
    broadcast_products<KEY_BLOCK, NV, false>(keys + j * D, D, 1, qt, D, scores + j * W);
  ints own[NV];
  for (int i = 0; i < NV; ++i) std::memcpy(&own[i], last + i * EXP_LANES, sizeof(ints));
  const bool masked = std::any_of(seen, seen + NV * EXP_LANES, [](const bool* p) { return p != nullptr; });
  for (int64_t j = 0; j < n; ++j) {
    const ints slot = ints{} + static_cast<int32_t>(j0 + j);
    for (int i = 0; i < NV; ++i) {
      floats s;
      std::memcpy(&s, scores + j * W + i * EXP_LANES, sizeof s);
      s = slot > own[i] ? floats{} - INFINITY : s;
      std::memcpy(scores + j * W + i * EXP_LANES, &s, sizeof s);
    }
    for (int64_t lane = 0; masked && lane < NV * EXP_LANES; ++lane)
      if (seen[lane] && j0 + j < last[lane] && !seen[lane][j0 + j]) scores[j * W + lane] = -INFINITY;
  }
  for (int i = 0; i < NV; ++i) {
    floats top = most[i];
    for (int64_t j = 0; j < n; ++j) {
      floats s;
      std::memcpy(&s, scores + j * W + i * EXP_LANES, sizeof s);
      top = s > top ? s : top;
    }
    const floats shift = top == -INFINITY ? floats{} : top;  // a query that has seen nothing yet stays at 0
    const floats rescale = most[i] == -INFINITY ? floats{} : fast_exp(most[i] - shift);
    most[i] = top;
    total[i] *= rescale;
    for (int64_t d = 0; d < D; ++d) {
      floats a;
      std::memcpy(&a, acc + d * W + i * EXP_LANES, sizeof a);
      a *= rescale;
      std::memcpy(acc + d * W + i * EXP_LANES, &a, sizeof a);
    }
    for (int64_t j = 0; j < n; ++j) {
      floats s;
      std::memcpy(&s, scores + j * W + i * EXP_LANES, sizeof s);
      s = s == -INFINITY ? floats{} : fast_exp(s - shift);
      total[i] += s;
      std::memcpy(scores + j * W + i * EXP_LANES, &s, sizeof s);
    }
  }
  int64_t d0 = 0;  // acc[d] += values[j][d] x weights[j], KEY_BLOCK elements of the values at a time
  for (; d0 + KEY_BLOCK <= D; d0 += KEY_BLOCK)
    broadcast_products<KEY_BLOCK, NV, true>(values + d0, 1, D, scores, n, acc + d0 * W);
  for (; d0 < D; ++d0) broadcast_products<1, NV, true>(values + d0, 1, D, scores, n, acc + d0 * W);
}

// The query heads u0 .. u0 + count - 1 (u = token t x G + head g, count <= TILE_LANES) of run b over key/value head h.
template <typename T>
void attend_tile(const CacheLayout& c, const T* kc, const T* vc, int64_t b, int64_t h, int64_t rows_per_run,
                 int64_t Q, int64_t KV, int64_t D, int64_t L, const int64_t* last_of, const bool* seen_of,
                 float scale, const float* q_of, float* out_of, int64_t u0, int64_t count, std::vector<float>& work) {
  constexpr int64_t W = GROUP_LANES;
  const int64_t G = Q / KV, groups = (count + W - 1) / W;
  const int64_t pass = std::max<int64_t>(KEY_BLOCK, PASS_BYTES / (D * 4) / KEY_BLOCK * KEY_BLOCK);
  const int64_t size = 2 * groups * D * W + 2 * pass * D + pass * W;
  if (work.size() < static_cast<size_t>(size)) work.resize(size);  // kept from task to task
  float *qt = work.data(), *acc = qt + groups * D * W, *keys = acc + groups * D * W, *values = keys + pass * D,
        *scores = values + pass * D;  // qt and acc: a D x W block per group
  std::fill(acc, acc + groups * D * W, 0.f);
  alignas(64) int32_t lane_last[TILE_LANES];
  const bool* lane_seen[TILE_LANES];
  int64_t last = 0;
  for (int64_t lane = 0; lane < groups * W; ++lane) {
    float* qg = qt + lane / W * D * W + lane % W;  // this lane's column of its group's transposed queries
    if (lane >= count) {  // padding: sees nothing
      lane_last[lane] = -1, lane_seen[lane] = nullptr;
      for (int64_t d = 0; d < D; ++d) qg[d * W] = 0.f;
      continue;
    }
    const int64_t u = u0 + lane, row = b * rows_per_run + u / G;
    lane_last[lane] = static_cast<int32_t>(last_of[row]);
    lane_seen[lane] = seen_of ? seen_of + row * L : nullptr;
    last = std::max(last, last_of[row]);
    const float* q = q_of + (row * Q + h * G + u % G) * D;
    for (int64_t d = 0; d < D; ++d) qg[d * W] = q[d] * scale;
  }
  floats most[TILE_GROUPS * TILE_VECTORS], total[TILE_GROUPS * TILE_VECTORS];
  for (int i = 0; i < TILE_GROUPS * TILE_VECTORS; ++i) most[i] = floats{} - INFINITY, total[i] = floats{};
  for (int64_t j0 = 0; j0 <= last; j0 += pass) {
    const int64_t n = std::min(pass, last + 1 - j0);
    for (int64_t j = 0; j < n; ++j) {  // the pass's keys and values in fp32; a slot no query sees stays 0 (a hole)
      bool anyone = seen_of == nullptr;
      for (int64_t lane = 0; lane < count && !anyone; ++lane)
        anyone = j0 + j == lane_last[lane] || (j0 + j < lane_last[lane] && lane_seen[lane][j0 + j]);
      float *k = keys + j * D, *v = values + j * D;
      if (!anyone) {
        std::fill(k, k + D, 0.f), std::fill(v, v + D, 0.f);
        continue;
      }
      const T *ks = kc + c.key_offset(b, h, j0 + j), *vs = vc + c.offset(b, h, j0 + j);
      const int64_t step = c.key_dim_stride;
      for (int64_t d = 0; d < D; ++d) k[d] = static_cast<float>(ks[d * step]), v[d] = static_cast<float>(vs[d]);
    }
    std::fill(keys + n * D, keys + (n + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK * D, 0.f);  // a last block's rest
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t vectors = (std::min(count - g * W, W) + EXP_LANES - 1) / EXP_LANES;
      float *qg = qt + g * D * W, *ag = acc + g * D * W;
      floats *mg = most + g * TILE_VECTORS, *tg = total + g * TILE_VECTORS;
      const int32_t* lg = lane_last + g * W;
      const bool* const* sg = lane_seen + g * W;
      if (vectors == 1) group_pass<1>(keys, values, n, j0, D, qg, lg, sg, scores, ag, mg, tg);
      else if (vectors == 2) group_pass<2>(keys, values, n, j0, D, qg, lg, sg, scores, ag, mg, tg);
      else group_pass<3>(keys, values, n, j0, D, qg, lg, sg, scores, ag, mg, tg);
    }
  }
  alignas(64) float sums[TILE_LANES];
  for (int i = 0; i < groups * TILE_VECTORS; ++i) std::memcpy(sums + i * EXP_LANES, &total[i], sizeof(floats));
  for (int64_t lane = 0; lane < count; ++lane) {
    const int64_t u = u0 + lane, row = b * rows_per_run + u / G;
    const float* ag = acc + lane / W * D * W + lane % W;
    float* out = out_of + (row * Q + h * G + u % G) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = ag[d * W] / sums[lane];
  }
}

// Every run's T x G query heads of each key/value head, in tiles (attend_tile): runs x KV x tiles tasks. A run's
// padding (its tokens from the first whose slot is -1 on) is no task's: `real` holds each run's real tokens.
template <typename T>
void attend_runs(const CacheLayout& c, const T* kc, const T* vc, int64_t runs, int64_t rows_per_run, int64_t Q,
                 int64_t KV, int64_t D, int64_t L, const int64_t* last_of, const bool* seen_of, double scale,
                 const float* q_of, float* out_of, const std::vector<int64_t>& real) {
  const int64_t G = Q / KV, tiles = (rows_per_run * G + TILE_LANES - 1) / TILE_LANES;
  at::parallel_for(0, runs * KV * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KV * tiles), h = task / tiles % KV, u0 = task % tiles * TILE_LANES;
      const int64_t heads = real[b] * G;  // this run's real query heads of head h
      if (u0 < heads)
        attend_tile(c, kc, vc, b, h, rows_per_run, Q, KV, D, L, last_of, seen_of, static_cast<float>(scale), q_of,
                    out_of, u0, std::min(TILE_LANES, heads - u0), work);
    }
  });
}
#endif

// Each query row's own slot (last, N of them) and, given, its visible slots (visible (N, L) bool, else empty: every
// slot up to its own), checked, and the window L they span: what paged_attention and paged_prefill_attention take.
struct Window {
  at::Tensor lasts, seen;  // seen undefined: no mask
  int64_t L = 0;
};

// With `padding`, a slot of -1 marks a query row that is a pass's padding (paged_prefill_attention skips it).
Window checked_window(const at::Tensor& last, const at::Tensor& visible, int64_t N, const char* op,
                      bool padding = false) {
  Window w;
  w.lasts = last.to(at::kLong).contiguous();
  w.seen = visible.numel() ? visible.to(at::kBool).contiguous() : at::Tensor();
  TORCH_CHECK(w.lasts.numel() == N && (!w.seen.defined() || w.seen.size(0) == N), op, ": mismatched shapes");
  const int64_t* lp = w.lasts.data_ptr<int64_t>();
  w.L = w.seen.defined() ? w.seen.size(1) : 0;
  for (int64_t i = 0; i < N; ++i) {
    if (padding && lp[i] == -1) continue;
    TORCH_CHECK(lp[i] >= 0, op, ": a negative slot");
    w.L = w.seen.defined() ? w.L : std::max(w.L, lp[i] + 1);
    TORCH_CHECK(lp[i] < w.L, op, ": a slot outside the visible window");
  }
  return w;
}

// The attention of the layer-by-layer decode path over a paged pool, read in place (no gathered copy of the
// attended keys, which cost a 64-row step of "small" fp32 a fifth of its time): q (N, Q, D) fp32, one row per
// new token; keys / values one layer's pool (blocks, KV, block size, D), fp32 or bf16; table (N, blocks); last
// (N,) each row's own slot; visible (N, L) bool or empty (every slot up to last). Returns (N, Q, D) fp32.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& table, const at::Tensor& last, const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && keys.dim() == 4 &&
                  keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "paged_attention: q (N, Q, D) fp32 and an fp32 or bf16 (blocks, KV, block size, D) pool");
  const int64_t N = q.size(0), Q = q.size(1), D = q.size(2), KV = keys.size(1);
  const Window w = checked_window(last, visible, N, "paged_attention");
  const auto &lasts = w.lasts, &seen = w.seen;
  const int64_t L = w.L;
  TORCH_CHECK(Q % KV == 0, "paged_attention: mismatched shapes");
  const CacheLayout c = cache_layout(keys, values, N, KV, D, L, c10::nullopt, table);
  const auto qc = q.contiguous();
  auto out = at::empty({N, Q, D}, q.options());
  const bool* sp = seen.defined() ? seen.data_ptr<bool>() : nullptr;
  if (keys.scalar_type() == at::kBFloat16)
    attend_cached(c, keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(), N, Q, KV, D, L,
                  lasts.data_ptr<int64_t>(), sp, scale, qc.data_ptr<float>(), Q * D, out.data_ptr<float>(), Q * D);
  else
    attend_cached(c, keys.data_ptr<float>(), values.data_ptr<float>(), N, Q, KV, D, L, lasts.data_ptr<int64_t>(), sp,
                  scale, qc.data_ptr<float>(), Q * D, out.data_ptr<float>(), Q * D);
  return out;
}

// Each run's real tokens: those before its first slot of -1 (padding, which only ever comes last: a right-padded
// pass of prompts of different lengths).
std::vector<int64_t> real_tokens(const at::Tensor& lasts, int64_t runs, int64_t T) {
  const int64_t* lp = lasts.data_ptr<int64_t>();
  std::vector<int64_t> real(runs);
  for (int64_t b = 0; b < runs; ++b) {
    const int64_t* row = lp + b * T;
    real[b] = std::find(row, row + T, -1) - row;
    TORCH_CHECK(std::all_of(row + real[b], row + T, [](int64_t x) { return x == -1; }),
                "paged_prefill_attention: a run's padding (slot -1) must come after all its real tokens");
  }
  return real;
}

// Prefill attention over a paged pool, read in place: q (runs, T, Q, D) fp32, the T new tokens of each run (a
// prompt); keys / values one layer's pool (blocks, KV, block size, D), fp32 or bf16; table (runs, blocks); last
// (runs, T) each token's own slot, or -1 for a padding token after a shorter run's real ones (not attended: its
// output is zeros); visible (runs T, L) bool or empty (every slot up to last). Returns (runs, T, Q, D) fp32.
// Without the vector loops, or with too few query heads for a tile, paged_attention's loop takes a row at a time.
// Which of the two a run takes follows from its own real tokens, never from the pass's length: a prompt's
// attention is then the same bits alone as padded among longer prompts (the tiles and the row-at-a-time loop sum
// in different orders; by the pass's length, a prompt of 4-15 tokens of the demo model came out up to 6e-7 apart).
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                   const at::Tensor& table, const at::Tensor& last, const at::Tensor& visible,
                                   double scale) {
  TORCH_CHECK(q.dim() == 4 && last.dim() == 2 && last.size(0) == q.size(0) && last.size(1) == q.size(1) &&
                  table.dim() == 2 && table.size(0) == q.size(0),
              "paged_prefill_attention: q (runs, T, Q, D), table (runs, blocks) and last (runs, T)");
  const int64_t runs = q.size(0), T = q.size(1), Q = q.size(2), D = q.size(3);
  const auto rows = q.reshape({runs * T, Q, D});
  const Window w = checked_window(last, visible, runs * T, "paged_prefill_attention", /*padding=*/true);
  const std::vector<int64_t> real = real_tokens(w.lasts, runs, T);
  const bool padded = std::any_of(real.begin(), real.end(), [T](int64_t n) { return n < T; });
  // The rows of the runs `take` names (their real tokens), a row at a time, into out (runs * T, Q, D).
  auto row_at_a_time = [&](const std::vector<bool>& take, at::Tensor& out) {
    const int64_t* lp = w.lasts.data_ptr<int64_t>();
    std::vector<int64_t> picked, their_runs;
    for (int64_t i = 0; i < runs * T; ++i)
      if (take[i / T] && lp[i] >= 0) {
        picked.push_back(i);
        their_runs.push_back(i / T);
      }
    if (picked.empty()) return;
    const auto keep = at::tensor(picked, at::kLong);
    out.index_copy_(0, keep, paged_attention(rows.index_select(0, keep), keys, values,
                                             table.index_select(0, at::tensor(their_runs, at::kLong)),
                                             w.lasts.view({-1}).index_select(0, keep),
                                             visible.numel() ? visible.index_select(0, keep) : visible, scale));
  };
#if defined(GLMTORCH_VECTOR_EXP) && defined(GLMTORCH_ATTEND_VECTORS)
  const int64_t KV = keys.dim() == 4 ? keys.size(1) : 0;
  // tiles for the runs whose query heads of a key/value head fill a group's registers (fewer: mostly padding
  // lanes, where the row-at-a-time loop is as fast); the shorter runs of the pass a row at a time
  std::vector<int64_t> tiled(real);  // the real tokens the tiles take of each run (0: none)
  std::vector<bool> short_run(runs, false);
  bool any_tiled = false, any_short = false;
  for (int64_t b = 0; b < runs; ++b) {
    if (KV > 0 && Q % KV == 0 && real[b] * (Q / KV) >= GROUP_LANES) {
      any_tiled = true;
    } else {
      short_run[b] = any_short = true;
      tiled[b] = 0;
    }
  }
  if (any_tiled && q.scalar_type() == at::kFloat) {
    TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                    (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
                "paged_prefill_attention: an fp32 or bf16 (blocks, KV, block size, D) pool");
    const at::Tensor& seen = w.seen;
    const int64_t* lp = w.lasts.data_ptr<int64_t>();
    const int64_t L = w.L;
    // a mask that only says what `last` says (each token sees every slot up to its own: the model's mask for a
    // prompt after a cached prefix, nothing padded) is dropped: the tiles then test no slot one by one
    bool causal = seen.defined();
    for (int64_t i = 0; causal && i < runs * T; ++i) {
      const bool* row = seen.data_ptr<bool>() + i * L;
      causal = lp[i] == -1 || (std::all_of(row, row + lp[i] + 1, [](bool x) { return x; }) &&
                               std::none_of(row + lp[i] + 1, row + L, [](bool x) { return x; }));
    }
    const CacheLayout c = cache_layout(keys, values, runs, KV, D, L, c10::nullopt, table);
    const auto qc = rows.contiguous();
    auto out = padded || any_short ? at::zeros({runs * T, Q, D}, q.options())
                                   : at::empty({runs * T, Q, D}, q.options());
    const bool* sp = seen.defined() && !causal ? seen.data_ptr<bool>() : nullptr;
    if (keys.scalar_type() == at::kBFloat16)
      attend_runs(c, keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(), runs, T, Q, KV, D, L, lp, sp,
                  scale, qc.data_ptr<float>(), out.data_ptr<float>(), tiled);
    else
      attend_runs(c, keys.data_ptr<float>(), values.data_ptr<float>(), runs, T, Q, KV, D, L, lp, sp, scale,
                  qc.data_ptr<float>(), out.data_ptr<float>(), tiled);
    if (any_short) row_at_a_time(short_run, out);
    return out.view({runs, T, Q, D});
  }
#endif
  if (!padded)
    return paged_attention(rows, keys, values, table.repeat_interleave(T, 0), w.lasts.view({-1}), visible, scale)
        .view({runs, T, Q, D});
  auto out = at::zeros({runs * T, Q, D}, q.options());
  row_at_a_time(std::vector<bool>(runs, true), out);
  return out.view({runs, T, Q, D});
}

// weight * (x / sqrt(mean(x^2) + eps)) per row, as RMSNorm in fp32: elementwise.cpp's op (rows over the threads,
// the loops vectorized), the one the layer-by-layer path runs too
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::rms_norm", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, eps);
}

// Each row's most likely token of (B, V) fp32 logits: elementwise.cpp's op (the first on ties, a row's first NaN)
at::Tensor greedy_rows(const at::Tensor& logits) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::greedy_rows", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(logits);
}

// up * silu(gate) of gate_up = [gate | up], elementwise.cpp's op: its exp is plain arithmetic the compiler
// vectorizes (std::exp in a scalar loop was ~1.5 ms of a 64-row step of the demo model, more than its products)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("glmtorch_kernels::silu_mul", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(gate_up);
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
}

struct DecodePlan : torch::CustomClassHolder {
  int64_t heads, kv_heads, head_dim, rotary_dim;
  double eps, scale;
  at::Tensor embed, final_norm, inv_freq;
  std::vector<Linear> linears;  // indexed by the numbers add_linear returns
  struct Layer {
    at::Tensor input_norm, post_norm;
    int64_t qkv, o, gate_up, down;
    // GLM-4-0414's sandwich norms on the attention and MLP outputs (undefined tensors: GLM-4-9B has none)
    at::Tensor attn_out_norm, mlp_out_norm;
  };
  std::vector<Layer> layers;
  int64_t lm_head = -1;

  DecodePlan(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t rotary_dim, double eps, at::Tensor embed,
             at::Tensor final_norm, at::Tensor inv_freq)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), rotary_dim(rotary_dim), eps(eps),
        scale(1.0 / std::sqrt(static_cast<double>(head_dim))), embed(std::move(embed)),
        final_norm(std::move(final_norm)), inv_freq(std::move(inv_freq)) {}

  int64_t add_linear(int64_t kind, at::Tensor weight, c10::optional<at::Tensor> scales, c10::optional<at::Tensor> bias,
                     int64_t group, int64_t interleave) {
    Linear l;
    l.kind = kind;
    l.weight = std::move(weight);
    if (scales) l.scales = *scales;
    if (bias) l.bias = *bias;
    l.group = group;
    l.interleave = interleave;
    linears.push_back(std::move(l));
    return static_cast<int64_t>(linears.size()) - 1;
  }

  void add_layer(at::Tensor input_norm, int64_t qkv, int64_t o, at::Tensor post_norm, int64_t gate_up, int64_t down,
                 c10::optional<at::Tensor> attn_out_norm, c10::optional<at::Tensor> mlp_out_norm) {
    layers.push_back({std::move(input_norm), std::move(post_norm), qkv, o, gate_up, down,
                      attn_out_norm ? *attn_out_norm : at::Tensor(), mlp_out_norm ? *mlp_out_norm : at::Tensor()});
  }

  // x += y, or x += rms_norm(y) where the layer normalises its sub-layer's output first
  void add_output(at::Tensor& x, const at::Tensor& y, const at::Tensor& out_norm) const {
    add_into(x, out_norm.defined() ? rms_norm(y, out_norm, eps) : y);
  }

  void set_lm_head(int64_t index) { lm_head = index; }

  void set_amx_buckets(int64_t index, int64_t buckets) { linears.at(index).amx_buckets = buckets; }

  // bit b set: a batch of up to 2^b rows (bucket b) runs split by rows, each thread the whole step for its share
  // of the rows (see step)
  void set_row_split(int64_t buckets) { row_split_buckets = buckets; }
  // rows a thread takes at a time when split by rows: smaller chunks share the rows out more evenly, and read the
  // weights once more each. The demo model's products, one thread, per row (AMD EPYC Zen 3, blocks): 0.09-0.11 ms
  // in chunks of 16 rows, 0.07-0.09 in 32, 0.10-0.13 in 8.
  static constexpr int64_t ROW_CHUNK = 16;
  int64_t row_split_buckets = 0;
  int64_t split_steps() const { return steps_split_by_rows.load(); }
  mutable std::atomic<int64_t> steps_split_by_rows{0};  // how many steps ran split by rows (tests, reports)

  // tokens (B, 1), positions (B, 1) rotary positions, slots (1,) or (B, 1) cache slots written, mask (B, L) 0/1
  // padding over the attended slots; keys / values (layers, rows, KV, capacity, D), fp32 or bf16 (a bf16 model's
  // cache: written rounded to nearest, read widened). Row b of the batch uses cache row b, or cache_rows[b]: several
  // new tokens of one sequence (speculative decoding's verify pass) are rows of one cache row at consecutive slots,
  // each attending its own slot and the ones before it. Returns (B, vocab) fp32 logits.
  // With a block_table (B, blocks) the cache is paged (a server's block pool): keys / values are (layers, pool
  // blocks, KV, block size, D), and slot j of row b lives in block block_table[b][j / block size] at offset
  // j % block size; cache_rows is then not used (rows of one sequence share its table).
  // `logits`: a (B, vocab) fp32 buffer the LM head may write into (see apply), which the caller reuses step after
  // step instead of a fresh tensor each time. `greedy`: a (B,) int64 tensor given each row's most likely token
  // (greedy_rows of its logits) where the LM head runs here: a row split's thread takes its own rows' while their
  // logits are in its cache, and no parallel region of its own follows the step (~0.2 ms of a 64-row step of the
  // demo model; AMD EPYC Zen 3). Left as it was when the head runs outside.
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& slots,
                  const at::Tensor& mask, const at::Tensor& keys, const at::Tensor& values,
                  c10::optional<at::Tensor> cache_rows, c10::optional<at::Tensor> block_table,
                  c10::optional<at::Tensor> logits, c10::optional<at::Tensor> greedy) const {
    TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                    (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
                "the cache must be fp32 or bf16");
    const int64_t B = tokens.size(0), threads = std::min<int64_t>(at::get_num_threads(), B);
    TORCH_CHECK(!greedy || (greedy->dim() == 1 && greedy->size(0) == B && greedy->scalar_type() == at::kLong),
                "step: greedy must be a (B,) int64 tensor");
    if (threads > 1 && ((row_split_buckets >> row_bucket_index(B)) & 1))
      return keys.scalar_type() == at::kBFloat16
                 ? split_by_rows<at::BFloat16>(threads, tokens, positions, slots, mask, keys, values, cache_rows,
                                               block_table, logits, greedy)
                 : split_by_rows<float>(threads, tokens, positions, slots, mask, keys, values, cache_rows,
                                        block_table, logits, greedy);
    if (keys.scalar_type() == at::kBFloat16)
      return run<at::BFloat16>(tokens, positions, slots, mask, keys, values, cache_rows, block_table, logits, greedy);
    return run<float>(tokens, positions, slots, mask, keys, values, cache_rows, block_table, logits, greedy);
  }

  // The step with the batch's rows split between the threads, each running every layer for its own rows (the
  // kernels it calls run on that thread alone: ATen runs a parallel_for inside a parallel region inline). Where the
  // weights are small enough to stay in the shared cache, this saves the ~60 meetings of the threads per step at
  // the end of each product, norm and attention (each waiting for the slower thread, or for one the OS gave another
  // task); where they are not, each thread streams every weight and it loses. Chosen per row bucket by timing
  // (glmtorch.fastpath).
  template <typename T>
  at::Tensor split_by_rows(int64_t threads, const at::Tensor& tokens, const at::Tensor& positions,
                           const at::Tensor& slots, const at::Tensor& mask, const at::Tensor& keys,
                           const at::Tensor& values, const c10::optional<at::Tensor>& cache_rows,
                           const c10::optional<at::Tensor>& block_table,
                           const c10::optional<at::Tensor>& logits,
                           const c10::optional<at::Tensor>& greedy) const {
    const int64_t B = tokens.size(0);
    ++steps_split_by_rows;
    // The rows go in chunks of at most ROW_CHUNK, each thread taking the next one left when it is done with its
    // last: a thread the OS takes off its core for a while (a served step shares the cores with the HTTP thread and
    // the clients) leaves its rows to the others, where with a half each the other thread finished and waited.
    const int64_t chunk = std::min<int64_t>(ROW_CHUNK, (B + threads - 1) / threads), chunks = (B + chunk - 1) / chunk;
    std::vector<at::Tensor> parts(chunks);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t t = next++; t < chunks; t = next++) {
        const int64_t first = t * chunk, n = std::min(chunk, B - first);
        auto rows = [&](const at::Tensor& x) { return x.narrow(0, first, n); };
        auto some = [&](const c10::optional<at::Tensor>& x) {
          return x ? c10::optional<at::Tensor>(rows(*x)) : c10::nullopt;
        };
        // a contiguous cache's row b is batch row b: this share's rows name theirs
        const auto own_rows = cache_rows || block_table ? some(cache_rows)
                                                        : c10::optional<at::Tensor>(at::arange(first, first + n));
        parts[t] = run<T>(rows(tokens), rows(positions), slots.numel() == 1 ? slots : rows(slots), rows(mask), keys,
                          values, own_rows, some(block_table), some(logits), some(greedy));
      }
    });
    bool in_buffer = logits.has_value();
    for (int64_t t = 0; t < chunks && in_buffer; ++t)
      in_buffer = parts[t].data_ptr() == logits->narrow(0, t * chunk, 1).data_ptr();
    return in_buffer ? *logits : at::cat(parts);
  }

  template <typename T>
  at::Tensor run(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& slots,
                 const at::Tensor& mask, const at::Tensor& keys, const at::Tensor& values,
                 const c10::optional<at::Tensor>& cache_rows, const c10::optional<at::Tensor>& block_table,
                 const c10::optional<at::Tensor>& logits, const c10::optional<at::Tensor>& greedy) const {
    const int64_t B = tokens.size(0), H = embed.size(1), L = mask.size(1), D = head_dim, R = rotary_dim;
    const int64_t Q = heads, KV = kv_heads;
    const CacheLayout layout = cache_layout(keys, values, B, KV, D, L, cache_rows, block_table);
    const auto tok = tokens.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
    const auto slot = slots.to(at::kLong).contiguous(), visible = mask.to(at::kBool).contiguous();
    const int64_t* tp = tok.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* sp = slot.data_ptr<int64_t>();
    const bool* vp = visible.data_ptr<bool>();
    const bool shared_slot = slot.numel() == 1;  // every row writes the same slot (a batch that began together)
    std::vector<int64_t> row_slot(B);
    // no padding among the slots any row attends (a server's rows, a batch of prompts of one length): the attention
    // then skips the mask's test per slot (~5% of its time for 64 rows of the demo model, AMD EPYC Zen 3)
    bool every_slot_seen = true;
    for (int64_t b = 0; b < B; ++b) {
      row_slot[b] = sp[shared_slot ? 0 : b];
      TORCH_CHECK(tp[b] >= 0 && tp[b] < embed.size(0), "token id ", tp[b], " is outside the vocabulary");
      TORCH_CHECK(row_slot[b] >= 0 && row_slot[b] < L, "cache slot ", row_slot[b], " is outside the mask");
      every_slot_seen = every_slot_seen && std::memchr(vp + b * L, 0, row_slot[b] + 1) == nullptr;
    }

    // Rotary angles per row: position * inv_freq[i] for channel pair i, in fp32 as RotaryEmbedding computes them.
    std::vector<float> cos_table(B * R / 2), sin_table(B * R / 2);
    const float* freq = inv_freq.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < R / 2; ++i) {
        const float angle = static_cast<float>(pp[b]) * freq[i];
        cos_table[b * R / 2 + i] = std::cos(angle);
        sin_table[b * R / 2 + i] = std::sin(angle);
      }

    // the embedding rows, widened to fp32 where the model keeps them in bf16
    auto x = at::empty({B, H}, embed.options().dtype(at::kFloat));
    for (int64_t b = 0; b < B; ++b) {
      float* row = x.data_ptr<float>() + b * H;
      if (embed.scalar_type() == at::kFloat) {
        std::memcpy(row, embed.data_ptr<float>() + tp[b] * H, H * sizeof(float));
      } else {
        const at::BFloat16* src = embed.data_ptr<at::BFloat16>() + tp[b] * H;
        for (int64_t i = 0; i < H; ++i) row[i] = static_cast<float>(src[i]);
      }
    }

    auto attended = at::empty({B, Q * D}, x.options());
    for (size_t layer = 0; layer < layers.size(); ++layer) {
      const Layer& ly = layers[layer];
      at::Tensor qkv = apply(linears[ly.qkv], rms_norm(x, ly.input_norm, eps));  // (B, (Q + 2 KV) D)
      float* qkvp = qkv.data_ptr<float>();
      const int64_t width = (Q + 2 * KV) * D;
      T* kc = keys.data_ptr<T>() + layer * keys.stride(0);
      T* vc = values.data_ptr<T>() + layer * values.stride(0);
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkvp + b * width;
        // rotate adjacent pairs of the first R channels of every query and key head
        for (int64_t h = 0; h < Q + KV; ++h) {
          float* v = row + h * D;
          for (int64_t i = 0; i < R / 2; ++i) {
            const float c = cos_table[b * R / 2 + i], s = sin_table[b * R / 2 + i];
            const float x0 = v[2 * i], x1 = v[2 * i + 1];
            v[2 * i] = x0 * c - x1 * s;
            v[2 * i + 1] = x1 * c + x0 * s;
          }
        }
        for (int64_t h = 0; h < KV; ++h) {
          T* k_at = kc + layout.key_offset(b, h, row_slot[b]);
          T* v_at = vc + layout.offset(b, h, row_slot[b]);
          const float* k_new = row + (Q + h) * D;
          const float* v_new = row + (Q + KV + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            k_at[d * layout.key_dim_stride] = static_cast<T>(k_new[d]);
            v_at[d] = static_cast<T>(v_new[d]);
          }
        }
      }
      // Attention of each row's query heads: the keys a row sees are slots j <= its own slot that are not padding
      // (its own slot always).
      attend_cached(layout, kc, vc, B, Q, KV, D, L, row_slot.data(), every_slot_seen ? nullptr : vp, scale, qkvp,
                    width, attended.data_ptr<float>(), Q * D);
      add_output(x, apply(linears[ly.o], attended), ly.attn_out_norm);

      at::Tensor gate_up = apply(linears[ly.gate_up], rms_norm(x, ly.post_norm, eps));  // (B, 2 I): [gate | up]
      const at::Tensor act = silu_mul(gate_up);
      add_output(x, apply(linears[ly.down], act), ly.mlp_out_norm);
    }
    if (lm_head < 0) return rms_norm(x, final_norm, eps);  // the head runs outside (a packed oneDNN weight)
    at::Tensor out = apply(linears[lm_head], rms_norm(x, final_norm, eps), logits);
    if (greedy) greedy->copy_(greedy_rows(out));
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmtorch_kernels, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_linear", &DecodePlan::add_linear)
      .def("add_layer", &DecodePlan::add_layer)
      .def("set_lm_head", &DecodePlan::set_lm_head)
      .def("set_amx_buckets", &DecodePlan::set_amx_buckets)
      .def("set_row_split", &DecodePlan::set_row_split)
      .def("split_steps", &DecodePlan::split_steps)
      .def("step", &DecodePlan::step);
  m.def("paged_attention(Tensor q, Tensor keys, Tensor values, Tensor table, Tensor last, Tensor visible, float scale) "
        "-> Tensor");
  m.def("paged_prefill_attention(Tensor q, Tensor keys, Tensor values, Tensor table, Tensor last, Tensor visible, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmtorch_kernels, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}

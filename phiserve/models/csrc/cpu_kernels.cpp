// CPU kernels: int4/int8 weight-only linear layers (int16 activations against the packed weights;
// from 12 rows (int4; 24 for int8) the weights unpacked a panel at a time, same bits), attention of
// decode rows over the paged KV cache and of prefill chunks, rope + KV write, silu * up, RMSNorm with
// the residual add fused, all the layers of a decode-only step in one call, and the sampler's
// filtered draw.
//
// Every kernel computes each row with the same sequence of operations whatever else is in the batch
// (no reduction is split by batch size), so a request's tokens do not depend on the load.
// Built at first use by phiserve/models/cpu_kernels.py with -march=native; AVX2 paths with a
// scalar fallback for other CPUs, VNNI multiply-adds where the CPU has them (same bits), and an AMX
// kernel for the int4 layers' prefill rows where it has AMX (its own bits; see amx_int4_linear).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PHISERVE_AVX2 1
#endif
// VNNI's vpdpwssd does vpmaddwd + vpaddd in one instruction (same integers): Intel since Ice Lake /
// Alder Lake, AMD since Zen 4. Either encoding; the EVEX one needs AVX-512 VL for ymm registers.
#if defined(PHISERVE_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define PHISERVE_VNNI 1
#define PHISERVE_VNNI_ASM "vpdpwssd"
#elif defined(PHISERVE_AVX2) && defined(__AVXVNNI__)
#define PHISERVE_VNNI 1
#define PHISERVE_VNNI_ASM "%{vex%} vpdpwssd"  // AVX-VNNI only: the VEX form ("%{": a literal brace in asm)
#endif
// AMX (Intel since Sapphire Rapids): 16x16 tiles of bf16 products summed in fp32, for prefill rows.
#if defined(PHISERVE_AVX2) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__linux__) && defined(__x86_64__)
#define PHISERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kGroup = 32;  // int4 group size: 32 weights share a scale and a min

#ifdef PHISERVE_AVX2
// acc + w . x per int32 lane (16 int16 products summed in pairs). Exact either way: |x| <= 32767 and
// |w| <= 127, so no pair sum nears int32's range.
inline __m256i madd_acc(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for x <= 0 (softmax after subtracting the max), Cephes-style polynomial, ~1 ulp.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

// The KV cache holds float32 or float16 (half the bytes: long-context decode is memory-bound).
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: contiguous float32 or float16 [slots, KVH, D]");
}

// Tasks [0, n) in chunks of `chunk`, claimed by torch's threads from a shared counter rather than
// split in equal halves up front: when a thread is descheduled (two cores shared with the HTTP
// thread and clients), the others take its remaining chunks instead of waiting for it at the end.
// Which thread computes a task never changes what it computes.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
#ifdef PHISERVE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
#ifdef PHISERVE_AVX2
  if (n % 16 == 0) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
    }
    return hsum(_mm256_add_ps(s0, s1));
  }
#endif
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// Weight-only linear layers, weights in groups of 32 input columns:
//   int4: w = q * scale + min, q in 0..15 (GGUF Q4_1)     int8: w = q * scale, q in -127..127 (GGUF Q8_0)
// Activations are rounded per row and group of 32 to int16 with their own scale (sx = max|x| / 32767,
// so each value keeps ~15 bits against the group's largest, finer than the float16 KV cache), and
// q * x is summed exactly in int32 by vpmaddwd: 16 products per instruction where fp32 FMAs on
// converted weights did 8 per four instructions (measured 1.3-1.8x faster on this AVX2 CPU for 1-256
// rows; output error ~4e-5 of the largest output, was ~3e-7). Per group:
//   out += scale * sx * sum_k q_k xq_k  (+ min * sum_k x_k, the exact fp32 sum of the group's x)
// Layout (quant.pack_q4 / pack_q8), eight output features per vector: qweight int32 [N/8, K*Bits/32, 8]
// holds, per block of 8 features and group, vectors of 16 int16 (int4: four nibble planes per int16,
// plane j at bits 4j; int8: 16 bytes widened to int16) whose lanes 2l and 2l+1 are feature l at
// k = 2p and 2p+1 of the group, p = 4 * vector + plane (int4) or the 16-byte chunk's index (int8), so
// one vpmaddwd against the broadcast pair (x_2p, x_2p+1) gives feature l's two products summed in
// int32 lane l. Scales and mins fp16 [N/8, K/32, 8] (the files store fp16; decode is memory-bound).
constexpr int64_t kLanes = 8;
constexpr float kInt16Max = 32767.f;
constexpr int64_t kPrefetchBytes = 8192;  // int4 weight bytes ahead (8 groups; int8 twice the bytes)

// x [M, K] -> int16 pairs (one int32 per two consecutive k), scale and exact sum per (row, group).
// The buffers belong to the calling thread and are reused by its next call: fresh ones per call cost
// page faults on every layer (0.3-0.5 ms of a 512-row layer, more than rounding the rows).
struct QuantizedRows {
  const int32_t* pairs;
  const float* scale;
  const float* sum;
};

// A group's max |x| and sum, in one fixed order (a row's values never depend on the batch): the sum
// adds lanes l, l + 8, l + 16, l + 24 as ((x_l + x_l+8) + (x_l+16 + x_l+24)), then the eight lane
// sums as the vector code's horizontal add does; the scalar path repeats that order exactly.
inline void group_max_and_sum(const float* xs, float& amax, float& sum) {
#ifdef PHISERVE_AVX2
  const __m256 v0 = _mm256_loadu_ps(xs), v1 = _mm256_loadu_ps(xs + 8), v2 = _mm256_loadu_ps(xs + 16), v3 = _mm256_loadu_ps(xs + 24);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  sum = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
#else
  float lane[8];
  amax = 0.f;
  for (int64_t l = 0; l < 8; ++l) {
    lane[l] = (xs[l] + xs[l + 8]) + (xs[l + 16] + xs[l + 24]);
    for (int64_t j = l; j < kGroup; j += 8) amax = std::max(amax, std::fabs(xs[j]));
  }
  for (int64_t l = 0; l < 4; ++l) lane[l] += lane[l + 4];  // hsum: halves, then pairs, then the last two
  sum = (lane[0] + lane[2]) + (lane[1] + lane[3]);
#endif
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  thread_local std::vector<int32_t> pairs;
  thread_local std::vector<float> scales, sums;
  if (static_cast<int64_t>(pairs.size()) < M * K / 2) pairs.resize(M * K / 2);
  if (static_cast<int64_t>(scales.size()) < M * G) {
    scales.resize(M * G);
    sums.resize(M * G);
  }
  int16_t* xq = reinterpret_cast<int16_t*>(pairs.data());
  float* scale_out = scales.data();
  float* sum_out = sums.data();
  at::parallel_for(0, M * G, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* xs = x + i * kGroup;
      float amax, sum;
      group_max_and_sum(xs, amax, sum);
      sum_out[i] = sum;
      scale_out[i] = amax / kInt16Max;
      const float inv = amax > 0.f ? kInt16Max / amax : 0.f;
      int16_t* out = xq + i * kGroup;
      int64_t j = 0;
#ifdef PHISERVE_AVX2
      // cvtps rounds to nearest even, as std::nearbyint does under the default rounding mode
      for (; j < kGroup; j += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + j), _mm256_set1_ps(inv)));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_castsi256_si128(packed));
      }
#endif
      for (; j < kGroup; ++j) out[j] = static_cast<int16_t>(std::nearbyint(xs[j] * inv));
    }
  });
  return {pairs.data(), scales.data(), sums.data()};
}

// The int16 weight of plane p (0..15) of a group for lanes [2l, 2l+1] = feature l at k = 2p, 2p+1.
inline int32_t weight_value(const int32_t* group_words, int bits, int64_t p, int64_t l, int64_t h) {
  if (bits == 4) {
    const uint32_t word = static_cast<uint32_t>(group_words[(p / 4) * kLanes + l]);
    return static_cast<int32_t>((word >> (16 * h + 4 * (p % 4))) & 0x0F);
  }
  const int8_t* bytes = reinterpret_cast<const int8_t*>(group_words);
  return bytes[p * 16 + 2 * l + h];
}

#ifdef PHISERVE_AVX2
// weight_value's vector form, 16 int16 lanes (2l + h = feature l at k = 2p + h) of plane p: for int4
// plane j (p = 4v + j) of the group's vector v, `packed`; for int8 the group's 16-byte chunk p.
inline __m256i int4_plane(__m256i packed, int j) {
  const __m256i shifted = _mm256_srli_epi16(packed, 4 * j);
  return j == 3 ? shifted : _mm256_and_si256(shifted, _mm256_set1_epi16(0x0F));  // the top nibble needs no mask
}

inline __m256i int8_plane(const int32_t* group_words, int p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_words + p * 4)));
}

// R rows against NB blocks of 8 features. Every (row, feature) is computed by the same operations in
// the same order in every instantiation (exact integer group dots, then one fixed chain of float
// FMAs), so a row's result does not depend on how many rows share the call.
template <int Bits, int R, int NB>
inline void tile(const int32_t* xp, const float* sx, const float* xsum, int64_t K, const int32_t* q,
                 const at::Half* scales, const at::Half* mins, float* out, int64_t N) {
  const int64_t G = K / kGroup, block_words = K * Bits / 32 * kLanes, group_words = kGroup * Bits / 32 * kLanes;
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dot[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) dot[r][b] = _mm256_setzero_si256();
    const int32_t* xg = xp + g * (kGroup / 2);
    auto use = [&](int b, int p, __m256i w) {
      for (int r = 0; r < R; ++r)
        dot[r][b] = madd_acc(dot[r][b], w, _mm256_set1_epi32(xg[r * K / 2 + p]));
    };
    for (int b = 0; b < NB; ++b) {
      const int32_t* qg = q + b * block_words + g * group_words;
      // Weights stream from memory once per step (decode reads ~90 MB): ask for groups ahead, the
      // hardware prefetcher alone left the kernel at ~8 GB/s of this machine's ~20.
      for (int64_t line = 0; line < group_words * 4; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qg) + kPrefetchBytes * Bits / 4 + line, _MM_HINT_T0);
      if ((g & 3) == 0) {  // scales (and mins): 16 bytes a group, one line per 4 groups, as far ahead
        _mm_prefetch(reinterpret_cast<const char*>(scales + (b * G + g) * kLanes) + kPrefetchBytes / 8, _MM_HINT_T0);
        if constexpr (Bits == 4)
          _mm_prefetch(reinterpret_cast<const char*>(mins + (b * G + g) * kLanes) + kPrefetchBytes / 8, _MM_HINT_T0);
      }
      if constexpr (Bits == 4) {
        for (int v = 0; v < 4; ++v) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + v * kLanes));
          for (int j = 0; j < 4; ++j) use(b, 4 * v + j, int4_plane(packed, j));
        }
      } else {
        for (int p = 0; p < 16; ++p) use(b, p, int8_plane(qg, p));
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + (b * G + g) * kLanes)));
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][b]), _mm256_mul_ps(d, _mm256_set1_ps(sx[r * G + g])), acc[r][b]);
      if constexpr (Bits == 4) {
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + (b * G + g) * kLanes)));
        for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[r * G + g]), acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(out + r * N + b * kLanes, acc[r][b]);
}
#endif

// One block of 8 features for `rows` rows: the portable path (same math, scalar; std::fma rounds once
// like the vector FMA).
template <int Bits>
void tile_scalar(const int32_t* xp, const float* sx, const float* xsum, int64_t rows, int64_t K, const int32_t* q,
                 const at::Half* scales, const at::Half* mins, float* out, int64_t N) {
  const int64_t G = K / kGroup, group_words = kGroup * Bits / 32 * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* xq = reinterpret_cast<const int16_t*>(xp + r * K / 2);
    for (int64_t l = 0; l < kLanes; ++l) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int64_t p = 0; p < kGroup / 2; ++p)
          for (int64_t h = 0; h < 2; ++h) dot += weight_value(q + g * group_words, Bits, p, l, h) * xq[g * kGroup + 2 * p + h];
        acc = std::fma(static_cast<float>(dot), static_cast<float>(scales[g * kLanes + l]) * sx[r * G + g], acc);
        if (Bits == 4) acc = std::fma(static_cast<float>(mins[g * kLanes + l]), xsum[r * G + g], acc);
      }
      out[r * N + l] = acc;
    }
  }
}

void check_weight_only_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor* mins, int bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(2) == kLanes,
              "qweight: contiguous int32 [N/8, K*Bits/32, 8]");
  const int64_t K = x.size(1), N = qweight.size(0) * kLanes;
  TORCH_CHECK(K % kGroup == 0 && qweight.size(1) * 32 / bits == K, "K must be a multiple of 32 and match qweight");
  for (const at::Tensor* t : {&scales, mins}) {
    if (t != nullptr)
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * K / kGroup,
                  "scales, mins: contiguous float16 [N/8, K/32, 8]");
  }
}

// ---- Many rows: the same arithmetic over weights unpacked a panel at a time -------------------------
// From panel_min_rows rows (prefill chunks, large decode batches) the layer is compute-bound, and
// unpacking the nibble planes inside tile() (a shift and a mask per 16 weights, for every 4 rows)
// costs more than the multiply-adds. So two blocks of 8 features are unpacked once into an int16
// panel [K/2][2][16] that every 6-row tile then reads. The integer dots and the FMA chain are tile()'s,
// in tile()'s order: the bits are the same whichever path a row takes (tested), so the caller need
// not know. vpmaddwd + vpaddd sustain ~1.3-1.5 multiply-adds of 16 products a cycle on this class of
// CPU (Zen 3 measured: 55-70 G products/s per core against 38-47 G for fp32 FMA), which made this
// 1.05-1.15x the fp32 kernel over dequantized panels that prefill used before.
constexpr int64_t kPanel = 16;  // features per panel: two blocks of 8
constexpr int64_t kPanelRows = 6;  // rows per register tile: 6 x 2 accumulators + 2 weights + input + product
// Rows from which the panel path beats tile() (A/B in one process, the 30 layers' int4 shapes: 1.01-1.04x
// at 12 rows, 1.08-1.12x at 16-20, 1.3x at 23, 0.83x at 8; the int8 output head, whose tile() needs
// no nibble unpacking: 0.91-0.97x at 12-23 rows, so it keeps the measured 24).
constexpr int64_t panel_min_rows(int bits) { return bits == 4 ? 12 : 24; }

#ifdef PHISERVE_AVX2
// A block's fp16 scales (or mins), 8 per group, as fp32 into a panel's [G][16] buffer at column dst.
inline void block_values_fp32(const at::Half* src, int64_t G, float* dst) {
  for (int64_t g = 0; g < G; ++g)
    _mm256_storeu_ps(dst + g * kPanel, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g * kLanes))));
}
#endif

#if defined(PHISERVE_AVX2) && defined(__GNUC__) && defined(__x86_64__)
#define PHISERVE_PANEL_ASM 1
// Block bb (0 or 1) of a panel: its int16 weight pairs for every k pair P at panel[2P + bb].
template <int Bits>
void unpack_block(const int32_t* q, int64_t K, __m256i* panel, int64_t bb) {
  const int64_t G = K / kGroup, group_words = kGroup * Bits / 32 * kLanes;
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* qg = q + g * group_words;
    __m256i* dst = panel + g * kGroup + bb;
    if constexpr (Bits == 4) {
      for (int v = 0; v < 4; ++v) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + v * kLanes));
        for (int j = 0; j < 4; ++j) _mm256_storeu_si256(dst + 2 * (4 * v + j), int4_plane(packed, j));
      }
    } else {
      for (int p = 0; p < 16; ++p) _mm256_storeu_si256(dst + 2 * p, int8_plane(qg, p));
    }
  }
}

// Six rows of one group against a panel's 16 features, accumulated into acc [6][16]. In asm because
// GCC spilled the 12 integer accumulators of the intrinsics version to the stack (~0.8x). Per row r:
// dots in ymm(2r) and ymm(2r+1); then acc = fma(float(dot), d * sx, acc) and, with mins,
// acc = fma(min, xsum, acc), tile()'s operations. sx_xs: the six rows' scales, then sums, of this group.
// One asm statement per variant (values in registers do not survive between asm statements).
// ymm(acc) += ymm(w) . ymm14 (the broadcast input pair): PHISERVE_MADD(w, acc)
#ifdef PHISERVE_VNNI
#define PHISERVE_MADD(w, acc) PHISERVE_VNNI_ASM " %%ymm14, %%ymm" #w ", %%ymm" #acc "\n"
#else
#define PHISERVE_MADD(w, acc) "vpmaddwd %%ymm14, %%ymm" #w ", %%ymm15\n vpaddd %%ymm15, %%ymm" #acc ", %%ymm" #acc "\n"
#endif
#define PHISERVE_GROUP6_DOTS \
      "vpxor %%xmm0, %%xmm0, %%xmm0\n" "vpxor %%xmm1, %%xmm1, %%xmm1\n" "vpxor %%xmm2, %%xmm2, %%xmm2\n" "vpxor %%xmm3, %%xmm3, %%xmm3\n" \
      "vpxor %%xmm4, %%xmm4, %%xmm4\n" "vpxor %%xmm5, %%xmm5, %%xmm5\n" "vpxor %%xmm6, %%xmm6, %%xmm6\n" "vpxor %%xmm7, %%xmm7, %%xmm7\n" \
      "vpxor %%xmm8, %%xmm8, %%xmm8\n" "vpxor %%xmm9, %%xmm9, %%xmm9\n" "vpxor %%xmm10, %%xmm10, %%xmm10\n" "vpxor %%xmm11, %%xmm11, %%xmm11\n" \
      "1:\n" \
      "vmovdqu (%[w]), %%ymm12\n vmovdqu 32(%[w]), %%ymm13\n" \
      "vpbroadcastd (%[x]), %%ymm14\n" PHISERVE_MADD(12, 0) PHISERVE_MADD(13, 1) \
      "vpbroadcastd (%[x],%[s],1), %%ymm14\n" PHISERVE_MADD(12, 2) PHISERVE_MADD(13, 3) \
      "vpbroadcastd (%[x],%[s],2), %%ymm14\n" PHISERVE_MADD(12, 4) PHISERVE_MADD(13, 5) \
      "vpbroadcastd (%[x3]), %%ymm14\n" PHISERVE_MADD(12, 6) PHISERVE_MADD(13, 7) \
      "vpbroadcastd (%[x3],%[s],1), %%ymm14\n" PHISERVE_MADD(12, 8) PHISERVE_MADD(13, 9) \
      "vpbroadcastd (%[x3],%[s],2), %%ymm14\n" PHISERVE_MADD(12, 10) PHISERVE_MADD(13, 11) \
      "add $64, %[w]\n add $4, %[x]\n add $4, %[x3]\n dec %[n]\n jnz 1b\n"
#define PHISERVE_GROUP6_SCALE \
      "vmovups (%[d]), %%ymm12\n vmovups 32(%[d]), %%ymm13\n" \
      "vbroadcastss 0(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm0, %%ymm0\n vfmadd213ps 0(%[acc]), %%ymm15, %%ymm0\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm1, %%ymm1\n vfmadd213ps 32(%[acc]), %%ymm15, %%ymm1\n" \
      "vbroadcastss 4(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm2, %%ymm2\n vfmadd213ps 64(%[acc]), %%ymm15, %%ymm2\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm3, %%ymm3\n vfmadd213ps 96(%[acc]), %%ymm15, %%ymm3\n" \
      "vbroadcastss 8(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm4, %%ymm4\n vfmadd213ps 128(%[acc]), %%ymm15, %%ymm4\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm5, %%ymm5\n vfmadd213ps 160(%[acc]), %%ymm15, %%ymm5\n" \
      "vbroadcastss 12(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm6, %%ymm6\n vfmadd213ps 192(%[acc]), %%ymm15, %%ymm6\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm7, %%ymm7\n vfmadd213ps 224(%[acc]), %%ymm15, %%ymm7\n" \
      "vbroadcastss 16(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm8, %%ymm8\n vfmadd213ps 256(%[acc]), %%ymm15, %%ymm8\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm9, %%ymm9\n vfmadd213ps 288(%[acc]), %%ymm15, %%ymm9\n" \
      "vbroadcastss 20(%[sx]), %%ymm14\n" \
      "vmulps %%ymm12, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm10, %%ymm10\n vfmadd213ps 320(%[acc]), %%ymm15, %%ymm10\n" \
      "vmulps %%ymm13, %%ymm14, %%ymm15\n vcvtdq2ps %%ymm11, %%ymm11\n vfmadd213ps 352(%[acc]), %%ymm15, %%ymm11\n"
#define PHISERVE_GROUP6_MINS \
      "vmovups (%[mn]), %%ymm12\n vmovups 32(%[mn]), %%ymm13\n" \
      "vbroadcastss 24(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm0\n vfmadd231ps %%ymm14, %%ymm13, %%ymm1\n" \
      "vbroadcastss 28(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm2\n vfmadd231ps %%ymm14, %%ymm13, %%ymm3\n" \
      "vbroadcastss 32(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm4\n vfmadd231ps %%ymm14, %%ymm13, %%ymm5\n" \
      "vbroadcastss 36(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm6\n vfmadd231ps %%ymm14, %%ymm13, %%ymm7\n" \
      "vbroadcastss 40(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm8\n vfmadd231ps %%ymm14, %%ymm13, %%ymm9\n" \
      "vbroadcastss 44(%[sx]), %%ymm14\n vfmadd231ps %%ymm14, %%ymm12, %%ymm10\n vfmadd231ps %%ymm14, %%ymm13, %%ymm11\n"
#define PHISERVE_GROUP6_STORE \
      "vmovaps %%ymm0, 0(%[acc])\n" "vmovaps %%ymm1, 32(%[acc])\n" "vmovaps %%ymm2, 64(%[acc])\n" "vmovaps %%ymm3, 96(%[acc])\n" \
      "vmovaps %%ymm4, 128(%[acc])\n" "vmovaps %%ymm5, 160(%[acc])\n" "vmovaps %%ymm6, 192(%[acc])\n" "vmovaps %%ymm7, 224(%[acc])\n" \
      "vmovaps %%ymm8, 256(%[acc])\n" "vmovaps %%ymm9, 288(%[acc])\n" "vmovaps %%ymm10, 320(%[acc])\n" "vmovaps %%ymm11, 352(%[acc])\n"

template <bool Mins>
inline void panel_group6(const int32_t* xg, int64_t row_bytes, const __m256i* pg, const float* d, const float* mn,
                         const float* sx_xs, float* acc) {
  int64_t n = 16;  // k pairs in a group
  const char* x = reinterpret_cast<const char*>(xg);
  const char* x3 = x + 3 * row_bytes;  // rows 3-5 (an x86 address takes a scale of 1, 2, 4 or 8 only)
  const char* w = reinterpret_cast<const char*>(pg);
  if constexpr (Mins) {
    __asm__ volatile(PHISERVE_GROUP6_DOTS PHISERVE_GROUP6_SCALE PHISERVE_GROUP6_MINS PHISERVE_GROUP6_STORE
                     : [w] "+r"(w), [x] "+r"(x), [x3] "+r"(x3), [n] "+r"(n)
                     : [s] "r"(row_bytes), [d] "r"(d), [sx] "r"(sx_xs), [mn] "r"(mn), [acc] "r"(acc)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
  } else {
    __asm__ volatile(PHISERVE_GROUP6_DOTS PHISERVE_GROUP6_SCALE PHISERVE_GROUP6_STORE
                     : [w] "+r"(w), [x] "+r"(x), [x3] "+r"(x3), [n] "+r"(n)
                     : [s] "r"(row_bytes), [d] "r"(d), [sx] "r"(sx_xs), [acc] "r"(acc)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
  }
}
#undef PHISERVE_MADD
#undef PHISERVE_GROUP6_DOTS
#undef PHISERVE_GROUP6_SCALE
#undef PHISERVE_GROUP6_MINS
#undef PHISERVE_GROUP6_STORE

// Six rows of x against one panel (width 8 or 16 features): every group's dots and FMAs.
template <int Bits>
void panel_tile6(const int32_t* xp, const float* sx, const float* xsum, int64_t K, const __m256i* panel, const float* d,
                 const float* mn, int64_t width, float* out, int64_t N) {
  const int64_t G = K / kGroup;
  alignas(32) float acc[kPanelRows * kPanel] = {};
  float sx_xs[2 * kPanelRows];  // the six rows' scales, then their sums, of one group
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < kPanelRows; ++r) {
      sx_xs[r] = sx[r * G + g];
      sx_xs[kPanelRows + r] = xsum[r * G + g];
    }
    panel_group6<Bits == 4>(xp + g * (kGroup / 2), K / 2 * 4, panel + g * kGroup, d + g * kPanel, mn + g * kPanel, sx_xs, acc);
  }
  for (int64_t r = 0; r < kPanelRows; ++r)
    for (int64_t c = 0; c < width; c += kLanes) _mm256_storeu_ps(out + r * N + c, _mm256_load_ps(acc + r * kPanel + c));
}

// R (1-5) rows against one panel: panel_tile6's operations for the rows its 6-row tiles leave, so a
// row's bits do not depend on which tile it falls in. Intrinsics: R x 2 accumulators, 2 weights and
// an input fit the 16 registers (only 6 rows spilled).
template <int Bits, int R>
void panel_tile_few(const int32_t* xp, const float* sx, const float* xsum, int64_t K, const __m256i* panel,
                    const float* d, const float* mn, int64_t width, float* out, int64_t N) {
  const int64_t G = K / kGroup;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    const int32_t* xg = xp + g * (kGroup / 2);
    const __m256i* pg = panel + g * kGroup;
    for (int p = 0; p < kGroup / 2; ++p) {
      const __m256i w0 = _mm256_loadu_si256(pg + 2 * p), w1 = _mm256_loadu_si256(pg + 2 * p + 1);
      for (int r = 0; r < R; ++r) {
        const __m256i a = _mm256_set1_epi32(xg[r * K / 2 + p]);
        dot[r][0] = madd_acc(dot[r][0], w0, a);
        dot[r][1] = madd_acc(dot[r][1], w1, a);
      }
    }
    const __m256 d0 = _mm256_loadu_ps(d + g * kPanel), d1 = _mm256_loadu_ps(d + g * kPanel + kLanes);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sx[r * G + g]);
      acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][0]), _mm256_mul_ps(d0, s), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][1]), _mm256_mul_ps(d1, s), acc[r][1]);
    }
    if constexpr (Bits == 4) {
      const __m256 m0 = _mm256_loadu_ps(mn + g * kPanel), m1 = _mm256_loadu_ps(mn + g * kPanel + kLanes);
      for (int r = 0; r < R; ++r) {
        const __m256 t = _mm256_set1_ps(xsum[r * G + g]);
        acc[r][0] = _mm256_fmadd_ps(m0, t, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(m1, t, acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < width; c += kLanes) _mm256_storeu_ps(out + r * N + c, acc[r][c / kLanes]);
}

template <int Bits>
void panel_tile_rest(int64_t rows, const int32_t* xp, const float* sx, const float* xsum, int64_t K,
                     const __m256i* panel, const float* d, const float* mn, int64_t width, float* out, int64_t N) {
  switch (rows) {
    case 1: panel_tile_few<Bits, 1>(xp, sx, xsum, K, panel, d, mn, width, out, N); break;
    case 2: panel_tile_few<Bits, 2>(xp, sx, xsum, K, panel, d, mn, width, out, N); break;
    case 3: panel_tile_few<Bits, 3>(xp, sx, xsum, K, panel, d, mn, width, out, N); break;
    case 4: panel_tile_few<Bits, 4>(xp, sx, xsum, K, panel, d, mn, width, out, N); break;
    case 5: panel_tile_few<Bits, 5>(xp, sx, xsum, K, panel, d, mn, width, out, N); break;
    default: break;
  }
}

template <int Bits>
void panel_linear(int64_t M, int64_t K, int64_t NB, const int32_t* xp, const float* sx, const float* xs, const int32_t* qp,
                  const at::Half* sp, const at::Half* mp, float* op) {
  const int64_t G = K / kGroup, N = NB * kLanes, block_q = K * Bits / 32 * kLanes, block_s = G * kLanes;
  // Panels are claimed four at a time (parallel_chunks): a thread preempted by the HTTP thread or a
  // client leaves its panels to the other instead of stalling the call.
  parallel_chunks((NB + 1) / 2, 4, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<__m256i> panel;
    thread_local std::vector<float> d, mn;  // [G][16] scales and mins as fp32
    panel.resize(K);  // K/2 k pairs x 2 blocks
    d.resize(G * kPanel);
    mn.resize(G * kPanel);
    for (int64_t pn = p0; pn < p1; ++pn) {
      const int64_t b0 = 2 * pn, blocks = std::min<int64_t>(2, NB - b0);
      for (int64_t bb = 0; bb < blocks; ++bb) {
        unpack_block<Bits>(qp + (b0 + bb) * block_q, K, panel.data(), bb);
        block_values_fp32(sp + (b0 + bb) * block_s, G, d.data() + bb * kLanes);
        if (mp != nullptr) block_values_fp32(mp + (b0 + bb) * block_s, G, mn.data() + bb * kLanes);
      }
      // A half panel's second block keeps the previous panel's values: computed, never stored.
      int64_t m = 0;
      for (; m + kPanelRows <= M; m += kPanelRows)
        panel_tile6<Bits>(xp + m * K / 2, sx + m * G, xs + m * G, K, panel.data(), d.data(), mn.data(), blocks * kLanes,
                          op + m * N + b0 * kLanes, N);
      panel_tile_rest<Bits>(M - m, xp + m * K / 2, sx + m * G, xs + m * G, K, panel.data(), d.data(), mn.data(),
                            blocks * kLanes, op + m * N + b0 * kLanes, N);
    }
  });
}
#endif

#ifdef PHISERVE_AMX
// ---- Prefill rows on AMX: exact weights, activations split into two bf16 ---------------------------
// A prefill chunk is compute-bound, and a tile op does 16 x 16 x 32 multiply-adds (16 rows, 16
// features, one group of 32) where vpdpwssd does 16. The int4 values 0..15 are exact in bf16; each
// activation is split into hi = bf16(x) and lo = bf16(x - hi), so hi + lo keeps ~16 bits of x (the
// int16 path keeps 15 against its group's largest). Per group one tile sums q * hi then q * lo in
// fp32; then, as tile() does, out += scale * dot and out += min * sum(x) (exact fp32 sum), with a
// 16-feature fp32 vector per row. Every row takes the same operations whatever the row count or its
// 16-row tile (rows never mix in a tile op), so a prompt's rows do not depend on the batch or the
// chunking. The bits differ from the int16 path's, so prefill rows always take this one (the caller
// says which rows are prefill) and decode rows never do, whatever the load.

// Linux gives a process the tile state only on request (arch_prctl), once, for all its threads.
bool amx_usable() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTileRows = 16;

// n elements of v starting on a 64-byte boundary: a tile row that straddles two cache lines costs
// two line accesses (K is a multiple of 32, so every row of a tile then starts on a line).
template <typename T>
T* aligned64(std::vector<T>& v, int64_t n) {
  const int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(v.size()) < n + pad) v.resize(n + pad);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

// x [M, K] -> hi, lo bf16 [Mp, K] (Mp = M rounded up to 16; padding rows zero) and each (row, group)'s
// exact sum as group_max_and_sum adds it (the tile path's order), sums [Mp, G].
void split_bf16(const float* x, int64_t M, int64_t Mp, int64_t K, uint16_t* hi, uint16_t* lo, float* sums) {
  const int64_t G = K / kGroup;
  at::parallel_for(0, Mp * G, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i >= M * G) {
        std::fill(hi + i * kGroup, hi + (i + 1) * kGroup, 0);
        std::fill(lo + i * kGroup, lo + (i + 1) * kGroup, 0);
        sums[i] = 0.f;
        continue;
      }
      float amax;
      group_max_and_sum(x + i * kGroup, amax, sums[i]);
      for (int64_t j = 0; j < kGroup; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + i * kGroup + j);
        const __m256bh h = _mm512_cvtneps_pbh(v);  // round to nearest even
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i * kGroup + j), (__m256i)h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i * kGroup + j), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
      }
    }
  });
}

// Two blocks of 8 features (bb = 0, 1) as the tile op's B operand: per group 16 rows (k pairs) of 16
// features x (k = 2p, 2p + 1) bf16, the int16 panel's layout with each value 0..15 as its bf16 bits.
void unpack_block_bf16(const int32_t* q, int64_t K, uint16_t* panel, int64_t bb) {
  const int64_t G = K / kGroup, group_words = kGroup * 4 / 32 * kLanes;
  // bf16 of 0..15: 0, then 0x3f80 (1.0), 0x4000 (2), 0x4040 (3), ...
  const __m256i table = _mm256_setr_epi16(0, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110,
                                          0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170);
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* qg = q + g * group_words;
    uint16_t* dst = panel + g * kGroup * kPanel + bb * kPanel;  // row p of group g at + p * 32
    for (int v = 0; v < 4; ++v) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + v * kLanes));
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (4 * v + j) * 2 * kPanel),
                            _mm256_permutexvar_epi16(int4_plane(packed, j), table));
    }
  }
}

// Rows [0, M) of x against every feature, int4 weights; out rows at op + m * N.
void amx_int4_linear(int64_t M, int64_t K, int64_t NB, const float* x, const int32_t* qp, const at::Half* sp,
                     const at::Half* mp, float* op) {
  const int64_t G = K / kGroup, N = NB * kLanes, Mp = (M + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t block_q = K * 4 / 32 * kLanes, block_s = G * kLanes, panels = (NB + 1) / 2;
  constexpr int64_t kShare = 3;  // panels that share each load of an activation tile
  thread_local std::vector<uint16_t> hi_buf, lo_buf;
  thread_local std::vector<float> sum_buf;
  uint16_t* hi = aligned64(hi_buf, Mp * K);
  uint16_t* lo = aligned64(lo_buf, Mp * K);
  float* sums = aligned64(sum_buf, Mp * G);
  split_bf16(x, M, Mp, K, hi, lo, sums);
  parallel_chunks(panels, kShare, [&](int64_t p0, int64_t p1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {  // 0, 1: x hi, lo; then per panel j: 2 + 2j its dots (fp32), 3 + 2j its weights
      cfg.rows[t] = kTileRows;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    thread_local std::vector<uint16_t> panel_buf;
    thread_local std::vector<float> d, mn, dots_buf;
    uint16_t* panel = aligned64(panel_buf, kShare * K * kPanel);  // [panel j][G][16 k pairs][16 x 2]
    float* dots = aligned64(dots_buf, kShare * G * kTileRows * kPanel);  // [panel j][G][16 rows][16]
    d.resize(kShare * G * kPanel);
    mn.resize(kShare * G * kPanel);
    for (int64_t pa = p0; pa < p1; pa += kShare) {
      const int64_t np = std::min(kShare, p1 - pa);
      for (int64_t j = 0; j < np; ++j) {
        const int64_t b0 = 2 * (pa + j), blocks = std::min<int64_t>(2, NB - b0);
        for (int64_t bb = 0; bb < 2; ++bb) {  // a half panel's second block: the first's weights, never stored
          const int64_t b = bb < blocks ? b0 + bb : b0;
          unpack_block_bf16(qp + b * block_q, K, panel + j * K * kPanel, bb);
          block_values_fp32(sp + b * block_s, G, d.data() + j * G * kPanel + bb * kLanes);
          block_values_fp32(mp + b * block_s, G, mn.data() + j * G * kPanel + bb * kLanes);
        }
      }
      for (int64_t m0 = 0; m0 < Mp; m0 += kTileRows) {
        // Per group: the 16 rows' hi and lo tiles once, then for each panel its weight tile, two
        // products (hi then lo) and a store of the dots to `dots`. Reading those back waits until
        // every group is done (reading a tile store right away waits for it to land). A panel's ops
        // are the same whichever panels share the loads, so its bits are too.
        // Tiles as literal numbers (the intrinsics paste them into the asm).
#define PHISERVE_PANEL_DOTS(SUM, W, J)                                       \
  _tile_zero(SUM);                                                           \
  _tile_loadd(W, panel + (J) * K * kPanel + g * kGroup * kPanel, 64);        \
  _tile_dpbf16ps(SUM, 0, W);                                                 \
  _tile_dpbf16ps(SUM, 1, W);                                                 \
  _tile_stored(SUM, dots + ((J) * G + g) * kTileRows * kPanel, 64);
        for (int64_t g = 0; g < G; ++g) {
          _tile_loadd(0, hi + m0 * K + g * kGroup, K * 2);
          _tile_loadd(1, lo + m0 * K + g * kGroup, K * 2);
          PHISERVE_PANEL_DOTS(2, 3, 0)
          if (np > 1) {
            PHISERVE_PANEL_DOTS(4, 5, 1)
          }
          if (np > 2) {
            PHISERVE_PANEL_DOTS(6, 7, 2)
          }
        }
#undef PHISERVE_PANEL_DOTS
        for (int64_t j = 0; j < np; ++j) {
          __m512 acc[kTileRows];
#pragma GCC unroll 16
          for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_ps();
          for (int64_t g = 0; g < G; ++g) {  // out += scale * dots, then += min * sum(x), group by group
            const float* dg_rows = dots + (j * G + g) * kTileRows * kPanel;
            const __m512 dg = _mm512_loadu_ps(d.data() + (j * G + g) * kPanel), mg = _mm512_loadu_ps(mn.data() + (j * G + g) * kPanel);
#pragma GCC unroll 16
            for (int r = 0; r < kTileRows; ++r) {
              acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(dg_rows + r * kPanel), dg, acc[r]);
              acc[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(sums[(m0 + r) * G + g]), acc[r]);
            }
          }
          const int64_t b0 = 2 * (pa + j);
          const __mmask16 cols = NB - b0 >= 2 ? 0xFFFF : 0x00FF;
#pragma GCC unroll 16
          for (int r = 0; r < kTileRows; ++r)
            if (m0 + r < M) _mm512_mask_storeu_ps(op + (m0 + r) * N + b0 * kLanes, cols, acc[r]);
        }
      }
    }
    _tile_release();
  });
}
#endif

// Rows [0, M) of x (quantized to int16 pairs) into out rows op + m * N.
template <int Bits>
void weight_only_rows(int64_t M, int64_t K, int64_t NB, const float* x, const int32_t* qp, const at::Half* sp,
                      const at::Half* mp, float* op) {
  const int64_t N = NB * kLanes, G = K / kGroup;
  const QuantizedRows xq = quantize_rows(x, M, K);
  const int32_t* xp = xq.pairs;
  const float* sx = xq.scale;
  const float* xs = xq.sum;
#ifdef PHISERVE_PANEL_ASM
  if (M >= panel_min_rows(Bits)) {
    panel_linear<Bits>(M, K, NB, xp, sx, xs, qp, sp, mp, op);
    return;
  }
#endif
  const int64_t block_q = K * Bits / 32 * kLanes, block_s = G * kLanes;
  // Work is split over pairs of feature blocks, never over K. Up to a few rows the kernel streams
  // its weights from memory: each thread takes one contiguous half (its prefetches run ahead in its
  // own half). From 8 rows it is compute-bound: threads claim 4 pairs at a time (A/B in one process,
  // 30 layers' weights: 16 rows -2% to +11% alone, +13% beside a bursty process; 1-4 rows were 3-14%
  // slower that way, their streams cut up).
  const int64_t pairs = (NB + 1) / 2, threads = at::get_num_threads();
  parallel_chunks(pairs, M < 8 ? (pairs + threads - 1) / threads : 4, [&](int64_t p0, int64_t p1) {
    for (int64_t b = 2 * p0; b < std::min(NB, 2 * p1); b += 2) {
      const int64_t blocks = std::min<int64_t>(2, NB - b);
      for (int64_t bb = 0; bb < blocks; ++bb) {
        const int32_t* q = qp + (b + bb) * block_q;
        const at::Half* s = sp + (b + bb) * block_s;
        const at::Half* mn = mp != nullptr ? mp + (b + bb) * block_s : nullptr;
        float* o = op + (b + bb) * kLanes;
        int64_t m = 0;
#ifdef PHISERVE_AVX2
        if (M == 1 && blocks == 2) {  // one row: both blocks at once, so more independent chains overlap
          tile<Bits, 1, 2>(xp, sx, xs, K, q, s, mn, o, N);
          break;
        }
        for (; m + 4 <= M; m += 4) tile<Bits, 4, 1>(xp + m * K / 2, sx + m * G, xs + m * G, K, q, s, mn, o + m * N, N);
        for (; m + 2 <= M; m += 2) tile<Bits, 2, 1>(xp + m * K / 2, sx + m * G, xs + m * G, K, q, s, mn, o + m * N, N);
        for (; m < M; ++m) tile<Bits, 1, 1>(xp + m * K / 2, sx + m * G, xs + m * G, K, q, s, mn, o + m * N, N);
#endif
        tile_scalar<Bits>(xp + m * K / 2, sx + m * G, xs + m * G, M - m, K, q, s, mn, o + m * N, N);
      }
    }
  });
}

// Whether prefill rows take their own kernel (AMX) here: then their bits differ from decode rows'.
bool has_prefill_kernel() {
#ifdef PHISERVE_AMX
  return amx_usable();
#else
  return false;
#endif
}

// The first `prefill_rows` rows are prompt rows: they take the AMX kernel where the CPU has one;
// every other row (and every row elsewhere) the int16 path.
template <int Bits>
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor* mins, int64_t prefill_rows = 0) {
  check_weight_only_args(x, qweight, scales, mins, Bits);
  const int64_t M = x.size(0), K = x.size(1), NB = qweight.size(0), N = NB * kLanes;
  TORCH_CHECK(prefill_rows >= 0 && prefill_rows <= M, "prefill_rows must be in [0, rows]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  const int32_t* qp = qweight.data_ptr<int32_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = mins != nullptr ? mins->data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  int64_t m = 0;
#ifdef PHISERVE_AMX
  if (Bits == 4 && prefill_rows > 0 && amx_usable()) {
    amx_int4_linear(prefill_rows, K, NB, xp, qp, sp, mp, op);
    m = prefill_rows;
  }
#endif
  if (m < M) weight_only_rows<Bits>(M - m, K, NB, xp + m * K, qp, sp, mp, op + m * N);
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                       int64_t prefill_rows) {
  return weight_only_linear<4>(x, qweight, scales, &mins, prefill_rows);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return weight_only_linear<8>(x, qweight, scales, nullptr);
}

// ---- fp32 register tile (prefill attention's two products) ---------------------------------------
// Each (row, column) is one FMA chain over k in order, so a row's result never depends on the others.
// R rows (R <= kPanelRows) of x (row r at x + r * ldx, K values) against a panel's first `width`
// (8 or 16) features; row r's results go to out + r * N.
template <int R>
void panel_tile(const float* x, int64_t ldx, int64_t K, const float* panel, int64_t width, float* out, int64_t N) {
#ifdef PHISERVE_AVX2
  // Named accumulators, not an array: GCC kept an array's 12 accumulators in memory, storing them at
  // every k (measured 27 instead of ~70 GMAC/s).
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero;
  __m256 c30 = zero, c31 = zero, c40 = zero, c41 = zero, c50 = zero, c51 = zero;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + kLanes);
#define PHISERVE_PANEL_ROW(r)                                   \
  if constexpr (R > r) {                                        \
    const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);      \
    c##r##0 = _mm256_fmadd_ps(a, w0, c##r##0);                  \
    c##r##1 = _mm256_fmadd_ps(a, w1, c##r##1);                  \
  }
    PHISERVE_PANEL_ROW(0) PHISERVE_PANEL_ROW(1) PHISERVE_PANEL_ROW(2)
    PHISERVE_PANEL_ROW(3) PHISERVE_PANEL_ROW(4) PHISERVE_PANEL_ROW(5)
#undef PHISERVE_PANEL_ROW
  }
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * N, acc[r][0]);
    if (width > kLanes) _mm256_storeu_ps(out + r * N + kLanes, acc[r][1]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < width; ++c) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * ldx + k], panel[k * kPanel + c], acc);
      out[r * N + c] = acc;
    }
#endif
}

// panel_tile for a run-time row count R (1..kPanelRows).
inline void panel_rows(int64_t R, const float* x, int64_t ldx, int64_t K, const float* panel, int64_t width, float* out, int64_t N) {
  switch (R) {
    case 6: panel_tile<6>(x, ldx, K, panel, width, out, N); break;
    case 5: panel_tile<5>(x, ldx, K, panel, width, out, N); break;
    case 4: panel_tile<4>(x, ldx, K, panel, width, out, N); break;
    case 3: panel_tile<3>(x, ldx, K, panel, width, out, N); break;
    case 2: panel_tile<2>(x, ldx, K, panel, width, out, N); break;
    case 1: panel_tile<1>(x, ldx, K, panel, width, out, N); break;
    default: break;
  }
}

// Attention of single-token decode rows over their paged context (the new token's K/V already
// written). q [B, H, D]; k_cache, v_cache [slots, KVH, D]; block_tables [B, max_blocks] int32;
// context_lens [B] int32. Returns [B, H, D].
#ifdef PHISERVE_AVX2
// out[g, d0:d0+32] = sum_t p[g, t] * v_t[d0:d0+32] for GC (<= 3) heads, accumulated in 12 registers:
// the same FMA chain over t per output as accumulating in memory, without a store and reload of
// every accumulator at every t (which bound the loop at one 256-bit store a cycle).
template <int GC, typename CacheT>
void weighted_sum_of_rows_32(const float* p, int64_t len, const CacheT* vp, const int64_t* rows, int64_t d0, float* out, int64_t D) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero;
  __m256 a20 = zero, a21 = zero, a22 = zero, a23 = zero;
  for (int64_t t = 0; t < len; ++t) {
    if (t + 32 < len) __builtin_prefetch(vp + rows[t + 32] + d0);
    const CacheT* v = vp + rows[t] + d0;
    const __m256 v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
#define PHISERVE_PV_HEAD(g)                                  \
  if constexpr (GC > g) {                                    \
    const __m256 w = _mm256_broadcast_ss(p + g * len + t);   \
    a##g##0 = _mm256_fmadd_ps(w, v0, a##g##0);               \
    a##g##1 = _mm256_fmadd_ps(w, v1, a##g##1);               \
    a##g##2 = _mm256_fmadd_ps(w, v2, a##g##2);               \
    a##g##3 = _mm256_fmadd_ps(w, v3, a##g##3);               \
  }
    PHISERVE_PV_HEAD(0) PHISERVE_PV_HEAD(1) PHISERVE_PV_HEAD(2)
#undef PHISERVE_PV_HEAD
  }
  const __m256 acc[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + g * D + d0 + 8 * j, acc[g][j]);
}

// scores[g * stride] = dot(q_g, k) * sc for GC (<= 4) query heads sharing one K row: the row is
// converted once for all of them, and each dot is dot()'s own chain (even and odd 8-lane halves,
// then one horizontal sum), so the bits are dot()'s.
template <int GC, typename CacheT>
inline void dot_heads_n(const float* q, const CacheT* k, int64_t D, float sc, float* scores, int64_t stride) {
  __m256 s[GC][2];
  for (int g = 0; g < GC; ++g) s[g][0] = s[g][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    const __m256 k0 = load8(k + i), k1 = load8(k + i + 8);
    for (int g = 0; g < GC; ++g) {
      s[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + i), k0, s[g][0]);
      s[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + i + 8), k1, s[g][1]);
    }
  }
  for (int g = 0; g < GC; ++g) scores[g * stride] = hsum(_mm256_add_ps(s[g][0], s[g][1])) * sc;
}

template <typename CacheT>
inline void dot_heads(const float* q, int64_t G, const CacheT* k, int64_t D, float sc, float* scores, int64_t stride) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const float* qg = q + g0 * D;
    float* sg = scores + g0 * stride;
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: dot_heads_n<4>(qg, k, D, sc, sg, stride); break;
      case 3: dot_heads_n<3>(qg, k, D, sc, sg, stride); break;
      case 2: dot_heads_n<2>(qg, k, D, sc, sg, stride); break;
      default: dot_heads_n<1>(qg, k, D, sc, sg, stride); break;
    }
  }
}

// All G heads' weighted sums (probabilities p [G, len]) over 32-column slices, three heads at a time.
template <typename CacheT>
void weighted_sum_of_rows(const float* p, int64_t len, int64_t G, const CacheT* vp, const int64_t* rows, int64_t D, float* out) {
  for (int64_t g0 = 0; g0 < G; g0 += 3)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const float* pg = p + g0 * len;
      float* og = out + g0 * D;
      switch (std::min<int64_t>(3, G - g0)) {
        case 3: weighted_sum_of_rows_32<3>(pg, len, vp, rows, d0, og, D); break;
        case 2: weighted_sum_of_rows_32<2>(pg, len, vp, rows, d0, og, D); break;
        default: weighted_sum_of_rows_32<1>(pg, len, vp, rows, d0, og, D); break;
      }
    }
}
#endif

template <typename CacheT>
void decode_attention_impl(const float* qp, const CacheT* kp, const CacheT* vp, const int32_t* bt, const int32_t* lens,
                           float* op, int64_t B, int64_t H, int64_t D, int64_t KVH, int64_t MB, int64_t block_size, float sc) {
  const int64_t G = H / KVH;
  // A task is one row's KV head (the G query heads of a KV head go together, so each K and V row is
  // read once), or with enough rows to keep every thread busy, all of a row's KV heads: its slots
  // ([KVH, D] each) are then read as one stream instead of KVH strided ones. Each head's arithmetic
  // is the same either way, so the choice never changes a result.
  const bool whole_rows = B >= 2 * at::get_num_threads();
  const int64_t tasks_per_row = whole_rows ? 1 : KVH;
  auto run = [&](auto whole_row) {  // compiled twice: with one KV head a task, the head loop folds away
    const int64_t heads_per_task = decltype(whole_row)::value ? KVH : 1;
    const int64_t slot_elems = KVH * D, lines = std::max<int64_t>(1, heads_per_task * D * static_cast<int64_t>(sizeof(CacheT)) / 64);
    at::parallel_for(0, B * tasks_per_row, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores, acc(G * D);
      std::vector<int64_t> rows;  // offset of each context token's slot in the caches
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / tasks_per_row, h0 = task % tasks_per_row * heads_per_task;
        const int64_t len = lens[b];
        const int32_t* table = bt + b * MB;
        rows.resize(len);
        for (int64_t t = 0; t < len; ++t) rows[t] = (static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size) * slot_elems;
        scores.resize(heads_per_task * G * len);  // [(kv head - h0) * G + g][t]
        const CacheT* kh0 = kp + h0 * D;
        constexpr int64_t kAhead = 32;  // rows are scattered over blocks: prefetch ahead of use
        for (int64_t t = 0; t < len; ++t) {
          if (t + kAhead < len)
            for (int64_t line = 0; line < lines; ++line) {
              __builtin_prefetch(reinterpret_cast<const char*>(kh0 + rows[t + kAhead]) + 64 * line);
              // whole rows: their V slots too, so the weighted sums below find them in cache (a row's
              // K and V stream from memory together; +8-20% at 4-16 rows, slower for one hot row)
              if constexpr (decltype(whole_row)::value)
                __builtin_prefetch(reinterpret_cast<const char*>(vp + rows[t + kAhead]) + 64 * line, 0, 2);
            }
          for (int64_t j = 0; j < heads_per_task; ++j) {
            const CacheT* krow = kh0 + rows[t] + j * D;
            const float* qh = qp + (b * H + (h0 + j) * G) * D;
            float* sj = scores.data() + j * G * len + t;
#ifdef PHISERVE_AVX2
            if (D % 16 == 0) {
              dot_heads(qh, G, krow, D, sc, sj, len);
              continue;
            }
#endif
            for (int64_t g = 0; g < G; ++g) sj[g * len] = dot(qh + g * D, krow, D) * sc;
          }
        }
        for (int64_t g = 0; g < heads_per_task * G; ++g) {
          float* sg = scores.data() + g * len;
          const float mx = *std::max_element(sg, sg + len);
          float total = 0.f;
          int64_t t = 0;
#ifdef PHISERVE_AVX2
          __m256 vtotal = _mm256_setzero_ps();
          for (; t + 8 <= len; t += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sg + t), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(sg + t, e);
            vtotal = _mm256_add_ps(vtotal, e);
          }
          total = hsum(vtotal);
#endif
          for (; t < len; ++t) {
            sg[t] = std::exp(sg[t] - mx);
            total += sg[t];
          }
          const float inv = 1.f / total;
          for (t = 0; t < len; ++t) sg[t] *= inv;
        }
        for (int64_t j = 0; j < heads_per_task; ++j) {
          const CacheT* vh = vp + (h0 + j) * D;
          const float* pj = scores.data() + j * G * len;
          float* out = op + (b * H + (h0 + j) * G) * D;
#ifdef PHISERVE_AVX2
          if (D % 32 == 0) {
            weighted_sum_of_rows(pj, len, G, vh, rows.data(), D, out);
            continue;
          }
#endif
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t t = 0; t < len; ++t) {
            if (t + kAhead < len)
              for (int64_t off = 0; off < D; off += 16) __builtin_prefetch(vh + rows[t + kAhead] + off);
            const CacheT* vrow = vh + rows[t];
            for (int64_t g = 0; g < G; ++g) {
              const float pr = pj[g * len + t];
              float* a = acc.data() + g * D;
              int64_t i = 0;
#ifdef PHISERVE_AVX2
              const __m256 pv = _mm256_set1_ps(pr);
              for (; i + 8 <= D; i += 8) _mm256_storeu_ps(a + i, _mm256_fmadd_ps(pv, load8(vrow + i), _mm256_loadu_ps(a + i)));
#endif
              for (; i < D; ++i) a[i] += pr * to_float(vrow[i]);
            }
          }
          std::copy(acc.begin(), acc.end(), out);
        }
      }
    });
  };
  if (whole_rows)
    run(std::true_type{});
  else
    run(std::false_type{});
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B, H, D]");
  check_caches(k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "block_tables, context_lens: contiguous int32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), MB = block_tables.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D && block_tables.size(0) == B && context_lens.size(0) == B,
              "shapes do not match");
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // checked here: an exception must not leave the parallel region
    TORCH_CHECK(lens[b] > 0 && lens[b] <= MB * block_size, "context length out of range");
  }
  at::Tensor out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kHalf)
    decode_attention_impl(qp, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), bt, lens, out.data_ptr<float>(), B, H, D, KVH, MB, block_size, sc);
  else
    decode_attention_impl(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt, lens, out.data_ptr<float>(), B, H, D, KVH, MB, block_size, sc);
  return out;
}

// Causal attention of one sequence's prefill chunk over the paged cache. q [n, H, D]: the chunk's
// tokens, at positions start .. start + n - 1; slots [start + n] int64: the cache slots of every key
// up to the chunk's end (the chunk's own already written). Query i attends to keys 0 .. start + i.
// Keys and values are read from the cache, as decode reads them, so a row's result depends only on
// its query and its context: not on how the prompt was chunked or what else the batch holds.
// Both products run on panel_tile, the fp32 register tile: K is repacked per KV head as
// 16-key panels [D][16] (scores = q . k, one FMA chain over d, then * scale) and V as 16-dim panels
// [keys][16] (out = sum_t p_t v_t, one chain over keys in order). Rows go six queries of one head at
// a time; their softmax is exact (max, exp, sum over the whole row), with masked keys set to 0, so
// the panel columns past a row's own context add exact zeros.
template <typename CacheT>
void prefill_attention_impl(const float* qp, const CacheT* kc, const CacheT* vc, const int64_t* slots, int64_t n,
                            int64_t start, int64_t H, int64_t KVH, int64_t D, float sc, float* op) {
  const int64_t L = start + n, P = (L + kPanel - 1) / kPanel, L16 = P * kPanel, G = H / KVH, DP = D / kPanel;
  // kt[kvh][p][d][j] = k[key p * 16 + j][kvh][d]; vt[kvh][dp][key][j] = v[key][kvh][dp * 16 + j]; zero past L
  // (every element is written: no zero-initialisation)
  std::unique_ptr<float[]> kt(new float[KVH * L16 * D]), vt(new float[KVH * L16 * D]);
  at::parallel_for(0, KVH * P, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t kvh = i / P, p = i % P;
      float* kpanel = kt.get() + (kvh * P + p) * D * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t key = p * kPanel + j;
        float* vkey = vt.get() + (kvh * DP * L16 + key) * kPanel;  // + dp * L16 * kPanel for dims dp*16..
        if (key >= L) {
          for (int64_t d = 0; d < D; ++d) kpanel[d * kPanel + j] = 0.f;
          for (int64_t dp = 0; dp < DP; ++dp) std::fill(vkey + dp * L16 * kPanel, vkey + dp * L16 * kPanel + kPanel, 0.f);
          continue;
        }
        const CacheT* krow = kc + (slots[key] * KVH + kvh) * D;
        const CacheT* vrow = vc + (slots[key] * KVH + kvh) * D;
        for (int64_t d = 0; d < D; ++d) kpanel[d * kPanel + j] = to_float(krow[d]);
        for (int64_t dp = 0; dp < DP; ++dp)
          for (int64_t e = 0; e < kPanel; ++e) vkey[dp * L16 * kPanel + e] = to_float(vrow[dp * kPanel + e]);
      }
    }
  });
  const int64_t blocks = (n + kPanelRows - 1) / kPanelRows;
  // Later query blocks see more keys: hand them out first, so the threads finish together.
  parallel_chunks(blocks * H, 1, [&](int64_t item, int64_t) {
    const int64_t block = blocks - 1 - item / H, h = item % H, kvh = h / G;
    const int64_t r0 = block * kPanelRows, R = std::min(kPanelRows, n - r0);
    const int64_t C = (start + r0 + R + kPanel - 1) / kPanel * kPanel;  // key columns this block needs
    thread_local std::vector<float> scores;  // every column this block reads is written first
    if (scores.size() < static_cast<size_t>(kPanelRows * C)) scores.resize(kPanelRows * C);
    const float* q = qp + (r0 * H + h) * D;
    for (int64_t p = 0; p < C / kPanel; ++p)
      panel_rows(R, q, H * D, D, kt.get() + (kvh * P + p) * D * kPanel, kPanel, scores.data() + p * kPanel, C);
    for (int64_t r = 0; r < R; ++r) {
      float* s = scores.data() + r * C;
      const int64_t visible = start + r0 + r + 1;
      float mx = -INFINITY;
      for (int64_t t = 0; t < visible; ++t) {
        s[t] *= sc;
        mx = std::max(mx, s[t]);
      }
      int64_t t = 0;
#ifdef PHISERVE_AVX2
      for (; t + 8 <= visible; t += 8) _mm256_storeu_ps(s + t, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(mx))));
#endif
      for (; t < visible; ++t) s[t] = std::exp(s[t] - mx);
      std::fill(s + visible, s + C, 0.f);
      float total = 0.f;
      t = 0;
#ifdef PHISERVE_AVX2
      __m256 vtotal = _mm256_setzero_ps();
      for (; t + 8 <= C; t += 8) vtotal = _mm256_add_ps(vtotal, _mm256_loadu_ps(s + t));
      total = hsum(vtotal);
#endif
      for (; t < C; ++t) total += s[t];
      const float inv = 1.f / total;
      for (t = 0; t < visible; ++t) s[t] *= inv;
    }
    for (int64_t dp = 0; dp < DP; ++dp)
      panel_rows(R, scores.data(), C, C, vt.get() + (kvh * DP + dp) * L16 * kPanel, kPanel, op + (r0 * H + h) * D + dp * kPanel, H * D);
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                             int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [n, H, D]");
  check_caches(k_cache, v_cache);
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D && D % kPanel == 0, "shapes do not match (head size a multiple of 16)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && start >= 0 && slots.numel() == start + n,
              "slots: int64 [start + n]");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) TORCH_CHECK(sl[i] >= 0 && sl[i] < k_cache.size(0), "slot out of range");
  at::Tensor out = at::empty_like(q);
  if (n == 0) return out;
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kHalf)
    prefill_attention_impl(q.data_ptr<float>(), k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), sl, n, start, H, KVH, D, sc, out.data_ptr<float>());
  else
    prefill_attention_impl(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sl, n, start, H, KVH, D, sc, out.data_ptr<float>());
  return out;
}

// RMSNorm of each row of x [T, D] with weight w [D]; with `residual`, first x += residual in place (the
// decoder's residual add fused into the norm that follows it). Rows are independent, fixed order.
at::Tensor rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [T, D]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1), "w: float32 [D]");
  const int64_t T = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* rp = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->sizes() == x.sizes(),
                "residual: contiguous float32 like x");
    rp = residual->data_ptr<float>();
  }
  const float* wp = w.data_ptr<float>();
  at::Tensor out = at::empty_like(x);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* xr = xp + t * D;
      if (rp != nullptr)
        for (int64_t i = 0; i < D; ++i) xr[i] += rp[t * D + i];
      const float inv = 1.f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) op[t * D + i] = xr[i] * inv * wp[i];
    }
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) { return rms_norm_impl(x, c10::nullopt, w, eps); }

at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps) {
  return rms_norm_impl(x, residual, w, eps);
}

// Rotary embedding (Hugging Face / NeoX halves) of the q and k parts of the fused qkv projection
// [T, (H + 2 KVH) * D], and the write of k and v into the paged cache at slot_mapping [T].
// cos, sin: [T, D/2]. Returns q, k, v as contiguous [T, H or KVH, D] (prefill attention reads k, v).
std::vector<at::Tensor> rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv: contiguous float32 [T, *]");
  const int64_t T = qkv.size(0), H = num_heads, KVH = num_kv_heads, D = qkv.size(1) / (H + 2 * KVH), half = D / 2;
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D && D % 2 == 0, "qkv width must be (H + 2 KVH) * D");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == T * half && sin.numel() == T * half,
              "cos, sin: contiguous float32 [T, D/2]");
  check_caches(k_cache, v_cache);
  TORCH_CHECK(k_cache.size(1) == KVH && k_cache.size(2) == D, "caches: [slots, KVH, D] with this qkv's KVH and D");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == T, "slot_mapping: int64 [T]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range");
  at::Tensor q = at::empty({T, H, D}, qkv.options()), k = at::empty({T, KVH, D}, qkv.options()),
             v = at::empty({T, KVH, D}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool half_cache = k_cache.scalar_type() == at::kHalf;
  void* const k_base = k_cache.data_ptr();
  void* const v_base = v_cache.data_ptr();
  auto store = [&](void* cache, int64_t slot, const float* src) {
    const int64_t n = KVH * D;
    if (half_cache) {
      at::Half* dst = static_cast<at::Half*>(cache) + slot * n;
      int64_t i = 0;
#ifdef PHISERVE_AVX2
      // F16C rounds to nearest even like at::Half's software conversion: the same bits, 8 at a time
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
      for (; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
    } else {
      std::copy(src, src + n, static_cast<float*>(cache) + slot * n);
    }
  };
  const int64_t width = qkv.size(1);
  at::parallel_for(0, T, 32, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = src + t * width;
      const float* c = cp + t * half;
      const float* sn = sp + t * half;
      auto rotate = [&](const float* x, float* out) {
        for (int64_t i = 0; i < half; ++i) {
          out[i] = x[i] * c[i] - x[i + half] * sn[i];
          out[i + half] = x[i + half] * c[i] + x[i] * sn[i];
        }
      };
      for (int64_t h = 0; h < H; ++h) rotate(row + h * D, qp + (t * H + h) * D);
      for (int64_t h = 0; h < KVH; ++h) rotate(row + (H + h) * D, kp + (t * KVH + h) * D);
      std::copy(row + (H + KVH) * D, row + (H + 2 * KVH) * D, vp + t * KVH * D);
      store(k_base, slots[t], kp + t * KVH * D);
      store(v_base, slots[t], vp + t * KVH * D);
    }
  });
  return {q, k, v};
}

// silu(gate) * up for the fused gate_up projection [T, 2I] -> [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up: contiguous float32 [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = src + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
#ifdef PHISERVE_AVX2
      // sigmoid from exp(-|g|) <= 1: no overflow for any g
      const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_nonpositive(_mm256_or_ps(gv, sign));  // exp(-|g|)
        const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e)), neg = _mm256_div_ps(e, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(pos, neg, gv);  // sign bit of g picks neg
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) {
        const float e = std::exp(-std::fabs(g[i]));
        const float sig = g[i] >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
        o[i] = g[i] * sig * u[i];
      }
    }
  });
  return out;
}

// A linear layer in one of our kernels' formats: int4 when `mins` has elements, else group-32 int8.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins) {
  return mins.numel() > 0 ? int4_linear(x, qweight, scales, mins, 0) : int8_linear(x, qweight, scales);
}

// Tensors per layer in decode_layers' `weights`: input norm; qkv (qweight, scales, mins); o (3);
// post-attention norm; gate_up (3); down (3). An empty `mins` marks an int8 layer.
constexpr size_t kLayerTensors = 14;

// Every decoder layer of a decode-only step (one new token per row, all layers in our kernels'
// formats): the same kernels in the same order as the Python decoder (models/decoder.py), so the
// same bits, in one call instead of ~10 per layer. The per-op Python and dispatcher work between
// kernels was ~5 ms of a 14 ms one-user step, and its gaps let the OpenMP workers fall asleep.
// x [B, hidden]: the residual stream, updated in place. Returns the last layer's output, not yet
// added (the final norm adds it, as the next layer's norm does inside the loop).
at::Tensor decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, int64_t block_size, at::TensorList weights, int64_t num_heads,
                         int64_t num_kv_heads, double eps, double scale) {
  const size_t L = k_caches.size();
  TORCH_CHECK(L > 0 && v_caches.size() == L && weights.size() == L * kLayerTensors,
              "decode_layers: one k and v cache and 14 weight tensors per layer");
  const int64_t T = x.size(0);
  at::Tensor delta;
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + i * kLayerTensors;
    at::Tensor h = rms_norm_impl(x, i == 0 ? c10::nullopt : c10::optional<at::Tensor>(delta), w[0], eps);
    const std::vector<at::Tensor> qkv =
        rope_and_cache(packed_linear(h, w[1], w[2], w[3]), cos, sin, k_caches[i], v_caches[i], slot_mapping, num_heads, num_kv_heads);
    const at::Tensor o = paged_decode_attention(qkv[0], k_caches[i], v_caches[i], block_tables, context_lens, block_size, scale);
    h = rms_norm_impl(x, packed_linear(o.view({T, -1}), w[4], w[5], w[6]), w[7], eps);
    delta = packed_linear(silu_mul(packed_linear(h, w[8], w[9], w[10])), w[11], w[12], w[13]);
  }
  return delta;
}

// ---- sampler: top-k / top-p / min-p draws within each row's `width` most likely tokens -------------
// The semantics of Sampler._draw_candidates (engine/sampler.py), one row per task, with no
// full-vocabulary pass but one selection scan: top-k and top-p cut at a logit value (ties kept), the
// top-p mass is normalised over the row's top-k survivors (over the whole row, `row_lse`, without
// top-k), min-p is relative to the most likely survivor, and the draw walks the survivors in token-id
// order by inverse CDF (float64) with the row's uniform `u`. A row whose survivors may reach past its
// slice returns -1: the caller retries it wider.
struct Candidate {
  float value;
  int64_t id;
};

// The W largest values of x[0, V) into `slice`, largest first: a min-heap of the best so far, fed
// by a scan that compares eight values at a time against its smallest (almost every group has none
// above it). Which of several values tied at the boundary is kept depends only on the row.
void select_top(const float* x, int64_t V, int64_t W, std::vector<Candidate>& slice) {
  slice.clear();
  // larger value first; as the heap's order it keeps the smallest kept value at the front
  auto larger_first = [](const Candidate& a, const Candidate& b) { return a.value > b.value; };
  const int64_t fill = std::min(W, V);
  for (int64_t i = 0; i < fill; ++i) slice.push_back({x[i], i});
  std::make_heap(slice.begin(), slice.end(), larger_first);
  auto offer = [&](int64_t i) {
    if (x[i] > slice.front().value) {
      std::pop_heap(slice.begin(), slice.end(), larger_first);
      slice.back() = {x[i], i};
      std::push_heap(slice.begin(), slice.end(), larger_first);
    }
  };
  int64_t i = fill;
#ifdef PHISERVE_AVX2
  for (; i + 8 <= V; i += 8) {
    const __m256 above = _mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(slice.front().value), _CMP_GT_OQ);
    if (_mm256_movemask_ps(above) == 0) continue;
    for (int64_t j = i; j < i + 8; ++j) offer(j);
  }
#endif
  for (; i < V; ++i) offer(i);
  std::sort(slice.begin(), slice.end(), larger_first);
}

// torch.topk(x, k).indices for float32 rows (the rescored output head's candidates), by select_top.
at::Tensor top_k_indices(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "top_k_indices: x must be contiguous float32 [R, V]");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "top_k_indices: k must be in [1, V]");
  at::Tensor out = at::empty({R, k}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Candidate> slice;
    slice.reserve(k);
    for (int64_t r = r0; r < r1; ++r) {
      select_top(xp + r * V, V, k, slice);
      for (int64_t j = 0; j < k; ++j) op[r * k + j] = slice[j].id;
    }
  });
  return out;
}

// out[r, j] = dot(x[r], w[idx[r, j]]): the rescored output head's candidates recomputed in fp32 from
// the weight in place. torch's gather copied ~2.4 MB of cold rows a 16-row step first (~1 ms of ~1.3).
at::Tensor rows_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1),
              "rows_dot: x [M, K] and w [V, K] must be contiguous float32");
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.size(0) == x.size(0),
              "rows_dot: idx must be contiguous int64 [M, k]");
  const int64_t M = idx.size(0), k = idx.size(1), K = x.size(1), V = w.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * k; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < V, "rows_dot: index out of range");
  at::Tensor out = at::empty({M, k}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M * k, 16, [&](int64_t i0, int64_t i1) {
    constexpr int64_t kAhead = 4;  // rows are scattered over the vocabulary: fetch a few ahead
    for (int64_t i = i0 - kAhead; i < i1; ++i) {
      if (i + kAhead < i1)
        for (int64_t c = 0; c < K; c += 16) __builtin_prefetch(wp + ip[i + kAhead] * K + c);
      if (i >= i0) op[i] = dot(xp + i / k * K, wp + ip[i] * K, K);
    }
  });
  return out;
}

int64_t sample_row(const float* x, int64_t V, int64_t W, int64_t k, float top_p, float min_p, double u, float row_lse,
                   std::vector<Candidate>& slice, std::vector<float>& probs) {
  select_top(x, V, W, slice);
  const bool k_on = k > 0 && k < V;
  const float kth = slice[(k_on ? std::min(k, W) : W) - 1].value;
  const float last = slice[W - 1].value;
  const bool k_inside = k_on && last < kth;
  const bool p_on = top_p < 1.0f;
  bool resolved = k_inside && !p_on;
  int64_t n = 0;  // survivors: slice[0, n) (values descending; every cut keeps a prefix)
  while (n < W && slice[n].value >= kth) ++n;
  if (p_on) {
    float lse = row_lse;
    if (k_inside) {
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += std::exp(slice[j].value - slice[0].value);
      lse = slice[0].value + std::log(sum);
    }
    float cum = 0.0f;
    int64_t n_keep = 0;
    for (int64_t j = 0; j < W; ++j) {
      const float p = j < n ? std::exp(slice[j].value - lse) : 0.0f;
      cum += p;
      if (cum - p < top_p) ++n_keep;  // the strictly more likely tokens hold < top_p of the mass
    }
    const float cut = slice[std::max<int64_t>(n_keep, 1) - 1].value;
    const bool nucleus_inside = cum >= top_p && last < cut;
    resolved = k_inside || (!k_on && nucleus_inside);
    while (n > 1 && slice[n - 1].value < cut) --n;
  }
  if (!resolved) return -1;
  // min-p: the survivors' probabilities relative to the most likely one (slice[0])
  const float top = slice[0].value;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(slice[j].value - top);
  const float first = 1.0f / sum;
  while (n > 1 && std::exp(slice[n - 1].value - top) / sum < min_p * first) --n;
  std::sort(slice.begin(), slice.begin() + n, [](const Candidate& a, const Candidate& b) { return a.id < b.id; });
  probs.resize(n);
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += probs[j] = std::exp(slice[j].value - top);
  double cdf_total = 0.0;
  for (int64_t j = 0; j < n; ++j) cdf_total += static_cast<double>(probs[j] / total);
  const double target = u * cdf_total;
  double cdf = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    cdf += static_cast<double>(probs[j] / total);
    if (cdf > target) return slice[j].id;
  }
  return slice[n - 1].id;
}

at::Tensor sample_candidates(const at::Tensor& x, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                             const at::Tensor& u, const at::Tensor& row_lse, int64_t width) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "sample_candidates: x must be contiguous float32 [R, V]");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(width >= 1 && width <= V, "sample_candidates: width must be in [1, V]");
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_p.scalar_type() == at::kFloat && min_p.scalar_type() == at::kFloat &&
                  u.scalar_type() == at::kDouble && row_lse.scalar_type() == at::kFloat,
              "sample_candidates: top_k int64, top_p/min_p/row_lse float32, u float64");
  TORCH_CHECK(top_k.numel() == R && top_p.numel() == R && min_p.numel() == R && u.numel() == R && row_lse.numel() == R,
              "sample_candidates: one parameter per row");
  const at::Tensor k = top_k.contiguous(), p = top_p.contiguous(), mp = min_p.contiguous(), uu = u.contiguous(), lse = row_lse.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const float *pp = p.data_ptr<float>(), *mpp = mp.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const double* up = uu.data_ptr<double>();
  at::Tensor out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Candidate> slice;
    std::vector<float> probs;
    slice.reserve(width);
    for (int64_t r = r0; r < r1; ++r) op[r] = sample_row(xp + r * V, V, width, kp[r], pp[r], mpp[r], up[r], lp[r], slice, probs);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(phiserve, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int prefill_rows=0) -> Tensor");
  m.def("has_prefill_kernel() -> bool", &has_prefill_kernel);  // no tensors: not dispatched by device
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("rope_and_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, int num_heads, int num_kv_heads) -> Tensor[]");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor w, float eps) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, int start, float scale) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, int block_size, float scale) -> Tensor");
  m.def("decode_layers(Tensor(a!) x, Tensor cos, Tensor sin, Tensor(b!)[] k_caches, Tensor(c!)[] v_caches, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, int block_size, Tensor[] weights, int num_heads, int num_kv_heads, float eps, "
        "float scale) -> Tensor");
  m.def("top_k_indices(Tensor x, int k) -> Tensor");
  m.def("rows_dot(Tensor x, Tensor w, Tensor idx) -> Tensor");
  m.def("sample_candidates(Tensor x, Tensor top_k, Tensor top_p, Tensor min_p, Tensor u, Tensor row_lse, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(phiserve, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("int8_linear", &int8_linear);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("silu_mul", &silu_mul);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("decode_layers", &decode_layers);
  m.impl("top_k_indices", &top_k_indices);
  m.impl("rows_dot", &rows_dot);
  m.impl("sample_candidates", &sample_candidates);
}

// CPU kernels of the integer model (fqvit_det.integer.kernels builds this file on first use).
// Each replaces a chain of whole-tensor torch ops (one pass instead of five to fifteen) and
// computes the same numbers: integer steps are exact, and every float step is the single IEEE
// operation the torch chain performs, in the same order (compiled with -ffp-contract=off: no
// product is fused into an add; no reassociation). Two exceptions give provably equal values:
// sums of exact integers in SIMD lanes, and div_rn (a correctly rounded quotient by fma).
// Where a step is a torch function whose implementation we cannot reproduce bit for bit
// (softmax, log2), the kernel calls that function, or, for log2, uses the exact float32
// thresholds where the code changes, found with torch's own log2 (attention.log_code_buckets).
//
//   attention_pow2 the attention core for power-of-two probability codes (log2, log√2, AdaLog,
//                  PTQ4ViT twin uniform): QKᵀ int8 GEMM → float32 logits → softmax → codes →
//                  int8 P·V operand planes (one per shift class and group) → int8 GEMMs →
//                  exact accumulators → the proj-input codes
//   attention_lis  the same for FQ-ViT's Log-Int-Softmax (integer logits, exp table, log2 codes)
//   prob_codes     the probability codes alone (the formulas attention_pow2 uses; for tests)
//   bucket_codes   the same log codes by exact thresholds (attention_pow2's route without log2)
//   gather_table   table[idx] by attention_pow2's operand-plane route (for tests)
//   bmm_int8       a batch of int8 × int8 → int32 GEMMs (torch._int_mm per matrix, the batch
//                  spread over the threads in one call)
//   qkv_int8       the qkv projection output (B, N, 3·H·d), float32 values or int32 codes → the
//                  int8 GEMM operands code − offset of q, k, v, laid out (3, B·H, N, d)
//   int_layernorm  FQ-ViT's integer LayerNorm on PTF codes (the exact-float64 route of
//                  quantizers/ptf.py's int_layernorm_fake_quant), rows flagged where a bound fails
//                  (and counted: the count is a value, which replay checks as a guard)
//   int_layernorm_codes  the same with the next Linear's input quantization as its epilogue:
//                  the codes clamp(⌊y/Δ⌉ + z) of the output values y, never stored as floats
//   twin_operands  PTQ4ViT's twin-uniform post-GELU codes split into the positive and negative
//                  int8 operand rows of one GEMM
//   fake_quant     a per-channel (last dim) uniform fake quantization with an integral zero point
//                  (quantizers/uniform.py's fake_quant_chunked: PTF residual-stream quantizers)
//   add_fake_quant the same of a + b (the residual sum and its quantizer in one pass)
//   twin_rescale   the int32 products of twin_operands' two row blocks → the float output
//                  float32((pos << m) + neg + b_int)·Δ[c] + bias[c] (int64 sum, as the torch
//                  path), written into a given block of rows
//   quantize       float32 → the uniform quantizer's codes clamp(⌊x/Δ⌉ + z) (uint8/int8/int32)
//   rescale_gelu_twin  fc1's accumulator → float → rational GELU → fc2's twin-uniform operand rows
//   rescale        an integer Linear's int32 accumulator → float32 (acc + b_int)·Δ_xΔ_w[c] + bias[c],
//                  optionally fake-quantized (or coded) by the next quantizer; rescale_ writes
//                  the result into the accumulator's own storage
//   tiles_rescale, tiles_rescale_gelu_quantize, tiles_rescale_gelu_twin, tiles_qkv_int8,
//   tiles_twin_rescale
//                  the same epilogues given the GEMM's codes and amx_pack's weight instead of the
//                  int32 product, which they compute on AMX tiles a block of rows at a time
//                  inside the epilogue's thread (AccRows)
// The attention cores' QKᵀ and P·V run on AMX tiles as well where the caller asks (amx=True).
#include "amx_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// Hot loops are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time by
// the CPU (GCC function multi-versioning); the arithmetic is the same IEEE operations in each.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FQVIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FQVIT_CLONES
#endif

namespace {

void check_cpu(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* who,
               const char* name) {
  TORCH_CHECK(t.device().is_cpu(), who, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, who, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(dim < 0 || t.dim() == dim, who, ": ", name, " must have ", dim, " dims, got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), who, ": ", name, " must be contiguous");
}

// the per-output-channel parameters of a rescale: int32 zero-point terms, float32 Δ_x·Δ_w and bias
void check_rescale_params(const at::Tensor& bias_int, const at::Tensor& acc_scale,
                          const at::Tensor& bias_float, int64_t n, const char* who) {
  check_cpu(bias_int, at::kInt, 1, who, "bias_int");
  check_cpu(acc_scale, at::kFloat, 1, who, "acc_scale");
  check_cpu(bias_float, at::kFloat, 1, who, "bias_float");
  TORCH_CHECK(bias_int.numel() == n && acc_scale.numel() == n && bias_float.numel() == n, who,
              ": one bias / scale per output channel (", n, ")");
}

using fqvit_amx::AlignedVector;
using fqvit_amx::CacheLineAllocator;

// A thread's scratch memory, cache-line aligned and reused between calls (zeroed only when it
// grows): a std::vector made afresh zeroes it on every call (the GEMM epilogues' buffers: ~200 KB
// per thread per Linear, about 3 % of a batch-1 forward in memset). Held by thread_local
// objects, one per use site.
template <typename T>
struct Scratch {
  AlignedVector<T> p;
  T* get(size_t n) {
    if (n > p.size()) p = AlignedVector<T>(n, T(), CacheLineAllocator<T>());   // zeroed once
    return p.data();
  }
};

// The int32 rows of an integer Linear's product for its epilogue (rescale, GELU, requantization):
// stored (the GEMM's output tensor), or computed on AMX tiles here, a block of rows at a time into
// a buffer of the thread that then runs the epilogue on them (amx_gemm.h): the product never
// leaves that core's cache, where a stored one is written to memory and read back (at batch 32,
// tens of MB per layer).
struct AccRows {
  int64_t M = 0, N = 0;
  const int32_t* stored = nullptr;   // (M, N), row-major
  at::Tensor a;                      // tiles: A (M, K) int8 / uint8, rows contiguous
  const int8_t* packed = nullptr;    // B (K, N) packed by amx_pack
  int64_t K = 0;
  bool u8 = false;

  static AccRows of(const at::Tensor& acc, const char* who) {
    check_cpu(acc, at::kInt, 2, who, "acc");
    AccRows r;
    r.M = acc.size(0);
    r.N = acc.size(1);
    r.stored = acc.data_ptr<int32_t>();
    return r;
  }

  static AccRows tiles(const at::Tensor& a, const at::Tensor& packed, int64_t n, const char* who) {
    AccRows r;
    r.a = fqvit_amx::product_operand(a, packed, n, who);
    r.M = a.size(0);
    r.N = n;
    r.K = a.size(1);
    r.packed = packed.data_ptr<int8_t>();
    r.u8 = a.scalar_type() == at::kByte;
    return r;
  }

  // body(begin, end, rows, ld) for blocks of rows in parallel: row m at rows + (m − begin)·ld
  template <typename Body>
  void for_rows(Body body) const {
    if (stored) {
      const int32_t* sp = stored;
      const int64_t n = N;
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                       [&](int64_t begin, int64_t end) { body(begin, end, sp + begin * n, n); });
      return;
    }
    const int8_t* ap = static_cast<const int8_t*>(a.data_ptr());
    const int64_t lda = a.stride(0);
    for_row_blocks(M, [&](int64_t r0, int64_t r1, Scratch<int32_t>& buf) {
      int32_t* acc = buf.get(kRows * N);
      if (K == 0)
        std::fill(acc, acc + kRows * N, 0);
      else
        fqvit_amx::matmul(ap + r0 * lda, lda, u8, packed, r1 - r0, N, K, acc, N);
      body(r0, r1, acc, N);
    });
  }

  // block(r0, r1, buffer) for blocks of at most kRows rows in parallel, the rows split evenly
  // between the threads at a multiple of 32 (197 rows on 2 threads: 96 + 101, where blocks of
  // 64 would give 128 + 69); the buffer is the thread's own
  static constexpr int64_t kRows = 64;
  template <typename Block>
  static void for_row_blocks(int64_t M, Block block) {
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + 31) / 32));
    const int64_t per = std::max<int64_t>(32, M / T / 32 * 32);
    const int64_t tasks = std::min(T, (M + per - 1) / per);
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      thread_local Scratch<int32_t> buf;
      for (int64_t t = tb; t < te; ++t) {
        const int64_t end = t == tasks - 1 ? M : (t + 1) * per;
        for (int64_t r0 = t * per; r0 < end; r0 += kRows) block(r0, std::min(end, r0 + kRows), buf);
      }
    });
  }
};

// The hot loops are plain functions of restrict pointers and values (a lambda's by-reference
// captures would be reloaded every iteration and keep the loops scalar).
template <typename T>
FQVIT_CLONES void quantize_span(const float* __restrict x, int64_t n, float s, float z, float lo, float hi,
                   T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint(x[i] / s) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    out[i] = static_cast<T>(q);
  }
}

template <typename T>
void quantize_into(const float* x, int64_t n, float s, float z, float lo, float hi, T* out) {
  at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
    quantize_span<T>(x + begin, end - begin, s, z, lo, hi, out + begin);
  });
}

// y = float32(acc + b_int)·Δ + bias per channel
FQVIT_CLONES void rescale_float(const int32_t* __restrict a, const int32_t* __restrict bi,
                   const float* __restrict sc, const float* __restrict bf, int64_t n,
                   float* __restrict o) {
  for (int64_t c = 0; c < n; ++c) o[c] = static_cast<float>(a[c] + bi[c]) * sc[c] + bf[c];
}

// fqvit_det.nn.exact.rational_gelu: the same float32 operations in the same order (no
// contraction: -ffp-contract=off), so the same bits
static inline __attribute__((always_inline)) float rational_gelu_value(float v) {
  const float k = static_cast<float>(0.7071067811865476);
  const float z = std::fabs(v) * k;
  float p = z * 0.0000430638f + 0.0002765672f;
  p = p * z + 0.0001520143f;
  p = p * z + 0.0092705272f;
  p = p * z + 0.0422820123f;
  p = p * z + 0.0705230784f;
  p = p * z + 1.0f;
  p = p * p;
  p = p * p;
  p = p * p;
  p = p * p;
  const float r = 1.0f / p;
  return (v * 0.5f) * (v >= 0.0f ? 2.0f - r : r);
}

// the next quantizer on y (Gelu: on rational_gelu(y)): codes clamp(⌊y/Δ_o⌉ + z_o) (T an integer
// type) or their values (clamp(…) − z_o)·Δ_o (T = float)
template <typename T, bool Gelu = false>
FQVIT_CLONES void rescale_requant(const int32_t* __restrict a, const int32_t* __restrict bi,
                                  const float* __restrict sc, const float* __restrict bf,
                                  int64_t n, float so, float zo, float lo, float hi,
                                  T* __restrict o) {
  for (int64_t c = 0; c < n; ++c) {
    float y = static_cast<float>(a[c] + bi[c]) * sc[c] + bf[c];
    if constexpr (Gelu) y = rational_gelu_value(y);
    float q = std::nearbyint(y / so) + zo;
    q = q < lo ? lo : (q > hi ? hi : q);
    if constexpr (std::is_same_v<T, float>)
      o[c] = (q - zo) * so;
    else
      o[c] = static_cast<T>(q);
  }
}

// per channel: clamp(⌊x/Δ⌉ + z, lo, hi) − off (the float steps of UniformQuantizer.quantize)
FQVIT_CLONES void quantize_offset(const float* __restrict x, const float* __restrict s, const float* __restrict z,
                     const float* __restrict lo, const float* __restrict hi,
                     const float* __restrict off, int64_t n, float* __restrict o) {
  for (int64_t c = 0; c < n; ++c) {
    float q = std::nearbyint(x[c] / s[c]) + z[c];
    q = q < lo[c] ? lo[c] : (q > hi[c] ? hi[c] : q);
    o[c] = q - off[c];
  }
}

// integral floats in [−128, 127] → int8 (a loop of its own so that it is vectorized)
FQVIT_CLONES void to_int8_span(const float* __restrict x, int64_t n, int8_t* __restrict o) {
  for (int64_t e = 0; e < n; ++e) o[e] = static_cast<int8_t>(static_cast<int32_t>(x[e]));
}

FQVIT_CLONES void codes_offset(const int32_t* __restrict x, const float* __restrict off, int64_t n,
                  float* __restrict o) {
  for (int64_t c = 0; c < n; ++c) o[c] = static_cast<float>(x[c]) - off[c];
}

// one row of logits: float32(float64(acc + row − b_sum·z_q)·m)
FQVIT_CLONES void logits_row(const int32_t* __restrict a, const int64_t* __restrict bs, int64_t row,
                             int64_t zq, double m, int64_t n, float* __restrict o) {
  for (int64_t j = 0; j < n; ++j)
    o[j] = static_cast<float>(static_cast<double>(a[j] + row - bs[j] * zq) * m);
}

// P·V planes into a class accumulator: s = Σ P·z_v − r (the zero-point form), shifted
static inline __attribute__((always_inline)) void pv_accumulate_exact(const int32_t* __restrict r, int64_t zs, int64_t sh,
                                      int64_t n, int64_t* __restrict acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += (zs - r[k]) << sh;
}

static inline __attribute__((always_inline)) void pv_accumulate_float(const int32_t* __restrict r, int64_t zs, double f, int64_t n,
                                      double* __restrict acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<double>(zs - r[k]) * f;
}

// y = Σ_c float64(acc_c)·m_c in class order (first: y = term)
static inline __attribute__((always_inline)) void pv_combine_exact(const int64_t* __restrict acc, double m, bool first, int64_t n,
                                   double* __restrict y) {
  for (int64_t k = 0; k < n; ++k) {
    const double t = static_cast<double>(acc[k]) * m;
    y[k] = first ? t : y[k] + t;
  }
}

static inline __attribute__((always_inline)) void pv_combine_float(const double* __restrict acc, double m, bool first, int64_t n,
                                   double* __restrict y) {
  for (int64_t k = 0; k < n; ++k) {
    const double t = acc[k] * m;
    y[k] = first ? t : y[k] + t;
  }
}

// codes clamp(⌊float32(y)/Δ⌉ + z, lo, hi) per channel
static inline __attribute__((always_inline)) void requant_codes_1(
    const double* __restrict y, float s, float z, float lo, float hi, int64_t n,
    int32_t* __restrict o) {
  for (int64_t k = 0; k < n; ++k) {
    float q = std::nearbyint(static_cast<float>(y[k]) / s) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    o[k] = static_cast<int32_t>(q);
  }
}
static inline __attribute__((always_inline)) void requant_codes(const double* __restrict y, const float* __restrict s,
                                const float* __restrict z, float lo, float hi, int64_t n,
                                int32_t* __restrict o) {
  for (int64_t k = 0; k < n; ++k) {
    float q = std::nearbyint(static_cast<float>(y[k]) / s[k]) + z[k];
    q = q < lo ? lo : (q > hi ? hi : q);
    o[k] = static_cast<int32_t>(q);
  }
}

// table rows (code + 1) of log codes from l = log2(x/Δ): mode 0 ⌊−l⌉, 1 ⌊−2l⌉, 2 ⌊(−l)·r/q⌉, then
// finish_log_codes (≥ 2^bits, +inf, NaN → the zero code, row 0; negative → code 0, row 1)
FQVIT_CLONES void log_rows(const float* __restrict l, int64_t n, int64_t mode, float r, float q,
                           float top, int32_t* __restrict idx) {
  for (int64_t j = 0; j < n; ++j) {
    float c = mode == 0 ? -l[j] : (mode == 1 ? -2.0f * l[j] : (-l[j]) * r / q);
    c = std::nearbyint(c);
    idx[j] = !(c < top) ? 0 : (c < 0.0f ? 1 : static_cast<int32_t>(c) + 1);
  }
}

// table rows (code + 1) of log codes by exact thresholds instead of log2 (one pass over the
// probabilities x): u = float32(x/Δ), bucket k = (bits of u) >> shift, code = base[k] + inc[k]·
// [u < thr[k]], which is the number of code thresholds above u (attention.log_code_buckets);
// code ≥ top, NaN or negative u (sign bit set) → the zero code, row 0. Branch-free; with
// AVX-512 16 values at a time (the table reads are gathers, which GCC does not vectorize here).
constexpr uint32_t kF32Inf = 0x7F800000u;

inline int32_t bucket_row(float u, uint32_t sh, const int32_t* base, const int32_t* inc,
                          const float* thr, int32_t top) {
  uint32_t b;
  std::memcpy(&b, &u, 4);
  const uint32_t bad = static_cast<uint32_t>(b > kF32Inf);
  const uint32_t k = (b < kF32Inf ? b : kF32Inf) >> sh;
  const int32_t c = base[k] + (inc[k] & -static_cast<int32_t>(u < thr[k]));
  const int32_t keep = -static_cast<int32_t>((bad | static_cast<uint32_t>(c >= top)) == 0);
  return (c + 1) & keep;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
// AVX-512 routes (code buckets and searches, operand planes, LIS code counts, the P·V row), taken
// where the CPU has the extensions (avx512()) and the caller asks for vector loops
#define FQVIT_HAVE_AVX512 1
#endif

// The AVX-512 extensions the vector routes use, read from the CPU once
struct Avx512 {
  bool f = false;       // AVX-512F: code searches, gathers, LIS counts, ≤ 32-entry planes
  bool vbmi = false;    // + BW, VBMI: byte permutes of ≤ 257-entry operand planes
  bool dq_vl = false;   // + DQ, VL: the exact P·V row in registers
};

const Avx512& avx512() {
  static const Avx512 has = [] {
    Avx512 h;
#ifdef FQVIT_HAVE_AVX512
    h.f = __builtin_cpu_supports("avx512f");
    h.vbmi = h.f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi");
    h.dq_vl = h.f && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    return h;
  }();
  return has;
}

#ifdef FQVIT_HAVE_AVX512
__attribute__((target("avx512f"))) void bucket_rows_avx512(
    const float* __restrict x, int64_t n, float delta, uint32_t sh, const int32_t* base,
    const int32_t* inc, const float* thr, int32_t top, int32_t* __restrict idx) {
  const __m512 vd = _mm512_set1_ps(delta);
  const __m512i vinf = _mm512_set1_epi32(static_cast<int32_t>(kF32Inf));
  const __m512i vtop = _mm512_set1_epi32(top), one = _mm512_set1_epi32(1);
  const __m128i count = _mm_cvtsi32_si128(static_cast<int>(sh));
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 u = _mm512_div_ps(_mm512_loadu_ps(x + j), vd);
    const __m512i b = _mm512_castps_si512(u);
    const __mmask16 bad = _mm512_cmpgt_epu32_mask(b, vinf);
    const __m512i k = _mm512_srl_epi32(_mm512_min_epu32(b, vinf), count);
    const __m512i c0 = _mm512_i32gather_epi32(k, base, 4);
    const __m512i in = _mm512_i32gather_epi32(k, inc, 4);
    const __m512 t = _mm512_i32gather_ps(k, thr, 4);
    const __m512i c = _mm512_mask_add_epi32(c0, _mm512_cmp_ps_mask(u, t, _CMP_LT_OQ), c0, in);
    const __mmask16 zero = bad | _mm512_cmpge_epi32_mask(c, vtop);
    _mm512_storeu_si512(idx + j, _mm512_maskz_add_epi32(static_cast<__mmask16>(~zero), c, one));
  }
  for (; j < n; ++j) idx[j] = bucket_row(x[j] / delta, sh, base, inc, thr, top);
}

// d_j = ymax − y_j and e_j = T[d_j] for the first 8·⌊M/8⌋ logits, with Σ e_j added to *sum (an
// exact integer sum); the table reads are AVX-512 gathers; returns how many were done
__attribute__((target("avx512f"))) int64_t lis_exp_gather_avx512(
    const float* __restrict y, int64_t M, float ymax, const int64_t* tp, int32_t* __restrict dd,
    int64_t* __restrict ev, int64_t* sum) {
  const __m256 vmax = _mm256_set1_ps(ymax);
  __m512i acc = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    const __m256i d = _mm256_cvttps_epi32(_mm256_sub_ps(vmax, _mm256_loadu_ps(y + j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dd + j), d);
    const __m512i e = _mm512_i32gather_epi64(d, tp, 8);
    _mm512_storeu_si512(ev + j, e);
    acc = _mm512_add_epi64(acc, e);
  }
  *sum += _mm512_reduce_add_epi64(acc);
  return j;
}

// code_j = #{k : θ_k ≥ e_j} for K = 16 non-increasing θ (lis_row): a four-step branch-free
// binary search per lane with θ held in two registers (a two-source permute per probe)
__attribute__((target("avx512f"))) void lis_codes16_avx512(const int64_t* __restrict e, int64_t n,
                                                           const int64_t* theta,
                                                           int32_t* __restrict code) {
  const __m512i t_lo = _mm512_loadu_si512(theta), t_hi = _mm512_loadu_si512(theta + 8);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i v = _mm512_loadu_si512(e + j);
    __m512i c = _mm512_setzero_si512();
    for (int64_t step = 8; step >= 1; step /= 2) {
      const __m512i probe = _mm512_add_epi64(c, _mm512_set1_epi64(step - 1));
      const __m512i t = _mm512_permutex2var_epi64(t_lo, probe, t_hi);
      c = _mm512_mask_add_epi64(c, _mm512_cmpge_epi64_mask(t, v), c, _mm512_set1_epi64(step));
    }
    const __m512i t = _mm512_permutex2var_epi64(t_lo, c, t_hi);
    c = _mm512_mask_add_epi64(c, _mm512_cmpge_epi64_mask(t, v), c, _mm512_set1_epi64(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + j), _mm512_cvtepi64_epi32(c));
  }
  for (; j < n; ++j) {
    int32_t c = 0;
    while (c < 16 && theta[c] >= e[j]) ++c;
    code[j] = c;
  }
}
// the same codes from at most 16 thresholds T (non-increasing, padded with −inf): the code of
// u is #{k : u < T[k]}, found by a four-step search with T in one register (a permute per
// probe) instead of the three table gathers per value
__attribute__((target("avx512f"))) void search_rows16_avx512(
    const float* __restrict x, int64_t n, float delta, const float* thr16, int32_t top,
    int32_t* __restrict idx) {
  const __m512 vd = _mm512_set1_ps(delta), t = _mm512_loadu_ps(thr16);
  const __m512i vinf = _mm512_set1_epi32(static_cast<int32_t>(kF32Inf));
  const __m512i vtop = _mm512_set1_epi32(top), one = _mm512_set1_epi32(1);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 u = _mm512_div_ps(_mm512_loadu_ps(x + j), vd);
    const __mmask16 bad = _mm512_cmpgt_epu32_mask(_mm512_castps_si512(u), vinf);
    __m512i c = _mm512_setzero_si512();
    for (int32_t step = 8; step >= 1; step /= 2) {
      const __m512 probe =
          _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), t);
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(u, probe, _CMP_LT_OQ), c,
                                _mm512_set1_epi32(step));
    }
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(u, _mm512_permutexvar_ps(c, t), _CMP_LT_OQ),
                              c, one);
    const __mmask16 zero = bad | _mm512_cmpge_epi32_mask(c, vtop);
    _mm512_storeu_si512(idx + j, _mm512_maskz_add_epi32(static_cast<__mmask16>(~zero), c, one));
  }
  for (; j < n; ++j) {
    const float u = x[j] / delta;
    uint32_t b;
    std::memcpy(&b, &u, 4);
    int32_t c = 0;
    for (int k = 0; k < 16; ++k) c += static_cast<int32_t>(u < thr16[k]);
    idx[j] = (b > kF32Inf || c >= top) ? 0 : c + 1;
  }
}
#endif

void bucket_rows(const float* __restrict x, int64_t n, float delta, int64_t shift,
                 const int32_t* __restrict base, const int32_t* __restrict inc,
                 const float* __restrict thr, int32_t top, int32_t* __restrict idx,
                 bool vector = true, const float* thr16 = nullptr) {
  const uint32_t sh = static_cast<uint32_t>(shift);
#ifdef FQVIT_HAVE_AVX512
  if (vector && avx512().f) {
    if (thr16 != nullptr) return search_rows16_avx512(x, n, delta, thr16, top, idx);
    return bucket_rows_avx512(x, n, delta, sh, base, inc, thr, top, idx);
  }
#endif
  for (int64_t j = 0; j < n; ++j) idx[j] = bucket_row(x[j] / delta, sh, base, inc, thr, top);
}

// Bucket tables of bucket_rows: shift in [0, 23], base / inc / thr with one entry per bucket
// of the non-negative float32 bit patterns up to +inf
struct Buckets {
  int64_t shift = 0;
  const int32_t *base = nullptr, *inc = nullptr;
  const float* thr = nullptr;
  bool on = false;
};

Buckets check_buckets(const char* who, const at::Tensor& base, const at::Tensor& inc,
                      const at::Tensor& thr, int64_t shift) {
  Buckets k;
  if (base.numel() == 0) return k;
  check_cpu(base, at::kInt, 1, who, "bucket base");
  check_cpu(inc, at::kInt, 1, who, "bucket inc");
  check_cpu(thr, at::kFloat, 1, who, "bucket thr");
  TORCH_CHECK(shift >= 0 && shift <= 23, who, ": bucket shift ", shift, " outside [0, 23]");
  const int64_t nb = (int64_t{0x7F800000} >> shift) + 1;
  TORCH_CHECK(base.numel() == nb && inc.numel() == nb && thr.numel() == nb, who, ": ", nb,
              " buckets expected for shift ", shift);
  k.shift = shift;
  k.base = base.data_ptr<int32_t>();
  k.inc = inc.data_ptr<int32_t>();
  k.thr = thr.data_ptr<float>();
  k.on = true;
  return k;
}

// the thresholds of search_rows16_avx512: empty (the bucket tables), or 16 float32 values
// that never rise
const float* check_thresholds16(const char* who, const at::Tensor& t, const Buckets& bk,
                                int64_t bits) {
  if (t.numel() == 0) return nullptr;
  check_cpu(t, at::kFloat, 1, who, "code thresholds");
  TORCH_CHECK(bk.on && t.numel() == 16 && bits <= 4, who,
              ": 16 code thresholds go with bucket tables of codes of at most 4 bits");
  const float* p = t.data_ptr<float>();
  for (int k = 0; k < 16; ++k)
    TORCH_CHECK(!std::isnan(p[k]) && (k == 0 || !(p[k] > p[k - 1])), who,
                ": code thresholds must be numbers that never rise");
  return p;
}

// o[r·ldo + e] = table[idx[r·n + e]] for rows r < rows, e < n: one int8 operand plane of the
// probability codes (its rows at stride ldo)
FQVIT_CLONES void gather_plane_scalar(const int8_t* __restrict table,
                                      const int32_t* __restrict idx, int64_t rows, int64_t n,
                                      int8_t* __restrict o, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < n; ++e) o[r * ldo + e] = table[idx[r * n + e]];
}

#ifdef FQVIT_HAVE_AVX512
// the same for a table of at most 32 entries (4-bit codes) and indices in [0, L): the table
// sits in two registers and each lookup is a two-source permute, 16 codes at a time
__attribute__((target("avx512f"))) void gather_plane32_avx512(const int8_t* table, int64_t L,
                                                              const int32_t* __restrict idx,
                                                              int64_t rows, int64_t n,
                                                              int8_t* __restrict o, int64_t ldo) {
  alignas(64) int32_t t[32] = {0};
  for (int64_t c = 0; c < L; ++c) t[c] = table[c];
  const __m512i t_lo = _mm512_load_si512(t), t_hi = _mm512_load_si512(t + 16);
  for (int64_t r = 0; r < rows; ++r, idx += n, o += ldo) {
    int64_t e = 0;
    for (; e + 16 <= n; e += 16) {
      const __m512i i = _mm512_loadu_si512(idx + e);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + e),
                       _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(t_lo, i, t_hi)));
    }
    for (; e < n; ++e) o[e] = table[idx[e]];
  }
}

// the same for a table of at most 257 entries (codes up to 8 bits, indexed by code + 1): the
// first 256 entries sit in four registers, each lookup is two two-source byte permutes (low 7
// index bits) and a blend on bit 7, 64 codes at a time; index 256 is patched from its mask
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void gather_plane256_avx512(
    const int8_t* table, int64_t L, const int32_t* __restrict idx, int64_t rows, int64_t n,
    int8_t* __restrict o, int64_t ldo) {
  alignas(64) int8_t t[256] = {0};
  for (int64_t c = 0; c < std::min<int64_t>(L, 256); ++c) t[c] = table[c];
  const __m512i t0 = _mm512_load_si512(t), t1 = _mm512_load_si512(t + 64),
                t2 = _mm512_load_si512(t + 128), t3 = _mm512_load_si512(t + 192);
  const bool has256 = L > 256;
  const __m512i v256 = _mm512_set1_epi32(256), last = _mm512_set1_epi8(has256 ? table[256] : 0);
  for (int64_t row = 0; row < rows; ++row, idx += n, o += ldo) {
    int64_t e = 0;
    for (; e + 64 <= n; e += 64) {
      const __m512i i0 = _mm512_loadu_si512(idx + e), i1 = _mm512_loadu_si512(idx + e + 16),
                    i2 = _mm512_loadu_si512(idx + e + 32), i3 = _mm512_loadu_si512(idx + e + 48);
      const __m256i b01 = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm512_cvtepi32_epi8(i0)), _mm512_cvtepi32_epi8(i1), 1);
      const __m256i b23 = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm512_cvtepi32_epi8(i2)), _mm512_cvtepi32_epi8(i3), 1);
      const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(b01), b23, 1);   // idx mod 256
      const __m512i lo = _mm512_permutex2var_epi8(t0, b, t1),
                    hi = _mm512_permutex2var_epi8(t2, b, t3);
      __m512i r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(b), lo, hi);
      if (has256) {
        const __mmask64 m = static_cast<__mmask64>(_mm512_cmpeq_epi32_mask(i0, v256)) |
                            (static_cast<__mmask64>(_mm512_cmpeq_epi32_mask(i1, v256)) << 16) |
                            (static_cast<__mmask64>(_mm512_cmpeq_epi32_mask(i2, v256)) << 32) |
                            (static_cast<__mmask64>(_mm512_cmpeq_epi32_mask(i3, v256)) << 48);
        r = _mm512_mask_blend_epi8(m, r, last);
      }
      _mm512_storeu_si512(o + e, r);
    }
    for (; e < n; ++e) o[e] = table[idx[e]];
  }
}
#endif

// idx[e] in [0, L) (checked by the caller)
void gather_plane(const int8_t* table, int64_t L, const int32_t* idx, int64_t rows, int64_t n,
                  int8_t* o, int64_t ldo, bool vector) {
#ifdef FQVIT_HAVE_AVX512
  if (vector && L <= 32 && avx512().f)
    return gather_plane32_avx512(table, L, idx, rows, n, o, ldo);
  if (vector && L <= 257 && avx512().vbmi)
    return gather_plane256_avx512(table, L, idx, rows, n, o, ldo);
#endif
  gather_plane_scalar(table, idx, rows, n, o, ldo);
}

// table rows (code + 1) of PTQ4ViT twin-uniform softmax codes from the probabilities x:
// large = x ≥ s; magnitude clamp(⌊x/Δ_R2⌉ or ⌊x/Δ_R1⌉, 0, n); code = magnitude + large·(n + 1)
FQVIT_CLONES void twin_rows(const float* __restrict x, int64_t count, float s, float d1, float d2,
                            float n, int32_t* __restrict idx) {
  for (int64_t j = 0; j < count; ++j) {
    const bool large = x[j] >= s;
    float mag = std::nearbyint(large ? x[j] / d2 : x[j] / d1);
    mag = mag < 0.0f ? 0.0f : (mag > n ? n : mag);
    idx[j] = static_cast<int32_t>(mag) + (large ? static_cast<int32_t>(n) + 1 : 0) + 1;
  }
}

// twin-uniform post-GELU levels: x < 0 → (0, clamp(⌊x/Δ_neg⌉, −h, 0)), else
// (clamp(⌊x/Δ_pos⌉, 0, h − 1), 0), as the positive and the negative operand
FQVIT_CLONES void twin_split(const float* __restrict x, int64_t n, float dn, float dp, float h,
                             int8_t* __restrict pos, int8_t* __restrict neg) {
  for (int64_t j = 0; j < n; ++j) {
    // one division per value: by Δ_neg where x < 0, by Δ_pos elsewhere (the other is unused)
    const bool negative = x[j] < 0.0f;
    const float v = std::nearbyint(x[j] / (negative ? dn : dp));
    const float a = v < -h ? -h : (v > 0.0f ? 0.0f : v);
    const float b = v < 0.0f ? 0.0f : (v > h - 1.0f ? h - 1.0f : v);
    neg[j] = static_cast<int8_t>(negative ? a : 0.0f);
    pos[j] = static_cast<int8_t>(negative ? 0.0f : b);
  }
}

// (clamp(⌊x/Δ_c⌉, lo, hi))·Δ_c − 0·x (fake_quant_chunked with an integral zero point folded into
// lo, hi; the − 0·x turns a −0.0 into +0.0 and ±inf into NaN, as the reference)
FQVIT_CLONES void fake_quant_row(const float* __restrict x, const float* __restrict s, float lo,
                                 float hi, int64_t n, float* __restrict o) {
  for (int64_t c = 0; c < n; ++c) {
    float q = std::nearbyint(x[c] / s[c]);
    q = q < lo ? lo : (q > hi ? hi : q);
    const float r = q * s[c];
    o[c] = r - 0.0f * x[c];
  }
}

// fake_quant_row of the float32 sums a + b (the same two IEEE steps as torch's add, then it)
FQVIT_CLONES void add_fake_quant_row(const float* __restrict a, const float* __restrict b,
                                     const float* __restrict s, float lo, float hi, int64_t n,
                                     float* __restrict o) {
  for (int64_t c = 0; c < n; ++c) {
    const float x = a[c] + b[c];
    float q = std::nearbyint(x / s[c]);
    q = q < lo ? lo : (q > hi ? hi : q);
    const float r = q * s[c];
    o[c] = r - 0.0f * x;
  }
}

// y = float32((pos·2^m + neg) + b_int)·Δ + bias (m < 0: pos + neg·2^−m), the int64 sum of the
// twin-uniform row blocks
FQVIT_CLONES void twin_rescale_row(const int32_t* __restrict pos, const int32_t* __restrict neg,
                                   int64_t m, const int32_t* __restrict bi,
                                   const float* __restrict sc, const float* __restrict bf,
                                   int64_t n, float* __restrict o) {
  const int64_t sp = m >= 0 ? m : 0, sn = m >= 0 ? 0 : -m;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t acc = (static_cast<int64_t>(pos[c]) << sp) + (static_cast<int64_t>(neg[c]) << sn);
    o[c] = static_cast<float>(acc + bi[c]) * sc[c] + bf[c];
  }
}

// The P·V requantization of one output row. The products r of the planes (int8 operand planes
// of the probability codes, see attention_pow2) with the value codes and a column of ones (so
// r[d] = Σ_j operand) enter their class accumulator as s = r[d]·z_v − r[k] shifted left by the
// plane's shift: exact classes in int64, the others float64(s)·2^shift. Then
// y = Σ_c float64(acc_c)·mult_c in class order, float32(y), codes clamp(⌊y/Δ⌉ + z, qmin, qmax)
// with Δ, z per channel of H·d or per tensor.
struct PvConsts {
  int64_t C, d, nq;
  const int64_t* pc;  // class of each plane
  const int64_t* ps;  // shift of each plane
  const bool* ex;     // class accumulates exactly (int64)
  const float* sp;    // out scale (nq values)
  const float* zp;    // out zero point
  float lo, hi;
};

struct PvScratch {
  std::vector<int64_t> iacc;
  std::vector<double> facc, y;
  PvScratch(int64_t C, int64_t d) : iacc(C * d), facc(C * d), y(d) {}
};

// rows[i]: the (d + 1)-long product row of plane pid[i]; mult[c]: the class multipliers of this
// matrix; h: its head (per-channel output parameters); o: the d output codes
// one pass per row, compiled per ISA with its small loops inlined (d = 64: the calls and the
// scratch fills of a non-inlined version cost as much as the arithmetic)
FQVIT_CLONES void pv_row(const PvConsts& k, PvScratch& s, const int32_t* const* rows,
                         const int64_t* pid, int64_t nplanes, int64_t z, const double* mult,
                         int64_t h, int32_t* o) {
  const int64_t d = k.d;
  int64_t* __restrict ia = s.iacc.data();
  double* __restrict fa = s.facc.data();
  for (int64_t e = 0; e < k.C * d; ++e) ia[e] = 0;
  for (int64_t e = 0; e < k.C * d; ++e) fa[e] = 0.0;
  for (int64_t i = 0; i < nplanes; ++i) {
    const int32_t* rr = rows[i];
    const int64_t p = pid[i], c = k.pc[p];
    const int64_t zs = static_cast<int64_t>(rr[d]) * z;
    if (k.ex[c])
      pv_accumulate_exact(rr, zs, k.ps[p], d, s.iacc.data() + c * d);
    else
      pv_accumulate_float(rr, zs, std::ldexp(1.0, static_cast<int>(k.ps[p])), d,
                          s.facc.data() + c * d);
  }
  for (int64_t c = 0; c < k.C; ++c) {
    if (k.ex[c])
      pv_combine_exact(s.iacc.data() + c * d, mult[c], c == 0, d, s.y.data());
    else
      pv_combine_float(s.facc.data() + c * d, mult[c], c == 0, d, s.y.data());
  }
  if (k.nq == 1)
    requant_codes_1(s.y.data(), k.sp[0], k.zp[0], k.lo, k.hi, d, o);
  else
    requant_codes(s.y.data(), k.sp + h * d, k.zp + h * d, k.lo, k.hi, d, o);
}

// clamp(⌊x/Δ⌉ + z, qmin, qmax) (float32 steps: x/Δ, round half to even, + z, clamp) → dtype
at::Tensor quantize(const at::Tensor& x, double scale, int64_t zero, int64_t qmin, int64_t qmax,
                    at::ScalarType dtype) {
  const char* who = "quantize";
  check_cpu(x, at::kFloat, -1, who, "x");
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar || dtype == at::kInt, who,
              ": uint8, int8 or int32 codes");
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const float* xp = x.data_ptr<float>();
  AT_DISPATCH_SWITCH(dtype, "quantize",
    AT_DISPATCH_CASE(at::kByte, [&] { quantize_into<scalar_t>(xp, x.numel(), s, z, lo, hi, out.data_ptr<scalar_t>()); })
    AT_DISPATCH_CASE(at::kChar, [&] { quantize_into<scalar_t>(xp, x.numel(), s, z, lo, hi, out.data_ptr<scalar_t>()); })
    AT_DISPATCH_CASE(at::kInt, [&] { quantize_into<scalar_t>(xp, x.numel(), s, z, lo, hi, out.data_ptr<scalar_t>()); }));
  return out;
}

// y = float32(acc + b_int[c])·Δ[c] + bias[c] for acc (M, N); mode 0: y; mode 1: the next
// quantizer's fake quantization (clamp(⌊y/Δ_o⌉ + z_o) − z_o)·Δ_o; mode 2: its codes (int32)
at::Tensor rescale_rows(const AccRows& src, const at::Tensor& bias_int,
                        const at::Tensor& acc_scale, const at::Tensor& bias_float, int64_t mode,
                        double out_scale, int64_t zero, int64_t qmin, int64_t qmax,
                        const at::Tensor* in_place, const at::TensorOptions& options) {
  const char* who = "rescale";
  const int64_t M = src.M, N = src.N;
  check_rescale_params(bias_int, acc_scale, bias_float, N, who);
  TORCH_CHECK(mode >= 0 && mode <= 2, who, ": mode 0, 1 or 2");
  const auto dtype = mode == 2 ? at::kInt : at::kFloat;
  // in place: the result overwrites the accumulator's storage (same element size), row by row
  // through a copy of the row, so the caller's GEMM output is the only allocation
  at::Tensor out = in_place ? (mode == 2 ? *in_place : in_place->view(at::kFloat))
                            : at::empty({M, N}, options.dtype(dtype));
  const int32_t* bi = bias_int.data_ptr<int32_t>();
  const float *sc = acc_scale.data_ptr<float>(), *bf = bias_float.data_ptr<float>();
  const float so = static_cast<float>(out_scale), zo = static_cast<float>(zero);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  float* of = mode == 2 ? nullptr : out.data_ptr<float>();
  int32_t* oi = mode == 2 ? out.data_ptr<int32_t>() : nullptr;
  const bool copy = in_place != nullptr;
  src.for_rows([=](int64_t begin, int64_t end, const int32_t* rows, int64_t ld) {
    std::vector<int32_t> row(copy ? N : 0);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* a = rows + (m - begin) * ld;
      if (copy) {
        std::memcpy(row.data(), a, N * sizeof(int32_t));
        a = row.data();
      }
      if (mode == 0)
        rescale_float(a, bi, sc, bf, N, of + m * N);
      else if (mode == 1)
        rescale_requant<float>(a, bi, sc, bf, N, so, zo, lo, hi, of + m * N);
      else
        rescale_requant<int32_t>(a, bi, sc, bf, N, so, zo, lo, hi, oi + m * N);
    }
  });
  return out;
}

at::Tensor rescale(const at::Tensor& acc, const at::Tensor& bias_int, const at::Tensor& acc_scale,
                   const at::Tensor& bias_float, int64_t mode, double out_scale, int64_t zero,
                   int64_t qmin, int64_t qmax) {
  return rescale_rows(AccRows::of(acc, "rescale"), bias_int, acc_scale, bias_float, mode,
                      out_scale, zero, qmin, qmax, nullptr, acc.options());
}

// the same, the result in the accumulator's storage (the caller's fresh GEMM output)
at::Tensor rescale_(const at::Tensor& acc, const at::Tensor& bias_int, const at::Tensor& acc_scale,
                    const at::Tensor& bias_float, int64_t mode, double out_scale, int64_t zero,
                    int64_t qmin, int64_t qmax) {
  return rescale_rows(AccRows::of(acc, "rescale"), bias_int, acc_scale, bias_float, mode,
                      out_scale, zero, qmin, qmax, &acc, acc.options());
}

// the same for the product a · packed B computed on AMX tiles block by block (AccRows)
at::Tensor tiles_rescale(const at::Tensor& a, const at::Tensor& packed, int64_t n,
                         const at::Tensor& bias_int, const at::Tensor& acc_scale,
                         const at::Tensor& bias_float, int64_t mode, double out_scale,
                         int64_t zero, int64_t qmin, int64_t qmax) {
  return rescale_rows(AccRows::tiles(a, packed, n, "tiles_rescale"), bias_int, acc_scale,
                      bias_float, mode, out_scale, zero, qmin, qmax, nullptr,
                      a.options().dtype(at::kInt));
}

// ops[g, j] = −((2^(8g+7) >> code_j) & 255): the code's power of two in group g's byte,
// −2^(top − code) where 0 ≤ top − code ≤ 7, else 0 (no shift by 32 or more)
FQVIT_CLONES void lis_operands(const int32_t* __restrict code, int64_t M, int64_t groups,
                               int8_t* __restrict o, int64_t stride) {
  for (int64_t gr = 0; gr < groups; ++gr) {
    const int32_t top = 8 * static_cast<int32_t>(gr) + 7;
    int8_t* __restrict og = o + gr * stride;
    for (int64_t j = 0; j < M; ++j) {
      const uint32_t sh = static_cast<uint32_t>(top - code[j]);
      const int32_t pw = sh <= 7u ? (1 << (sh & 7u)) : 0;
      og[j] = static_cast<int8_t>(-pw);
    }
  }
}

// One row of FQ-ViT's Log-Int-Softmax path (IntegerAttention._lis_fast, 'simulation'
// requantization of the logits), operands of group g at o + g·stride:
//   y_j  = float64(float32((row_i + acc_ij + col_j)·m) / Δ_logit), rounded, clamped to [lo, hi]
//   d_j  = max_j y − y_j;  e_j = T[d_j];  2Σ = 2·Σ_j e_j
//   θ_k  = ⌊(2Σ − odd_k) / den_k⌋;  D_k = min{d : T[d] ≤ θ_k};  code_j = #{k : D_k ≤ d_j}
//   ops[g, j] = −((2^(8g+7) >> code_j) & 255)   (the code's power of two in group g's byte)
// The maximum and the integer sum are exact in any order, so both are taken in SIMD lanes. D_k
// is a binary search per k over the non-increasing T whose probe sequence depends only on the
// table length, so the K searches advance together, one probe step for all k at a time.
// halves: the probe steps of that search (len/2 while len > 1, from the table length).
FQVIT_CLONES void lis_row(const int32_t* __restrict a, double rt, const double* __restrict col,
                          int64_t M, double m, float ls, double lo, double hi,
                          const int64_t* __restrict tp, int64_t levels,
                          const int64_t* __restrict halves, int64_t steps,
                          const int64_t* __restrict op, const int64_t* __restrict dp,
                          const double* __restrict inv_den, int64_t K,
                          int64_t groups, float* __restrict y, int32_t* __restrict dd,
                          int32_t* __restrict code, int32_t* __restrict lut,
                          int64_t* __restrict D, int64_t* __restrict theta,
                          int64_t* __restrict ev, int8_t* __restrict o, int64_t stride,
                          bool count16) {
  // the rounded, clamped logit codes are small integers: float32 holds them (and the rounding of
  // the float32 quotient) exactly
  const float lof = static_cast<float>(lo), hif = static_cast<float>(hi);
  float ymax = lof;
#pragma omp simd reduction(max : ymax)
  for (int64_t j = 0; j < M; ++j) {
    const double v = (rt + static_cast<double>(a[j])) + col[j];
    float u = std::nearbyint(static_cast<float>(v * m) / ls);
    u = u < lof ? lof : (u > hif ? hif : u);
    y[j] = u;
    ymax = u > ymax ? u : ymax;
  }
  int64_t sum = 0;
  int64_t j0 = 0;
#ifdef FQVIT_HAVE_AVX512
  if (count16) j0 = lis_exp_gather_avx512(y, M, ymax, tp, dd, ev, &sum);
#endif
#pragma omp simd reduction(+ : sum)
  for (int64_t j = j0; j < M; ++j) {
    const int32_t d = static_cast<int32_t>(ymax - y[j]);
    dd[j] = d;
    ev[j] = tp[d];
    sum += ev[j];
  }
  const int64_t s2 = 2 * sum;
  bool falling = true;
  for (int64_t k = 0; k < K; ++k) {
    // ⌊(2Σ − odd_k)/den_k⌋ (s2 > odd_k): below 2^53 from the float64 reciprocal, whose quotient
    // is within one of the truth, and one exact integer correction either way
    const int64_t num = s2 - op[k];
    int64_t t;
    if (num >= 0 && num < (int64_t{1} << 53)) {
      t = static_cast<int64_t>(static_cast<double>(num) * inv_den[k]);
      t -= static_cast<int64_t>(t * dp[k] > num);
      t += static_cast<int64_t>((t + 1) * dp[k] <= num);
    } else {
      t = num / dp[k];
    }
    theta[k] = t;
    falling = falling && (k == 0 || t <= theta[k - 1]);
  }
  // code_j = #{k : D_k ≤ d_j} = #{k : T[d_j] ≤ θ_k} (T non-increasing); for K = 16 counted
  // directly from e_j = T[d_j]
#ifdef FQVIT_HAVE_AVX512
  if (count16 && K == 16 && falling) {
    lis_codes16_avx512(ev, M, theta, code);
    lis_operands(code, M, groups, o, stride);
    return;
  }
#endif
  for (int64_t k = 0; k < K; ++k) D[k] = 0;
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t half = halves[st];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) D[k] = tp[D[k] + half - 1] > theta[k] ? D[k] + half : D[k];
  }
  for (int64_t k = 0; k < K; ++k) D[k] += tp[D[k]] > theta[k] ? 1 : 0;
  // code(d) = #{k : D_k ≤ d}; D is non-decreasing (θ_k falls with k), so code(d) = c on
  // [D_{c−1}, D_c) (D_{−1} = 0, D_K = levels + 1)
  int64_t from = 0;
  for (int64_t c = 0; c <= K; ++c) {
    const int64_t to = c < K ? D[c] : levels + 1;
    for (int64_t d = from; d < to; ++d) lut[d] = static_cast<int32_t>(c);
    from = std::max(from, to);
  }
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) code[j] = lut[dd[j]];
  lis_operands(code, M, groups, o, stride);
}

// the probe steps of a branch-free binary search over n entries (lis_row): len/2 while len > 1
std::vector<int64_t> search_halves(int64_t n) {
  std::vector<int64_t> h;
  for (int64_t len = n; len > 1; len -= len / 2) h.push_back(len / 2);
  return h;
}

// (B, N, 3·H·d) → (3, B·H, N, d) int8: per channel c, code = clamp(⌊x/Δ_c⌉ + z_c, lo_c, hi_c)
// minus the operand offset off_c, where x is the float32 qkv output, or the int32 accumulator
// of the qkv GEMM (``acc_scale`` non-empty: x = float32(acc + b_int)·Δ + bias, the integer
// Linear's own rescale, never stored); int32 input without acc_scale: already codes
// qkv (B, N, C3): float32 values, or int32 (codes, or with acc_scale the accumulator) stored or
// computed on tiles (src, rows b·N + n)
at::Tensor qkv_int8_rows(const char* who, const at::Tensor* qkv, const AccRows* src, int64_t B,
                         int64_t N, int64_t C3, const at::Tensor& scale, const at::Tensor& zero,
                         const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& offset,
                         int64_t heads, const at::Tensor& bias_int, const at::Tensor& acc_scale,
                         const at::Tensor& bias_float, const at::TensorOptions& options) {
  const bool ints = src != nullptr || qkv->scalar_type() == at::kInt;
  const bool acc = ints && acc_scale.numel() > 0;
  TORCH_CHECK(src == nullptr || acc, who, ": products on tiles need the rescale parameters");
  for (const auto* t : {&scale, &zero, &lo, &hi, &offset}) check_cpu(*t, at::kFloat, 1, who, "per-channel parameter");
  TORCH_CHECK(heads >= 1 && C3 % (3 * heads) == 0, who, ": last dim ", C3, " is not 3·heads·d");
  for (const auto* t : {&scale, &zero, &lo, &hi, &offset})
    TORCH_CHECK(t->numel() == C3, who, ": per-channel parameters of length ", C3, " expected");
  if (acc) check_rescale_params(bias_int, acc_scale, bias_float, C3, who);
  const int64_t d = C3 / (3 * heads);
  auto out = at::empty({3, B * heads, N, d}, options.dtype(at::kChar));
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>(), *lp = lo.data_ptr<float>(),
              *hp = hi.data_ptr<float>(), *op = offset.data_ptr<float>();
  const float* xf = ints ? nullptr : qkv->data_ptr<float>();
  const int32_t* bi = acc ? bias_int.data_ptr<int32_t>() : nullptr;
  const float* sc = acc ? acc_scale.data_ptr<float>() : nullptr;
  const float* bf = acc ? bias_float.data_ptr<float>() : nullptr;
  int8_t* o = out.data_ptr<int8_t>();
  const int64_t part = B * heads * N * d;
  // one row r = b·N + n: its C3 values (x: float32 values or int32 accumulator / codes)
  auto row_out = [=](int64_t r, const float* x, const int32_t* xi, float* row, float* y) {
    const int64_t b = r / N, n = r % N;
    if (acc) {
      rescale_float(xi, bi, sc, bf, C3, y);
      quantize_offset(y, sp, zp, lp, hp, op, C3, row);
    } else if (ints) {
      codes_offset(xi, op, C3, row);
    } else {
      quantize_offset(x, sp, zp, lp, hp, op, C3, row);
    }
    for (int64_t c = 0; c < C3; c += d) {
      const int64_t p = c / (heads * d), h = (c / d) % heads;
      to_int8_span(row + c, d, o + p * part + ((b * heads + h) * N + n) * d);
    }
  };
  if (src != nullptr) {
    src->for_rows([&](int64_t begin, int64_t end, const int32_t* rows, int64_t ld) {
      std::vector<float> row(C3), y(C3);
      for (int64_t r = begin; r < end; ++r)
        row_out(r, nullptr, rows + (r - begin) * ld, row.data(), y.data());
    });
    return out;
  }
  const int32_t* xi = ints ? qkv->data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, B * N, 16, [=](int64_t begin, int64_t end) {
    std::vector<float> row(C3), y(acc ? C3 : 0);
    for (int64_t r = begin; r < end; ++r)
      row_out(r, xf ? xf + r * C3 : nullptr, xi ? xi + r * C3 : nullptr, row.data(), y.data());
  });
  return out;
}

at::Tensor qkv_int8(const at::Tensor& qkv, const at::Tensor& scale, const at::Tensor& zero,
                    const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& offset,
                    int64_t heads, const at::Tensor& bias_int, const at::Tensor& acc_scale,
                    const at::Tensor& bias_float) {
  const char* who = "qkv_int8";
  check_cpu(qkv, qkv.scalar_type() == at::kInt ? at::kInt : at::kFloat, 3, who, "qkv");
  return qkv_int8_rows(who, &qkv, nullptr, qkv.size(0), qkv.size(1), qkv.size(2), scale, zero, lo,
                       hi, offset, heads, bias_int, acc_scale, bias_float, qkv.options());
}

// the same for the qkv GEMM's product a · packed B (rows b·N + n of `batch` images) computed on
// AMX tiles block by block (AccRows), with its rescale
at::Tensor tiles_qkv_int8(const at::Tensor& a, const at::Tensor& packed, int64_t n, int64_t batch,
                          const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& lo,
                          const at::Tensor& hi, const at::Tensor& offset, int64_t heads,
                          const at::Tensor& bias_int, const at::Tensor& acc_scale,
                          const at::Tensor& bias_float) {
  const char* who = "tiles_qkv_int8";
  const AccRows src = AccRows::tiles(a, packed, n, who);
  TORCH_CHECK(batch >= 1 && src.M % batch == 0, who, ": ", src.M, " rows are not ", batch, " images");
  return qkv_int8_rows(who, nullptr, &src, batch, src.M / batch, n, scale, zero, lo, hi, offset,
                       heads, bias_int, acc_scale, bias_float, a.options());
}

at::Tensor bmm_int8(const at::Tensor& a, const at::Tensor& b) {
  const char* who = "bmm_int8";
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), who, ": CPU tensors expected");
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, who,
              ": int8 operands expected, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              who, ": (G, M, K) @ (G, K, N) expected, got ", a.sizes(), " @ ", b.sizes());
  const int64_t G = a.size(0);
  auto c = at::empty({G, a.size(1), b.size(2)}, a.options().dtype(at::kInt));
  const at::ThreadLocalState state;   // the caller's dispatch state (e.g. inference mode)
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = begin; i < end; ++i) {
      auto ci = c.select(0, i);
      at::_int_mm_out(ci, a.select(0, i), b.select(0, i));
    }
  });
  return c;
}

// ---- whole attention cores, one matrix (or block of query rows) per task ------------------
// The steps of IntegerAttention's torch path (qk GEMMs → logits → softmax / LIS → operands → P·V GEMMs
// → requantization), each matrix run start to end by one thread: its intermediates stay in that
// core's cache and no step waits for the others (a task: one (image, head) matrix, or a block
// of its query rows when the batch is small). The int8 GEMMs run on AMX tiles where the caller
// asks for them (amx_gemm.h). ATen ops called here (torch._int_mm, softmax,
// div, log2) are the ones the Python path calls, run single-threaded.

struct QkvOperands {
  const at::Tensor &qa, &ka, &va;  // (B·H, N, d) int8
  int64_t B, H, N, d;
};

QkvOperands check_operands(const char* who, const at::Tensor& qa, const at::Tensor& ka,
                           const at::Tensor& va, int64_t heads) {
  for (const auto* t : {&qa, &ka, &va}) check_cpu(*t, at::kChar, 3, who, "q / k / v operands");
  TORCH_CHECK(qa.sizes() == ka.sizes() && qa.sizes() == va.sizes(), who,
              ": q, k, v operands of one shape expected");
  TORCH_CHECK(heads >= 1 && qa.size(0) % heads == 0, who, ": batch·heads not divisible by heads");
  return QkvOperands{qa, ka, va, qa.size(0) / heads, heads, qa.size(1), qa.size(2)};
}

// (G, N, d) int8 values → (G, N, d + 1) with a column of ones (the Σ operand column of the P·V
// GEMM), once per call
at::Tensor ones_column(const at::Tensor& v) {
  auto out = at::empty({v.size(0), v.size(1), v.size(2) + 1}, v.options());
  out.narrow(2, 0, v.size(2)).copy_(v);
  out.narrow(2, v.size(2), 1).fill_(1);
  return out;
}

// Σ_e x[i, e] per row (|Σ| ≤ 128·d < 2^31: int32 lanes; a local sum, since int8 stores could
// alias the output)
FQVIT_CLONES void row_sums_into(const int8_t* __restrict x, int64_t n, int64_t d,
                                int64_t* __restrict s) {
  for (int64_t i = 0; i < n; ++i) {
    int32_t acc = 0;
    for (int64_t e = 0; e < d; ++e) acc += x[i * d + e];
    s[i] = acc;
  }
}

std::vector<int64_t> row_sums(const int8_t* x, int64_t n, int64_t d) {
  TORCH_CHECK(d < (int64_t{1} << 23), "row_sums: rows of at most 2^23 codes");
  std::vector<int64_t> s(n);
  row_sums_into(x, n, d, s.data());
  return s;
}

// Row blocks per matrix so that small batches still give every thread work: the query rows of
// one matrix are independent through the whole core (QKᵀ, softmax / LIS and P·V are row-wise).
int64_t row_blocks(int64_t matrices, int64_t rows) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(rows, (want + matrices - 1) / matrices));
}

// The two int8 GEMMs of a task (QKᵀ and P·V): torch._int_mm, or AMX tiles (amx_gemm.h) where the
// caller asks for them. The tiles read whole 32-row blocks and 64-byte K slices of A; the bytes
// past K belong to the next rows but meet the packed B's zero rows, so A needs no padded copy,
// only readable memory: the operand planes get slack, q is copied only at the end of its tensor.
// The packed kᵀ and values of the last matrix are kept for the next task.
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct TaskGemms {
  bool amx = false;
  int64_t k_of = -1, v_of = -1;      // matrices whose packed kᵀ / values are held
  AlignedVector<int8_t> kp, vp, qpad;
  AlignedVector<int32_t> qk, pv;     // AMX outputs
  at::Tensor held;                   // torch._int_mm output
  // P·V operand planes: planes × span rows of N codes at row stride ld(N) (on tiles a whole
  // number of cache lines: rows that straddle lines load slower), with the tiles' slack
  int64_t ld(int64_t N) const { return amx ? round_up(N, 64) : N; }
  at::Tensor operands(int64_t planes, int64_t span, int64_t N, const at::TensorOptions& o) const {
    const int64_t slack = amx ? 32 * ld(N) + 64 : 0;
    return at::empty({planes * span * ld(N) + slack}, o);
  }
};

// Step 1 of a task: rows [i0, i0 + R) of matrix g's QKᵀ (int8 GEMM) and the operands' row sums
// (the zero-point terms); row(i, acc, sums) gets row i's N int32 products. On tiles the products
// come in stripes of 32 rows whose outputs stay in the L1 cache until their rows are used.
struct QkSums {
  std::vector<int64_t> q, k;
};

template <typename Row>
void qk_rows(const at::Tensor& qa, const at::Tensor& ka, int64_t g, int64_t i0, int64_t R,
             TaskGemms& tg, Row row) {
  const int64_t N = qa.size(1), d = qa.size(2);
  const int8_t* qp = qa.data_ptr<int8_t>() + (g * N + i0) * d;
  const int8_t* kp = ka.data_ptr<int8_t>() + g * N * d;
  const QkSums sums{row_sums(qp, R, d), row_sums(kp, N, d)};
  if (!tg.amx) {
    tg.held = at::_int_mm(qa[g].narrow(0, i0, R), ka[g].t());
    const int32_t* acc = tg.held.data_ptr<int32_t>();
    for (int64_t i = 0; i < R; ++i) row(i, acc + i * N, sums);
    return;
  }
  if (tg.k_of != g) {                // kᵀ: K = d (contiguous in a key row), N keys
    tg.kp.resize(fqvit_amx::packed_bytes(d, N));
    fqvit_amx::pack(kp, 1, d, d, N, tg.kp.data());
    tg.k_of = g;
  }
  const int64_t Rp = round_up(R, 32), Np = round_up(N, 32);
  const int8_t* a = qp;
  const int8_t* end = static_cast<const int8_t*>(qa.storage().data()) + qa.storage().nbytes();
  if (qp + (Rp - 1) * d + round_up(d, 64) > end) {     // the tiles would read past q's storage
    tg.qpad.assign(Rp * d + 64, 0);
    std::memcpy(tg.qpad.data(), qp, R * d);
    a = tg.qpad.data();
  }
  tg.qk.resize(32 * Np);
  for (int64_t r0 = 0; r0 < R; r0 += 32) {
    const int64_t rn = std::min<int64_t>(32, R - r0);
    fqvit_amx::matmul_padded(a + r0 * d, d, tg.kp.data(), rn, N, d, tg.qk.data(), Np);
    for (int64_t i = 0; i < rn; ++i) row(r0 + i, tg.qk.data() + i * Np, sums);
  }
}

// Steps 3–4 of a task: the operand planes of its R rows, stacked by rows in ``operands``
// (np planes, ids pid), times the value operands with their ones column ``vaug`` (N × (d + 1))
// in one int8 GEMM, then each row's requantization into out_row(i).
#ifdef FQVIT_HAVE_AVX512
// pv_row where every class accumulates exactly (int64) and there are at most 8 classes: the
// class sums of 8 outputs at a time stay in registers across the planes (no scratch arrays),
// then the same steps: t_c = double(acc_c)·m_c summed in class order, float32(y)/Δ rounded to
// nearest even, + z, clamped (8 lanes; masked loads and stores for d not a multiple of 8)
__attribute__((target("avx512f,avx512dq,avx512vl"))) void pv_row_exact_avx512(
    const PvConsts& k, const int32_t* const* rows, const int64_t* pid, int64_t nplanes, int64_t z,
    const double* mult, int64_t h, int32_t* o) {
  const int64_t d = k.d;
  int64_t zs[64];
  int64_t cls[64];
  __m128i sh[64];
  for (int64_t i = 0; i < nplanes; ++i) {
    zs[i] = static_cast<int64_t>(rows[i][d]) * z;
    cls[i] = k.pc[pid[i]];
    sh[i] = _mm_cvtsi64_si128(k.ps[pid[i]]);
  }
  const bool per_channel = k.nq != 1;
  const float* sp = per_channel ? k.sp + h * d : nullptr;
  const float* zp = per_channel ? k.zp + h * d : nullptr;
  const __m256 lo = _mm256_set1_ps(k.lo), hi = _mm256_set1_ps(k.hi);
  for (int64_t e = 0; e < d; e += 8) {
    const __mmask8 m = d - e >= 8 ? static_cast<__mmask8>(0xFF)
                                  : static_cast<__mmask8>((1u << (d - e)) - 1u);
    __m512i acc[8];
    for (int64_t c = 0; c < k.C; ++c) acc[c] = _mm512_setzero_si512();
    for (int64_t i = 0; i < nplanes; ++i) {
      const __m512i r = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(m, rows[i] + e));
      const __m512i t = _mm512_sll_epi64(_mm512_sub_epi64(_mm512_set1_epi64(zs[i]), r), sh[i]);
      acc[cls[i]] = _mm512_add_epi64(acc[cls[i]], t);
    }
    __m512d y = _mm512_mul_pd(_mm512_cvtepi64_pd(acc[0]), _mm512_set1_pd(mult[0]));
    for (int64_t c = 1; c < k.C; ++c)
      y = _mm512_add_pd(y, _mm512_mul_pd(_mm512_cvtepi64_pd(acc[c]), _mm512_set1_pd(mult[c])));
    const __m256 s = per_channel ? _mm256_maskz_loadu_ps(m, sp + e) : _mm256_set1_ps(k.sp[0]);
    const __m256 zz = per_channel ? _mm256_maskz_loadu_ps(m, zp + e) : _mm256_set1_ps(k.zp[0]);
    // a masked-off lane divides 0 by 0: its NaN is never stored
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm512_cvtpd_ps(y), s),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_add_ps(q, zz);
    q = _mm256_blendv_ps(q, lo, _mm256_cmp_ps(q, lo, _CMP_LT_OQ));
    q = _mm256_blendv_ps(q, hi, _mm256_cmp_ps(q, hi, _CMP_GT_OQ));
    _mm256_mask_storeu_epi32(o + e, m, _mm256_cvttps_epi32(q));
  }
}
#endif

template <typename OutRow>
void pv_rows(const PvConsts& k, PvScratch& scratch, const at::Tensor& operands, int64_t np,
             const int64_t* pid, int64_t R, const at::Tensor& vaug, int64_t z, const double* mult,
             int64_t h, std::vector<const int32_t*>& rows, OutRow out_row, TaskGemms& tg,
             int64_t g, bool vector = true) {
  const int64_t N = vaug.size(0), d = k.d;
  const int32_t* pp;
  int64_t ldp = d + 1;
  if (tg.amx) {
    if (tg.v_of != g) {              // values with their ones column: K = N, N' = d + 1
      tg.vp.resize(fqvit_amx::packed_bytes(N, d + 1));
      fqvit_amx::pack(vaug.data_ptr<int8_t>(), d + 1, 1, N, d + 1, tg.vp.data());
      tg.v_of = g;
    }
    ldp = round_up(d + 1, 32);
    tg.pv.resize(round_up(np * R, 32) * ldp);
    fqvit_amx::matmul_padded(operands.data_ptr<int8_t>(), tg.ld(N), tg.vp.data(), np * R, d + 1,
                             N, tg.pv.data(), ldp);
    pp = tg.pv.data();
  } else {
    tg.held = at::_int_mm(operands.narrow(0, 0, np * R * N).view({np * R, N}), vaug);
    pp = tg.held.data_ptr<int32_t>();
  }
  bool fast = false;
#ifdef FQVIT_HAVE_AVX512
  fast = vector && k.C <= 8 && np <= 64 && avx512().dq_vl;
  for (int64_t c = 0; c < k.C && fast; ++c) fast = k.ex[c];
#endif
  for (int64_t i = 0; i < R; ++i) {
    for (int64_t j = 0; j < np; ++j) rows[j] = pp + (j * R + i) * ldp;
#ifdef FQVIT_HAVE_AVX512
    if (fast) {
      pv_row_exact_avx512(k, rows.data(), pid, np, z, mult, h, out_row(i));
      continue;
    }
#endif
    pv_row(k, scratch, rows.data(), pid, np, z, mult, h, out_row(i));
  }
}

at::Tensor attention_pow2(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
                          const at::Tensor& zq, const at::Tensor& zk, const at::Tensor& zv,
                          const at::Tensor& m, const at::Tensor& probs_delta, int64_t mode,
                          double r, double q, double split, int64_t bits, const at::Tensor& table,
                          const at::Tensor& plane_class, const at::Tensor& plane_shift,
                          const at::Tensor& class_exact, const at::Tensor& mult,
                          const at::Tensor& out_scale, const at::Tensor& out_zero, int64_t qmin,
                          int64_t qmax, int64_t heads, const at::Tensor& bucket_base,
                          const at::Tensor& bucket_inc, const at::Tensor& bucket_thr,
                          int64_t bucket_shift, const at::Tensor& code_thresholds, bool vector,
                          bool amx) {
  const char* who = "attention_pow2";
  TORCH_CHECK(!amx || fqvit_amx::available(), who, ": amx=True but AMX is not available");
  const QkvOperands x = check_operands(who, qa, ka, va, heads);
  const Buckets bk = check_buckets(who, bucket_base, bucket_inc, bucket_thr, bucket_shift);
  const float* thr16 = check_thresholds16(who, code_thresholds, bk, bits);
  TORCH_CHECK(!bk.on || (mode != 3 && probs_delta.numel() == 1 &&
                         probs_delta.scalar_type() == at::kFloat),
              who, ": code buckets are for log codes with one float32 Δ");
  const float delta = bk.on ? probs_delta.item<float>() : 0.0f;
  const int64_t B = x.B, H = x.H, N = x.N, d = x.d, G = B * H;
  for (const auto* t : {&zq, &zk, &zv}) check_cpu(*t, at::kLong, 1, who, "zero points");
  check_cpu(m, at::kDouble, 1, who, "m");
  check_cpu(table, at::kChar, 2, who, "table");
  check_cpu(plane_class, at::kLong, 1, who, "plane_class");
  check_cpu(plane_shift, at::kLong, 1, who, "plane_shift");
  check_cpu(class_exact, at::kBool, 1, who, "class_exact");
  check_cpu(mult, at::kDouble, 2, who, "mult");
  check_cpu(out_scale, at::kFloat, 1, who, "out_scale");
  check_cpu(out_zero, at::kFloat, 1, who, "out_zero");
  TORCH_CHECK(zq.numel() == G && zk.numel() == G && zv.numel() == G && m.numel() == G, who,
              ": one zero point / multiplier per matrix");
  TORCH_CHECK(mode >= 0 && mode <= 3 && bits >= 2 && bits <= 16, who, ": bad code mode / bits");
  const int64_t P = table.size(0), L = table.size(1), C = class_exact.numel();
  TORCH_CHECK(plane_class.numel() == P && plane_shift.numel() == P && C >= 1 && C <= 8 &&
                  mult.size(0) == C && mult.size(1) == G,
              who, ": plane / class tables do not match");
  const int64_t nq = out_scale.numel();
  TORCH_CHECK((nq == 1 || nq == H * d) && out_zero.numel() == nq, who,
              ": out_scale / out_zero per tensor or per channel of H·d");
  const int64_t *pc = plane_class.data_ptr<int64_t>(), *ps = plane_shift.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(pc[p] >= 0 && pc[p] < C && ps[p] >= 0 && ps[p] < 63, who, ": plane ", p,
                " has class ", pc[p], " / shift ", ps[p]);
  auto out = at::empty({B, N, H * d}, qa.options().dtype(at::kInt));
  const PvConsts k{C, d, nq, pc, ps, class_exact.data_ptr<bool>(), out_scale.data_ptr<float>(),
                   out_zero.data_ptr<float>(), static_cast<float>(qmin), static_cast<float>(qmax)};
  const int64_t *zqp = zq.data_ptr<int64_t>(), *zkp = zk.data_ptr<int64_t>(),
                *zvp = zv.data_ptr<int64_t>();
  const double *mp = m.data_ptr<double>(), *mu = mult.data_ptr<double>();
  const int8_t* tp = table.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  // modes 0–2: log codes (r, q: AdaLog's r and q); 3: twin uniform (r, q: Δ_R1, Δ_R2; split s)
  const float rf = static_cast<float>(r), qf = static_cast<float>(q), sf = static_cast<float>(split);
  const float top = static_cast<float>(int64_t{1} << bits);
  std::vector<int64_t> bad(G, 0);
  const auto vaug = ones_column(va);
  const at::ThreadLocalState state;
  const int64_t nb = row_blocks(G, N), span = (N + nb - 1) / nb;
  at::parallel_for(0, G * nb, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    PvScratch scratch(C, d);
    TaskGemms tg;
    tg.amx = amx;
    std::vector<const int32_t*> rows(P);
    std::vector<int64_t> pid(P);
    std::vector<double> cm(C);
    thread_local Scratch<int32_t> idx_buf;
    int32_t* const idx = idx_buf.get(span * N);
    auto logits = at::empty({span, N}, qa.options().dtype(at::kFloat));
    const auto operands = tg.operands(P, span, N, qa.options());
    int8_t* const ob = operands.data_ptr<int8_t>();
    const int64_t ldo = tg.ld(N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / nb, i0 = (t % nb) * span, b = g / H, h = g % H;
      const int64_t R = std::min(span, N - i0);
      if (R <= 0) continue;
      auto lgt = logits.narrow(0, 0, R);
      float* lg = lgt.data_ptr<float>();
      qk_rows(qa, ka, g, i0, R, tg, [&](int64_t i, const int32_t* acc, const QkSums& sums) {
        logits_row(acc, sums.k.data(), d * zqp[g] * zkp[g] - sums.q[i] * zkp[g], zqp[g], mp[g], N,
                   lg + i * N);
      });
      auto l = at::_softmax(lgt, -1, false);
      if (mode == 3) {
        twin_rows(l.data_ptr<float>(), R * N, sf, rf, qf, static_cast<float>((1 << (bits - 1)) - 1),
                  idx);
      } else if (bk.on) {
        bucket_rows(l.data_ptr<float>(), R * N, delta, bk.shift, bk.base, bk.inc, bk.thr,
                    static_cast<int32_t>(top), idx, vector, thr16);
      } else {
        l.div_(probs_delta);
        at::log2_out(l, l);
        log_rows(l.data_ptr<float>(), R * N, mode, rf, qf, top, idx);
      }
      int32_t lo = static_cast<int32_t>(L), hi = -1;
      for (int64_t e = 0; e < R * N; ++e) {
        lo = std::min(lo, idx[e]);
        hi = std::max(hi, idx[e]);
      }
      if (lo < 0 || hi >= L) {
        bad[g] = 1;
        continue;
      }
      int64_t np = 0;                      // planes with a non-zero entry in the codes' range
      for (int64_t p = 0; p < P; ++p) {
        bool any = false;
        for (int64_t c = lo; c <= hi; ++c) any = any || tp[p * L + c] != 0;
        if (!any) continue;
        gather_plane(tp + p * L, L, idx, R, N, ob + np * R * ldo, ldo, vector);   // stacked by rows
        pid[np++] = p;
      }
      if (np == 0) {                       // every probability is the zero code: P·V = 0
        pid[np++] = 0;
        std::memset(ob, 0, R * ldo);
      }
      for (int64_t c = 0; c < C; ++c) cm[c] = mu[c * G + g];
      pv_rows(k, scratch, operands, np, pid.data(), R, vaug[g], zvp[g], cm.data(), h, rows,
              [&](int64_t i) { return op + (b * N + i0 + i) * H * d + h * d; }, tg, g, vector);
    }
  });
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(!bad[g], who, ": probability codes outside the table's range (matrix ", g, ")");
  return out;
}

at::Tensor attention_lis(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
                         int64_t zq, int64_t zk, int64_t zv, double m, double logit_scale,
                         double lo, double hi, const at::Tensor& table, const at::Tensor& odd,
                         const at::Tensor& den, int64_t groups, double out_step,
                         double out_scale, double out_zero, int64_t qmin, int64_t qmax,
                         int64_t heads, bool vector, bool amx) {
  const char* who = "attention_lis";
  TORCH_CHECK(!amx || fqvit_amx::available(), who, ": amx=True but AMX is not available");
  const QkvOperands x = check_operands(who, qa, ka, va, heads);
  const int64_t B = x.B, H = x.H, N = x.N, d = x.d;
  check_cpu(table, at::kLong, 1, who, "table");
  check_cpu(odd, at::kLong, 1, who, "odd");
  check_cpu(den, at::kLong, 1, who, "den");
  const int64_t K = odd.numel(), levels = table.numel();
  TORCH_CHECK(den.numel() == K && K >= 1 && groups >= 1 && 8 * groups >= K, who,
              ": thresholds and groups do not match");
  // Σ_j 2^(8·groups − 1)·|v − z_v| must fit the int64 accumulators: at most 4 groups (5-bit codes)
  TORCH_CHECK(groups <= 4 && N * (128 + std::abs(zv)) < (int64_t{1} << 31), who,
              ": at most 4 operand groups (5-bit codes) for the int64 accumulators, got ", groups);
  TORCH_CHECK(hi - lo + 1 <= static_cast<double>(levels), who, ": table shorter than the logit range");
  TORCH_CHECK(lo == std::nearbyint(lo) && hi == std::nearbyint(hi) && std::fabs(lo) < 16777216.0 &&
                  std::fabs(hi) < 16777216.0,
              who, ": integer logit code bounds below 2^24 expected");
  auto out = at::empty({B, N, H * d}, qa.options().dtype(at::kInt));
  const int64_t frac = 8 * groups - 1;
  std::vector<int64_t> pc(groups, 0), ps(groups);
  for (int64_t g = 0; g < groups; ++g) ps[g] = frac - (8 * g + 7);
  const bool exact = true;
  const float so = static_cast<float>(out_scale), zo = static_cast<float>(out_zero);
  const PvConsts k{1, d, 1, pc.data(), ps.data(), &exact, &so, &zo, static_cast<float>(qmin),
                   static_cast<float>(qmax)};
  const int64_t *tp = table.data_ptr<int64_t>(), *opd = odd.data_ptr<int64_t>(),
                *dp = den.data_ptr<int64_t>();
  const float ls = static_cast<float>(logit_scale);
  int32_t* op = out.data_ptr<int32_t>();
  const auto vaug = ones_column(va);
  const at::ThreadLocalState state;
  const int64_t nb = row_blocks(B * H, N), span = (N + nb - 1) / nb;
  const auto halves = search_halves(levels);
  std::vector<double> inv_den(K);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(dp[k] >= 1, who, ": positive threshold denominators expected");
    inv_den[k] = 1.0 / static_cast<double>(dp[k]);
  }
  const bool count16 = vector && avx512().f;
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    PvScratch scratch(1, d);
    TaskGemms tg;
    tg.amx = amx;
    std::vector<const int32_t*> rows(groups);
    std::vector<int64_t> pid(groups);
    for (int64_t gr = 0; gr < groups; ++gr) pid[gr] = gr;
    std::vector<double> col(N);
    std::vector<float> y(N);
    std::vector<int32_t> dd(N), code(N), lut(levels + 1);
    std::vector<int64_t> D(K), theta(K), ev(N);
    const auto operands = tg.operands(groups, span, N, qa.options());
    int8_t* ob = operands.data_ptr<int8_t>();
    const int64_t ldo = tg.ld(N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / nb, i0 = (t % nb) * span, b = g / H, h = g % H;
      const int64_t R = std::min(span, N - i0);
      if (R <= 0) continue;
      bool first = true;
      qk_rows(qa, ka, g, i0, R, tg, [&](int64_t i, const int32_t* acc, const QkSums& sums) {
        if (first) {
          for (int64_t j = 0; j < N; ++j) col[j] = static_cast<double>(sums.k[j] * -zq);
          first = false;
        }
        lis_row(acc, static_cast<double>(sums.q[i] * -zk + d * zq * zk), col.data(), N, m, ls, lo,
                hi, tp, levels, halves.data(), static_cast<int64_t>(halves.size()), opd, dp,
                inv_den.data(), K, groups, y.data(), dd.data(), code.data(), lut.data(), D.data(),
                theta.data(), ev.data(), ob + i * ldo, R * ldo, count16);
      });
      pv_rows(k, scratch, operands, groups, pid.data(), R, vaug[g], zv, &out_step, h, rows,
              [&](int64_t i) { return op + (b * N + i0 + i) * H * d + h * d; }, tg, g, vector);
    }
  });
  return out;
}

// One row of FQ-ViT's integer LayerNorm, the fast route of ptf._int_layernorm_rows with its
// exactness checks per row (false: the caller computes the row by the reference).
struct LnConsts {
  int64_t C;
  const float* s_in;       // PTF channel scale (C)
  const double* factor;    // 2^α (C)
  double lo_in, hi_in, delta1, delta_out, eps, top, gamma_absmax, beta_absmax, beta_out_absmax;
  const double *gamma, *gamma_abs, *beta, *beta_out, *sign;  // sign may be null
  bool fold_mean;
  double lo_out, hi_out, s_out;
};

constexpr double kExactLimit = 4503599627370496.0;  // 2^52
constexpr double kEdge = 1.4551915228366852e-11;    // 2^-36

// The correctly rounded quotient a/d from y = RN(1/d), without a division: q0 = RN(a·y) is
// within two ulps, one correction with the exact remainder r = a − q0·d (an fma) makes it
// faithful, and a second is RN(a/d) by Markstein's theorem (y within half an ulp of 1/d, q
// faithful ⇒ RN(q + r·y) = RN(a/d); IEEE normal range, which the callers' bounds keep).
static inline __attribute__((always_inline)) double div_rn(double a, double d, double y) {
  const double q0 = a * y;
  const double q1 = __builtin_fma(__builtin_fma(-q0, d, a), y, q0);
  return __builtin_fma(__builtin_fma(-q1, d, a), y, q1);
}

// PTF shifted codes of one row: clamp(⌊float32(x/Δ_c)⌉, lo, hi)·2^α_c (float64), and their sum
// and sum of squares. Every code is an integer and every partial sum an integer below 2^53 when
// the final S2·C < 2^52 holds (checked by the caller), so the sums are exact in any order: they
// are summed in SIMD lanes.
FQVIT_CLONES void ln_codes(const float* __restrict x, const float* __restrict s, double lo,
                           double hi, const double* __restrict factor, int64_t n,
                           double* __restrict codes, double* sums) {
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t c = 0; c < n; ++c) {
    double v = std::nearbyint(static_cast<double>(x[c] / s[c]));
    v = v < lo ? lo : (v > hi ? hi : v);
    v = v * factor[c];
    codes[c] = v;
    s1 += v;
    s2 += v * v;
  }
  sums[0] = s1;
  sums[1] = s2;
}

// Per channel: |a| = Δ_1/σ·|γ|/Δ_out (/C), 2^n = 2^(d−1)/2^⌊log2|a|⌋ clamped to [1, 2^31],
// M = ⌊|a|·2^n⌋ and 2^−n (the division by 2^n below as an exact product); 1/2^⌊log2|a|⌋ is
// formed from the exponent bits (exact, no division). A channel where that or the bound
// |a|·2^n ∈ [2^(d−1), 2^d) (with margin) does not hold is counted: such rows take the reference
// route. |a| = 0 (a zero γ_c; real DeiT-Tiny LayerNorms have one) is the reference's literal
// route exactly: ⌊log2(tiny)⌋ = −1022 clamps n to 31, M = 0; the exponent bits give the same
// 2^31, 2^−31 and M (E = 0), so such a channel is not counted. Then the output
// y = ⌊(B + M·x_in)/2^n⌉ + 0 (B rounded), clamped to the output codes, times Δ_out (float32).
// One pass over the channels; returns the number of channels whose multiplier bound fails, in
// which case the row's outputs are discarded by the caller (the reference recomputes the row).
template <bool FoldMean>
FQVIT_CLONES int64_t ln_fused(double ds, const double* __restrict gamma_abs, double delta_out,
                              double Cd, double top, const double* __restrict codes,
                              const double* __restrict gamma, const double* __restrict beta,
                              const double* __restrict beta_out, const double* __restrict sign,
                              double mu_sigma, double s1, double lo_out, double hi_out,
                              double s_out, int64_t n, float* __restrict o) {
  int64_t bad = 0;
  const double lo = top / 2.0 * (1.0 + kEdge), hi = top * (1.0 - kEdge), half = top / 2.0;
  const double inv_half = 2.0 / top;
  const double inv_out = 1.0 / delta_out, inv_c = 1.0 / Cd;
  for (int64_t c = 0; c < n; ++c) {
    double a = ds * gamma_abs[c];
    a = div_rn(a, delta_out, inv_out);
    if (!FoldMean) a = div_rn(a, Cd, inv_c);
    uint64_t bits;
    std::memcpy(&bits, &a, 8);
    const uint64_t E = (bits >> 52) & 0x7FF;
    const uint64_t rbits = (2046 - E) << 52;          // 1/2^(E − 1023), E in [1, 2045]
    double r, e;
    std::memcpy(&r, &rbits, 8);
    const uint64_t ebits = E << 52;
    std::memcpy(&e, &ebits, 8);
    double t = r * half;
    t = t < 1.0 ? 1.0 : (t > 2147483648.0 ? 2147483648.0 : t);
    double it = e * inv_half;                          // 1/t, the same clamp
    it = it > 1.0 ? 1.0 : (it < 4.656612873077393e-10 ? 4.656612873077393e-10 : it);
    const double mm = a * t;
    bad += 1 - ((static_cast<int64_t>(E >= 1) & static_cast<int64_t>(E <= 2045) &
                 static_cast<int64_t>(mm >= lo) & static_cast<int64_t>(mm <= hi)) |
                static_cast<int64_t>(a == 0.0));
    const double m = std::floor(mm);
    double bb, xin;
    if (FoldMean) {
      bb = mu_sigma * gamma[c];
      bb = beta[c] - bb;
      bb = div_rn(bb, delta_out, inv_out);
      bb = bb * t;
      xin = codes[c];
    } else {
      bb = beta_out[c] * t;
      xin = codes[c] * Cd - s1;
    }
    bb = std::nearbyint(bb);
    const double mc = m * sign[c];
    double y = std::nearbyint((bb + mc * xin) * it) + 0.0;
    y = y < lo_out ? lo_out : (y > hi_out ? hi_out : y);
    o[c] = static_cast<float>(y * s_out);
  }
  return bad;
}

bool ln_row(const LnConsts& k, const float* x, double* codes, const double* sign, float* o) {
  const int64_t C = k.C;
  const double Cd = static_cast<double>(C);
  double sums[2];
  ln_codes(x, k.s_in, k.lo_in, k.hi_in, k.factor, C, codes, sums);
  const double s1 = sums[0], s2 = sums[1];
  if (!(s2 * Cd < kExactLimit)) return false;
  const double dv = Cd * s2 - s1 * s1;
  const double sigma = k.delta1 / Cd * std::sqrt(dv + k.eps * Cd * Cd / (k.delta1 * k.delta1));
  const double mu = k.delta1 * s1 / Cd;
  if (!(sigma > 0)) return false;
  double mu_sigma = 0.0, b_bound;
  if (k.fold_mean) {
    mu_sigma = mu / sigma;
    b_bound = (k.beta_absmax + std::fabs(mu_sigma) * k.gamma_absmax) / k.delta_out;
  } else {
    b_bound = k.beta_out_absmax;
  }
  const double x_bound = std::sqrt(s2) * (k.fold_mean ? 1.0 : 2.0 * Cd) + 1.0;
  if (!(b_bound * (1.0 + 9.5367431640625e-07) * 2147483648.0 + 1.0 + k.top * x_bound <
        kExactLimit))
    return false;
  const double ds = k.delta1 / sigma;
  const int64_t bad = (k.fold_mean ? ln_fused<true> : ln_fused<false>)(
      ds, k.gamma_abs, k.delta_out, Cd, k.top, codes, k.gamma, k.beta, k.beta_out, sign,
      mu_sigma, s1, k.lo_out, k.hi_out, k.s_out, C, o);
  return bad == 0;
}

// The checked arguments of int_layernorm / int_layernorm_codes as LnConsts (sign: γ's signs,
// or ones held in ``ones`` when all γ ≥ 0)
LnConsts layernorm_consts(const char* who, const at::Tensor& x, const at::Tensor& s_in,
                          const at::Tensor& factor, double lo_in, double hi_in,
                          const at::Tensor& gamma, const at::Tensor& gamma_abs,
                          const at::Tensor& beta, const at::Tensor& beta_out,
                          const at::Tensor& sign, double delta1, double delta_out, double eps,
                          int64_t dyadic_bits, bool fold_mean, double lo_out, double hi_out,
                          double s_out, std::vector<double>& ones) {
  check_cpu(x, at::kFloat, 2, who, "x");
  const int64_t C = x.size(1);
  check_cpu(s_in, at::kFloat, 1, who, "s_in");
  for (const auto* t : {&factor, &gamma, &gamma_abs, &beta, &beta_out})
    check_cpu(*t, at::kDouble, 1, who, "per-channel parameter");
  for (const auto* t : {&s_in, &factor, &gamma, &gamma_abs, &beta, &beta_out})
    TORCH_CHECK(t->numel() == C, who, ": per-channel parameters of length ", C, " expected");
  TORCH_CHECK(sign.numel() == 0 || (sign.scalar_type() == at::kDouble && sign.numel() == C &&
                                    sign.is_contiguous()),
              who, ": sign empty or (C,) float64");
  TORCH_CHECK(dyadic_bits >= 1 && dyadic_bits <= 31, who, ": dyadic_bits in [1, 31]");
  const double* ga = gamma_abs.data_ptr<double>();
  const double* be = beta.data_ptr<double>();
  const double* bo = beta_out.data_ptr<double>();
  double gmax = 0, bmax = 0, bomax = 0;
  for (int64_t c = 0; c < C; ++c) {
    gmax = std::max(gmax, ga[c]);
    bmax = std::max(bmax, std::fabs(be[c]));
    bomax = std::max(bomax, std::fabs(bo[c]));
  }
  ones.assign(sign.numel() ? 0 : C, 1.0);
  return LnConsts{C, s_in.data_ptr<float>(), factor.data_ptr<double>(), lo_in, hi_in, delta1,
                  delta_out, eps, std::ldexp(1.0, static_cast<int>(dyadic_bits)), gmax, bmax,
                  bomax, gamma.data_ptr<double>(), ga, be, bo,
                  sign.numel() ? sign.data_ptr<double>() : ones.data(), fold_mean, lo_out,
                  hi_out, s_out};
}

// ln_row over every row of x: the values go to dest(r, buf) (the output row itself, or the
// thread's buffer buf), then done(r, values) runs for each row whose bounds held; ok[r] says
// which did; returns how many did not
template <typename Dest, typename Done>
int64_t layernorm_rows(const LnConsts& k, const float* xp, int64_t rows, bool* okp, Dest dest,
                       Done done) {
  const int64_t C = k.C;
  std::vector<int64_t> bad(static_cast<size_t>(at::get_num_threads()), 0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> codes(C);
    std::vector<float> buf(C);
    int64_t n = 0;
    for (int64_t r = begin; r < end; ++r) {
      float* o = dest(r, buf.data());
      okp[r] = ln_row(k, xp + r * C, codes.data(), k.sign, o);
      if (okp[r]) done(r, o);
      n += !okp[r];
    }
    bad[static_cast<size_t>(at::get_thread_num())] += n;
  });
  int64_t n = 0;
  for (int64_t v : bad) n += v;
  return n;
}

std::tuple<at::Tensor, at::Tensor, int64_t> int_layernorm(
    const at::Tensor& x, const at::Tensor& s_in, const at::Tensor& factor, double lo_in,
    double hi_in, const at::Tensor& gamma, const at::Tensor& gamma_abs, const at::Tensor& beta,
    const at::Tensor& beta_out, const at::Tensor& sign, double delta1, double delta_out,
    double eps, int64_t dyadic_bits, bool fold_mean, double lo_out, double hi_out, double s_out) {
  std::vector<double> ones;
  const LnConsts k = layernorm_consts("int_layernorm", x, s_in, factor, lo_in, hi_in, gamma,
                                      gamma_abs, beta, beta_out, sign, delta1, delta_out, eps,
                                      dyadic_bits, fold_mean, lo_out, hi_out, s_out, ones);
  const int64_t rows = x.size(0), C = k.C;
  auto out = at::empty({rows, C}, x.options());
  auto ok = at::empty({rows}, x.options().dtype(at::kBool));
  float* op = out.data_ptr<float>();
  const int64_t nbad = layernorm_rows(k, x.data_ptr<float>(), rows, ok.data_ptr<bool>(),
                                      [&](int64_t r, float*) { return op + r * C; },
                                      [](int64_t, const float*) {});
  return {out, ok, nbad};
}

// int_layernorm → the codes clamp(⌊y/Δ⌉ + z) of its output values y (quantize's formula), a
// row at a time while the row is in the cache; rows whose bounds fail are left for the caller
std::tuple<at::Tensor, at::Tensor, int64_t> int_layernorm_codes(
    const at::Tensor& x, const at::Tensor& s_in, const at::Tensor& factor, double lo_in,
    double hi_in, const at::Tensor& gamma, const at::Tensor& gamma_abs, const at::Tensor& beta,
    const at::Tensor& beta_out, const at::Tensor& sign, double delta1, double delta_out,
    double eps, int64_t dyadic_bits, bool fold_mean, double lo_out, double hi_out, double s_out,
    double scale, int64_t zero, int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  const char* who = "int_layernorm_codes";
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar || dtype == at::kInt, who,
              ": uint8, int8 or int32 codes");
  std::vector<double> ones;
  const LnConsts k = layernorm_consts(who, x, s_in, factor, lo_in, hi_in, gamma, gamma_abs, beta,
                                      beta_out, sign, delta1, delta_out, eps, dyadic_bits,
                                      fold_mean, lo_out, hi_out, s_out, ones);
  const int64_t rows = x.size(0), C = k.C;
  auto out = at::empty({rows, C}, x.options().dtype(dtype));
  auto ok = at::empty({rows}, x.options().dtype(at::kBool));
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  int64_t nbad = 0;
  const float* xp = x.data_ptr<float>();
  bool* okp = ok.data_ptr<bool>();
  auto run = [&](auto* op) {
    nbad = layernorm_rows(k, xp, rows, okp, [](int64_t, float* buf) { return buf; },
                          [&](int64_t r, const float* v) {
                            quantize_span(v, C, s, z, lo, hi, op + r * C);
                          });
  };
  if (dtype == at::kByte) run(out.data_ptr<uint8_t>());
  else if (dtype == at::kChar) run(out.data_ptr<int8_t>());
  else run(out.data_ptr<int32_t>());
  return {out, ok, nbad};
}

// (M, K) float32 → (2M, K) int8: rows [positive levels; negative levels]
at::Tensor twin_operands(const at::Tensor& x, double d_neg, double d_pos, int64_t h) {
  const char* who = "twin_operands";
  check_cpu(x, at::kFloat, 2, who, "x");
  TORCH_CHECK(h >= 1 && h <= 128, who, ": h in [1, 128]");
  const int64_t M = x.size(0), K = x.size(1);
  auto out = at::empty({2 * M, K}, x.options().dtype(at::kChar));
  const float* xp = x.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  const float dn = static_cast<float>(d_neg), dp = static_cast<float>(d_pos);
  const float hf = static_cast<float>(h);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [=](int64_t begin, int64_t end) {
    twin_split(xp + begin * K, (end - begin) * K, dn, dp, hf, op + begin * K,
               op + (M + begin) * K);
  });
  return out;
}

// codes (int32, −1 = the zero code) of probabilities x by attention_pow2's formulas: modes 0–2
// from l = x (already log2(p/Δ)), mode 3 (twin uniform) from the probabilities themselves
at::Tensor prob_codes(const at::Tensor& x, int64_t mode, double r, double q, double split,
                      int64_t bits) {
  const char* who = "prob_codes";
  check_cpu(x, at::kFloat, -1, who, "x");
  TORCH_CHECK(mode >= 0 && mode <= 3 && bits >= 2 && bits <= 16, who, ": bad code mode / bits");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  const int64_t n = x.numel();
  if (mode == 3)
    twin_rows(x.data_ptr<float>(), n, static_cast<float>(split), static_cast<float>(r),
              static_cast<float>(q), static_cast<float>((1 << (bits - 1)) - 1),
              out.data_ptr<int32_t>());
  else
    log_rows(x.data_ptr<float>(), n, mode, static_cast<float>(r), static_cast<float>(q),
             static_cast<float>(int64_t{1} << bits), out.data_ptr<int32_t>());
  return out.sub_(1);
}

// codes (int32, −1 = the zero code) of probabilities x by bucket_rows (the exact-threshold route
// of attention_pow2's log codes; for tests; vector false: the scalar loop even with AVX-512;
// thresholds non-empty: the 16-threshold search)
at::Tensor bucket_codes(const at::Tensor& x, double delta, const at::Tensor& base,
                        const at::Tensor& inc, const at::Tensor& thr, int64_t shift, int64_t bits,
                        bool vector, const at::Tensor& thresholds) {
  const char* who = "bucket_codes";
  check_cpu(x, at::kFloat, -1, who, "x");
  TORCH_CHECK(base.numel() > 0 && bits >= 2 && bits <= 16, who, ": buckets and 2 ≤ bits ≤ 16");
  const Buckets bk = check_buckets(who, base, inc, thr, shift);
  const float* thr16 = check_thresholds16(who, thresholds, bk, bits);
  auto out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  bucket_rows(x.data_ptr<float>(), x.numel(), static_cast<float>(delta), bk.shift, bk.base,
              bk.inc, bk.thr, static_cast<int32_t>(int64_t{1} << bits), out.data_ptr<int32_t>(),
              vector, thr16);
  return out.sub_(1);
}

// a/d for every a by div_rn (int_layernorm's division by a per-call constant; for tests)
// table[idx] (int8) by the route attention_pow2 takes for a table of that length (for tests)
at::Tensor gather_table(const at::Tensor& table, const at::Tensor& idx, bool vector) {
  const char* who = "gather_table";
  check_cpu(table, at::kChar, 1, who, "table");
  check_cpu(idx, at::kInt, 1, who, "idx");
  const int64_t L = table.numel(), n = idx.numel();
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t e = 0; e < n; ++e) TORCH_CHECK(ip[e] >= 0 && ip[e] < L, who, ": index outside the table");
  auto out = at::empty({n}, table.options());
  gather_plane(table.data_ptr<int8_t>(), L, ip, 1, n, out.data_ptr<int8_t>(), n, vector);
  return out;
}

at::Tensor quotients(const at::Tensor& a, double d) {
  check_cpu(a, at::kDouble, 1, "quotients", "a");
  auto out = at::empty_like(a);
  const double* ap = a.data_ptr<double>();
  double* op = out.data_ptr<double>();
  const double y = 1.0 / d;
  for (int64_t i = 0; i < a.numel(); ++i) op[i] = div_rn(ap[i], d, y);
  return out;
}

at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale, double lo, double hi) {
  const char* who = "fake_quant";
  check_cpu(x, at::kFloat, 2, who, "x");
  check_cpu(scale, at::kFloat, 1, who, "scale");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(scale.numel() == C, who, ": one scale per channel (", C, ") expected");
  auto out = at::empty({M, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float l = static_cast<float>(lo), h = static_cast<float>(hi);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [=](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) fake_quant_row(xp + m * C, sp, l, h, C, op + m * C);
  });
  return out;
}

// fake_quant(a + b) in one pass (a, b: (M, C) float32)
at::Tensor add_fake_quant(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          double lo, double hi) {
  const char* who = "add_fake_quant";
  check_cpu(a, at::kFloat, 2, who, "a");
  check_cpu(b, at::kFloat, 2, who, "b");
  check_cpu(scale, at::kFloat, 1, who, "scale");
  TORCH_CHECK(a.sizes() == b.sizes(), who, ": a and b of the same shape expected, got ", a.sizes(),
              " and ", b.sizes());
  const int64_t M = a.size(0), C = a.size(1);
  TORCH_CHECK(scale.numel() == C, who, ": one scale per channel (", C, ") expected");
  auto out = at::empty({M, C}, a.options());
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float l = static_cast<float>(lo), h = static_cast<float>(hi);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [=](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      add_fake_quant_row(ap + m * C, bp + m * C, sp, l, h, C, op + m * C);
  });
  return out;
}

FQVIT_CLONES void rational_gelu_span(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = rational_gelu_value(x[i]);
}

// fc1's epilogue fused with GELU and fc2's input quantizer: the codes clamp(⌊gelu(y)/Δ⌉ + z)
// (uint8 / int8) of y = float32(acc + b_int)·Δ_acc + bias, the values of rescale → rational_gelu_
// → quantize
at::Tensor rescale_gelu_quantize_rows(const char* who, const AccRows& src,
                                      const at::Tensor& bias_int, const at::Tensor& acc_scale,
                                      const at::Tensor& bias_float, double scale, int64_t zero,
                                      int64_t qmin, int64_t qmax, at::ScalarType dtype,
                                      const at::TensorOptions& options) {
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, who, ": uint8 or int8 codes");
  const int64_t M = src.M, N = src.N;
  check_rescale_params(bias_int, acc_scale, bias_float, N, who);
  auto out = at::empty({M, N}, options.dtype(dtype));
  const int32_t* bi = bias_int.data_ptr<int32_t>();
  const float *sc = acc_scale.data_ptr<float>(), *bf = bias_float.data_ptr<float>();
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  auto rows = [&](auto* op) {
    using T = std::remove_pointer_t<decltype(op)>;
    src.for_rows([=](int64_t begin, int64_t end, const int32_t* ap, int64_t ld) {
      for (int64_t m = begin; m < end; ++m)
        rescale_requant<T, true>(ap + (m - begin) * ld, bi, sc, bf, N, s, z, lo, hi, op + m * N);
    });
  };
  if (dtype == at::kByte)
    rows(out.data_ptr<uint8_t>());
  else
    rows(out.data_ptr<int8_t>());
  return out;
}

at::Tensor rescale_gelu_quantize(const at::Tensor& acc, const at::Tensor& bias_int,
                                 const at::Tensor& acc_scale, const at::Tensor& bias_float,
                                 double scale, int64_t zero, int64_t qmin, int64_t qmax,
                                 at::ScalarType dtype) {
  const char* who = "rescale_gelu_quantize";
  return rescale_gelu_quantize_rows(who, AccRows::of(acc, who), bias_int, acc_scale, bias_float,
                                    scale, zero, qmin, qmax, dtype, acc.options());
}

at::Tensor tiles_rescale_gelu_quantize(const at::Tensor& a, const at::Tensor& packed, int64_t n,
                                       const at::Tensor& bias_int, const at::Tensor& acc_scale,
                                       const at::Tensor& bias_float, double scale, int64_t zero,
                                       int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  const char* who = "tiles_rescale_gelu_quantize";
  return rescale_gelu_quantize_rows(who, AccRows::tiles(a, packed, n, who), bias_int, acc_scale,
                                    bias_float, scale, zero, qmin, qmax, dtype, a.options());
}

// fc1's int32 accumulator → float (acc + b_int)·Δ[c] + bias[c] → rational GELU → PTQ4ViT's
// twin-uniform operand rows of fc2, [positive rows; negative rows] (2M, N) int8: rescale,
// rational_gelu_ and twin_operands in one pass over a row (the same float steps)
at::Tensor rescale_gelu_twin_rows(const char* who, const AccRows& src, const at::Tensor& bias_int,
                                  const at::Tensor& acc_scale, const at::Tensor& bias_float,
                                  double d_neg, double d_pos, int64_t h,
                                  const at::TensorOptions& options) {
  TORCH_CHECK(h >= 1 && h <= 128, who, ": h in [1, 128]");
  const int64_t M = src.M, N = src.N;
  check_rescale_params(bias_int, acc_scale, bias_float, N, who);
  auto out = at::empty({2 * M, N}, options.dtype(at::kChar));
  const int32_t* bi = bias_int.data_ptr<int32_t>();
  const float *sc = acc_scale.data_ptr<float>(), *bf = bias_float.data_ptr<float>();
  const float dn = static_cast<float>(d_neg), dp = static_cast<float>(d_pos);
  const float hf = static_cast<float>(h);
  int8_t* op = out.data_ptr<int8_t>();
  src.for_rows([=](int64_t begin, int64_t end, const int32_t* ap, int64_t ld) {
    std::vector<float> row(N);
    for (int64_t m = begin; m < end; ++m) {
      rescale_float(ap + (m - begin) * ld, bi, sc, bf, N, row.data());
      rational_gelu_span(row.data(), N);
      twin_split(row.data(), N, dn, dp, hf, op + m * N, op + (M + m) * N);
    }
  });
  return out;
}

at::Tensor rescale_gelu_twin(const at::Tensor& acc, const at::Tensor& bias_int,
                             const at::Tensor& acc_scale, const at::Tensor& bias_float,
                             double d_neg, double d_pos, int64_t h) {
  const char* who = "rescale_gelu_twin";
  return rescale_gelu_twin_rows(who, AccRows::of(acc, who), bias_int, acc_scale, bias_float,
                                d_neg, d_pos, h, acc.options());
}

at::Tensor tiles_rescale_gelu_twin(const at::Tensor& a, const at::Tensor& packed, int64_t n,
                                   const at::Tensor& bias_int, const at::Tensor& acc_scale,
                                   const at::Tensor& bias_float, double d_neg, double d_pos,
                                   int64_t h) {
  const char* who = "tiles_rescale_gelu_twin";
  return rescale_gelu_twin_rows(who, AccRows::tiles(a, packed, n, who), bias_int, acc_scale,
                                bias_float, d_neg, d_pos, h, a.options());
}

at::Tensor rational_gelu_(const at::Tensor& x) {
  check_cpu(x, at::kFloat, -1, "rational_gelu_", "x");
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384, [=](int64_t begin, int64_t end) {
    rational_gelu_span(xp + begin, end - begin);
  });
  return x;
}

// acc2: (2M, N) int32, rows [positive block; negative block] of one twin-uniform GEMM
void twin_rescale(const at::Tensor& acc2, int64_t m, const at::Tensor& bias_int,
                  const at::Tensor& acc_scale, const at::Tensor& bias_float, const at::Tensor& out) {
  const char* who = "twin_rescale";
  check_cpu(acc2, at::kInt, 2, who, "acc2");
  TORCH_CHECK(acc2.size(0) % 2 == 0 && m > -32 && m < 32, who, ": (2M, N) products, |m| < 32");
  const int64_t M = acc2.size(0) / 2, N = acc2.size(1);
  check_rescale_params(bias_int, acc_scale, bias_float, N, who);
  check_cpu(out, at::kFloat, 2, who, "out");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, who, ": out of shape (", M, ", ", N, ") expected");
  const int32_t* ap = acc2.data_ptr<int32_t>();
  const int32_t* bi = bias_int.data_ptr<int32_t>();
  const float *sc = acc_scale.data_ptr<float>(), *bf = bias_float.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                   [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      twin_rescale_row(ap + r * N, ap + (M + r) * N, m, bi, sc, bf, N, op + r * N);
  });
}

// the same for the products of the operand rows a2 = [positive; negative] with packed B computed
// on AMX tiles: row r's two products, rows r and M + r of a2, in two blocks of one thread
void tiles_twin_rescale(const at::Tensor& a2, const at::Tensor& packed, int64_t n, int64_t m,
                        const at::Tensor& bias_int, const at::Tensor& acc_scale,
                        const at::Tensor& bias_float, const at::Tensor& out) {
  const char* who = "tiles_twin_rescale";
  const AccRows src = AccRows::tiles(a2, packed, n, who);
  TORCH_CHECK(!src.u8 && src.M % 2 == 0 && m > -32 && m < 32, who,
              ": int8 (2M, K) operand rows, |m| < 32");
  const int64_t M = src.M / 2, N = n, K = src.K;
  check_rescale_params(bias_int, acc_scale, bias_float, N, who);
  check_cpu(out, at::kFloat, 2, who, "out");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, who, ": out of shape (", M, ", ", N, ") expected");
  const int8_t* ap = static_cast<const int8_t*>(src.a.data_ptr());
  const int64_t lda = src.a.stride(0);
  const int32_t* bi = bias_int.data_ptr<int32_t>();
  const float *sc = acc_scale.data_ptr<float>(), *bf = bias_float.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int8_t* bp = src.packed;
  AccRows::for_row_blocks(M, [&](int64_t r0, int64_t r1, Scratch<int32_t>& buf) {
    const int64_t rows = r1 - r0;
    int32_t* pos = buf.get(2 * AccRows::kRows * N);      // [positive block; negative block]
    int32_t* neg = pos + AccRows::kRows * N;
    if (K == 0) {
      std::fill(pos, pos + 2 * AccRows::kRows * N, 0);
    } else {
      fqvit_amx::matmul(ap + r0 * lda, lda, false, bp, rows, N, K, pos, N);
      fqvit_amx::matmul(ap + (M + r0) * lda, lda, false, bp, rows, N, K, neg, N);
    }
    for (int64_t r = 0; r < rows; ++r)
      twin_rescale_row(pos + r * N, neg + r * N, m, bi, sc, bf, N, op + (r0 + r) * N);
  });
}

}  // namespace

TORCH_LIBRARY(fqvit_int, m) {
  m.def("prob_codes", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(prob_codes)));
  m.def("bucket_codes", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(bucket_codes)));
  m.def("quotients", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(quotients)));
  m.def("gather_table", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(gather_table)));
  m.def("qkv_int8", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(qkv_int8)));
  m.def("bmm_int8", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(bmm_int8)));
  m.def("attention_pow2", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(attention_pow2)));
  m.def("attention_lis", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(attention_lis)));
  m.def("int_layernorm", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(int_layernorm)));
  m.def("twin_operands", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(twin_operands)));
  m.def("fake_quant", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(fake_quant)));
  m.def("add_fake_quant", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(add_fake_quant)));
  m.def("int_layernorm_codes",
        torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(int_layernorm_codes)));
  m.def("twin_rescale(Tensor acc2, int m, Tensor bias_int, Tensor acc_scale, Tensor bias_float, "
        "Tensor(a!) out) -> ()", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(twin_rescale)));
  m.def("quantize", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(quantize)));
  m.def("rescale", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(rescale)));
  m.def("rescale_(Tensor(a!) acc, Tensor bias_int, Tensor acc_scale, Tensor bias_float, int mode, "
        "float out_scale, int zero, int qmin, int qmax) -> Tensor(a!)",
        torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(rescale_)));
  m.def("rational_gelu_(Tensor(a!) x) -> Tensor(a!)", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(rational_gelu_)));
  m.def("rescale_gelu_quantize", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(rescale_gelu_quantize)));
  m.def("rescale_gelu_twin", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(rescale_gelu_twin)));
  // the epilogues on a product computed on AMX tiles block by block (a, amx_pack's B, N)
  m.def("tiles_rescale", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(tiles_rescale)));
  m.def("tiles_rescale_gelu_quantize",
        torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(tiles_rescale_gelu_quantize)));
  m.def("tiles_rescale_gelu_twin",
        torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(tiles_rescale_gelu_twin)));
  m.def("tiles_qkv_int8", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(tiles_qkv_int8)));
  m.def("tiles_twin_rescale(Tensor a2, Tensor packed, int n, int m, Tensor bias_int, "
        "Tensor acc_scale, Tensor bias_float, Tensor(a!) out) -> ()",
        torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(tiles_twin_rescale)));
}

// CPU kernels (not catch-all ones, which would run as decompositions above the Python dispatch
// key) without autograd formulas: under no_grad the ops fall through the Autograd key to the
// Python key like ATen's ops do (fqvit_det.integer.recording records them there).
TORCH_LIBRARY_IMPL(fqvit_int, Autograd, m) {
  for (const char* op : {"prob_codes", "bucket_codes", "quotients", "gather_table", "qkv_int8", "bmm_int8",
                         "attention_pow2", "attention_lis", "int_layernorm", "int_layernorm_codes",
                         "twin_operands", "fake_quant", "add_fake_quant", "twin_rescale", "quantize", "rescale", "rescale_", "rational_gelu_",
                         "rescale_gelu_quantize", "rescale_gelu_twin", "tiles_rescale",
                         "tiles_rescale_gelu_quantize", "tiles_rescale_gelu_twin", "tiles_qkv_int8",
                         "tiles_twin_rescale"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}

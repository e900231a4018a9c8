// int8 × int8 → int32 GEMMs on Intel AMX (Sapphire Rapids and later Xeons), for the integer
// model's Linear layers (linear.int_mm).
//
// torch._int_mm goes through oneDNN's gemm API, which uses AVX-512 VNNI but not the AMX tiles, and
// at the integer DeiT-Tiny's batch-1 shapes (197 × 192 × 576 …) two threads were slower than one
// on such a CPU. Here the product is computed in 32 × 32 output blocks of four 16 × 16 int32 tiles:
// per 64-wide slice of K, two A tiles (16 rows × 64 int8) and two B tiles (16 groups of 4 K × 16
// columns, the VNNI layout TDPBSSD reads) give four tile dot products. Every product and partial
// sum is an exact int32, so the result equals at::_int_mm's bit for bit.
//
// B is packed once into that layout (amx_pack; the Linear layers keep their packed weights). Rows,
// columns and K that do not fill a tile are zero-padded: A rows through a per-thread copy, B in the
// packing, C through a per-thread block buffer. The attention cores (int8_kernels.cpp, through
// amx_gemm.h) pack kᵀ and the values per matrix and call matmul_padded, which skips the copies:
// they leave readable room after A and C instead.
#include "amx_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FQVIT_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTileK = 64;    // bytes per A tile row = K per tile dot product
constexpr int64_t kTileN = 16;    // int32 columns per C tile
constexpr int64_t kBlock = 32;    // output block: 2 × 2 tiles

#ifdef FQVIT_HAVE_AMX
bool amx_supported() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
    if (!tile || !int8) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;   // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;                               // XTILECFG, XTILEDATA
    // Linux grants the tile data state per process on request (ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0–3: C (rows r × cols c: 0 = (0,0), 1 = (0,1), 2 = (1,0), 3 = (1,1)); 4–5: A; 6–7: B;
// each 16 rows of 64 bytes. A namespace-scope object: GCC 12 drops stores into a local
// configuration as dead (it does not see ldtilecfg read them).
const TileConfig kTiles = [] {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}();

__attribute__((target("amx-tile,amx-int8"))) void load_tiles() { _tile_loadconfig(&kTiles); }

__attribute__((target("amx-tile,amx-int8"))) void release_tiles() { _tile_release(); }

// One 32 × 32 (TwoM × TwoN tiles) output block over all of K: A rows at ``a`` (stride lda bytes,
// Kb·64 readable bytes per row), B tiles at ``b0`` / ``b1`` (consecutive K slices, 1024 bytes each),
// C written at ``c`` with stride ldc int32.
template <bool U8, bool TwoM, bool TwoN>
__attribute__((target("amx-tile,amx-int8"))) void block(const int8_t* a, int64_t lda,
                                                        const int8_t* b0, const int8_t* b1,
                                                        int64_t Kb, int32_t* c, int64_t ldc) {
  _tile_zero(0);
  if (TwoN) _tile_zero(1);
  if (TwoM) _tile_zero(2);
  if (TwoM && TwoN) _tile_zero(3);
  for (int64_t kb = 0; kb < Kb; ++kb) {
    _tile_loadd(4, a + kb * kTileK, lda);
    _tile_loadd(6, b0 + kb * 1024, 64);
    if (TwoN) _tile_loadd(7, b1 + kb * 1024, 64);
    if (TwoM) _tile_loadd(5, a + 16 * lda + kb * kTileK, lda);
    if (U8) {
      _tile_dpbusd(0, 4, 6);
      if (TwoN) _tile_dpbusd(1, 4, 7);
      if (TwoM) _tile_dpbusd(2, 5, 6);
      if (TwoM && TwoN) _tile_dpbusd(3, 5, 7);
    } else {
      _tile_dpbssd(0, 4, 6);
      if (TwoN) _tile_dpbssd(1, 4, 7);
      if (TwoM) _tile_dpbssd(2, 5, 6);
      if (TwoM && TwoN) _tile_dpbssd(3, 5, 7);
    }
  }
  const int64_t stride = ldc * 4;
  _tile_stored(0, c, stride);
  if (TwoN) _tile_stored(1, c + kTileN, stride);
  if (TwoM) _tile_stored(2, c + 16 * ldc, stride);
  if (TwoM && TwoN) _tile_stored(3, c + 16 * ldc + kTileN, stride);
}

template <bool U8>
void block_any(bool two_m, bool two_n, const int8_t* a, int64_t lda, const int8_t* b0,
               const int8_t* b1, int64_t Kb, int32_t* c, int64_t ldc) {
  if (two_m && two_n) return block<U8, true, true>(a, lda, b0, b1, Kb, c, ldc);
  if (two_m) return block<U8, true, false>(a, lda, b0, b1, Kb, c, ldc);
  if (two_n) return block<U8, false, true>(a, lda, b0, b1, Kb, c, ldc);
  return block<U8, false, false>(a, lda, b0, b1, Kb, c, ldc);
}
#endif

// B (K × N, element (k, n) at b[k·sk + n·sn]) → tiles [Nt][Kb][16][64] with Nt = 2·⌈N/32⌉,
// Kb = ⌈K/64⌉: tile (t, kb) row r holds, for its 16 columns n, the 4 bytes B[64kb + 4r + i][16t + n]
// (zero outside B). Two loop orders: contiguous K (weights (N, K) transposed, kᵀ: a column's 4
// bytes are one unaligned 32-bit load) or contiguous N (the values of P·V: a tile row interleaves
// four rows of B, 16 columns at a time, which GCC vectorizes).
void pack_b(const int8_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, int8_t* out) {
  const int64_t Kb = (K + kTileK - 1) / kTileK, Nt = 2 * ((N + kBlock - 1) / kBlock);
  std::memset(out, 0, static_cast<size_t>(Nt * Kb * 1024));
  if (sk == 1) {
    for (int64_t col = 0; col < N; ++col) {
      const int8_t* src = b + col * sn;
      int8_t* dst = out + (col / kTileN) * Kb * 1024 + (col % kTileN) * 4;
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {               // 4 consecutive K of one column: one row slot
        uint32_t v;
        std::memcpy(&v, src + k, 4);
        std::memcpy(dst + (k >> 6) * 1024 + ((k & 63) >> 2) * 64, &v, 4);
      }
      for (; k < K; ++k) dst[(k / kTileK) * 1024 + ((k % kTileK) / 4) * 64 + k % 4] = src[k];
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += 4) {         // 4 rows of B: one 4-byte slot per column
    const int64_t nk = std::min<int64_t>(4, K - k0);
    const int8_t* r[4];
    for (int64_t i = 0; i < 4; ++i) r[i] = b + (k0 + std::min<int64_t>(i, nk - 1)) * sk;
    const uint32_t keep = nk == 4 ? 0xFFFFFFFFu : (1u << (8 * nk)) - 1u;   // rows past K: 0
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + (k0 / kTileK) * 1024 + ((k0 % kTileK) / 4) * 64);
    if (sn == 1) {
      for (int64_t t = 0; t * kTileN < N; ++t) {
        const int64_t c0 = t * kTileN, cols = std::min<int64_t>(kTileN, N - c0);
        uint32_t* o = dst + t * Kb * 256;
        const uint8_t *r0 = reinterpret_cast<const uint8_t*>(r[0]) + c0,
                      *r1 = reinterpret_cast<const uint8_t*>(r[1]) + c0,
                      *r2 = reinterpret_cast<const uint8_t*>(r[2]) + c0,
                      *r3 = reinterpret_cast<const uint8_t*>(r[3]) + c0;
        for (int64_t n = 0; n < cols; ++n)
          o[n] = (static_cast<uint32_t>(r0[n]) | static_cast<uint32_t>(r1[n]) << 8 |
                  static_cast<uint32_t>(r2[n]) << 16 | static_cast<uint32_t>(r3[n]) << 24) & keep;
      }
      continue;
    }
    for (int64_t col = 0; col < N; ++col) {
      uint32_t v = 0;
      for (int64_t i = 0; i < nk; ++i)
        v |= static_cast<uint32_t>(static_cast<uint8_t>(r[i][col * sn])) << (8 * i);
      dst[(col / kTileN) * Kb * 256 + col % kTileN] = v;
    }
  }
}

int64_t packed_bytes(int64_t K, int64_t N) {
  return 2 * ((N + kBlock - 1) / kBlock) * ((K + kTileK - 1) / kTileK) * 1024;
}

#ifdef FQVIT_HAVE_AMX
// C (M × N, stride ldc) = A (M × K, stride lda) · packed B, blocks [begin, end) of the row-major
// order over (32-row block, 32-column block); the tiles are configured by the caller.
void gemm_blocks(const int8_t* A, int64_t lda, bool u8, const int8_t* Bp, int64_t M, int64_t N,
                 int64_t K, int32_t* C, int64_t ldc, int64_t begin, int64_t end) {
  const int64_t Kb = (K + kTileK - 1) / kTileK, nblk = (N + kBlock - 1) / kBlock;
  const int64_t Kp = Kb * kTileK;
  fqvit_amx::AlignedVector<int8_t> abuf;
  fqvit_amx::AlignedVector<int32_t> cbuf;
  int64_t copied = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t mb = t / nblk, nb = t % nblk;
    const int64_t r0 = mb * kBlock, rows = std::min(kBlock, M - r0);
    const int64_t c0 = nb * kBlock, cols = std::min(kBlock, N - c0);
    const int8_t* a = A + r0 * lda;
    int64_t sa = lda;
    if (rows < kBlock || K % kTileK != 0) {      // zero-padded copy of this row block
      if (abuf.empty()) abuf.resize(static_cast<size_t>(kBlock * Kp));
      if (copied != mb) {
        std::memset(abuf.data(), 0, abuf.size());
        for (int64_t r = 0; r < rows; ++r) std::memcpy(abuf.data() + r * Kp, a + r * lda, K);
        copied = mb;
      }
      a = abuf.data();
      sa = Kp;
    }
    const int8_t* b0 = Bp + (2 * nb) * Kb * 1024;
    const int8_t* b1 = b0 + Kb * 1024;
    const bool two_m = rows > 16, two_n = cols > 16;
    if (rows == kBlock && cols == kBlock) {
      int32_t* c = C + r0 * ldc + c0;
      u8 ? block_any<true>(true, true, a, sa, b0, b1, Kb, c, ldc)
         : block_any<false>(true, true, a, sa, b0, b1, Kb, c, ldc);
    } else {
      if (cbuf.empty()) cbuf.resize(kBlock * kBlock);
      u8 ? block_any<true>(two_m, two_n, a, sa, b0, b1, Kb, cbuf.data(), kBlock)
         : block_any<false>(two_m, two_n, a, sa, b0, b1, Kb, cbuf.data(), kBlock);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(C + (r0 + r) * ldc + c0, cbuf.data() + r * kBlock, cols * 4);
    }
  }
}
#endif

bool amx_available() {
#ifdef FQVIT_HAVE_AMX
  return amx_supported();
#else
  return false;
#endif
}

// b (K, N) int8 → its tiles (a flat int8 tensor; amx_mm takes it with N)
at::Tensor amx_pack(const at::Tensor& b) {
  TORCH_CHECK(b.device().is_cpu() && b.dim() == 2 && b.scalar_type() == at::kChar,
              "amx_pack: b must be a 2-D int8 CPU tensor (K, N)");
  const int64_t K = b.size(0), N = b.size(1);
  auto out = at::empty({packed_bytes(K, N)}, b.options());
  pack_b(b.data_ptr<int8_t>(), b.stride(0), b.stride(1), K, N, out.data_ptr<int8_t>());
  return out;
}

#ifdef FQVIT_HAVE_AMX
// blocks [begin, end) of gemm_blocks on the calling thread, the tiles configured around them
void run_blocks(const int8_t* a, int64_t lda, bool u8, const int8_t* bp, int64_t M, int64_t N,
                int64_t K, int32_t* c, int64_t ldc, int64_t begin, int64_t end) {
  load_tiles();
  gemm_blocks(a, lda, u8, bp, M, N, K, c, ldc, begin, end);
  release_tiles();
}
#endif

int64_t block_count(int64_t M, int64_t N) {
  return ((M + kBlock - 1) / kBlock) * ((N + kBlock - 1) / kBlock);
}

}  // namespace

namespace fqvit_amx {

at::Tensor product_operand(const at::Tensor& a, const at::Tensor& packed, int64_t n,
                           const char* who) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 &&
                  (a.scalar_type() == at::kChar || a.scalar_type() == at::kByte),
              who, ": a must be a 2-D int8 or uint8 CPU tensor");
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 1 && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous() && packed.numel() == ::packed_bytes(a.size(1), n),
              who, ": packed must be amx_pack's output for a (K, N) with K = a.size(1), N = n");
  TORCH_CHECK(amx_available(), who, ": AMX is not available on this CPU / OS");
  return a.stride(1) == 1 && a.stride(0) >= a.size(1) ? a : a.contiguous();
}

}  // namespace fqvit_amx

namespace {

// a (M, K) int8 / uint8 · the packed (K, N) int8 → (M, N) int32, equal to torch._int_mm
at::Tensor amx_mm(const at::Tensor& a_in, const at::Tensor& packed, int64_t n) {
  const auto a = fqvit_amx::product_operand(a_in, packed, n, "amx_mm");
  const int64_t M = a.size(0), K = a.size(1);
  auto c = at::empty({M, n}, a.options().dtype(at::kInt));
  if (M == 0 || n == 0) return c;
  if (K == 0) return c.zero_();
#ifdef FQVIT_HAVE_AMX
  const bool u8 = a.scalar_type() == at::kByte;
  const int8_t* ap = static_cast<const int8_t*>(a.data_ptr());
  const int8_t* bp = packed.data_ptr<int8_t>();
  const int64_t lda = a.stride(0);
  int32_t* cp = c.data_ptr<int32_t>();
  at::parallel_for(0, block_count(M, n), 1, [&](int64_t begin, int64_t end) {
    run_blocks(ap, lda, u8, bp, M, n, K, cp, n, begin, end);
  });
#endif
  return c;
}

}  // namespace

namespace fqvit_amx {

bool available() { return amx_available(); }

int64_t packed_bytes(int64_t K, int64_t N) { return ::packed_bytes(K, N); }

void pack(const int8_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, int8_t* out) {
  pack_b(b, sk, sn, K, N, out);
}

void matmul(const int8_t* a, int64_t lda, bool u8, const int8_t* packed, int64_t M, int64_t N,
            int64_t K, int32_t* c, int64_t ldc) {
  TORCH_CHECK(amx_available(), "fqvit_amx::matmul: AMX is not available on this CPU / OS");
#ifdef FQVIT_HAVE_AMX
  if (M == 0 || N == 0) return;
  run_blocks(a, lda, u8, packed, M, N, K, c, ldc, 0, block_count(M, N));
#endif
}

void matmul_padded(const int8_t* a, int64_t lda, const int8_t* packed, int64_t M, int64_t N,
                   int64_t K, int32_t* c, int64_t ldc) {
  TORCH_CHECK(amx_available(), "fqvit_amx::matmul_padded: AMX is not available on this CPU / OS");
  const int64_t Kb = (K + kTileK - 1) / kTileK, nblk = (N + kBlock - 1) / kBlock;
  TORCH_CHECK(lda >= K && ldc >= nblk * kBlock, "fqvit_amx::matmul_padded: lda ", lda, " / ldc ",
              ldc, " below K / the padded N");
#ifdef FQVIT_HAVE_AMX
  if (M == 0 || N == 0) return;
  load_tiles();
  for (int64_t r0 = 0; r0 < M; r0 += kBlock)
    for (int64_t nb = 0; nb < nblk; ++nb) {
      const int8_t* b0 = packed + (2 * nb) * Kb * 1024;
      block<false, true, true>(a + r0 * lda, lda, b0, b0 + Kb * 1024, Kb, c + r0 * ldc + nb * kBlock,
                               ldc);
    }
  release_tiles();
#endif
}

}  // namespace fqvit_amx

TORCH_LIBRARY_FRAGMENT(fqvit_int, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("amx_pack", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(amx_pack)));
  m.def("amx_mm", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(amx_mm)));
}

TORCH_LIBRARY_IMPL(fqvit_int, Autograd, m) {
  for (const char* op : {"amx_pack", "amx_mm"}) m.impl(op, torch::CppFunction::makeFallthrough());
}

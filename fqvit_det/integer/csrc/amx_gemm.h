// The AMX int8 GEMM of amx_gemm.cpp for the other kernels of this extension (the attention
// cores, the tiles_* epilogues): single-threaded calls on raw pointers, the tile state configured
// and released per call.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace fqvit_amx {

// Tile loads and stores whose 64-byte rows straddle cache lines run about twice as slow (the
// attention cores' QKᵀ on a 16-byte aligned std::vector: 23k → 11.5k cycles per task once
// aligned); packed operands, products and scratch rows get cache-line aligned storage.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// whether the CPU has AMX-INT8 and Linux granted the tile state (always false off x86-64 Linux)
bool available();

// a (M, K) int8 / uint8 and amx_pack's output for a (K, n) B, checked (errors name ``who``; AMX
// must be available): a with contiguous rows (a itself, or a copy)
at::Tensor product_operand(const at::Tensor& a, const at::Tensor& packed, int64_t n,
                           const char* who);

// bytes of pack()'s output for a K × N matrix B
int64_t packed_bytes(int64_t K, int64_t N);

// B (K × N, element (k, n) at b[k·sk + n·sn]) → the tile layout matmul() reads
void pack(const int8_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, int8_t* out);

// C (M × N, row stride ldc) = A (M × K int8, or uint8 where u8, row stride lda) · packed B, exact
// int32, on the calling thread; only where available()
void matmul(const int8_t* a, int64_t lda, bool u8, const int8_t* packed, int64_t M, int64_t N,
            int64_t K, int32_t* c, int64_t ldc);

// the same without copies, for callers that leave room: the tiles read ⌈M/32⌉·32 rows of A at
// stride lda, ⌈K/64⌉·64 bytes each (the bytes past column K, whatever they hold, meet the packed
// B's zero rows); C has room for ⌈M/32⌉·32 rows of ⌈N/32⌉·32 columns (ldc ≥ that), the rows and
// columns past M, N written with values the caller ignores
void matmul_padded(const int8_t* a, int64_t lda, const int8_t* packed, int64_t M, int64_t N,
                   int64_t K, int32_t* c, int64_t ldc);

}  // namespace fqvit_amx

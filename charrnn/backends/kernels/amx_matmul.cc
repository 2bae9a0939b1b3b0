// bfloat16 matmul on Intel AMX tiles, or on AVX512-BF16's vdpbf16ps where there is no AMX (an
// AMD Zen 4 EPYC, say), as XLA FFI custom calls (see charrnn/amx.py).
//
// C (M x N, float32) = A (M x K, bfloat16, row-major) @ B, where B (K x N) arrives packed the
// way the tile unit reads it: in panels of 16 columns, each panel K/2 rows of 16 column pairs
// (shape (N/16, K/2, 32), element [n/16][k/2][2*(n%16) + k%2] = B[k][n]), so each 32 x 16
// block of B is one tile of 64-byte rows, contiguous in memory. (A row-major B read with a
// stride of N*4 bytes maps every tile row of a wide matrix to the same L1 set: N = 2048 ran
// at a third of the speed of N = 512.) Any M; K % 32 == 0 and N % 16 == 0 (the Python side
// pads K and N). The same layout is what vdpbf16ps wants: one 64-byte row of a panel is one
// zmm of 16 column pairs, multiplied against a broadcast pair of A's row.
//
// Built on first use by charrnn/amx.py with the system's C++ compiler; nothing here runs before
// charrnn_amx_available() has checked CPUID and asked the kernel for the tile state, or
// charrnn_avx512bf16_available() has checked CPUID and that the OS saves the AVX-512 state.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

#include "bf16_dot.h"

namespace ffi = xla::ffi;

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3 accumulate C (16 x 16 float32 each: 0 and 1 the first 16 rows, 2 and 3 the next),
// 4-5 hold A (16 x 32 bf16: rows of the first and second 16), 6-7 hold B (16 pair-rows x 16
// columns x 2). kTileConfigs[0] has every tile full; kTileConfigs[r] is for a last row block of
// r < 32 rows: its tiles hold only the rows that exist, so A is read and C written without
// padding.
constexpr TileConfig MakeTileConfig(int rows) {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  const int first = rows == 0 || rows > 16 ? 16 : rows;
  const int second = rows == 0 ? 16 : rows > 16 ? rows - 16 : 1;  // (unused when rows <= 16)
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = first;
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = second;
  cfg.rows[6] = cfg.rows[7] = 16;
  return cfg;
}

struct TileConfigs {
  TileConfig by_rows[32];
};

constexpr TileConfigs MakeTileConfigs() {
  TileConfigs all = {};
  for (int r = 0; r < 32; ++r) all.by_rows[r] = MakeTileConfig(r);
  return all;
}

// Constants in memory, not locals: GCC 12 does not see that ldtilecfg reads all 64 bytes of its
// operand and dropped the stores to a local's colsb fields at -O2 (the CPU then faults on the
// invalid configuration).
constexpr TileConfigs kTileConfigs = MakeTileConfigs();

void LoadTileConfig(int64_t rows) { _tile_loadconfig(&kTileConfigs.by_rows[rows]); }

// One block of C, up to 32 rows (two row tiles when kTwoM) by 16 or 32 columns, over all of K.
// b points at the first of the block's one or two B panels.
template <bool kTwoM, bool kTwoN>
inline void Block(const uint16_t* a, const uint16_t* b, float* c, int64_t K, int64_t N) {
  const int64_t a_stride = K * 2, b_stride = 64, c_stride = N * 4, panel = K * 16;
  _tile_zero(0);
  if (kTwoN) _tile_zero(1);
  if (kTwoM) _tile_zero(2);
  if (kTwoM && kTwoN) _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* bk = b + (k / 2) * 32;
    _tile_loadd(4, a + k, a_stride);
    _tile_loadd(6, bk, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoN) {
      _tile_loadd(7, bk + panel, b_stride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kTwoM) {
      _tile_loadd(5, a + 16 * K + k, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      if (kTwoN) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if (kTwoN) _tile_stored(1, c + 16, c_stride);
  if (kTwoM) _tile_stored(2, c + 16 * N, c_stride);
  if (kTwoM && kTwoN) _tile_stored(3, c + 16 * N + 16, c_stride);
}

void RowBlocks(const uint16_t* a, const uint16_t* b, float* c, int64_t m0, int64_t m1, bool two_m,
               int64_t n0, int64_t n1, int64_t K, int64_t N) {
  for (int64_t m = m0; m < m1; m += 32) {
    for (int64_t n = n0; n < n1; n += 32) {
      const bool two_n = n + 32 <= n1;
      const uint16_t* am = a + m * K;
      const uint16_t* bn = b + (n / 16) * K * 16;
      float* cmn = c + m * N + n;
      if (two_m && two_n) Block<true, true>(am, bn, cmn, K, N);
      else if (two_m) Block<true, false>(am, bn, cmn, K, N);
      else if (two_n) Block<false, true>(am, bn, cmn, K, N);
      else Block<false, false>(am, bn, cmn, K, N);
    }
  }
}

void Matmul(const uint16_t* a, const uint16_t* b, float* c, int64_t M, int64_t K, int64_t N) {
  const int64_t full = M / 32 * 32, rest = M - full;
  int64_t loaded = -1;  // the configuration in the tile unit (loaded per call: it is per thread)
  // Columns in chunks of 128, so that a chunk of B (K x 128: 128 KB at K = 512) stays in L2
  // while every row block of A passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += 128) {
    const int64_t n1 = n0 + 128 < N ? n0 + 128 : N;
    if (full) {
      if (loaded != 0) LoadTileConfig(loaded = 0);
      RowBlocks(a, b, c, 0, full, true, n0, n1, K, N);
    }
    if (rest) {  // the last rows, fewer than 32: tiles configured to their count
      if (loaded != rest) LoadTileConfig(loaded = rest);
      RowBlocks(a, b, c, full, M, rest > 16, n0, n1, K, N);
    }
  }
  _tile_release();  // leave no tile state behind for context switches to save
}


template <bool kAmx>
ffi::Error MatmulImpl(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                         ffi::ResultBuffer<ffi::F32> c) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 3 || cd.size() != 2 || bd[2] != 32) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "amx_matmul: bad ranks");
  }
  const int64_t M = ad[0], K = ad[1], N = bd[0] * 16;
  if (bd[1] * 2 != K || cd[0] != M || cd[1] != N || K % 32 || N % 16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "amx_matmul: bad shapes");
  }
  (kAmx ? Matmul : DpMatmul)(reinterpret_cast<const uint16_t*>(a.typed_data()),
                             reinterpret_cast<const uint16_t*>(b.typed_data()), c->typed_data(), M, K, N);
  return ffi::Error::Success();
}

// One pair-row (rows k and k + 1) of a whole panel of B's columns n0 .. n0 + 15, from b as it
// is stored (no bounds to check: the caller keeps to the interior).
inline void PackPair(const uint16_t* b, uint16_t* row, int64_t k, int64_t n0, int64_t K, int64_t N,
                     bool transpose) {
  if (!transpose) {
    const uint16_t* r0 = b + k * N + n0;
    const uint16_t* r1 = r0 + N;
    for (int64_t j = 0; j < 16; ++j) {
      row[2 * j] = r0[j];
      row[2 * j + 1] = r1[j];
    }
  } else {  // a pair (k, k + 1) of column n is 4 contiguous bytes of b's row n
    for (int64_t j = 0; j < 16; ++j) std::memcpy(row + 2 * j, b + (n0 + j) * K + k, 4);
  }
}

// out (N'/16, K'/2, 32) = B (K x N) in the layout Block reads, zero-padded to K' = K rounded up
// to 32 and N' = N rounded up to 16. B is b, or b's transpose when b is (N x K) and
// transpose is set (the backward pass multiplies by transposed weights: packing straight from
// the weight saves XLA a transpose copy). XLA's own transpose for packing ran at ~0.4 GB/s.
void Pack(const uint16_t* b, uint16_t* out, int64_t K, int64_t N, int64_t Kp, int64_t Np, bool transpose) {
  const int64_t whole_k = K / 2 * 2, whole_n = N / 16 * 16;
  // The interior in blocks of 64 rows of B, every panel's share of a block before the next
  // (a block of a row-major B, 64 x N, stays in L2 while its panels are written), without
  // per-element bounds checks: packing a 3200 x 512 cotangent took ~4 ms that way, a tenth of a
  // bf16 LSTM 2x512 train step.
  for (int64_t k0 = 0; k0 < whole_k; k0 += 64) {
    const int64_t k1 = k0 + 64 < whole_k ? k0 + 64 : whole_k;
    for (int64_t n0 = 0; n0 < whole_n; n0 += 16) {
      uint16_t* panel = out + (n0 / 16) * Kp * 16;
      for (int64_t k = k0; k < k1; k += 2) PackPair(b, panel + (k / 2) * 32, k, n0, K, N, transpose);
    }
  }
  // The edges: a last panel of fewer than 16 columns, an odd last row, K's padding to Kp.
  const int64_t ks = transpose ? 1 : N, ns = transpose ? K : 1;  // (k, n) is b[k * ks + n * ns]
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    uint16_t* panel = out + (n0 / 16) * Kp * 16;
    const int64_t cols = N - n0 < 16 ? N - n0 : 16;
    for (int64_t k = cols == 16 ? whole_k : 0; k < Kp; k += 2) {
      uint16_t* row = panel + (k / 2) * 32;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t n = n0 + j;
        row[2 * j] = (k < K && j < cols) ? b[k * ks + n * ns] : 0;
        row[2 * j + 1] = (k + 1 < K && j < cols) ? b[(k + 1) * ks + n * ns] : 0;
      }
    }
  }
}

ffi::Error AmxPackImpl(ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::BF16> out, int32_t transpose) {
  auto bd = b.dimensions();
  auto od = out->dimensions();
  if (bd.size() != 2 || od.size() != 3 || od[2] != 32) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "amx_pack: bad ranks");
  }
  const int64_t K = transpose ? bd[1] : bd[0], N = transpose ? bd[0] : bd[1];
  const int64_t Np = od[0] * 16, Kp = od[1] * 2;
  if (Kp % 32 || Kp < K || Kp - K >= 32 || Np < N || Np - N >= 16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "amx_pack: bad shapes");
  }
  Pack(reinterpret_cast<const uint16_t*>(b.typed_data()), reinterpret_cast<uint16_t*>(out->typed_data()),
       K, N, Kp, Np, transpose != 0);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnAmxPack, AmxPackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnAmxMatmul, MatmulImpl<true>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnDpbf16Matmul, MatmulImpl<false>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when this CPU has AMX-BF16 and the kernel grants this process the tile state, else 0.
extern "C" int charrnn_amx_available() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  if (!amx_bf16 || !amx_tile) return 0;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
}

// 1 when this CPU has AVX512-BF16 and the operating system saves the AVX-512 state, else 0.
extern "C" int charrnn_avx512bf16_available() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(ebx & (1u << 16))) return 0;  // AVX512F
  if (eax < 1 || !__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6) == 0xe6 ? 1 : 0;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state enabled
}

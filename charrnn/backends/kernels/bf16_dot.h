// bfloat16 matmul with AVX512-BF16's vdpbf16ps, shared by kernels/amx_matmul.cc (the bf16
// product of charrnn/amx.py, on CPUs without AMX) and kernels/rnn_cpu.cc (the bf16 LSTM layer's
// recurrent products). Every function that runs AVX512-BF16 instructions carries its own target
// attribute, so a file including this needs no compiler flag for them; callers check the CPU
// first (charrnn_avx512bf16_available in amx_matmul.cc).
//
// C (M x N, float32, row stride N) = A (M x K, bfloat16, row-major) @ B, B (K x N) packed as
// amx_matmul.cc's Pack writes it: panels of 16 columns, each K/2 rows of 16 column pairs
// (element [n/16][k/2][2*(n%16) + k%2] = B[k][n]). K even, N % 16 == 0.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

// --- AVX512-BF16 ---------------------------------------------------------------------------
// A kM x (16 kN) block of C over all of K in registers: per pair of K, kN zmm loads of B (one
// per panel) and kM broadcasts of A's pair, kM * kN vdpbf16ps. 8 x 3 uses 24 accumulators,
// enough independent chains to cover the instruction's latency, and leaves room for the operands.
constexpr int kDpRows = 8, kDpPanels = 3;

template <int kM, int kN>
__attribute__((target("avx512f,avx512bf16"))) inline void DpBlock(const uint16_t* a, const uint16_t* b,
                                                                   float* c, int64_t K, int64_t N) {
  const int64_t panel = K * 16;
  __m512 acc[kM][kN];
  _Pragma("GCC unroll 8") for (int m = 0; m < kM; ++m)
    _Pragma("GCC unroll 4") for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* bk = b + k * 16;
    __m512bh bv[kN];
    _Pragma("GCC unroll 4") for (int n = 0; n < kN; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(bk + n * panel);
    _Pragma("GCC unroll 8") for (int m = 0; m < kM; ++m) {
      uint32_t pair;
      std::memcpy(&pair, a + m * K + k, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      _Pragma("GCC unroll 4") for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], av, bv[n]);
    }
  }
  _Pragma("GCC unroll 8") for (int m = 0; m < kM; ++m)
    _Pragma("GCC unroll 4") for (int n = 0; n < kN; ++n) _mm512_storeu_ps(c + m * N + n * 16, acc[m][n]);
}

template <int kM>
__attribute__((target("avx512f,avx512bf16"))) void DpRowBlock(const uint16_t* a, const uint16_t* b, float* c,
                                                               int64_t p0, int64_t p1, int64_t K, int64_t N) {
  int64_t p = p0;
  for (; p + kDpPanels <= p1; p += kDpPanels) DpBlock<kM, kDpPanels>(a, b + p * K * 16, c + p * 16, K, N);
  if (p1 - p == 2) DpBlock<kM, 2>(a, b + p * K * 16, c + p * 16, K, N);
  if (p1 - p == 1) DpBlock<kM, 1>(a, b + p * K * 16, c + p * 16, K, N);
}

using DpRowFn = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr DpRowFn kDpRowFns[kDpRows + 1] = {nullptr,        DpRowBlock<1>, DpRowBlock<2>,
                                            DpRowBlock<3>, DpRowBlock<4>, DpRowBlock<5>,
                                            DpRowBlock<6>, DpRowBlock<7>, DpRowBlock<8>};

void DpMatmul(const uint16_t* a, const uint16_t* b, float* c, int64_t M, int64_t K, int64_t N) {
  // Panels in chunks of 8 (128 columns: 128 KB of B at K = 512, kept in L2) while every row
  // block of A passes over them, as the AMX kernel does.
  const int64_t panels = N / 16;
  for (int64_t p0 = 0; p0 < panels; p0 += 8) {
    const int64_t p1 = p0 + 8 < panels ? p0 + 8 : panels;
    for (int64_t m = 0; m < M; m += kDpRows) {
      const int64_t rows = M - m < kDpRows ? M - m : kDpRows;
      kDpRowFns[rows](a + m * K, b, c + m * N, p0, p1, K, N);
    }
  }
}

// out (R x Kp, bfloat16, round to nearest even) = a (R x K, float32, row stride lda) scaled by
// row_scale[r] where given (a state reset: 0 or 1), zero-padded from K to Kp.
__attribute__((target("avx512f,avx512bf16"))) inline void RowsToBf16(const float* a, int64_t lda, int64_t R,
                                                                    int64_t K, const float* row_scale,
                                                                    uint16_t* out, int64_t Kp) {
  for (int64_t r = 0; r < R; ++r) {
    const __m512 s = _mm512_set1_ps(row_scale ? row_scale[r] : 1.0f);
    const float* ar = a + r * lda;
    uint16_t* o = out + r * Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = K - k;
      const __mmask16 m = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ar + k), s);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(o + k, &h, 32);
    }
  }
}

}  // namespace

// charrnn's float32 recurrent kernels for x86 CPUs with AVX-512, as XLA FFI custom calls:
//  - a whole LSTM layer over a training window, forward and backward (charrnn/lstm_kernel.py),
//    with its recurrent products in float32 or, for --dtype bfloat16 on AVX512-BF16, in bf16
//    (Bf16Product below; everything else stays float32);
//  - one time step of an LSTM, GRU or tanh-RNN layer, and the dense output layer, for sampling
//    (charrnn/step_kernel.py; see "one time step" below).
// The training layer first:
//
// Why: inside XLA's scan every time step of a layer is ~15 thunks (four small dots, a dozen
// elementwise fusions, the stacked-output writes), each dispatched by the runtime; for the
// shapes char-rnn trains (a few dozen rows per device) that dispatch and the dots' own
// per-call cost were half of a step. Here one call runs the T steps: per step one matmul of
// the previous h with all four gate blocks at once (weights packed once per call), then the
// gate arithmetic in AVX-512 registers.
//
// Shapes (row-major, float32): T steps, B rows (this device's), H hidden, G = 4H (the gate
// blocks i, f, g, o side by side, as in w_hh).
//   forward  (xw: T x B x G, the input projections without bias; w: PackPanels(w_hh), 4 blocks;
//             bias: G; c0, h0: B x H; keep: T x B x 1, 0 where the state is reset before the
//             step) -> h_all, c_all: T x B x H, the carry after each step; gates: T x B x G,
//             the activated gates each step.
//   backward (wt: PackTransposed(w_hh); gates, c_all, c0, keep as above; dh_all: T x B x H,
//             the cotangent of h_all; dc, dh: B x H, of the final carry) -> dz: T x B x G, the
//             cotangent of the gates' pre-activations (equal to those of xw, of the bias at
//             each step and of h @ w_hh); d_bias: G, dz summed over steps and rows; dc0, dh0.
// The weight gradient (h_prev^T @ dz over all steps) is one large matmul, left to XLA.
// Both calls take `threads`: the rows are split into that many parts (at least 4 rows each),
// run at once on helper threads (Pool, below); a row's values do not depend on the split.
//
// Hp is H rounded up to 32: packed weights are panels of 32 columns (K x 32, contiguous), the
// matmul's output block. Built by charrnn/native.py; nothing here runs unless
// charrnn_lstm_available() said the CPU has AVX-512.

#include <immintrin.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "bf16_dot.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- matmul: C (rows x 32 per panel) = A (rows x K, row stride lda) @ panel (K x 32) ----------

// MR rows of A times NP panels: 2 * MR * NP accumulators, 2 * NP loads of B and MR broadcasts of
// A per k. C's rows are full panels (the callers' scratch is padded to whole panels). Every
// output element is one chain of FMAs over k in order, whatever MR and NP: a row's result does
// not depend on how many rows or panels share the pass.
template <int MR, int NP = 1>
inline void Micro(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc) {
  __m512 acc0[MR][NP], acc1[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc0[i][p] = acc1[i][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b0[NP], b1[NP];
    for (int p = 0; p < NP; ++p) {
      b0[p] = _mm512_loadu_ps(panel + (p * K + k) * kPanel);
      b1[p] = _mm512_loadu_ps(panel + (p * K + k) * kPanel + 16);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      for (int p = 0; p < NP; ++p) {
        acc0[i][p] = _mm512_fmadd_ps(ai, b0[p], acc0[i][p]);
        acc1[i][p] = _mm512_fmadd_ps(ai, b1[p], acc1[i][p]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) {
      _mm512_storeu_ps(c + i * ldc + p * kPanel, acc0[i][p]);
      _mm512_storeu_ps(c + i * ldc + p * kPanel + 16, acc1[i][p]);
    }
}

// 1-4 rows (a sampling step) against as many panels at once as keep ~8-16 accumulators
// busy: one row against one panel is two chains of dependent FMAs, which run at a quarter of
// the FMA units' rate; four panels at once make it eight independent chains.
template <int MR, int NP>
void FewRows(const float* a, int64_t lda, const float* panels, int64_t n_panels, int64_t K, float* c,
             int64_t ldc) {
  int64_t p = 0;
  for (; p + NP <= n_panels; p += NP) Micro<MR, NP>(a, lda, panels + p * K * kPanel, K, c + p * kPanel, ldc);
  for (; p < n_panels; ++p) Micro<MR, 1>(a, lda, panels + p * K * kPanel, K, c + p * kPanel, ldc);
}

// One block of 1-12 rows of A times one panel.
void Rows(const float* ai, int64_t lda, int64_t rows, const float* panel, int64_t K, float* ci, int64_t ldc) {
  switch (rows) {
    case 1: Micro<1>(ai, lda, panel, K, ci, ldc); break;
    case 2: Micro<2>(ai, lda, panel, K, ci, ldc); break;
    case 3: Micro<3>(ai, lda, panel, K, ci, ldc); break;
    case 4: Micro<4>(ai, lda, panel, K, ci, ldc); break;
    case 5: Micro<5>(ai, lda, panel, K, ci, ldc); break;
    case 6: Micro<6>(ai, lda, panel, K, ci, ldc); break;
    case 7: Micro<7>(ai, lda, panel, K, ci, ldc); break;
    case 8: Micro<8>(ai, lda, panel, K, ci, ldc); break;
    case 9: Micro<9>(ai, lda, panel, K, ci, ldc); break;
    case 10: Micro<10>(ai, lda, panel, K, ci, ldc); break;
    case 11: Micro<11>(ai, lda, panel, K, ci, ldc); break;
    case 12: Micro<12>(ai, lda, panel, K, ci, ldc); break;
    default: break;
  }
}

// C (M x panels*32, row stride ldc) = A (M x K) @ the packed panels. Panel by panel, so one
// panel (K x 32) stays in L1/L2 while every row block of A passes over it.
void Matmul(const float* a, int64_t lda, int64_t M, int64_t K, const float* panels, int64_t n_panels,
            float* c, int64_t ldc) {
  // Row blocks of at most 12 rows (24 accumulators), as even as the rows allow: 25 rows run
  // as 9 + 8 + 8, not 12 + 12 + 1 (a one-row block does two FMAs per two loads of B). Every
  // row's sums run in the same order whatever its block, so a row's result does not depend
  // on how many rows share the call.
  switch (M) {
    case 1: return FewRows<1, 4>(a, lda, panels, n_panels, K, c, ldc);
    case 2: return FewRows<2, 3>(a, lda, panels, n_panels, K, c, ldc);
    case 3: return FewRows<3, 2>(a, lda, panels, n_panels, K, c, ldc);
    case 4: return FewRows<4, 2>(a, lda, panels, n_panels, K, c, ldc);
    default: break;
  }
  const int64_t blocks = (M + 11) / 12;
  for (int64_t p = 0; p < n_panels; ++p) {
    const float* panel = panels + p * K * kPanel;
    float* cp = c + p * kPanel;
    for (int64_t blk = 0, i = 0; blk < blocks; ++blk) {
      const int64_t rows = (M - i) / (blocks - blk);
      Rows(a + i * lda, lda, rows, panel, K, cp + i * ldc, ldc);
      i += rows;
    }
  }
}

// ---- elementwise functions, 16 lanes -----------------------------------------------------

// exp: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), ~1-2 ulp.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.3762626647950f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

inline __m512 Sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// tanh: the rational approximation Eigen (and so XLA:CPU) uses for float32, x clamped to +-7.9
// (beyond which tanh rounds to +-1), a few ulp.
inline __m512 Tanh(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-7.90531110763549805f)), _mm512_set1_ps(7.90531110763549805f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  p = _mm512_mul_ps(p, x);
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  return _mm512_div_ps(p, q);
}

inline __mmask16 Tail(int64_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1); }

inline __m512 Load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void Store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

// ---- the layer ---------------------------------------------------------------------------

// The recurrent product of a step, z (R x Ldc(), gate block q at columns q * block) = a @ w,
// where a is R rows of K values (row stride lda), each first scaled by row_scale[r] where
// row_scale is given (keep: 0 where the state was reset). Two kinds, one layer code:
//  - F32Product: w in PackPanels' 32-column panels, float32 FMAs (Matmul above);
//  - Bf16Product: w packed for vdpbf16ps (amx_matmul.cc's Pack; bf16_dot.h), a rounded to
//    bfloat16 first, products summed in float32: what XLA's scan computes in --dtype bfloat16
//    (h and the cotangent rounded to bfloat16 before each recurrent matmul), in one call per
//    window instead of ~20 dispatched operations per step.
struct F32Product {
  using Scratch = std::vector<float>;
  const float* panels;
  int64_t n_panels;  // 32-column panels of the product's output
  int64_t block;     // columns of one gate block in the output (N rounded up to 32)

  int64_t Ldc() const { return n_panels * kPanel; }
  void Multiply(const float* a, int64_t lda, int64_t R, int64_t K, const float* row_scale, Scratch& scaled,
                float* z) const {
    if (row_scale) {
      scaled.resize(R * K);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; ++k) scaled[r * K + k] = a[r * lda + k] * row_scale[r];
      a = scaled.data(), lda = K;
    }
    Matmul(a, lda, R, K, panels, n_panels, z, Ldc());
  }
};

struct Bf16Product {
  using Scratch = std::vector<uint16_t>;
  const uint16_t* packed;  // (Np / 16, Kp / 2, 32)
  int64_t Kp, Np;          // K rounded up to 32, N to 16
  int64_t block;           // columns of one gate block (N / gates: the packed columns are N's own)

  int64_t Ldc() const { return Np; }
  void Multiply(const float* a, int64_t lda, int64_t R, int64_t K, const float* row_scale, Scratch& a16,
                float* z) const {
    a16.resize(R * Kp);
    RowsToBf16(a, lda, R, K, row_scale, a16.data(), Kp);
    DpMatmul(a16.data(), packed, z, R, Kp, Np);
  }
};

// Rows [b0, b1) of the window (rows never interact: each part of a split call runs on its own
// thread with no synchronisation until the end). Row b of step t is at (t * B + b).
template <typename Product>
void Forward(const float* xw, const Product& w, const float* bias, const float* c0, const float* h0,
             const float* keep, float* h_all, float* c_all, float* gates, int64_t T, int64_t B, int64_t H,
             int64_t b0, int64_t b1) {
  const int64_t BH = B * H, G = 4 * H, R = b1 - b0, ldz = w.Ldc(), block = w.block;
  std::vector<float> z(R * ldz);
  typename Product::Scratch scratch;
  for (int64_t t = 0; t < T; ++t) {
    const float* c_before = t ? c_all + (t - 1) * BH : c0;
    const float* h_before = t ? h_all + (t - 1) * BH : h0;
    // The state the step reads, zero where a document starts, times w_hh (all four gates).
    w.Multiply(h_before + b0 * H, H, R, H, keep + t * B + b0, scratch, z.data());
    for (int64_t b = b0; b < b1; ++b) {
      const __m512 k = _mm512_set1_ps(keep[t * B + b]);
      const int64_t row = t * BH + b * H;
      const float* zr = z.data() + (b - b0) * ldz;
      const float* xr = xw + (t * B + b) * G;
      float* gr = gates + (t * B + b) * G;
      for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = Tail(H - j);
        __m512 pre[4];
        for (int q = 0; q < 4; ++q) {
          pre[q] = _mm512_add_ps(_mm512_add_ps(Load(xr + q * H + j, m), Load(bias + q * H + j, m)),
                                 Load(zr + q * block + j, m));
        }
        const __m512 i = Sigmoid(pre[0]), f = Sigmoid(pre[1]), g = Tanh(pre[2]), o = Sigmoid(pre[3]);
        const __m512 c_prev = _mm512_mul_ps(Load(c_before + b * H + j, m), k);
        const __m512 c = _mm512_fmadd_ps(f, c_prev, _mm512_mul_ps(i, g));
        Store(c_all + row + j, m, c);
        Store(h_all + row + j, m, _mm512_mul_ps(o, Tanh(c)));
        Store(gr + j, m, i);
        Store(gr + H + j, m, f);
        Store(gr + 2 * H + j, m, g);
        Store(gr + 3 * H + j, m, o);
      }
    }
  }
}

// Rows [b0, b1), as Forward. d_bias is summed afterwards (BiasGradient), so that its order of
// additions does not depend on how the rows were split.
template <typename Product>
void Backward(const Product& wt, const float* gates, const float* c_all, const float* c0, const float* keep,
              const float* dh_all, const float* dc_T, const float* dh_T, float* dz_all, float* dc0, float* dh0,
              int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1) {
  const int64_t BH = B * H, G = 4 * H, R = b1 - b0, ldd = wt.Ldc();
  std::vector<float> d_prev_h(R * ldd), dc(dc_T + b0 * H, dc_T + b1 * H), dh(dh_T + b0 * H, dh_T + b1 * H);
  typename Product::Scratch scratch;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_before = t ? c_all + (t - 1) * BH : c0;
    float* dz = dz_all + (t * B + b0) * G;  // this step's rows: also the matmul's A below
    for (int64_t b = b0; b < b1; ++b) {
      const __m512 k = _mm512_set1_ps(keep[t * B + b]);
      const int64_t row = t * BH + b * H, r = (b - b0) * H;
      const float* gr = gates + (t * B + b) * G;
      float* dzr = dz + (b - b0) * G;
      for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = Tail(H - j);
        const __m512 i = Load(gr + j, m), f = Load(gr + H + j, m), g = Load(gr + 2 * H + j, m),
                     o = Load(gr + 3 * H + j, m);
        const __m512 c = Load(c_all + row + j, m), c_prev = _mm512_mul_ps(Load(c_before + b * H + j, m), k);
        const __m512 d_h = _mm512_add_ps(Load(dh.data() + r + j, m), Load(dh_all + row + j, m));
        const __m512 tc = Tanh(c);
        // dc += dh * o * (1 - tanh(c)^2)
        const __m512 d_c = _mm512_fmadd_ps(_mm512_mul_ps(d_h, o), _mm512_fnmadd_ps(tc, tc, one),
                                           Load(dc.data() + r + j, m));
        const __m512 d[4] = {
            _mm512_mul_ps(_mm512_mul_ps(d_c, g), _mm512_mul_ps(i, _mm512_sub_ps(one, i))),
            _mm512_mul_ps(_mm512_mul_ps(d_c, c_prev), _mm512_mul_ps(f, _mm512_sub_ps(one, f))),
            _mm512_mul_ps(_mm512_mul_ps(d_c, i), _mm512_fnmadd_ps(g, g, one)),
            _mm512_mul_ps(_mm512_mul_ps(d_h, tc), _mm512_mul_ps(o, _mm512_sub_ps(one, o)))};
        for (int q = 0; q < 4; ++q) Store(dzr + q * H + j, m, d[q]);
        // The cotangent of the cell state the step read, zeroed where that state was reset.
        Store(dc.data() + r + j, m, _mm512_mul_ps(_mm512_mul_ps(d_c, f), k));
      }
    }
    // d h_prev = dz @ w_hh^T, all four gates in one matmul over K = 4H.
    wt.Multiply(dz, G, R, G, nullptr, scratch, d_prev_h.data());
    for (int64_t b = 0; b < R; ++b) {
      const float k = keep[t * B + b0 + b];
      for (int64_t j = 0; j < H; ++j) dh[b * H + j] = d_prev_h[b * ldd + j] * k;
    }
  }
  std::memcpy(dc0 + b0 * H, dc.data(), R * H * sizeof(float));
  std::memcpy(dh0 + b0 * H, dh.data(), R * H * sizeof(float));
}

// d_bias[n0:n1) = dz summed over steps (last first) and, within a step, rows (first first):
// the order the whole-window loop met them in, whatever the split. n0 is a multiple of 16.
void BiasGradient(const float* dz_all, float* d_bias, int64_t T, int64_t B, int64_t G, int64_t n0, int64_t n1) {
  for (int64_t j = n0; j < n1; j += 16) {
    const __mmask16 m = Tail(n1 - j);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t t = T - 1; t >= 0; --t)
      for (int64_t b = 0; b < B; ++b) acc = _mm512_add_ps(acc, Load(dz_all + (t * B + b) * G + j, m));
    Store(d_bias + j, m, acc);
  }
}

// A weight of `gates` blocks of N columns side by side (K x gates*N) as the matmul reads it:
// each block's columns padded to Np = N rounded up to 32, in gates*Np/32 panels of (K x 32).
void PackPanels(const float* w, float* out, int64_t K, int64_t N, int64_t gates) {
  const int64_t Np = RoundUp(N, kPanel), ld = gates * N;
  for (int64_t g = 0; g < gates; ++g)
    for (int64_t p = 0; p < Np / kPanel; ++p) {
      float* panel = out + (g * Np / kPanel + p) * K * kPanel;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < kPanel; ++t) {
          const int64_t n = p * kPanel + t;
          panel[k * kPanel + t] = n < N ? w[k * ld + g * N + n] : 0.0f;
        }
    }
}

// w_hh (H x 4H, gate blocks i, f, g, o side by side) as the backward's matmul reads it:
// B = w_hh^T (4H x H), columns padded to Hp, in Hp/32 panels of (4H x 32). (The forward reads
// PackPanels(w_hh) with four blocks of H.)
void PackTransposed(const float* w, float* out, int64_t H) {
  const int64_t Hp = RoundUp(H, kPanel), G = 4 * H;
  for (int64_t p = 0; p < Hp / kPanel; ++p) {
    float* panel = out + p * G * kPanel;
    for (int64_t t = 0; t < kPanel; ++t) {
      const int64_t n = p * kPanel + t;
      for (int64_t k = 0; k < G; ++k) panel[k * kPanel + t] = n < H ? w[n * G + k] : 0.0f;
    }
  }
}

// ---- one time step of a layer (sampling) ---------------------------------------------------
//
// Sampling runs a layer one step at a time for a few rows: inside XLA's loop that step was a
// handful of small dots (one per gate block of w_ih, one for w_hh) plus elementwise fusions,
// each dispatched separately, and at one row XLA's dots ran at ~12 GFLOP/s. Here one call per
// layer and step: x @ w_ih (unless x is already the projection: the first layer's gathered
// rows of w_ih), h @ w_hh, both packed once per sampling call, then the gates in registers.

enum Kind : int32_t { kRnn = 0, kLstm = 1, kGru = 2 };

int GatesOf(int32_t kind) { return kind == kLstm ? 4 : kind == kGru ? 3 : 1; }

// Helper threads. For a sampling step: at batch 1 a step is a matrix-vector product, bound by
// how fast the weights stream in, and a GRU 2x256's (2.4 MB) do not fit one core's L2 cache
// (2 MB here). Split by output columns over two cores, each core reads the same half of every
// weight at every step, and that half stays in its own L2. A helper spins between steps (a
// sampling step comes every few microseconds; waking a sleeping thread takes longer than a
// step) and sleeps after ~1 ms without work, so it burns nothing once sampling stops.
// For a training window on one device alone on several cores: the rows, which never interact,
// split into one part per thread for the whole window (no synchronisation between steps).
class Pool {
 public:
  static Pool& Get() {
    static std::once_flag once;
    // A child process has no helper threads: it starts a pool of its own.
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance.store(nullptr); }); });
    Pool* pool = instance.load();
    if (pool == nullptr) {
      Pool* fresh = new Pool();  // never destroyed: helpers outlive exit
      pool = instance.compare_exchange_strong(pool, fresh) ? fresh : (delete fresh, pool);
    }
    return *pool;
  }

  // f(part) for part in [0, parts): part 0 on the caller, the others on helpers. Where another
  // call holds the helpers (two devices sampling at once) the caller runs every part itself.
  // A part computes the same values on any thread, so the result is the same either way.
  //
  // `linger`: whether the helpers spin for the next call (~1 ms) before sleeping. Sampling
  // steps come microseconds apart; a training window's calls come milliseconds apart, with
  // XLA's own threads working in between, whom a spinning helper would take a core from.
  template <typename F>
  void Run(int parts, F& f, bool linger = true) {
    bool expected = false;
    if (parts <= 1 || !busy_.compare_exchange_strong(expected, true)) {
      for (int p = 0; p < parts; ++p) f(p);
      return;
    }
    while (static_cast<int>(helpers_.size()) < parts - 1 && helpers_.size() < kMaxHelpers) {
      helpers_.push_back(new Helper());
    }
    const int on_helpers = std::min<int>(parts - 1, static_cast<int>(helpers_.size()));
    // The helpers run in the caller's floating-point mode (XLA's threads flush denormals to
    // zero; a helper that did not would compute other values, slowly). A new thread inherits
    // its creator's mode, so this matters only if callers in other modes share the helpers.
    const unsigned csr = _mm_getcsr();
    for (int i = 0; i < on_helpers; ++i) helpers_[i]->Start(&Trampoline<F>, &f, i + 1, csr, linger);
    f(0);
    for (int p = on_helpers + 1; p < parts; ++p) f(p);
    for (int i = 0; i < on_helpers; ++i) helpers_[i]->Wait();
    busy_.store(false, std::memory_order_release);
  }

 private:
  static constexpr size_t kMaxHelpers = 7;
  static constexpr int kSpins = 20000;
  static inline std::atomic<Pool*> instance{nullptr};

  template <typename F>
  static void Trampoline(void* f, int part) { (*static_cast<F*>(f))(part); }

  struct Helper {
    std::atomic<uint64_t> posted{0}, finished{0};
    std::atomic<bool> sleeping{false};
    void (*fn)(void*, int) = nullptr;
    void* ctx = nullptr;
    int part = 0;
    unsigned csr = 0;
    std::atomic<int> spin_limit{kSpins};
    std::mutex mu;
    std::condition_variable cv;

    Helper() { std::thread([this] { Loop(); }).detach(); }

    void Start(void (*f)(void*, int), void* c, int p, unsigned mxcsr, bool linger) {
      fn = f, ctx = c, part = p, csr = mxcsr;
      spin_limit.store(linger ? kSpins : 0, std::memory_order_relaxed);
      posted.fetch_add(1);  // seq_cst: ordered before the read of `sleeping` below
      if (sleeping.load()) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_one();
      }
    }

    void Wait() {
      const uint64_t want = posted.load(std::memory_order_relaxed);
      while (finished.load(std::memory_order_acquire) != want) _mm_pause();
    }

    void Loop() {
      uint64_t seen = 0;
      for (;;) {
        uint64_t now;
        for (int spins = 0; (now = posted.load(std::memory_order_acquire)) == seen;) {
          if (++spins < spin_limit.load(std::memory_order_relaxed)) {
            _mm_pause();
            continue;
          }
          std::unique_lock<std::mutex> lock(mu);
          sleeping.store(true);  // seq_cst: before the predicate's read of `posted`
          cv.wait(lock, [&] { return posted.load() != seen; });
          sleeping.store(false);
          spins = 0;
        }
        seen = now;
        if (_mm_getcsr() != csr) _mm_setcsr(csr);
        fn(ctx, part);
        finished.store(now, std::memory_order_release);
      }
    }
  };

  std::atomic<bool> busy_{false};
  std::vector<Helper*> helpers_;
};

// Column panels [p0, p1) of each of `gates` blocks of Np = n_panels * 32 columns:
// C[:, block q's panels p0..p1) = A @ those panels of w.
void MatmulPanels(const float* a, int64_t lda, int64_t M, int64_t K, const float* w, int64_t gates,
                  int64_t n_panels, int64_t p0, int64_t p1, float* c, int64_t ldc) {
  for (int64_t q = 0; q < gates; ++q) {
    const int64_t first = q * n_panels + p0;
    Matmul(a, lda, M, K, w + first * K * kPanel, p1 - p0, c + first * kPanel, ldc);
  }
}

// How many parts to split a step's columns into: one per thread asked for, at least one panel
// (32 columns) each.
int Parts(int32_t threads, int64_t n_panels) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_panels)));
}

// How many parts to split a training window's rows into: one per thread asked for, at least
// kMinRowsPerPart rows each (fewer rows than that run below the matmul's full-width blocks).
constexpr int64_t kMinRowsPerPart = 4;
int RowParts(int32_t threads, int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / kMinRowsPerPart)));
}

// x: B x I (projected = false) or B x G, the input projection without b_ih (projected = true);
// wih, whh: PackPanels of w_ih (I x G), w_hh (H x G); b_ih, b_hh: G; h, c: B x H (c read only
// for the LSTM). Writes h_out, c_out (c_out zero for the cells without a cell state). The
// hidden units are split into `threads` parts of whole panels, computed on as many threads.
void CellStep(int32_t kind, const float* x, int64_t I, bool projected, const float* wih, const float* b_ih,
              const float* whh, const float* b_hh, const float* h, const float* c, float* h_out, float* c_out,
              int64_t B, int64_t H, int32_t threads) {
  const int64_t gates = GatesOf(kind), Hp = RoundUp(H, kPanel), Gp = gates * Hp, G = gates * H;
  const int64_t n_panels = Hp / kPanel;
  thread_local std::vector<float> zh_buf, zx_buf;
  zh_buf.resize(B * Gp);
  if (!projected) zx_buf.resize(B * Gp);
  float* zh = zh_buf.data();
  float* zx = zx_buf.data();
  const int parts = Parts(threads, n_panels);
  auto part = [&](int t) {
    const int64_t p0 = n_panels * t / parts, p1 = n_panels * (t + 1) / parts;
    MatmulPanels(h, H, B, H, whh, gates, n_panels, p0, p1, zh, Gp);
    const float* xs = x;
    int64_t x_row = G, x_block = H;
    if (!projected) {
      MatmulPanels(x, I, B, I, wih, gates, n_panels, p0, p1, zx, Gp);
      xs = zx, x_row = Gp, x_block = Hp;
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = xs + b * x_row;
      const float* zr = zh + b * Gp;
      for (int64_t j = p0 * kPanel; j < std::min(H, p1 * kPanel); j += 16) {
        const __mmask16 m = Tail(H - j);
        // The model's order of additions: (x @ w_ih + b_ih) + (h @ w_hh + b_hh).
        auto xw = [&](int q) { return _mm512_add_ps(Load(xr + q * x_block + j, m), Load(b_ih + q * H + j, m)); };
        auto hw = [&](int q) { return _mm512_add_ps(Load(zr + q * Hp + j, m), Load(b_hh + q * H + j, m)); };
        __m512 h_new, c_new = _mm512_setzero_ps();
        if (kind == kRnn) {
          h_new = Tanh(_mm512_add_ps(xw(0), hw(0)));
        } else if (kind == kLstm) {
          const __m512 i = Sigmoid(_mm512_add_ps(xw(0), hw(0))), f = Sigmoid(_mm512_add_ps(xw(1), hw(1))),
                       g = Tanh(_mm512_add_ps(xw(2), hw(2))), o = Sigmoid(_mm512_add_ps(xw(3), hw(3)));
          c_new = _mm512_fmadd_ps(f, Load(c + b * H + j, m), _mm512_mul_ps(i, g));
          h_new = _mm512_mul_ps(o, Tanh(c_new));
        } else {
          const __m512 r = Sigmoid(_mm512_add_ps(xw(0), hw(0))), z = Sigmoid(_mm512_add_ps(xw(1), hw(1)));
          const __m512 n = Tanh(_mm512_fmadd_ps(r, hw(2), xw(2)));
          h_new = _mm512_fmadd_ps(z, Load(h + b * H + j, m), _mm512_mul_ps(_mm512_sub_ps(one, z), n));
        }
        Store(h_out + b * H + j, m, h_new);
        Store(c_out + b * H + j, m, c_new);
      }
    }
  };
  Pool::Get().Run(parts, part);
}

// y (B x N) = x (B x K) @ w + bias, w packed by PackPanels with one block (the output layer).
void Dense(const float* x, const float* wp, const float* bias, float* y, int64_t B, int64_t K, int64_t N,
           int32_t threads) {
  const int64_t Np = RoundUp(N, kPanel), n_panels = Np / kPanel;
  thread_local std::vector<float> z_buf;
  z_buf.resize(B * Np);
  float* z = z_buf.data();
  const int parts = Parts(threads, n_panels);
  auto part = [&](int t) {
    const int64_t p0 = n_panels * t / parts, p1 = n_panels * (t + 1) / parts;
    MatmulPanels(x, K, B, K, wp, 1, n_panels, p0, p1, z, Np);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = p0 * kPanel; j < std::min(N, p1 * kPanel); j += 16) {
        const __mmask16 m = Tail(N - j);
        Store(y + b * N + j, m, _mm512_add_ps(Load(z + b * Np + j, m), Load(bias + j, m)));
      }
  };
  Pool::Get().Run(parts, part);
}

// ---- FFI handlers ------------------------------------------------------------------------

using F32 = ffi::Buffer<ffi::F32>;
using F32Ret = ffi::ResultBuffer<ffi::F32>;

ffi::Error Bad(const char* what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

bool Count(const F32& x, int64_t n) { return x.element_count() == static_cast<size_t>(n); }

ffi::Error PackTransposedImpl(F32 w, F32Ret out) {
  const auto d = w.dimensions();
  if (d.size() != 2 || d[1] != 4 * d[0]) return Bad("lstm_pack: w_hh must be H x 4H");
  const int64_t H = d[0];
  if (out->element_count() != static_cast<size_t>(4 * H * RoundUp(H, kPanel))) {
    return Bad("lstm_pack: bad output size");
  }
  PackTransposed(w.typed_data(), out->typed_data(), H);
  return ffi::Error::Success();
}

ffi::Error PackPanelsImpl(F32 w, F32Ret out, int64_t gates) {
  const auto d = w.dimensions();
  if (d.size() != 2 || gates < 1 || d[1] % gates) return Bad("pack_panels: w must be K x gates*N");
  const int64_t K = d[0], N = d[1] / gates;
  if (!Count(*out, gates * RoundUp(N, kPanel) * K)) return Bad("pack_panels: bad output size");
  PackPanels(w.typed_data(), out->typed_data(), K, N, gates);
  return ffi::Error::Success();
}

ffi::Error CellStepImpl(F32 x, F32 wih, F32 b_ih, F32 whh, F32 b_hh, F32 h, F32 c, F32Ret h_out, F32Ret c_out,
                        int32_t kind, int32_t projected, int32_t threads) {
  const auto dh = h.dimensions(), dx = x.dimensions();
  if (kind < kRnn || kind > kGru) return Bad("cell_step: unknown cell kind");
  if (dh.size() != 2 || dx.size() != 2 || dx[0] != dh[0]) return Bad("cell_step: x and h must be B x I, B x H");
  const int64_t B = dh[0], H = dh[1], I = dx[1], gates = GatesOf(kind), G = gates * H;
  const int64_t Gp = gates * RoundUp(H, kPanel);
  if ((projected && I != G) || (!projected && !Count(wih, I * Gp)) || !Count(whh, H * Gp) || !Count(b_ih, G) ||
      !Count(b_hh, G) || !Count(c, B * H)) {
    return Bad("cell_step: inconsistent shapes");
  }
  CellStep(kind, x.typed_data(), I, projected != 0, wih.typed_data(), b_ih.typed_data(), whh.typed_data(),
           b_hh.typed_data(), h.typed_data(), c.typed_data(), h_out->typed_data(), c_out->typed_data(), B, H, threads);
  return ffi::Error::Success();
}

ffi::Error DenseImpl(F32 x, F32 wp, F32 bias, F32Ret y, int32_t threads) {
  const auto dx = x.dimensions(), dy = y->dimensions();
  if (dx.size() != 2 || dy.size() != 2 || dx[0] != dy[0]) return Bad("dense: x, y must be B x K, B x N");
  const int64_t B = dx[0], K = dx[1], N = dy[1];
  if (!Count(wp, K * RoundUp(N, kPanel)) || !Count(bias, N)) return Bad("dense: inconsistent shapes");
  Dense(x.typed_data(), wp.typed_data(), bias.typed_data(), y->typed_data(), B, K, N, threads);
  return ffi::Error::Success();
}

using BF16 = ffi::Buffer<ffi::BF16>;

// What Forward and Backward read of w_hh (or its transpose) packed for vdpbf16ps, (Np/16, Kp/2,
// 32) for a K x N product: null where the buffer does not have that shape.
const uint16_t* Bf16Packed(const BF16& w, int64_t K, int64_t N) {
  const auto d = w.dimensions();
  if (d.size() != 3 || d[0] != RoundUp(N, 16) / 16 || d[1] != RoundUp(K, 32) / 2 || d[2] != 32) return nullptr;
  return reinterpret_cast<const uint16_t*>(w.typed_data());
}

template <typename Product>
ffi::Error RunForward(const Product& w, F32 xw, F32 bias, F32 c0, F32 h0, F32 keep, F32Ret h_all, F32Ret c_all,
                      F32Ret gates, int64_t T, int64_t B, int64_t H, int32_t threads) {
  if (!Count(bias, 4 * H) || !Count(c0, B * H) || !Count(h0, B * H) || !Count(keep, T * B)) {
    return Bad("lstm_forward: inconsistent shapes");
  }
  const int parts = RowParts(threads, B);
  auto part = [&](int p) {
    Forward(xw.typed_data(), w, bias.typed_data(), c0.typed_data(), h0.typed_data(), keep.typed_data(),
            h_all->typed_data(), c_all->typed_data(), gates->typed_data(), T, B, H, B * p / parts,
            B * (p + 1) / parts);
  };
  Pool::Get().Run(parts, part, /*linger=*/false);
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(F32 xw, F32 wp, F32 bias, F32 c0, F32 h0, F32 keep, F32Ret h_all, F32Ret c_all,
                       F32Ret gates, int32_t threads) {
  const auto d = xw.dimensions();
  if (d.size() != 3 || d[2] % 4) return Bad("lstm_forward: xw must be T x B x 4H");
  const int64_t T = d[0], B = d[1], H = d[2] / 4, Hp = RoundUp(H, kPanel);
  if (!Count(wp, 4 * H * Hp)) return Bad("lstm_forward: inconsistent shapes");
  return RunForward(F32Product{wp.typed_data(), 4 * Hp / kPanel, Hp}, xw, bias, c0, h0, keep, h_all, c_all, gates,
                    T, B, H, threads);
}

ffi::Error Bf16ForwardImpl(F32 xw, BF16 wp, F32 bias, F32 c0, F32 h0, F32 keep, F32Ret h_all, F32Ret c_all,
                           F32Ret gates, int32_t threads) {
  const auto d = xw.dimensions();
  if (d.size() != 3 || d[2] % 4) return Bad("lstm_forward_bf16: xw must be T x B x 4H");
  const int64_t T = d[0], B = d[1], H = d[2] / 4;
  const uint16_t* w = Bf16Packed(wp, H, 4 * H);
  if (!w) return Bad("lstm_forward_bf16: w_hh is not packed for H x 4H");
  return RunForward(Bf16Product{w, RoundUp(H, 32), RoundUp(4 * H, 16), H}, xw, bias, c0, h0, keep, h_all, c_all,
                    gates, T, B, H, threads);
}

template <typename Product>
ffi::Error RunBackward(const Product& wt, F32 gates, F32 c_all, F32 c0, F32 keep, F32 dh_all, F32 dc, F32 dh,
                       F32Ret dz, F32Ret d_bias, F32Ret dc0, F32Ret dh0, int64_t T, int64_t B, int64_t H,
                       int32_t threads) {
  if (!Count(gates, 4 * T * B * H) || !Count(dh_all, T * B * H) || !Count(c0, B * H) || !Count(dc, B * H) ||
      !Count(dh, B * H) || !Count(keep, T * B)) {
    return Bad("lstm_backward: inconsistent shapes");
  }
  const int parts = RowParts(threads, B);
  auto part = [&](int p) {
    Backward(wt, gates.typed_data(), c_all.typed_data(), c0.typed_data(), keep.typed_data(), dh_all.typed_data(),
             dc.typed_data(), dh.typed_data(), dz->typed_data(), dc0->typed_data(), dh0->typed_data(), T, B, H,
             B * p / parts, B * (p + 1) / parts);
  };
  Pool::Get().Run(parts, part, /*linger=*/false);
  // The bias gradient by columns (16 at a time), over the finished dz.
  const int64_t G = 4 * H, chunks = (G + 15) / 16;
  const int bias_parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, chunks)));
  auto bias_part = [&](int p) {
    BiasGradient(dz->typed_data(), d_bias->typed_data(), T, B, G, 16 * (chunks * p / bias_parts),
                 std::min(G, 16 * (chunks * (p + 1) / bias_parts)));
  };
  Pool::Get().Run(bias_parts, bias_part, /*linger=*/false);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(F32 wtp, F32 gates, F32 c_all, F32 c0, F32 keep, F32 dh_all, F32 dc, F32 dh, F32Ret dz,
                        F32Ret d_bias, F32Ret dc0, F32Ret dh0, int32_t threads) {
  const auto d = c_all.dimensions();
  if (d.size() != 3) return Bad("lstm_backward: c_all must be T x B x H");
  const int64_t T = d[0], B = d[1], H = d[2], Hp = RoundUp(H, kPanel);
  if (!Count(wtp, 4 * H * Hp)) return Bad("lstm_backward: inconsistent shapes");
  return RunBackward(F32Product{wtp.typed_data(), Hp / kPanel, Hp}, gates, c_all, c0, keep, dh_all, dc, dh, dz,
                     d_bias, dc0, dh0, T, B, H, threads);
}

ffi::Error Bf16BackwardImpl(BF16 wtp, F32 gates, F32 c_all, F32 c0, F32 keep, F32 dh_all, F32 dc, F32 dh,
                            F32Ret dz, F32Ret d_bias, F32Ret dc0, F32Ret dh0, int32_t threads) {
  const auto d = c_all.dimensions();
  if (d.size() != 3) return Bad("lstm_backward_bf16: c_all must be T x B x H");
  const int64_t T = d[0], B = d[1], H = d[2];
  const uint16_t* wt = Bf16Packed(wtp, 4 * H, H);
  if (!wt) return Bad("lstm_backward_bf16: w_hh^T is not packed for 4H x H");
  return RunBackward(Bf16Product{wt, RoundUp(4 * H, 32), RoundUp(H, 16), H}, gates, c_all, c0, keep, dh_all, dc,
                     dh, dz, d_bias, dc0, dh0, T, B, H, threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmPackTransposed, PackTransposedImpl, ffi::Ffi::Bind().Arg<F32>().Ret<F32>());

namespace {

// The bindings of the layer's calls, W being how w_hh arrives: float32 panels or bf16 packed.
// (`.template`: in a template, the members of Bind()'s builder are named as templates.)
template <typename W>
auto LstmForwardBinding() {
  return ffi::Ffi::Bind()
      .template Arg<F32>()                                          // xw
      .template Arg<W>().template Arg<F32>()                        // packed w_hh, bias
      .template Arg<F32>().template Arg<F32>()                      // c0, h0
      .template Arg<F32>()                                          // keep
      .template Ret<F32>().template Ret<F32>().template Ret<F32>()  // h_all, c_all, gates
      .template Attr<int32_t>("threads");
}

template <typename W>
auto LstmBackwardBinding() {
  return ffi::Ffi::Bind()
      .template Arg<W>()                                            // packed w_hh^T
      .template Arg<F32>().template Arg<F32>()                      // gates, c_all
      .template Arg<F32>().template Arg<F32>()                      // c0, keep
      .template Arg<F32>().template Arg<F32>().template Arg<F32>()  // dh_all, dc, dh
      .template Ret<F32>().template Ret<F32>()                      // dz, d_bias
      .template Ret<F32>().template Ret<F32>()                      // dc0, dh0
      .template Attr<int32_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmForward, ForwardImpl, LstmForwardBinding<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmBackward, BackwardImpl, LstmBackwardBinding<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmForwardBf16, Bf16ForwardImpl, LstmForwardBinding<BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmBackwardBf16, Bf16BackwardImpl, LstmBackwardBinding<BF16>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnPackPanels, PackPanelsImpl,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Attr<int64_t>("gates"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnCellStep, CellStepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()                        // x
                                  .Arg<F32>().Arg<F32>()             // packed w_ih, b_ih
                                  .Arg<F32>().Arg<F32>()             // packed w_hh, b_hh
                                  .Arg<F32>().Arg<F32>()             // h, c
                                  .Ret<F32>().Ret<F32>()             // h, c after the step
                                  .Attr<int32_t>("kind").Attr<int32_t>("projected")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnDense, DenseImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int32_t>("threads"));

// 1 when this CPU runs the AVX-512 instructions above (F for the arithmetic), else 0.
extern "C" int charrnn_rnn_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
}

// A whole LSTM layer over a window, forward and backward, as two XLA FFI custom calls (see
// charrnn/lstm_kernel.py): the float32 training path on x86 CPUs with AVX-512.
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
//   forward  (xw: T x B x G, the input projections without bias; w: pack(w_hh) below;
//             bias: G; c0, h0: B x H; keep: T x B x 1, 0 where the state is reset before the
//             step) -> h_all, c_all: T x B x H, the carry after each step; gates: T x B x G,
//             the activated gates each step.
//   backward (wt: pack(w_hh, transpose); gates, c_all, c0, keep as above; dh_all: T x B x H,
//             the cotangent of h_all; dc, dh: B x H, of the final carry) -> dz: T x B x G, the
//             cotangent of the gates' pre-activations (equal to those of xw, of the bias at
//             each step and of h @ w_hh); d_bias: G, dz summed over steps and rows; dc0, dh0.
// The weight gradient (h_prev^T @ dz over all steps) is one large matmul, left to XLA.
//
// Hp is H rounded up to 32: packed weights are panels of 32 columns (K x 32, contiguous), the
// matmul's output block. Built by charrnn/native.py; nothing here runs unless
// charrnn_lstm_available() said the CPU has AVX-512.

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- matmul: C (rows x 32 per panel) = A (rows x K, row stride lda) @ panel (K x 32) ----------

// MR rows of A times one panel: 2 * MR accumulators, two loads of B and MR broadcasts of A per
// k. C's rows are full panels (the callers' scratch is padded to whole panels).
template <int MR>
inline void Micro(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc) {
  __m512 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kPanel), b1 = _mm512_loadu_ps(panel + k * kPanel + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc0[i]);
    _mm512_storeu_ps(c + i * ldc + 16, acc1[i]);
  }
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

void Forward(const float* xw, const float* wp, const float* bias, const float* c0, const float* h0,
             const float* keep, float* h_all, float* c_all, float* gates, int64_t T, int64_t B, int64_t H) {
  const int64_t Hp = RoundUp(H, kPanel), BH = B * H, G = 4 * H;
  std::vector<float> prev_h(B * H), z(B * 4 * Hp);
  for (int64_t t = 0; t < T; ++t) {
    const float* c_before = t ? c_all + (t - 1) * BH : c0;
    const float* h_before = t ? h_all + (t - 1) * BH : h0;
    for (int64_t b = 0; b < B; ++b) {  // the state the step reads: zero where a document starts
      const float k = keep[t * B + b];
      for (int64_t j = 0; j < H; ++j) prev_h[b * H + j] = h_before[b * H + j] * k;
    }
    Matmul(prev_h.data(), H, B, H, wp, 4 * Hp / kPanel, z.data(), 4 * Hp);
    for (int64_t b = 0; b < B; ++b) {
      const __m512 k = _mm512_set1_ps(keep[t * B + b]);
      const int64_t row = t * BH + b * H;
      const float* zr = z.data() + b * 4 * Hp;
      const float* xr = xw + (t * B + b) * G;
      float* gr = gates + (t * B + b) * G;
      for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = Tail(H - j);
        __m512 pre[4];
        for (int q = 0; q < 4; ++q) {
          pre[q] = _mm512_add_ps(_mm512_add_ps(Load(xr + q * H + j, m), Load(bias + q * H + j, m)),
                                 Load(zr + q * Hp + j, m));
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

void Backward(const float* wtp, const float* gates, const float* c_all, const float* c0, const float* keep,
              const float* dh_all, const float* dc_T, const float* dh_T, float* dz_all, float* d_bias, float* dc0,
              float* dh0, int64_t T, int64_t B, int64_t H) {
  const int64_t Hp = RoundUp(H, kPanel), BH = B * H, G = 4 * H;
  std::vector<float> d_prev_h(B * Hp), dc(dc_T, dc_T + BH), dh(dh_T, dh_T + BH);
  std::memset(d_bias, 0, G * sizeof(float));
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_before = t ? c_all + (t - 1) * BH : c0;
    float* dz = dz_all + t * B * G;  // this step's rows: also the matmul's A below
    for (int64_t b = 0; b < B; ++b) {
      const __m512 k = _mm512_set1_ps(keep[t * B + b]);
      const int64_t row = t * BH + b * H;
      const float* gr = gates + (t * B + b) * G;
      float* dzr = dz + b * G;
      for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = Tail(H - j);
        const __m512 i = Load(gr + j, m), f = Load(gr + H + j, m), g = Load(gr + 2 * H + j, m),
                     o = Load(gr + 3 * H + j, m);
        const __m512 c = Load(c_all + row + j, m), c_prev = _mm512_mul_ps(Load(c_before + b * H + j, m), k);
        const __m512 d_h = _mm512_add_ps(Load(dh.data() + b * H + j, m), Load(dh_all + row + j, m));
        const __m512 tc = Tanh(c);
        // dc += dh * o * (1 - tanh(c)^2)
        const __m512 d_c = _mm512_fmadd_ps(_mm512_mul_ps(d_h, o), _mm512_fnmadd_ps(tc, tc, one),
                                           Load(dc.data() + b * H + j, m));
        const __m512 d[4] = {
            _mm512_mul_ps(_mm512_mul_ps(d_c, g), _mm512_mul_ps(i, _mm512_sub_ps(one, i))),
            _mm512_mul_ps(_mm512_mul_ps(d_c, c_prev), _mm512_mul_ps(f, _mm512_sub_ps(one, f))),
            _mm512_mul_ps(_mm512_mul_ps(d_c, i), _mm512_fnmadd_ps(g, g, one)),
            _mm512_mul_ps(_mm512_mul_ps(d_h, tc), _mm512_mul_ps(o, _mm512_sub_ps(one, o)))};
        for (int q = 0; q < 4; ++q) {
          Store(dzr + q * H + j, m, d[q]);
          Store(d_bias + q * H + j, m, _mm512_add_ps(Load(d_bias + q * H + j, m), d[q]));
        }
        // The cotangent of the cell state the step read, zeroed where that state was reset.
        Store(dc.data() + b * H + j, m, _mm512_mul_ps(_mm512_mul_ps(d_c, f), k));
      }
    }
    // d h_prev = dz @ w_hh^T, all four gates in one matmul over K = 4H.
    Matmul(dz, G, B, G, wtp, Hp / kPanel, d_prev_h.data(), Hp);
    for (int64_t b = 0; b < B; ++b) {
      const float k = keep[t * B + b];
      for (int64_t j = 0; j < H; ++j) dh[b * H + j] = d_prev_h[b * Hp + j] * k;
    }
  }
  std::memcpy(dc0, dc.data(), BH * sizeof(float));
  std::memcpy(dh0, dh.data(), BH * sizeof(float));
}

// w_hh (H x 4H, gate blocks i, f, g, o side by side) as the matmul reads it. Forward
// (transpose = 0): B = w_hh with each block's columns padded to Hp, in 4*Hp/32 panels of
// (H x 32). Backward (transpose = 1): B = w_hh^T (4H x H), columns padded to Hp, in Hp/32
// panels of (4H x 32).
void Pack(const float* w, float* out, int64_t H, bool transpose) {
  const int64_t Hp = RoundUp(H, kPanel), G = 4 * H;
  if (!transpose) {
    for (int g = 0; g < 4; ++g)
      for (int64_t p = 0; p < Hp / kPanel; ++p) {
        float* panel = out + (g * Hp / kPanel + p) * H * kPanel;
        for (int64_t k = 0; k < H; ++k)
          for (int64_t t = 0; t < kPanel; ++t) {
            const int64_t n = p * kPanel + t;
            panel[k * kPanel + t] = n < H ? w[k * G + g * H + n] : 0.0f;
          }
      }
  } else {
    for (int64_t p = 0; p < Hp / kPanel; ++p) {
      float* panel = out + p * G * kPanel;
      for (int64_t t = 0; t < kPanel; ++t) {
        const int64_t n = p * kPanel + t;
        for (int64_t k = 0; k < G; ++k) panel[k * kPanel + t] = n < H ? w[n * G + k] : 0.0f;
      }
    }
  }
}

// ---- FFI handlers ------------------------------------------------------------------------

using F32 = ffi::Buffer<ffi::F32>;
using F32Ret = ffi::ResultBuffer<ffi::F32>;

ffi::Error Bad(const char* what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

bool Count(const F32& x, int64_t n) { return x.element_count() == static_cast<size_t>(n); }

ffi::Error PackImpl(F32 w, F32Ret out, int32_t transpose) {
  const auto d = w.dimensions();
  if (d.size() != 2 || d[1] != 4 * d[0]) return Bad("lstm_pack: w_hh must be H x 4H");
  const int64_t H = d[0];
  if (out->element_count() != static_cast<size_t>(4 * H * RoundUp(H, kPanel))) {
    return Bad("lstm_pack: bad output size");
  }
  Pack(w.typed_data(), out->typed_data(), H, transpose != 0);
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(F32 xw, F32 wp, F32 bias, F32 c0, F32 h0, F32 keep, F32Ret h_all, F32Ret c_all,
                       F32Ret gates) {
  const auto d = xw.dimensions();
  if (d.size() != 3 || d[2] % 4) return Bad("lstm_forward: xw must be T x B x 4H");
  const int64_t T = d[0], B = d[1], H = d[2] / 4;
  if (!Count(wp, 4 * H * RoundUp(H, kPanel)) || !Count(bias, 4 * H) || !Count(c0, B * H) || !Count(h0, B * H) ||
      !Count(keep, T * B)) {
    return Bad("lstm_forward: inconsistent shapes");
  }
  Forward(xw.typed_data(), wp.typed_data(), bias.typed_data(), c0.typed_data(), h0.typed_data(),
          keep.typed_data(), h_all->typed_data(), c_all->typed_data(), gates->typed_data(), T, B, H);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(F32 wtp, F32 gates, F32 c_all, F32 c0, F32 keep, F32 dh_all, F32 dc, F32 dh, F32Ret dz,
                        F32Ret d_bias, F32Ret dc0, F32Ret dh0) {
  const auto d = c_all.dimensions();
  if (d.size() != 3) return Bad("lstm_backward: c_all must be T x B x H");
  const int64_t T = d[0], B = d[1], H = d[2];
  if (!Count(wtp, 4 * H * RoundUp(H, kPanel)) || !Count(gates, 4 * T * B * H) || !Count(dh_all, T * B * H) ||
      !Count(c0, B * H) || !Count(dc, B * H) || !Count(dh, B * H) || !Count(keep, T * B)) {
    return Bad("lstm_backward: inconsistent shapes");
  }
  Backward(wtp.typed_data(), gates.typed_data(), c_all.typed_data(), c0.typed_data(), keep.typed_data(),
           dh_all.typed_data(), dc.typed_data(), dh.typed_data(), dz->typed_data(), d_bias->typed_data(),
           dc0->typed_data(), dh0->typed_data(), T, B, H);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmPack, PackImpl,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Attr<int32_t>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()              // xw
                                  .Arg<F32>().Arg<F32>()   // packed w_hh, bias
                                  .Arg<F32>().Arg<F32>()   // c0, h0
                                  .Arg<F32>()              // keep
                                  .Ret<F32>().Ret<F32>().Ret<F32>());  // h_all, c_all, gates

XLA_FFI_DEFINE_HANDLER_SYMBOL(CharrnnLstmBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()                                   // packed w_hh^T
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()  // gates, c_all, c0, keep
                                  .Arg<F32>().Arg<F32>().Arg<F32>()             // dh_all, dc, dh
                                  .Ret<F32>().Ret<F32>()                        // dz, d_bias
                                  .Ret<F32>().Ret<F32>());                      // dc0, dh0

// 1 when this CPU runs the AVX-512 instructions above (F for the arithmetic), else 0.
extern "C" int charrnn_lstm_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
}

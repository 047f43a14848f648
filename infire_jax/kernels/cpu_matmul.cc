// y = x @ w^T for float32 x (M, K) and a float32 or bfloat16 w (N, K), as XLA FFI handlers for the
// CPU backend (bf16 weights are widened to float32 in registers: exact, and half the bytes to read).
//
// Why: at a few rows per step (decode batches of 2-32) XLA:CPU's dots with (out, in) weights run at
// 20-65 GFLOP/s on this project's machines; this kernel keeps a tile of TM x TN dot products in
// registers, reads every weight row once per tile of rows, and splits N over XLA's intra-op threads.
// The weight stays in the (out, in) layout the models store (no transposed copy).
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using infire::hsum;
using infire::load;
using infire::vec;
using infire::VW;

#if defined(__AVX512F__)
constexpr int TM = 4, TN = 4;  // 32 vector registers: 16 accumulators
#else
constexpr int TM = 3, TN = 4;  // 16 vector registers (AVX2 or narrower): 12 accumulators
#endif

// bf16 weights on AVX2 are widened by interleaving with zeros: 16 weights per 32-byte load become two
// float vectors (per 128-bit lane: weights 0-3 and 8-11 in the low one, 4-7 and 12-15 in the high one)
// at one shuffle each, no shift; x is permuted to that order once per call (permute_for_unpack).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define INFIRE_BF16_UNPACK 1
#endif

template <typename W>
constexpr int kStep = VW;  // weights consumed per row per step of the K loop
#ifdef INFIRE_BF16_UNPACK
template <>
constexpr int kStep<uint16_t> = 16;
#endif

// acc[i][j] += x[i, k : k + kStep] * w[j, k : k + kStep] (lane-wise; summed after the K loop).
template <int MB, int NB>
inline void accumulate(vec (&acc)[MB][NB], const float* x, const float* w, int64_t K, int64_t k) {
  vec wv[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) wv[j] = load(w + j * K + k);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const vec xv = load(x + i * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] += xv * wv[j];
  }
}

template <int MB, int NB>
inline void accumulate(vec (&acc)[MB][NB], const float* x, const uint16_t* w, int64_t K, int64_t k) {
#ifdef INFIRE_BF16_UNPACK
  const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + j * K + k));
    const vec lo = (vec)_mm256_unpacklo_epi16(zero, raw), hi = (vec)_mm256_unpackhi_epi16(zero, raw);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i][j] += load(x + i * K + k) * lo + load(x + i * K + k + VW) * hi;
  }
#else  // widen 16-bit patterns to the high half of 32-bit lanes
  typedef uint16_t halves __attribute__((vector_size(VW * 2)));
  typedef uint32_t words __attribute__((vector_size(VW * 4)));
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    halves h;
    std::memcpy(&h, w + j * K + k, sizeof h);
    const words bits = __builtin_convertvector(h, words) << 16;
    vec wv;
    std::memcpy(&wv, &bits, sizeof wv);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i][j] += load(x + i * K + k) * wv;
  }
#endif
}

#ifdef INFIRE_BF16_UNPACK
// x in the order accumulate() pairs it with bf16 weights: each whole block of 16 permuted, the tail
// (the scalar loop's part) as it is.
std::unique_ptr<float[]> permute_for_unpack(const float* x, int64_t M, int64_t K) {
  static constexpr int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  std::unique_ptr<float[]> out(new float[M * K]);
  const int64_t blocks = K - K % 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float* dst = out.get() + m * K;
    for (int64_t k = 0; k < blocks; k += 16)
      for (int e = 0; e < 16; ++e) dst[k + e] = row[k + order[e]];
    std::memcpy(dst + blocks, row + blocks, sizeof(float) * (K - blocks));
  }
  return out;
}
#endif

inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[m0 + i, n0 + j] = dot(x[m0 + i], w[n0 + j]) for i < MB, j < NB: MB * NB accumulators in
// registers, one load per x row and per w row for every kStep values of K.
template <int MB, int NB, typename W>
inline void tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  vec acc[MB][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = vec{};
  const int64_t kv = K - K % kStep<W>;
  const float* xr = x + m0 * K;
  const W* wr = w + n0 * K;
  for (int64_t k = 0; k < kv; k += kStep<W>) accumulate<MB, NB>(acc, xr, wr, K, k);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    float* out = y + (m0 + i) * N + n0;
    int j = 0;
#if !defined(__AVX512F__) && defined(__AVX__)
    if constexpr (NB % 4 == 0) {  // four horizontal sums at once
#pragma GCC unroll 8
      for (; j < NB; j += 4) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps((__m256)acc[i][j], (__m256)acc[i][j + 1]),
                                  _mm256_hadd_ps((__m256)acc[i][j + 2], (__m256)acc[i][j + 3]));
        _mm_storeu_ps(out + j, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      }
    }
#endif
#pragma GCC unroll 8
    for (; j < NB; ++j) out[j] = hsum(acc[i][j]);
  }
  if (kv < K)  // K not a multiple of kStep: the tail, scalar
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j)
        for (int64_t k = kv; k < K; ++k) y[(m0 + i) * N + n0 + j] += xr[i * K + k] * widen(wr[j * K + k]);
}

// All M rows of y for the NB weight rows starting at n0; the weight tile stays in L1 across row tiles.
template <int NB, typename W>
void row_tiles(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + TM <= M; m += TM) tile<TM, NB, W>(x, w, y, K, N, m, n0);
  switch (M - m) {
    case 3: tile<3, NB, W>(x, w, y, K, N, m, n0); break;
    case 2: tile<2, NB, W>(x, w, y, K, N, m, n0); break;
    case 1: tile<1, NB, W>(x, w, y, K, N, m, n0); break;
    default: break;
  }
}

// Weight rows [lo, hi) for all M rows of x.
template <typename W>
void weight_rows(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi) {
  int64_t n = lo;
  if (M == 1)  // a matrix-vector product: more weight rows in flight
    for (; n + 8 <= hi; n += 8) row_tiles<8, W>(x, w, y, M, K, N, n);
  for (; n + TN <= hi; n += TN) row_tiles<TN, W>(x, w, y, M, K, N, n);
  for (; n < hi; ++n) row_tiles<1, W>(x, w, y, M, K, N, n);
}

template <ffi::DataType WT>
ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("infire_matmul_nt: expects x (M, K), w (N, K) and y (M, N)");
  const float* xp = x.typed_data();
  const auto* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  // About eight chunks of weight rows per thread (balance), each a multiple of 8 rows (whole tiles).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = (std::max<int64_t>(8, N / (threads * 8)) + 7) / 8 * 8;
#ifdef INFIRE_BF16_UNPACK
  std::unique_ptr<float[]> permuted;
  if constexpr (WT == ffi::BF16) {
    permuted = permute_for_unpack(xp, M, K);
    xp = permuted.get();
  }
#endif
  infire::parallel_for(pool, (N + chunk - 1) / chunk, [=](int64_t c) {
    weight_rows(xp, wp, yp, M, K, N, c * chunk, std::min(N, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

namespace {

template <ffi::DataType WT>  // x float32 (M, K), w of type WT (N, K) -> y float32 (M, N)
auto MatmulBinding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<WT>>().template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireMatmulNT, MatmulNT<ffi::F32>, MatmulBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireMatmulNTBF16, MatmulNT<ffi::BF16>, MatmulBinding<ffi::BF16>());

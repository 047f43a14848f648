// y = x @ w^T for float32 x (M, K) and w (N, K), as an XLA FFI handler for the CPU backend.
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

// y[m0 + i, n0 + j] = dot(x[m0 + i], w[n0 + j]) for i < MB, j < NB: MB * NB accumulators in
// registers, one load per x row and per w row for every VW values of K.
template <int MB, int NB>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  vec acc[MB][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = vec{};
  const int64_t kv = K - K % VW;
  const float* xr = x + m0 * K;
  const float* wr = w + n0 * K;
  for (int64_t k = 0; k < kv; k += VW) {
    vec wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = load(wr + j * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const vec xv = load(xr + i * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] += xv * wv[j];
    }
  }
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
  if (kv < K)  // K not a multiple of the vector width: the tail, scalar
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j)
        for (int64_t k = kv; k < K; ++k) y[(m0 + i) * N + n0 + j] += xr[i * K + k] * wr[j * K + k];
}

// All M rows of y for the NB weight rows starting at n0; the weight tile stays in L1 across row tiles.
template <int NB>
void row_tiles(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + TM <= M; m += TM) tile<TM, NB>(x, w, y, K, N, m, n0);
  switch (M - m) {
    case 3: tile<3, NB>(x, w, y, K, N, m, n0); break;
    case 2: tile<2, NB>(x, w, y, K, N, m, n0); break;
    case 1: tile<1, NB>(x, w, y, K, N, m, n0); break;
    default: break;
  }
}

// Weight rows [lo, hi) for all M rows of x.
void weight_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi) {
  int64_t n = lo;
  if (M == 1)  // a matrix-vector product: more weight rows in flight
    for (; n + 8 <= hi; n += 8) row_tiles<8>(x, w, y, M, K, N, n);
  for (; n + TN <= hi; n += TN) row_tiles<TN>(x, w, y, M, K, N, n);
  for (; n < hi; ++n) row_tiles<1>(x, w, y, M, K, N, n);
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("infire_matmul_nt: expects x (M, K), w (N, K) and y (M, N)");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
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
  infire::parallel_for(pool, (N + chunk - 1) / chunk, [=](int64_t c) {
    weight_rows(xp, wp, yp, M, K, N, c * chunk, std::min(N, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireMatmulNT, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

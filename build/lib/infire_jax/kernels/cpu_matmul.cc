// y = x @ w^T for float32 x (M, K) and a float32, bfloat16 or palette12-compressed w (N, K), as XLA
// FFI handlers for the CPU backend (bf16 weights are widened to float32 in the kernel: exact, and half
// the bytes to read; palette12 weights are decoded to the same bf16 patterns: 12 bits read per
// weight, and bit for bit the bf16 kernel's result).
//
// Why: at a few rows per step (decode batches of 2-32) XLA:CPU's dots with (out, in) weights run at
// 20-65 GFLOP/s on this project's machines; this kernel keeps a tile of TM x TN dot products in
// registers, reads every weight row once per column tile (the first row tile prefetching the next
// one's), and splits N over XLA's intra-op threads. The weight stays in the (out, in) layout the
// models store (no transposed copy).
#include <type_traits>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using infire::hsum;
using infire::load;
using infire::vec;
using infire::VW;

#if defined(__AVX512F__)
constexpr int kVectorRegisters = 32;
constexpr int TM = 4, TN = 4;  // 16 accumulators, 4 weight vectors, 1 of x
#else
constexpr int kVectorRegisters = 16;  // AVX2 or narrower
constexpr int TM = 4, TN = 3;  // 12 accumulators, 3 weight vectors, 1 of x
#endif

// bf16 weights on AVX2 are widened by interleaving with zeros: 16 weights per 32-byte load become two
// float vectors (per 128-bit lane: weights 0-3 and 8-11 in the low one, 4-7 and 12-15 in the high one)
// at one shuffle each, no shift; x is permuted to that order once per call (permute_for_unpack).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define INFIRE_BF16_UNPACK 1
#endif

#ifdef INFIRE_BF16_UNPACK
constexpr int kBf16Step = 16;  // bf16 weights consumed per row per step of the K loop (32 bytes)
#else
constexpr int kBf16Step = VW;
#endif
typedef uint16_t bf16x __attribute__((vector_size(kBf16Step * 2)));  // kBf16Step bf16 bit patterns

inline float widen(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Weight sources: a tile asks each for a row cursor, then for the row's weights at K offset k, one
// step at a time in increasing k (accumulate() consumes them), then for the scalar tail as floats.

struct F32Rows {  // float32 (N, K)
  static constexpr int kStep = VW;
  using Row = const float*;
  using Block = vec;
  const float* w;
  int64_t K, first = 0;  // w holds weight rows [first, ...)
  Row row(int64_t n) const { return w + (n - first) * K; }
  Block block(Row& r, int64_t k) const { return load(r + k); }
  void prefetch(int64_t n, int64_t k) const { __builtin_prefetch(w + (n - first) * K + k); }
  void tail(Row& r, int64_t k0, int64_t k1, float* out) const { std::copy(r + k0, r + k1, out); }
};

struct Bf16Rows {  // bfloat16 bit patterns of weight rows [first, first + rows) as (rows, K)
  static constexpr int kStep = kBf16Step;
  using Row = const uint16_t*;
  using Block = bf16x;
  const uint16_t* w;
  int64_t K, first = 0;
  Row row(int64_t n) const { return w + (n - first) * K; }
  void prefetch(int64_t n, int64_t k) const { __builtin_prefetch(w + (n - first) * K + k); }
  const uint16_t* bf16_row(int64_t n, uint16_t*) const { return row(n); }
  Block block(Row& r, int64_t k) const {
    Block b;
    std::memcpy(&b, r + k, sizeof b);
    return b;
  }
  void tail(Row& r, int64_t k0, int64_t k1, float* out) const {
    for (int64_t k = k0; k < k1; ++k) out[k - k0] = widen(r[k]);
  }
};

// Blocked palette12 (infire_jax/compression/codec.py): each weight is a 4-bit index into a palette of
// 16 exponents plus a sign+mantissa byte (12 bits instead of 16); the few weights whose exponent is
// not in the palette are escapes (sorted flat index, full bf16 pattern). A row's index nibbles are
// packed per segment of S weights (the tensor's last axis) in "halves" order: byte j holds weight j
// (low nibble) and weight h + j (high nibble), h = ceil(S / 2). Rows are decoded to bf16 patterns a
// panel at a time into a buffer that stays in L1 while every row of x passes over it.
struct Palette12 {
  const uint8_t* packed;
  const uint8_t* sign_mant;
  const int32_t* escape_idx;  // sorted; entries >= N * K are padding
  const uint16_t* escape_val;
  int64_t E, K, S, packed_row;
  alignas(16) uint8_t exp_hi[16], exp_lo[16];  // per palette entry: its part of the bf16 high / low byte

  // out[i] for i < n: the weights whose index nibbles are (bytes[i] >> shift) & 15.
  void decode_run(const uint8_t* bytes, int shift, const uint8_t* sm, uint16_t* out, int64_t n) const {
    int64_t i = 0;
#if defined(__AVX2__)
    {  // 32 at a time; unpacking interleaves within 128-bit lanes, the lane permutes restore the order
      const __m256i hi_table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)exp_hi));
      const __m256i lo_table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)exp_lo));
      const __m256i nibble = _mm256_set1_epi8(0x0F), sign = _mm256_set1_epi8(char(0x80)), mantissa = _mm256_set1_epi8(0x7F);
      const __m128i count = _mm_cvtsi32_si128(shift);
      for (; i + 32 <= n; i += 32) {
        const __m256i idx = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i*)(bytes + i)), count), nibble);
        const __m256i m = _mm256_loadu_si256((const __m256i*)(sm + i));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(m, sign), _mm256_shuffle_epi8(hi_table, idx));
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(m, mantissa), _mm256_shuffle_epi8(lo_table, idx));
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
        _mm256_storeu_si256((__m256i*)(out + i), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i*)(out + i + 16), _mm256_permute2x128_si256(a, b, 0x31));
      }
    }
#endif
#if defined(__SSSE3__)
    const __m128i hi_table = _mm_load_si128((const __m128i*)exp_hi), lo_table = _mm_load_si128((const __m128i*)exp_lo);
    const __m128i nibble = _mm_set1_epi8(0x0F), sign = _mm_set1_epi8(char(0x80)), mantissa = _mm_set1_epi8(0x7F);
    const __m128i count = _mm_cvtsi32_si128(shift);
    for (; i + 16 <= n; i += 16) {
      const __m128i idx = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i*)(bytes + i)), count), nibble);
      const __m128i m = _mm_loadu_si128((const __m128i*)(sm + i));
      const __m128i hi = _mm_or_si128(_mm_and_si128(m, sign), _mm_shuffle_epi8(hi_table, idx));
      const __m128i lo = _mm_or_si128(_mm_and_si128(m, mantissa), _mm_shuffle_epi8(lo_table, idx));
      _mm_storeu_si128((__m128i*)(out + i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128((__m128i*)(out + i + 8), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; i < n; ++i) {
      const int idx = (bytes[i] >> shift) & 15;
      out[i] = uint16_t(((sm[i] & 0x80) | exp_hi[idx]) << 8 | ((sm[i] & 0x7F) | exp_lo[idx]));
    }
  }

  void decode_row(int64_t n, uint16_t* out) const {
    const int64_t h = (S + 1) / 2;
    const uint8_t* bytes = packed + n * packed_row;
    const uint8_t* sm = sign_mant + n * K;
    for (int64_t s = 0; s < K; s += S, bytes += h) {
      decode_run(bytes, 0, sm + s, out + s, h);
      decode_run(bytes, 4, sm + s + h, out + s + h, S - h);
    }
    const int32_t* e = std::lower_bound(escape_idx, escape_idx + E, n * K);
    for (; e < escape_idx + E && *e < (n + 1) * K; ++e) out[*e - n * K] = escape_val[e - escape_idx];
  }

  const uint16_t* bf16_row(int64_t n, uint16_t* scratch) const {
    decode_row(n, scratch);
    return scratch;
  }
};

// acc[i][j] += x[i, k : k + kStep] * w[j, k : k + kStep] (lane-wise; summed after the K loop).
// Where accumulators, weights and one x vector fit the vector registers, they are pinned there (the
// empty asm): left alone, GCC folds a weight load into every FMA, 15 loads per 12 FMAs in a 4 x 3
// tile instead of 7, and the loads bound the tile (measured 1.13-1.18x slower at 4-32 rows).
template <int MB, int NB>
inline void accumulate(vec (&acc)[MB][NB], const float* x, vec (&w)[NB], int64_t K, int64_t k) {
  [[maybe_unused]] constexpr bool pin = MB * NB + NB + 1 <= kVectorRegisters;
#if defined(__AVX__)
  if constexpr (pin)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) asm("" : "+v"(w[j]));
#endif
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    vec xv = load(x + i * K + k);
#if defined(__AVX__)
    if constexpr (pin) asm("" : "+v"(xv));
#endif
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] += xv * w[j];
  }
}

template <int MB, int NB>
inline void accumulate(vec (&acc)[MB][NB], const float* x, const bf16x (&w)[NB], int64_t K, int64_t k) {
#ifdef INFIRE_BF16_UNPACK
  const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const vec lo = (vec)_mm256_unpacklo_epi16(zero, (__m256i)w[j]), hi = (vec)_mm256_unpackhi_epi16(zero, (__m256i)w[j]);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i][j] += load(x + i * K + k) * lo + load(x + i * K + k + VW) * hi;
  }
#else  // widen 16-bit patterns to the high half of 32-bit lanes
  typedef uint32_t words __attribute__((vector_size(VW * 4)));
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const words bits = __builtin_convertvector(w[j], words) << 16;
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

// y[m0 + i, n0 + j] = dot(x[m0 + i], w[n0 + j]) for i < MB, j < NB: MB * NB accumulators in
// registers, one load per x row and per w row for every kStep values of K.
// With `prefetch`, the NB weight rows after this tile's are fetched into the cache meanwhile (the
// first row tile of a column tile does it: the weights then arrive while the others compute).
template <int MB, int NB, bool prefetch, typename Src>
inline void tile(const float* x, const Src& src, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  vec acc[MB][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = vec{};
  typename Src::Row rows[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) rows[j] = src.row(n0 + j);
  const int64_t kv = K - K % Src::kStep;
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < kv; k += Src::kStep) {
    typename Src::Block w[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) w[j] = src.block(rows[j], k);
    if constexpr (prefetch)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) src.prefetch(n0 + NB + j, k);
    accumulate<MB, NB>(acc, xr, w, K, k);
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
    } else if constexpr (NB == 3) {  // the same with a zero fourth
      __m256 h = _mm256_hadd_ps(_mm256_hadd_ps((__m256)acc[i][0], (__m256)acc[i][1]),
                                _mm256_hadd_ps((__m256)acc[i][2], _mm256_setzero_ps()));
      alignas(16) float sums[4];
      _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      std::copy(sums, sums + 3, out);
      j = 3;
    }
#endif
#pragma GCC unroll 8
    for (; j < NB; ++j) out[j] = hsum(acc[i][j]);
  }
  if (kv < K) {  // K not a multiple of kStep: the tail, scalar
    float tail[NB][Src::kStep];
    for (int j = 0; j < NB; ++j) src.tail(rows[j], kv, K, tail[j]);
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j)
        for (int64_t k = kv; k < K; ++k) y[(m0 + i) * N + n0 + j] += xr[i * K + k] * tail[j][k - kv];
  }
}

// All M rows of y for the NB weight rows starting at n0; the weight tile stays in L1 across row tiles.
template <int NB, typename Src>
void row_tiles(const float* x, const Src& src, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t hi) {
  int64_t m = 0;
  // The first row tile fetches the chunk's next weight rows (not for one row of x: memory-bound
  // there, measured 2% slower).
  if (M > 1 && n0 + 2 * NB <= hi) {
    switch (std::min<int64_t>(M, TM)) {
      case TM: tile<TM, NB, true>(x, src, y, K, N, m, n0); break;
      case 3: tile<3, NB, true>(x, src, y, K, N, m, n0); break;
      case 2: tile<2, NB, true>(x, src, y, K, N, m, n0); break;
      case 1: tile<1, NB, true>(x, src, y, K, N, m, n0); break;
      default: break;
    }
    m = std::min<int64_t>(M, TM);
  }
  for (; m + TM <= M; m += TM) tile<TM, NB, false>(x, src, y, K, N, m, n0);
  switch (M - m) {
    case 3: tile<3, NB, false>(x, src, y, K, N, m, n0); break;
    case 2: tile<2, NB, false>(x, src, y, K, N, m, n0); break;
    case 1: tile<1, NB, false>(x, src, y, K, N, m, n0); break;
    default: break;
  }
}

// Weight rows [lo, hi) for all M rows of x.
template <typename Src>
void weight_rows(const float* x, const Src& src, float* y, int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi) {
  int64_t n = lo;
  if (M == 1)  // a matrix-vector product: more weight rows in flight
    for (; n + 8 <= hi; n += 8) row_tiles<8>(x, src, y, M, K, N, n, hi);
  for (; n + TN <= hi; n += TN) row_tiles<TN>(x, src, y, M, K, N, n, hi);
  if constexpr (TN > 2)
    if (n + 2 <= hi) row_tiles<2>(x, src, y, M, K, N, n, hi), n += 2;
  for (; n < hi; ++n) row_tiles<1>(x, src, y, M, K, N, n, hi);
}

// From this many rows of x, bf16 and palette12 weights are widened to float32 panels of TN rows that
// every row tile then reads from L1 (the float32 tiles, 7 loads per 12 FMAs), instead of widening in
// registers once per row tile (`/tmp`-style 30-layer chain: bf16 at 16 rows 1.4x faster).
constexpr int64_t kWidenFromRows = 8;

// Weight rows [lo, hi) a panel of `panel_rows` rows at a time: fill(n, out) writes weight row n to
// the panel (float32 or bf16 patterns), then every row of x passes over the panel.
template <typename T, typename Fill>
void by_panels(const float* x, float* y, int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi, int64_t panel_rows, Fill fill) {
  using Rows = std::conditional_t<std::is_same_v<T, float>, F32Rows, Bf16Rows>;
  std::unique_ptr<T[]> panel(new T[panel_rows * K]);
  for (int64_t n = lo; n < hi; n += panel_rows) {
    const int64_t rows = std::min(panel_rows, hi - n);
    for (int64_t r = 0; r < rows; ++r) fill(n + r, panel.get() + r * K);
    weight_rows(x, Rows{panel.get(), K, n}, y, M, K, N, n, n + rows);
  }
}

// y = x @ w^T over XLA's intra-op threads: about eight chunks of weight rows per thread (balance),
// each a multiple of 8 rows (whole tiles). x is float32 (M, K), y float32 (M, N).
template <typename Src>
void matmul(ffi::ThreadPool& pool, const float* x, const Src& src, float* y, int64_t M, int64_t K, int64_t N) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::fill(y, y + M * N, 0.f);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = (std::max<int64_t>(8, N / (threads * 8)) + 7) / 8 * 8;
  constexpr bool narrow = !std::is_same_v<Src, F32Rows>;
  const bool widened = narrow && M >= kWidenFromRows;
#ifdef INFIRE_BF16_UNPACK
  std::unique_ptr<float[]> permuted;
  if (narrow && !widened) {
    permuted = permute_for_unpack(x, M, K);
    x = permuted.get();
  }
#endif
  infire::parallel_for(pool, (N + chunk - 1) / chunk, [=, &src](int64_t c) {
    const int64_t lo = c * chunk, hi = std::min(N, (c + 1) * chunk);
    if constexpr (!narrow) {
      weight_rows(x, src, y, M, K, N, lo, hi);
    } else if (widened) {  // float32 panels of one column tile
      std::unique_ptr<uint16_t[]> scratch(new uint16_t[K]);
      by_panels<float>(x, y, M, K, N, lo, hi, TN, [&](int64_t n, float* out) {
        const uint16_t* bits = src.bf16_row(n, scratch.get());
        for (int64_t k = 0; k < K; ++k) out[k] = widen(bits[k]);
      });
    } else if constexpr (std::is_same_v<Src, Palette12>) {  // bf16 panels: 8 rows for one row of x, else a column tile
      by_panels<uint16_t>(x, y, M, K, N, lo, hi, M == 1 ? 8 : TN, [&](int64_t n, uint16_t* out) { src.decode_row(n, out); });
    } else {  // bf16 rows read in place
      weight_rows(x, src, y, M, K, N, lo, hi);
    }
  });
}


template <ffi::DataType WT>
ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("infire_matmul_nt: expects x (M, K), w (N, K) and y (M, N)");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if constexpr (WT == ffi::F32)
    matmul(pool, x.typed_data(), F32Rows{w.typed_data(), K}, y->typed_data(), M, K, N);
  else
    matmul(pool, x.typed_data(), Bf16Rows{reinterpret_cast<const uint16_t*>(w.typed_data()), K}, y->typed_data(), M, K, N);
  return ffi::Error::Success();
}

ffi::Error MatmulNTPalette12(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                             ffi::Buffer<ffi::U8> sign_mant, ffi::Buffer<ffi::U8> palette, ffi::Buffer<ffi::S32> escape_idx,
                             ffi::Buffer<ffi::U16> escape_val, ffi::ResultBuffer<ffi::F32> y, int64_t segment) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), sd = sign_mant.dimensions(), yd = y->dimensions();
  const int64_t S = segment;
  if (xd.size() != 2 || sd.size() != 2 || pd.size() != 2 || xd[1] != sd[1] || pd[0] != sd[0] || yd.size() != 2 ||
      yd[0] != xd[0] || yd[1] != sd[0] || S < 1 || sd[1] % S != 0 || pd[1] != sd[1] / S * ((S + 1) / 2))
    return ffi::Error::InvalidArgument(
        "infire_matmul_nt_palette12: expects x (M, K), packed (N, K / S * ceil(S / 2)), sign_mant (N, K), y (M, N)");
  if (palette.element_count() != 16 || escape_idx.element_count() != escape_val.element_count())
    return ffi::Error::InvalidArgument("infire_matmul_nt_palette12: expects a palette of 16 and one value per escape");
  const int64_t M = xd[0], K = xd[1], N = sd[0], E = escape_idx.element_count();
  const int32_t* esc = escape_idx.typed_data();
  for (int64_t e = 0; e < E; ++e)
    if (esc[e] < 0 || (e && esc[e] < esc[e - 1]))
      return ffi::Error::InvalidArgument("infire_matmul_nt_palette12: escape indices must be non-negative and sorted");
  Palette12 src{packed.typed_data(), sign_mant.typed_data(), esc, escape_val.typed_data(), E, K, S, pd[1]};
  for (int i = 0; i < 16; ++i) {
    const uint8_t e = palette.typed_data()[i];
    src.exp_hi[i] = e >> 1;
    src.exp_lo[i] = uint8_t((e & 1) << 7);
  }
  matmul(pool, x.typed_data(), src, y->typed_data(), M, K, N);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireMatmulNTPalette12, MatmulNTPalette12,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (M, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed index nibbles (N, K / S * ceil(S / 2))
                                  .Arg<ffi::Buffer<ffi::U8>>()   // sign + mantissa (N, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // palette (16,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // escape indices (E,), sorted
                                  .Arg<ffi::Buffer<ffi::U16>>()  // escape values (E,), bf16 patterns
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (M, N)
                                  .Attr<int64_t>("segment"));

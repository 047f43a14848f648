// Shared by infire_jax's CPU kernels: SIMD vector type and a parallel loop over XLA's intra-op pool.
#pragma once

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define INFIRE_SPIN_PAUSE() _mm_pause()
#else
#include <thread>
#define INFIRE_SPIN_PAUSE() std::this_thread::yield()
#endif

namespace infire {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
#else
constexpr int VW = 8;
#endif
typedef float vec __attribute__((vector_size(VW * 4)));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Every lane x.
inline vec broadcast(float x) {
#if defined(__AVX512F__)
  return (vec)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vec)_mm256_set1_ps(x);  // one vbroadcastss (`vec{} + x` adds a zero vector)
#else
  return vec{} + x;
#endif
}

// Sum of the lanes. With 8 lanes ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): the order of the
// matmul's four-at-once horizontal sums (_mm256_hadd_ps), so a dot product has the same bits in every
// tile shape.
inline float hsum(vec v) {
  if constexpr (VW == 8) return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  float s = 0.f;
#pragma GCC unroll 16
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// exp(x) lane-wise for the softmax's x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6
// Taylor polynomial (relative error ~1e-7), times 2^n built in the exponent bits; x < -87 -> ~0.
inline vec exp_nonpositive(vec x) {
  typedef int32_t ivec __attribute__((vector_size(VW * 4)));
  const vec lowest = vec{} - 87.f;
  x = x < lowest ? lowest : x;
  const vec shifter = vec{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vec n = (x * 1.44269504f + shifter) - shifter;
  const vec r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts
  vec p = vec{} + (1.f / 720);
  p = p * r + (1.f / 120);
  p = p * r + (1.f / 24);
  p = p * r + (1.f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// c[i * ldc + x] (+)= sum over r < depth of a[i * lda + r] * b[r * ldb + x], for i < M and x < NV * VW:
// M x NV accumulators in registers, one broadcast of a and NV loads of b per step of r (no horizontal
// sums). kAccumulate adds to c, else c is overwritten.
template <int M, int NV, bool kAccumulate>
inline void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  vec acc[M][NV];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = kAccumulate ? load(c + i * ldc + j * VW) : vec{};
  for (int64_t r = 0; r < depth; ++r) {
    vec bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = load(b + r * ldb + j * VW);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const vec ab = broadcast(a[i * lda + r]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += ab * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * VW, acc[i][j]);
}

// o[i * ldo + d] += sum over s < count of w[i * ldw + s] * v[s * ldv + d], for i < M and d < hd:
// NV vectors of d at a time in registers across the positions (in memory, each position's update
// would wait on the previous one's store), then single vectors, then scalars.
template <int M, int NV>
inline void add_weighted_rows(const float* w, int64_t ldw, const float* v, int64_t ldv, int64_t count, float* o, int64_t ldo,
                              int64_t hd) {
  int64_t d = 0;
  for (; d + NV * VW <= hd; d += NV * VW) tile_product<M, NV, true>(w, ldw, v + d, ldv, count, o + d, ldo);
  for (; d + VW <= hd; d += VW) tile_product<M, 1, true>(w, ldw, v + d, ldv, count, o + d, ldo);
  for (; d < hd; ++d)
    for (int i = 0; i < M; ++i)
      for (int64_t s = 0; s < count; ++s) o[i * ldo + d] += w[i * ldw + s] * v[s * ldv + d];
}

// The running softmax of one query head: max, sum of exp(score - max) and the value sum `acc`.
struct Online {
  float max = -INFINITY, sum = 0.f;
  float* acc = nullptr;  // hd floats
  int64_t hd = 0;

  // Positions with these scores (modified in place) and value rows v + s * hd.
  void add(float* scores, const float* v, int64_t count) {
    float top = max;
    for (int64_t s = 0; s < count; ++s) top = std::max(top, scores[s]);
    raise_max(top);
    int64_t s = 0;
    for (; s + VW <= count; s += VW) store(scores + s, exp_nonpositive(load(scores + s) - max));
    for (; s < count; ++s) scores[s] = std::exp(scores[s] - max);
    for (s = 0; s < count; ++s) sum += scores[s];
    weighted_sum(scores, v, count);
  }

  // acc += sum over s of w[s] * v[s * hd : (s + 1) * hd].
  void weighted_sum(const float* w, const float* v, int64_t count) { add_weighted_rows<1, 8>(w, 0, v, hd, count, acc, 0, hd); }

  // Another head state over other positions (a chunk of the same row).
  void merge(const Online& o) {
    if (o.sum == 0.f) return;
    const float top = std::max(max, o.max), mine = std::exp(max - top), theirs = std::exp(o.max - top);
    rescale(mine);
    sum += o.sum * theirs;
    weighted_sum(&theirs, o.acc, 1);
    max = top;
  }

  // A new maximum: what was summed under the old one is rescaled to it.
  void raise_max(float top) {
    if (top > max) rescale(std::exp(max - top)), max = top;
  }

  void rescale(float scale) {
    sum *= scale;
    for (float* a = acc; a < acc + hd; ++a) *a *= scale;
  }
};

// fn(i) for i in [0, n): the calling thread and up to (pool threads - 1) helpers claim indices from an
// atomic counter, so a helper that starts late (or never) delays nothing and nothing can deadlock;
// the call returns when every claimed index is done.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    F fn;
    State(int64_t n, F fn) : n(n), fn(std::move(fn)) {}
    void run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (n <= 0) return;
  auto state = std::make_shared<State>(n, std::move(fn));
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < n) INFIRE_SPIN_PAUSE();
}

}  // namespace infire

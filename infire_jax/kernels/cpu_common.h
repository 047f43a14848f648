// Shared by infire_jax's CPU kernels: SIMD vector type and a parallel loop over XLA's intra-op pool.
#pragma once

#include <algorithm>
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

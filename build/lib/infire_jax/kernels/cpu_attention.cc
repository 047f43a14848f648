// Decode attention straight from a paged KV pool, as an XLA FFI handler for the CPU backend.
//
// Why: without it every decode step gathers each row's pages into a contiguous cache (a copy of the
// whole visible KV per layer) and runs small attention dots over the full padded table width; on
// this project's CPUs that was a third of a batch-16 decode step (WORKSPACE_NOTES.md, issue 9).
// Here a row's valid positions are read page by page, with an online softmax: the KV heads of a page
// are one contiguous read, the G query heads of a KV head share it, a page's scores are reduced
// eight dot products at a time and exponentiated as vectors, and when the rows are too few to keep
// the threads busy (one long request) a row's pages are split into chunks whose softmaxes are merged.
// Against the previous kernel (a task per (row, KV head), an exp and a memory-resident axpy per
// position): 1.3x at batch 16 x 48 positions, 1.7-1.9x at one row x 1-4K positions (bench in
// WORKSPACE_NOTES.md).
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using infire::load;
using infire::Online;
using infire::vec;
using infire::VW;

// out[s] = dot(q, k + s * hd) for s < n (n <= 8), eight dot products reduced together.
template <bool kFull>
inline void dots_of(const float* q, const float* k, int64_t n, int64_t hd, float* out) {
  vec acc[8] = {};
  const int64_t hv = hd - hd % VW;
  for (int64_t d = 0; d < hv; d += VW) {
    const vec qv = load(q + d);
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s)
      if (kFull || s < n) acc[s] += qv * load(k + s * hd + d);
  }
#if defined(__AVX__) && !defined(__AVX512F__)
  const __m256 t0 = _mm256_hadd_ps((__m256)acc[0], (__m256)acc[1]), t1 = _mm256_hadd_ps((__m256)acc[2], (__m256)acc[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)acc[4], (__m256)acc[5]), t3 = _mm256_hadd_ps((__m256)acc[6], (__m256)acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  alignas(32) float sums[8];
  _mm256_store_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
  for (int64_t s = 0; s < n; ++s) out[s] = sums[s];
#else
  for (int64_t s = 0; s < n; ++s) out[s] = infire::hsum(acc[s]);
#endif
  for (int64_t s = 0; s < n; ++s)
    for (int64_t d = hv; d < hd; ++d) out[s] += q[d] * k[s * hd + d];
}

inline void dots(const float* q, const float* k, int64_t n, int64_t hd, float* out) {
  if (n == 8)
    dots_of<true>(q, k, 8, hd, out);
  else
    dots_of<false>(q, k, n, hd, out);
}

// A row is split into chunks of at least this many pages (one task each) only when the rows alone
// would leave threads idle: enough tasks for one long request, few merges otherwise.
constexpr int64_t kMinPagesPerChunk = 4;

ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                                ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_pages,
                                ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> table,
                                ffi::Buffer<ffi::S32> start, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  // q (B, KV, G, hd); k_new, v_new (B, KV, hd); pages (L, NP, KV, page, hd); table (B, P); start (B,)
  const auto qd = q.dimensions(), pd = k_pages.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || pd.size() != 5 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: expects q (B, KV, G, hd), pages (L, NP, KV, page, hd), table (B, P)");
  const int64_t B = qd[0], KV = qd[1], G = qd[2], hd = qd[3];
  const int64_t L = pd[0], NP = pd[1], page = pd[3], P = td[1];
  if (pd[2] != KV || pd[4] != hd || td[0] != B || start.element_count() != B ||
      k_new.element_count() != B * KV * hd || v_new.element_count() != B * KV * hd ||
      v_pages.element_count() != k_pages.element_count() || layer < 0 || layer >= L)
    return ffi::Error::InvalidArgument("paged attention: inconsistent shapes or layer index");
  const float *qp = q.typed_data(), *knp = k_new.typed_data(), *vnp = v_new.typed_data();
  const float *kp = k_pages.typed_data(), *vp = v_pages.typed_data();
  const int32_t *tp = table.typed_data(), *sp = start.typed_data();
  float* op = out->typed_data();
  std::atomic<bool> bad_page{false};
  if (B == 0) return ffi::Error::Success();

  // Chunks of pages per row: a row's positions are split only when the rows would leave threads idle.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t max_pages = 0;
  for (int64_t b = 0; b < B; ++b) max_pages = std::max(max_pages, (std::clamp<int64_t>(sp[b], 0, P * page) + page - 1) / page);
  const int64_t chunks = std::max<int64_t>(1, std::min((4 * threads + B - 1) / B, max_pages / kMinPagesPerChunk));
  const int64_t chunk_pages = std::max<int64_t>(1, (max_pages + chunks - 1) / chunks);
  // Softmax state of (row, chunk, KV head, query head).
  std::vector<float> accs(B * chunks * KV * G * hd, 0.f);
  std::vector<Online> states(B * chunks * KV * G);
  for (size_t i = 0; i < states.size(); ++i) states[i].acc = accs.data() + i * hd, states[i].hd = hd;
  auto heads_of = [&](int64_t b, int64_t c, int64_t kv) { return states.data() + ((b * chunks + c) * KV + kv) * G; };

  // A task is one chunk of one row, all its KV heads: a page's KV heads are adjacent in the pool,
  // so the keys (and the values) of a page are one contiguous read.
  infire::parallel_for(pool, B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks;
    const int64_t visible = std::clamp<int64_t>(sp[b], 0, P * page);  // cached positions this row sees
    const int64_t end = std::min(visible, (c + 1) * chunk_pages * page);
    std::vector<float> scores(page);
    for (int64_t first = c * chunk_pages * page; first < end; first += page) {
      const int32_t id = tp[b * P + first / page];
      if (id < 0 || id >= NP) {
        bad_page.store(true);
        return;
      }
      const int64_t count = std::min(page, end - first);
      for (int64_t kv = 0; kv < KV; ++kv) {
        const int64_t base = ((layer * NP + id) * KV + kv) * page * hd;
        const float* qrow = qp + (b * KV + kv) * G * hd;
        Online* heads = heads_of(b, c, kv);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t s = 0; s < count; s += 8) dots(qrow + g * hd, kp + base + s * hd, std::min<int64_t>(8, count - s), hd, scores.data() + s);
          heads[g].add(scores.data(), vp + base, count);
        }
      }
    }
  });
  if (bad_page.load())
    return ffi::Error::InvalidArgument("paged attention: a page table entry for a visible position is out of range");

  // Merge the chunks, add the new token (it sees itself) and normalise.
  infire::parallel_for(pool, B * KV, [&](int64_t row_head) {
    const int64_t b = row_head / KV, kv = row_head % KV;
    const float* qrow = qp + row_head * G * hd;
    for (int64_t g = 0; g < G; ++g) {
      Online& h = heads_of(b, 0, kv)[g];
      for (int64_t c = 1; c < chunks; ++c) h.merge(heads_of(b, c, kv)[g]);
      float self;
      dots(qrow + g * hd, knp + row_head * hd, 1, hd, &self);
      h.add(&self, vnp + row_head * hd, 1);
      float* o = op + (row_head * G + g) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = h.acc[d] / h.sum;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfirePagedDecodeAttention, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()   // table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // start
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<int64_t>("layer"));

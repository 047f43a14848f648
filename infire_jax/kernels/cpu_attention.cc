// Decode attention straight from a paged KV pool, as an XLA FFI handler for the CPU backend.
//
// Why: without it every decode step gathers each row's pages into a contiguous cache (a copy of the
// whole visible KV per layer) and runs small attention dots over the full padded table width; on
// this project's CPUs that was a third of a batch-16 decode step (WORKSPACE_NOTES.md, issue 9).
// Here each (row, KV head) reads only its valid positions, page by page, with an online softmax.
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using infire::load;
using infire::vec;
using infire::VW;

inline float dot(const float* a, const float* b, int64_t n) {
  vec acc{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) acc += load(a + i) * load(b + i);
  float s = infire::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vec v = load(y + i) + a * load(x + i);
    std::memcpy(y + i, &v, sizeof v);
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// The running softmax of one query head: max, sum of exp(score - max), and the weighted value sum.
struct Online {
  float max = -INFINITY, sum = 0.f;
  float* acc;  // hd floats

  void add(const float* scores, const float* const* values, int64_t count, int64_t hd) {
    float top = max;
    for (int64_t s = 0; s < count; ++s) top = std::max(top, scores[s]);
    if (top > max) {  // rescale what was summed under the old maximum
      const float scale = std::exp(max - top);
      sum *= scale;
      for (int64_t d = 0; d < hd; ++d) acc[d] *= scale;
      max = top;
    }
    for (int64_t s = 0; s < count; ++s) {
      const float e = std::exp(scores[s] - max);
      sum += e;
      axpy(e, values[s], acc, hd);
    }
  }
};

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

  infire::parallel_for(pool, B * KV, [&](int64_t task) {
    const int64_t b = task / KV, kv = task % KV;
    const int64_t visible = std::clamp<int64_t>(sp[b], 0, P * page);  // cached positions this row sees
    std::vector<float> acc(G * hd, 0.f), scores(page);
    std::vector<const float*> values(page);
    std::vector<Online> heads(G);
    for (int64_t g = 0; g < G; ++g) heads[g].acc = acc.data() + g * hd;
    const float* qrow = qp + task * G * hd;
    for (int64_t first = 0; first < visible; first += page) {
      const int32_t id = tp[b * P + first / page];
      if (id < 0 || id >= NP) {
        bad_page.store(true);
        return;
      }
      const int64_t count = std::min(page, visible - first);
      const int64_t base = ((layer * NP + id) * KV + kv) * page * hd;
      for (int64_t s = 0; s < count; ++s) values[s] = vp + base + s * hd;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t s = 0; s < count; ++s) scores[s] = dot(qrow + g * hd, kp + base + s * hd, hd);
        heads[g].add(scores.data(), values.data(), count, hd);
      }
    }
    const float* v_self = vnp + task * hd;  // the new token sees itself
    for (int64_t g = 0; g < G; ++g) {
      const float self = dot(qrow + g * hd, knp + task * hd, hd);
      heads[g].add(&self, &v_self, 1, hd);
      float* o = op + (task * G + g) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = heads[g].acc[d] / heads[g].sum;
    }
  });
  if (bad_page.load())
    return ffi::Error::InvalidArgument("paged attention: a page table entry for a visible position is out of range");
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

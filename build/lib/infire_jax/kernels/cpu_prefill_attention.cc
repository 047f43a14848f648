// Causal self-attention of prompts, as XLA FFI handlers for the CPU backend: a prefill with no cache
// (CausalPrefillAttention), and a chunk of new tokens after a cached prefix read from a paged KV pool
// (PagedPrefillAttention: prefix reuse and chunked prefill).
//
// Why: XLA runs a prompt's attention as many small batched dots (query blocks against the keys before
// them) plus softmax fusions; at 512 tokens that was 17% of the SmolLM-135M prefill, at 64-79 GFLOP/s
// of causal attention (this kernel: 115-135; WORKSPACE_NOTES.md, issue 9). Over a cached prefix XLA
// first gathers the row's pages into a contiguous cache, then materialises every (query, key) score
// (WORKSPACE_NOTES.md, issue 20). Here a task is one (row, KV head, tile of TQ query positions): its
// TQ x G query rows go over the keys up to the diagonal TK at a time with an online softmax, and both
// products are broadcast-form register tiles (MR rows x NV vectors of keys or of head dims, no
// horizontal sums). The keys are transposed once per (row, KV head), into one contiguous (hd, TK)
// block per step, so a score tile reads them as vectors from a few pages (one (hd, T) transpose put
// hd rows T floats apart: at T = 2048 they alias in L1); positions past the diagonal are neither
// multiplied by values nor summed. With a cached prefix the keys of the row's cached positions (read
// from its pages) come first, its values are copied next to the new ones, and the diagonal is shifted
// by the prefix length.
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using infire::add_weighted_rows;
using infire::exp_nonpositive;
using infire::load;
using infire::Online;
using infire::store;
using infire::tile_product;
using infire::vec;
using infire::VW;

constexpr int64_t TQ = 16;      // query positions per task
constexpr int64_t TK = 8 * VW;  // keys per step of the online softmax
constexpr int MR = 6;           // query rows per register tile (MR x 2 accumulators, 2 operand vectors)

template <int M>
using Rows = std::integral_constant<int, M>;

// fn(Rows<m>{}, r) for the row tiles [r, r + m) of `rows` rows: MR at a time, then the remainder.
template <typename F>
inline void by_row_tiles(int64_t rows, F&& fn) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) fn(Rows<MR>{}, r);
  switch (rows - r) {
    case 5: fn(Rows<5>{}, r); break;
    case 4: fn(Rows<4>{}, r); break;
    case 3: fn(Rows<3>{}, r); break;
    case 2: fn(Rows<2>{}, r); break;
    case 1: fn(Rows<1>{}, r); break;
    default: break;
  }
}

// The keys and values one (row, KV head) attends to: `kt` holds its transposed keys, blocks (hd, TK)
// per step; the value of key j is at v + j * ldv; new position t (0-based in the chunk) sees keys
// j <= offset + t (offset = cached positions before the chunk).
struct Keys {
  const float *kt, *v;
  int64_t ldv, offset;
};

// One task: query positions [t0, t1) of row b and KV head kv, all G query heads. q rows (t, g) are
// copied to `qs` as row (t - t0) * G + g.
struct Task {
  const float* q;
  float* out;
  int64_t T, KV, G, hd;

  void run(int64_t b, int64_t kv, int64_t t0, int64_t t1, const Keys& keys_of) const {
    const int64_t rows = (t1 - t0) * G, head_row = KV * G * hd;  // floats between positions of q / out
    const int64_t off = keys_of.offset;
    std::vector<float> qs(rows * hd), o(rows * hd, 0.f), s(rows * TK);
    std::vector<Online> heads(rows);  // row r's softmax, its value sum in o
    for (int64_t r = 0; r < rows; ++r) heads[r].acc = o.data() + r * hd, heads[r].hd = hd;
    for (int64_t t = t0; t < t1; ++t)
      std::copy_n(q + (b * T + t) * head_row + kv * G * hd, G * hd, qs.data() + (t - t0) * G * hd);
    for (int64_t j0 = 0; j0 < off + t1; j0 += TK) {
      const int64_t keys = std::min(TK, off + t1 - j0), kvecs = (keys + VW - 1) / VW;
      by_row_tiles(rows, [&](auto m, int64_t r) {  // scores of every key vector this step reaches
        constexpr int M = decltype(m)::value;
        const float *qr = qs.data() + r * hd, *block = keys_of.kt + j0 * hd;  // block: this step's (hd, TK) keys
        int64_t j = 0;
        for (; j + 2 <= kvecs; j += 2) tile_product<M, 2, false>(qr, hd, block + j * VW, TK, hd, s.data() + r * TK + j * VW, TK);
        if (j < kvecs) tile_product<M, 1, false>(qr, hd, block + j * VW, TK, hd, s.data() + r * TK + j * VW, TK);
      });
      for (int64_t r = 0; r < rows; ++r) {  // mask past the diagonal, then the online softmax
        float* sr = s.data() + r * TK;
        const int64_t visible = std::min(keys, off + t0 + r / G - j0 + 1);  // keys j0 .. position of row r (>= 1)
        for (int64_t j = std::max<int64_t>(visible, 0); j < kvecs * VW; ++j) sr[j] = -INFINITY;
        Online& h = heads[r];
        vec mv = infire::broadcast(h.max);  // masked scores are -inf: the max over whole vectors is the visible max
        for (int64_t j = 0; j < kvecs * VW; j += VW) mv = mv > load(sr + j) ? mv : load(sr + j);
        float m = mv[0];
        for (int j = 1; j < VW; ++j) m = std::max(m, mv[j]);
        h.raise_max(m);
        vec total{};
        for (int64_t j = 0; j < kvecs * VW; j += VW) store(sr + j, exp_nonpositive(load(sr + j) - m));
        std::fill(sr + std::max<int64_t>(visible, 0), sr + kvecs * VW, 0.f);  // exactly nothing past the diagonal
        for (int64_t j = 0; j < kvecs * VW; j += VW) total += load(sr + j);
        h.sum += infire::hsum(total);
      }
      by_row_tiles(rows, [&](auto m, int64_t r) {  // weighted values, 2 vectors of head dims at a time
        constexpr int M = decltype(m)::value;
        const int64_t ks = std::min(keys, off + t0 + (r + M - 1) / G - j0 + 1);  // keys any of these rows sees
        add_weighted_rows<M, 2>(s.data() + r * TK, TK, keys_of.v + j0 * keys_of.ldv, keys_of.ldv, ks, o.data() + r * hd, hd, hd);
      });
    }
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const Online& h = heads[(t - t0) * G + g];
        float* dst = out + (b * T + t) * head_row + (kv * G + g) * hd;
        for (int64_t d = 0; d < hd; ++d) dst[d] = h.acc[d] / h.sum;
      }
  }

  // Every (row, KV head, query tile), the tiles with the most keys first so the short ones fill in at
  // the end; keys(b, kv) gives that pair's Keys.
  template <typename F>
  void run_all(ffi::ThreadPool& pool, int64_t B, F&& keys) const {
    const int64_t tiles = (T + TQ - 1) / TQ;
    infire::parallel_for(pool, B * KV * tiles, [&](int64_t i) {
      const int64_t tile = tiles - 1 - i / (B * KV), bkv = i % (B * KV);
      const int64_t t0 = tile * TQ;
      run(bkv / KV, bkv % KV, t0, std::min(T, t0 + TQ), keys(bkv / KV, bkv % KV));
    });
  }
};

// Key j of a (row, KV head) into its transposed blocks `kt` ((hd, TK) per step).
inline void put_key(float* kt, int64_t j, const float* key, int64_t hd) {
  float* dst = kt + (j / TK) * hd * TK + j % TK;
  for (int64_t d = 0; d < hd; ++d) dst[d * TK] = key[d];
}

ffi::Error CausalPrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                  ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out) {
  // q (B, T, KV, G, hd), rotated and scaled; k, v (B, T, KV, hd); out like q.
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[2] != qd[2] || kd[3] != qd[4] ||
      v.element_count() != k.element_count() || out->element_count() != q.element_count())
    return ffi::Error::InvalidArgument("prefill attention: expects q (B, T, KV, G, hd), k and v (B, T, KV, hd)");
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], hd = qd[4];
  if (B * T * KV * G * hd == 0) return ffi::Error::Success();
  const int64_t steps = (T + TK - 1) / TK;

  // Keys transposed per (row, KV head) and step: block i holds keys [i * TK, (i + 1) * TK) as (hd, TK),
  // zeros past T. Values are read in place.
  std::vector<float> kt(B * KV * steps * hd * TK, 0.f);
  const float* kp = k.typed_data();
  infire::parallel_for(pool, B * KV, [&](int64_t bkv) {
    const int64_t b = bkv / KV, kv = bkv % KV;
    for (int64_t t = 0; t < T; ++t) put_key(kt.data() + bkv * steps * hd * TK, t, kp + ((b * T + t) * KV + kv) * hd, hd);
  });
  const Task task{q.typed_data(), out->typed_data(), T, KV, G, hd};
  const float* vp = v.typed_data();
  task.run_all(pool, B, [&](int64_t b, int64_t kv) {
    return Keys{kt.data() + (b * KV + kv) * steps * hd * TK, vp + (b * T * KV + kv) * hd, KV * hd, 0};
  });
  return ffi::Error::Success();
}

ffi::Error PagedPrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                                 ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_pages,
                                 ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> table,
                                 ffi::Buffer<ffi::S32> start, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  // q (B, T, KV, G, hd), rotated and scaled; k_new, v_new (B, T, KV, hd); pages (L, NP, KV, page, hd);
  // table (B, P); start (B,): row b's new position t sees its cached positions < start[b] and new ones <= t.
  const auto qd = q.dimensions(), kd = k_new.dimensions(), pd = k_pages.dimensions(), td = table.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || pd.size() != 5 || td.size() != 2 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[2] != qd[2] || kd[3] != qd[4] || v_new.element_count() != k_new.element_count() || pd[2] != qd[2] ||
      pd[4] != qd[4] || v_pages.element_count() != k_pages.element_count() || td[0] != qd[0] ||
      start.element_count() != qd[0] || layer < 0 || layer >= pd[0])
    return ffi::Error::InvalidArgument(
        "paged prefill attention: expects q (B, T, KV, G, hd), k_new and v_new (B, T, KV, hd), pages (L, NP, KV, page, hd), "
        "table (B, P), start (B,) and a layer index < L");
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], hd = qd[4];
  const int64_t NP = pd[1], page = pd[3], P = td[1];
  if (B * T * KV * G * hd == 0) return ffi::Error::Success();
  const int32_t *tp = table.typed_data(), *sp = start.typed_data();
  std::vector<int64_t> cached(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, cached[b] = std::clamp<int64_t>(sp[b], 0, P * page));
  const int64_t steps = (longest + T + TK - 1) / TK, per_pair = steps * TK * hd;

  // Per (row, KV head): the cached positions' keys from the row's pages, then the new ones, transposed
  // into blocks; their values copied in the same order.
  std::vector<float> kt(B * KV * per_pair, 0.f), vs(B * KV * per_pair);
  const float *kp = k_pages.typed_data(), *vp = v_pages.typed_data(), *knp = k_new.typed_data(), *vnp = v_new.typed_data();
  std::atomic<bool> bad_page{false};
  infire::parallel_for(pool, B * KV, [&](int64_t bkv) {
    const int64_t b = bkv / KV, kv = bkv % KV;
    float *ktb = kt.data() + bkv * per_pair, *vsb = vs.data() + bkv * per_pair;
    for (int64_t j = 0; j < cached[b]; ++j) {
      const int32_t id = tp[b * P + j / page];
      if (id < 0 || id >= NP) {
        bad_page.store(true);
        return;
      }
      const int64_t at = (((layer * NP + id) * KV + kv) * page + j % page) * hd;
      put_key(ktb, j, kp + at, hd);
      std::copy_n(vp + at, hd, vsb + j * hd);
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t at = ((b * T + t) * KV + kv) * hd;
      put_key(ktb, cached[b] + t, knp + at, hd);
      std::copy_n(vnp + at, hd, vsb + (cached[b] + t) * hd);
    }
  });
  if (bad_page.load())
    return ffi::Error::InvalidArgument("paged prefill attention: a page table entry for a cached position is out of range");
  const Task task{q.typed_data(), out->typed_data(), T, KV, G, hd};
  task.run_all(pool, B, [&](int64_t b, int64_t kv) {
    return Keys{kt.data() + (b * KV + kv) * per_pair, vs.data() + (b * KV + kv) * per_pair, hd, cached[b]};
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireCausalPrefillAttention, CausalPrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfirePagedPrefillAttention, PagedPrefillAttention,
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

// Host-side decode of the Huffman distribution format (infire_jax/compression/codec.py) on load, as a
// plain C function (called through ctypes on numpy buffers; not an XLA op).
//
// Why: the format cuts a tensor's exponent stream into chunks of `chunk_symbols` symbols with
// stored bit offsets so chunks decode independently. numpy can only exploit that across chunks
// (one vector op per symbol position, ~4096 Python-level steps per tensor), which took 20+ s for
// the 135M-parameter shape; decoding each chunk sequentially here is one table lookup per symbol,
// with the chunks spread over threads.
//
// The table has 2^L entries indexed by the next L bits of the stream (L = the longest code): entry
// (symbol, code length). Unassigned slots of an incomplete code decode as length L so a corrupt
// stream still advances and is caught by the boundary check: every chunk must end exactly where the
// next begins and the last at the stream's final byte (as numpy's reference decoder checks).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

inline uint64_t load_be64(const uint8_t* stream, int64_t nbytes, int64_t byte) {
  uint8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (byte + 8 <= nbytes) {
    std::memcpy(buf, stream + byte, 8);
  } else if (byte < nbytes) {
    std::memcpy(buf, stream + byte, size_t(nbytes - byte));
  }
  uint64_t v;
  std::memcpy(&v, buf, 8);
  return __builtin_bswap64(v);
}

// Decodes chunks [c0, c1); returns false if a chunk does not end where the next one starts.
bool decode_chunks(const uint8_t* stream, int64_t nbytes, const int64_t* offsets, int64_t n_chunks, int64_t cs,
                   int64_t n, const uint8_t* tab_sym, const uint8_t* tab_len, int L, uint8_t* out, int64_t c0,
                   int64_t c1) {
  const int64_t limit_bits = nbytes * 8;
  const int shift = 64 - L;
  for (int64_t c = c0; c < c1; ++c) {
    int64_t pos = offsets[c];
    const int64_t first = c * cs;
    const int64_t count = std::min(cs, n - first);
    uint8_t* dst = out + first;
    int64_t k = 0;
    // Fast path: 8 stream bytes are readable for every lookup; one 64-bit load serves several
    // symbols while the window still holds L unread bits.
    while (k < count) {
      const int64_t byte = pos >> 3;
      if (byte + 8 > nbytes || pos > limit_bits) break;
      uint64_t window;
      std::memcpy(&window, stream + byte, 8);
      window = __builtin_bswap64(window) << (pos & 7);
      int avail = 64 - int(pos & 7);
      while (avail >= L && k < count) {
        const uint32_t v = uint32_t(window >> shift);
        const int len = tab_len[v];
        dst[k++] = tab_sym[v];
        window <<= len;
        avail -= len;
        pos += len;
      }
    }
    for (; k < count; ++k) {  // the stream's last bytes
      if (pos > limit_bits) return false;
      const uint64_t window = load_be64(stream, nbytes, pos >> 3) << (pos & 7);
      const uint32_t v = uint32_t(window >> shift);
      dst[k] = tab_sym[v];
      pos += tab_len[v];
    }
    const int64_t expected_end = c + 1 < n_chunks ? offsets[c + 1] : -1;
    if (expected_end >= 0 ? pos != expected_end : (pos + 7) / 8 != nbytes) return false;
  }
  return true;
}

}  // namespace

// Returns 0 on success, 1 if the stream is corrupt (chunk boundaries do not line up), 2 on bad
// arguments. out: n bytes (the exponent of every symbol, in order).
extern "C" int infire_huffman_decode(const uint8_t* stream, int64_t nbytes, const int64_t* offsets, int64_t n_chunks,
                                     int64_t chunk_symbols, int64_t n, const uint8_t* tab_sym, const uint8_t* tab_len,
                                     int L, uint8_t* out, int threads) {
  if (L < 1 || L > 24 || chunk_symbols < 1 || n < 0 || n_chunks != (n + chunk_symbols - 1) / chunk_symbols) return 2;
  for (int64_t c = 0; c < n_chunks; ++c)
    if (offsets[c] < 0 || offsets[c] > nbytes * 8) return 2;
  const int64_t per_thread_min = 64;  // chunks: below this a thread costs more than it saves
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks / per_thread_min));
  if (t == 1) return decode_chunks(stream, nbytes, offsets, n_chunks, chunk_symbols, n, tab_sym, tab_len, L, out, 0,
                                   n_chunks) ? 0 : 1;
  std::vector<char> ok(size_t(t), 0);
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t c0 = n_chunks * i / t, c1 = n_chunks * (i + 1) / t;
    pool.emplace_back([=, &ok] {
      ok[size_t(i)] = decode_chunks(stream, nbytes, offsets, n_chunks, chunk_symbols, n, tab_sym, tab_len, L, out, c0, c1);
    });
  }
  for (auto& th : pool) th.join();
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; }) ? 0 : 1;
}

// Counts of each byte value (palette12's palette: the 16 most common exponents). numpy's bincount
// widens uint8 to int64 first: 8 bytes written per weight.
extern "C" void infire_histogram_u8(const uint8_t* data, int64_t n, int64_t* counts) {
  int64_t c[4][256] = {};  // four interleaved tables: no store-to-load stall on runs of one value
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++c[0][data[i]];
    ++c[1][data[i + 1]];
    ++c[2][data[i + 2]];
    ++c[3][data[i + 3]];
  }
  for (; i < n; ++i) ++c[0][data[i]];
  for (int v = 0; v < 256; ++v) counts[v] = c[0][v] + c[1][v] + c[2][v] + c[3][v];
}

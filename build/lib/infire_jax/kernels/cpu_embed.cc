// Rows of a bfloat16 embedding table widened to float32, as an XLA FFI handler for the CPU backend.
//
// Why: XLA:CPU runs a bf16 gather in float32 (or through a 16-bit bitcast copy of the table), and
// hoists that table-sized copy out of the decode loop: 56-113 MB written per dispatch for a
// 49152 x 576 table, several milliseconds per decode step. Here only the requested rows are read.
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error EmbedRowsBF16(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || out->element_count() != tokens.element_count() * td[1])
    return ffi::Error::InvalidArgument("embed rows: expects a table (V, D), tokens (T,) and out (T, D)");
  const int64_t V = td[0], D = td[1], T = tokens.element_count();
  const uint16_t* tp = table.typed_data();
  const int32_t* ids = tokens.typed_data();
  uint32_t* op = reinterpret_cast<uint32_t*>(out->typed_data());  // float32 bits
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] < 0 || ids[t] >= V) return ffi::Error::InvalidArgument("embed rows: a token id is outside the table");
    const uint16_t* row = tp + int64_t(ids[t]) * D;
    for (int64_t d = 0; d < D; ++d) op[t * D + d] = uint32_t(row[d]) << 16;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InfireEmbedRowsBF16, EmbedRowsBF16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // table
                                  .Arg<ffi::Buffer<ffi::S32>>()    // tokens
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rows

// Portable path: plain C++ with no instruction-set flags (popcount through the compiler builtin).
#include <cstdint>

#include "kernels.h"
#include "generic.inc"

namespace bnas_deploy {

void pack_rows_portable(const PackArgs& a, int64_t r0, int64_t r1) { pack_rows_generic(a, r0, r1); }
void conv_rows_portable(const ConvArgs& a, int64_t r0, int64_t r1) { conv_rows_generic(a, r0, r1); }
void pool_rows_portable(const PoolArgs& a, int64_t r0, int64_t r1) { pool_rows_generic(a, r0, r1); }

}  // namespace bnas_deploy

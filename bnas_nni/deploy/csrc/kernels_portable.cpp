// Portable path: plain C++ with no instruction-set flags (popcount through the compiler builtin).
#include <cstdint>

#include "kernels.h"
#include "generic.inc"

namespace bnas_deploy {

void pack_rows_portable(const PackArgs& a, int64_t r0, int64_t r1) { pack_rows_generic(a, r0, r1); }
void conv_rows_portable(const ConvArgs& a, int64_t r0, int64_t r1) { conv_rows_generic(a, r0, r1); }
void pool_rows_portable(const PoolArgs& a, int64_t r0, int64_t r1) { pool_rows_generic(a, r0, r1); }
void transpose_rows_portable(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  transpose_rows_generic(src, dst, rows, cols, r0, r1);
}

void int8_conv_rows_portable(const Int8ConvArgs& a, int64_t r0, int64_t r1) {
  for (int64_t oh = r0; oh < r1; ++oh)
    for (int64_t ow = 0; ow < a.OW; ++ow) {
      float* out = a.out + oh * a.oH + ow * a.oW;
      for (int64_t o = 0; o < a.O; ++o) {
        const int8_t* wo = a.w + (o / 16) * a.K4 * 64 + (o % 16) * 4;
        int32_t acc = 0;
        int64_t k = 0;
        for (int64_t kh = 0; kh < a.KH; ++kh)
          for (int64_t kw = 0; kw < a.KW; ++kw) {
            const uint8_t* px = a.act + ((oh * a.stride + kh * a.dil) * a.Wp + ow * a.stride + kw * a.dil) * a.C;
            for (int64_t c = 0; c < a.C; ++c, ++k)
              acc += static_cast<int32_t>(px[c]) * static_cast<int32_t>(wo[(k / 4) * 64 + k % 4]);
          }
        for (; k < a.K4 * 4; ++k) acc += 128 * static_cast<int32_t>(wo[(k / 4) * 64 + k % 4]);  // padding (0 weights)
        const float scale = a.xscale * a.wscale[o];
        float v = static_cast<float>(acc - a.wsum128[o]) * scale + a.bias[o];
        out[o] = (a.relu && !(v > 0.0f)) ? 0.0f : v;
      }
    }
}

}  // namespace bnas_deploy

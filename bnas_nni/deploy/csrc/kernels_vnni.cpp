// AVX-512 VNNI path of the int8 full-precision convs (kernels.h, Int8ConvArgs): VPDPBUSD multiplies 4
// unsigned activation bytes by 4 signed weight bytes and adds them into 32-bit lanes, 16 filters per
// vector; blocks of 4 output pixels x up to 4 vectors (64 filters) keep 16 accumulators in registers.
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")

namespace {

using bnas_deploy::Int8ConvArgs;

constexpr int kPix = static_cast<int>(bnas_deploy::kInt8Pixels);

// the im2col rows of pixels [ow0, ow0 + np) of output row oh: K4 * 4 bytes each, padding bytes 128 (their
// weights are 0)
void gather(const Int8ConvArgs& a, int64_t oh, int64_t ow0, int np, uint8_t* rows) {
  const int64_t K = a.K4 * 4;
  for (int p = 0; p < np; ++p) {
    uint8_t* dst = rows + p * K;
    int64_t k = 0;
    for (int64_t kh = 0; kh < a.KH; ++kh)
      for (int64_t kw = 0; kw < a.KW; ++kw, k += a.C)
        std::memcpy(dst + k, a.act + ((oh * a.stride + kh * a.dil) * a.Wp + (ow0 + p) * a.stride + kw * a.dil) * a.C,
                    a.C);
    std::memset(dst + k, 128, K - k);
  }
  for (int p = np; p < kPix; ++p) std::memset(rows + p * K, 128, K);
}

template <int OB>
void block(const Int8ConvArgs& a, const uint8_t* rows, int64_t v0, int np, float* out0) {
  __m512i acc[kPix][OB];
  for (int p = 0; p < kPix; ++p)
    for (int b = 0; b < OB; ++b) acc[p][b] = _mm512_setzero_si512();
  const int64_t K = a.K4 * 4;
  for (int64_t k4 = 0; k4 < a.K4; ++k4) {
    __m512i wv[OB];
    for (int b = 0; b < OB; ++b) wv[b] = _mm512_loadu_si512(a.w + ((v0 + b) * a.K4 + k4) * 64);
    for (int p = 0; p < kPix; ++p) {
      int32_t four;
      std::memcpy(&four, rows + p * K + k4 * 4, 4);
      const __m512i x = _mm512_set1_epi32(four);
      for (int b = 0; b < OB; ++b) acc[p][b] = _mm512_dpbusd_epi32(acc[p][b], x, wv[b]);
    }
  }
  const __m512 zero = _mm512_setzero_ps(), xs = _mm512_set1_ps(a.xscale);
  for (int b = 0; b < OB; ++b) {
    const int64_t c = (v0 + b) * 16;
    const __m512 scale = _mm512_mul_ps(xs, _mm512_loadu_ps(a.wscale + c));
    const __m512i ws = _mm512_loadu_si512(a.wsum128 + c);
    const __m512 bias = _mm512_loadu_ps(a.bias + c);
    const int64_t left = a.O - c;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    for (int p = 0; p < np; ++p) {
      __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p][b], ws)), scale), bias);
      if (a.relu) v = _mm512_max_ps(v, zero);
      float* out = out0 + p * a.oW + c;
      if (left >= 16) _mm512_storeu_ps(out, v);
      else _mm512_mask_storeu_ps(out, mask, v);
    }
  }
}

}  // namespace

namespace bnas_deploy {

bool cpu_supports_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

void int8_conv_rows_vnni(const Int8ConvArgs& a, int64_t r0, int64_t r1) {
  const int64_t nv = a.Opad / 16;
  uint8_t* rows = a.scratch;
  for (int64_t oh = r0; oh < r1; ++oh)
    for (int64_t ow = 0; ow < a.OW; ow += kPix) {
      const int np = static_cast<int>(a.OW - ow < kPix ? a.OW - ow : kPix);
      gather(a, oh, ow, np, rows);
      float* out = a.out + oh * a.oH + ow * a.oW;
      int64_t v0 = 0;
      for (; v0 + 4 <= nv; v0 += 4) block<4>(a, rows, v0, np, out);
      switch (nv - v0) {
        case 3: block<3>(a, rows, v0, np, out); break;
        case 2: block<2>(a, rows, v0, np, out); break;
        case 1: block<1>(a, rows, v0, np, out); break;
        default: break;
      }
    }
}

}  // namespace bnas_deploy

// AVX2 path: 4 filters per 256-bit vector; popcount by nibble lookup (VPSHUFB) into byte counters that
// are summed into 64-bit lanes (VPSADBW) every 31 words, before a byte can overflow.
#include <cstdint>
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx2,fma,popcnt")

#include "generic.inc"

namespace {

using bnas_deploy::ConvArgs;
using bnas_deploy::PackArgs;

// DENSE: the pixel's window is dense (kernels.h, ConvArgs::dense_nnz): no mask to broadcast and apply.
template <int OB, bool DENSE>
inline void conv_pixel(const ConvArgs& a, const uint64_t* act_n, int64_t oh, int64_t ow, int64_t v0, int32_t nnz,
                       float* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc8[OB], acc64[OB];
  for (int b = 0; b < OB; ++b) acc8[b] = acc64[b] = zero;
  int pending = 0;
  const int64_t pix = a.Kw * 2;
  for (int64_t kh = 0; kh < a.KH; ++kh) {
    const uint64_t* row = act_n + (oh * a.stride + kh * a.dil) * a.Wp * pix;
    for (int64_t kw = 0; kw < a.KW; ++kw) {
      const uint64_t* wt = a.w + (kh * a.KW + kw) * a.Kw * a.Opad + v0 * 4;
      const uint64_t* px = row + (ow * a.col_stride() + kw * a.dil) * pix;
      for (int64_t k = 0; k < a.Kw; ++k) {
        const __m256i s = _mm256_set1_epi64x(static_cast<long long>(px[2 * k]));
        const __m256i m = DENSE ? s : _mm256_set1_epi64x(static_cast<long long>(px[2 * k + 1]));
        for (int b = 0; b < OB; ++b) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * a.Opad + b * 4));
          const __m256i x = DENSE ? _mm256_xor_si256(s, wv) : _mm256_and_si256(_mm256_xor_si256(s, wv), m);
          const __m256i lo = _mm256_and_si256(x, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
          acc8[b] = _mm256_add_epi8(acc8[b], _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi)));
        }
        if (++pending == 31) {
          for (int b = 0; b < OB; ++b) {
            acc64[b] = _mm256_add_epi64(acc64[b], _mm256_sad_epu8(acc8[b], zero));
            acc8[b] = zero;
          }
          pending = 0;
        }
      }
    }
  }
  const __m256i take_low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128 fzero = _mm_setzero_ps();
  for (int b = 0; b < OB; ++b) {
    acc64[b] = _mm256_add_epi64(acc64[b], _mm256_sad_epu8(acc8[b], zero));
    const __m256i dot64 = _mm256_sub_epi64(_mm256_set1_epi64x(nnz), _mm256_slli_epi64(acc64[b], 1));
    const __m128i dot = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(dot64, take_low));
    const int64_t c = (v0 + b) * 4;
    __m128 v = _mm_mul_ps(_mm_loadu_ps(a.alpha + c), _mm_cvtepi32_ps(dot));
    if (a.relu) v = _mm_max_ps(v, fzero);
    const int64_t left = a.O - c;
    if (left >= 4) {
      if (a.accumulate) v = _mm_add_ps(_mm_loadu_ps(out + c), v);
      _mm_storeu_ps(out + c, v);
    } else {
      float tmp[4];
      _mm_storeu_ps(tmp, v);
      for (int64_t i = 0; i < left; ++i) out[c + i] = a.accumulate ? out[c + i] + tmp[i] : tmp[i];
    }
  }
}

// Word k of every pixel of row r, from its NG 8-channel groups (channel-contiguous input): the word's thresholds
// and sign flips are loaded once per row instead of once per pixel (as on the AVX-512 path); the input's last
// group may be partial (masked loads, and its bits beyond C cleared). The same compares as the generic path
// (x >= t, ordered, so NaN is negative), so the same bits.
// ONE_COMPARE: the word's two thresholds coincide (see one_compare_spans), so one compare per group gives it.
template <int NG, bool ONE_COMPARE>
inline void pack_word_row(const PackArgs& a, int64_t r, int64_t k) {
  const int64_t tail = a.C - 64 * k - 8 * (NG - 1);   // channels in the last group: 1 to 8
  const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const uint64_t last_bits = tail >= 8 ? 0xffu : (1u << tail) - 1u;
  __m256 tz[NG], tp[NG];
  __m256i fl[NG];
  for (int g = 0; g < NG; ++g) {
    const int64_t c = 64 * k + 8 * g;
    if (g < NG - 1) {
      tz[g] = _mm256_loadu_ps(a.t_zero + c);
      tp[g] = _mm256_loadu_ps(a.t_pos + c);
      fl[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.flip + c));
    } else {
      tz[g] = _mm256_maskload_ps(a.t_zero + c, last);
      tp[g] = _mm256_maskload_ps(a.t_pos + c, last);
      fl[g] = _mm256_maskload_epi32(reinterpret_cast<const int*>(a.flip + c), last);
    }
  }
  const int64_t n = r / a.H, h = r % a.H;
  uint64_t* dst = a.out + (((n * a.Hp) + h + a.pad) * a.Wp + a.pad) * a.Kw * 2 + 2 * k;
  const float* src = a.x + n * a.sN + h * a.sH + 64 * k;
  for (int64_t w = 0; w < a.W; ++w, dst += a.Kw * 2, src += a.sW) {
    uint64_t neg = 0, pos = 0;
    for (int g = 0; g < NG; ++g) {
      const __m256i raw = g < NG - 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8 * g))
                                     : _mm256_castps_si256(_mm256_maskload_ps(src + 8 * g, last));
      const __m256 x = _mm256_castsi256_ps(_mm256_xor_si256(raw, fl[g]));
      const uint64_t valid = g < NG - 1 ? 0xffu : last_bits;
      const uint64_t not_neg = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, tz[g], _CMP_GE_OQ)));
      const uint64_t p = ONE_COMPARE ? valid : static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, tp[g], _CMP_GE_OQ)));
      neg |= (~not_neg & valid) << (8 * g);
      pos |= (p & valid) << (8 * g);
    }
    dst[0] = neg;
    dst[1] = neg | pos;
  }
}

}  // namespace

namespace bnas_deploy {

void pack_rows_avx2(const PackArgs& a, int64_t r0, int64_t r1) {
  if (a.sC != 1) {
    pack_rows_generic(a, r0, r1);
    return;
  }
  const uint64_t one = one_compare_spans(a, 64);   // spans of one word
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < a.Kw; ++k)
      with_group_count((a.C - 64 * k + 7) / 8, [&](auto count) {
        constexpr int NG = decltype(count)::value;
        if (has_one_compare(one, k))
          pack_word_row<NG, true>(a, r, k);
        else
          pack_word_row<NG, false>(a, r, k);
      });
}

// one output pixel, every filter
template <bool DENSE>
inline void conv_pixel_all(const ConvArgs& a, const uint64_t* act_n, int64_t oh, int64_t ow, int32_t nnz, float* out) {
  const int64_t nv = a.Opad / 4;
  int64_t v0 = 0;
  for (; v0 + 4 <= nv; v0 += 4) conv_pixel<4, DENSE>(a, act_n, oh, ow, v0, nnz, out);
  switch (nv - v0) {
    case 3: conv_pixel<3, DENSE>(a, act_n, oh, ow, v0, nnz, out); break;
    case 2: conv_pixel<2, DENSE>(a, act_n, oh, ow, v0, nnz, out); break;
    case 1: conv_pixel<1, DENSE>(a, act_n, oh, ow, v0, nnz, out); break;
    default: break;
  }
}

void conv_rows_avx2(const ConvArgs& a, int64_t r0, int64_t r1) {
  int32_t nnz[kMaxRow];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / a.OH, oh = r % a.OH;
    const uint64_t* act_n = a.act + n * a.Hp * a.Wp * a.Kw * 2;
    float* out_row = a.out + n * a.oN + oh * a.oH;
    // a row's dense windows lie between its border columns (masked, with counted windows)
    const bool dense_row = a.dense_nnz > 0 && oh >= a.dense_oh0 && oh < a.dense_oh1;
    const int64_t d0 = dense_row ? a.dense_ow0 : a.OW, d1 = dense_row ? a.dense_ow1 : a.OW;
    row_nnz(a, act_n, oh, 0, d0, nnz);
    row_nnz(a, act_n, oh, d1, a.OW, nnz);
    for (int64_t ow = 0; ow < a.OW; ++ow) {
      if (ow >= d0 && ow < d1)
        conv_pixel_all<true>(a, act_n, oh, ow, static_cast<int32_t>(a.dense_nnz), out_row + ow * a.oW);
      else
        conv_pixel_all<false>(a, act_n, oh, ow, nnz[ow], out_row + ow * a.oW);
    }
  }
}

void pool_rows_avx2(const PoolArgs& a, int64_t r0, int64_t r1) { pool_rows_generic(a, r0, r1); }

// conv_pixel's step (xor, and, nibble lookup, byte add; VPSADBW every 31 words) on 8 independent chains
int64_t peak_binary_avx2(int64_t iters) {
  constexpr int kChains = 8;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const __m256i m = _mm256_set1_epi64x(0x5bd1e9955bd1e995LL);
  __m256i acc8[kChains], acc64[kChains], w[kChains];
  for (int j = 0; j < kChains; ++j) {
    acc8[j] = _mm256_set1_epi64x(j + 1);
    acc64[j] = zero;
    w[j] = _mm256_set1_epi64x(0x0101010101010101LL * (j + 3));
  }
  int64_t done = 0;
  while (done < iters) {
    const int64_t n = iters - done < 31 ? iters - done : 31;
    for (int64_t i = 0; i < n; ++i)
      for (int j = 0; j < kChains; ++j) {
        const __m256i x = _mm256_and_si256(_mm256_xor_si256(acc8[j], w[j]), m);
        const __m256i lo = _mm256_and_si256(x, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        acc8[j] = _mm256_add_epi8(acc8[j], _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi)));
      }
    for (int j = 0; j < kChains; ++j) acc64[j] = _mm256_add_epi64(acc64[j], _mm256_sad_epu8(acc8[j], zero));
    done += n;
  }
  __m256i sum = acc64[0];
  for (int j = 1; j < kChains; ++j) sum = _mm256_add_epi64(sum, acc64[j]);
  alignas(32) long long lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  volatile long long sink = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  (void)sink;
  return iters * kChains * 256;
}

int64_t peak_fma_avx2(int64_t iters) {
  constexpr int kChains = 12;
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  alignas(32) float lanes[8];
  __m256 sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm256_add_ps(sum, acc[j]);
  _mm256_store_ps(lanes, sum);
  volatile float sink = lanes[0] + lanes[7];
  (void)sink;
  return iters * kChains * 8;
}

// 8 x 8 blocks in registers (the standard unpack / shuffle / 128-bit permute sequence), the edges as scalars
void transpose_rows_avx2(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      __m256 x[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(src + (r + i) * cols + c);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (c + i) * rows + r, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c + i + 4) * rows + r, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * rows + i] = src[i * cols + c];
  }
  if (r < r1) transpose_rows_generic(src, dst, rows, cols, r, r1);
}

}  // namespace bnas_deploy

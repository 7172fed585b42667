// AVX-512 path: 8 filters per 512-bit vector; per 64 input channels one VPTERNLOGQ ((s ^ w) & m), one
// VPOPCNTQ and one add. Requires AVX512F/BW/DQ/VL and AVX512_VPOPCNTDQ (checked at run time by engine.cpp).
#include <cstdint>
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt")

#include "generic.inc"

namespace {

using bnas_deploy::ConvArgs;
using bnas_deploy::PackArgs;

// PB output pixels x OB vectors of 8 filters. Each pixel's window count of non-zero activations (nnz) is summed
// here too, by scalar POPCNTs of the mask words the vector steps broadcast: they run on the integer units,
// beside the vector work, instead of a separate pass over the window.
// DENSE: the pixels' windows are dense (kernels.h, ConvArgs::dense_nnz): the count is known and a step is
// popcount(s ^ w), a non-destructive XOR where (s ^ w) & m needs a register copy (VPTERNLOGQ overwrites an
// operand still in use) and a broadcast of m: about a third fewer instructions per step.
template <int OB, int PB, bool DENSE>
inline void conv_block(const ConvArgs& a, const uint64_t* act_n, int64_t oh, int64_t ow0, int64_t v0, float* out0) {
  __m512i acc[PB][OB];
  int64_t nnz[PB];
  for (int p = 0; p < PB; ++p) {
    nnz[p] = DENSE ? a.dense_nnz : 0;
    for (int b = 0; b < OB; ++b) acc[p][b] = _mm512_setzero_si512();
  }
  const int64_t pix = a.Kw * 2;
  for (int64_t kh = 0; kh < a.KH; ++kh) {
    const uint64_t* row = act_n + (oh * a.stride + kh * a.dil) * a.Wp * pix;
    for (int64_t kw = 0; kw < a.KW; ++kw) {
      const uint64_t* wt = a.w + (kh * a.KW + kw) * a.Kw * a.Opad + v0 * 8;
      const uint64_t* px0 = row + (ow0 * a.col_stride() + kw * a.dil) * pix;
      for (int64_t k = 0; k < a.Kw; ++k) {
        __m512i wv[OB];
        for (int b = 0; b < OB; ++b) wv[b] = _mm512_loadu_si512(wt + k * a.Opad + b * 8);
        for (int p = 0; p < PB; ++p) {
          const uint64_t* px = px0 + p * a.col_stride() * pix + 2 * k;
          const __m512i s = _mm512_set1_epi64(static_cast<long long>(px[0]));
          if (DENSE) {
            for (int b = 0; b < OB; ++b)
              acc[p][b] = _mm512_add_epi64(acc[p][b], _mm512_popcnt_epi64(_mm512_xor_si512(s, wv[b])));
            continue;
          }
          const __m512i m = _mm512_set1_epi64(static_cast<long long>(px[1]));
          nnz[p] += _mm_popcnt_u64(px[1]);
          for (int b = 0; b < OB; ++b)
            acc[p][b] = _mm512_add_epi64(acc[p][b], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(s, wv[b], m, 0x28)));
        }
      }
    }
  }
  // the epilogue: the call's constants in locals (the float stores below could otherwise alias `a`, and each
  // field was loaded again for every vector), and a whole-vector store unless this block holds the last filters.
  // Two accumulators at a time where counts fit 31 bits (windows of under 2^30 inputs: all but absurd shapes):
  // one permute gathers the 16 filters' counts into one vector and the rest (dot, conversion, scale, ReLU,
  // store) runs once per 16 filters, not per 8. The same integer dot, converted by the same rounding (exact
  // below 2^24), so the same bits.
  const __m256 zero = _mm256_setzero_ps();
  const __m512 zero16 = _mm512_setzero_ps();
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const float* alpha = a.alpha;
  const bool relu = a.relu != 0, accumulate = a.accumulate != 0, whole = (v0 + OB) * 8 <= a.O;
  const bool narrow = a.KH * a.KW * a.Kw * 64 < (int64_t(1) << 30);
  const int64_t O = a.O, out_px = a.oW;
  // 8 filters from one accumulator (64-bit lanes)
  auto finish8 = [&](const __m512i& count, int64_t nz, int64_t c, float* out) {
    const __m512i dot = _mm512_sub_epi64(_mm512_set1_epi64(nz), _mm512_slli_epi64(count, 1));
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(alpha + c), _mm512_cvtepi64_ps(dot));
    if (relu) v = _mm256_max_ps(v, zero);
    if (whole || O - c >= 8) {  // plain loads and stores: masked memory operations are slow on some CPUs (AMD Zen 4)
      if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(out + c), v);
      _mm256_storeu_ps(out + c, v);
    } else {
      const __mmask8 mask = static_cast<__mmask8>((1u << (O - c)) - 1u);
      if (accumulate) v = _mm256_add_ps(_mm256_maskz_loadu_ps(mask, out + c), v);
      _mm256_mask_storeu_ps(out + c, mask, v);
    }
  };
  // unrolled, so that the accumulators stay in registers (a loop indexing them puts them on the stack)
#pragma GCC unroll 8
  for (int p = 0; p < PB; ++p) {
    float* out = out0 + p * out_px;
    const __m512i nz16 = _mm512_set1_epi32(static_cast<int>(nnz[p]));
#pragma GCC unroll 8
    for (int b = 0; b + 1 < OB; b += 2) {
      const int64_t c = (v0 + b) * 8;
      if (!narrow) {
        finish8(acc[p][b], nnz[p], c, out);
        finish8(acc[p][b + 1], nnz[p], c + 8, out);
        continue;
      }
      const __m512i counts = _mm512_permutex2var_epi32(acc[p][b], low_halves, acc[p][b + 1]);
      const __m512i dot = _mm512_sub_epi32(nz16, _mm512_slli_epi32(counts, 1));
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(alpha + c), _mm512_cvtepi32_ps(dot));
      if (relu) v = _mm512_max_ps(v, zero16);
      if (whole || O - c >= 16) {
        if (accumulate) v = _mm512_add_ps(_mm512_loadu_ps(out + c), v);
        _mm512_storeu_ps(out + c, v);
      } else {
        const __mmask16 mask = static_cast<__mmask16>((1u << (O - c)) - 1u);
        if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out + c), v);
        _mm512_mask_storeu_ps(out + c, mask, v);
      }
    }
    if (OB % 2 == 1) finish8(acc[p][OB - 1], nnz[p], (v0 + OB - 1) * 8, out);   // the odd vector
  }
}

// output columns [ow, end) of one row in blocks of 4 pixels
template <int OB, bool DENSE>
inline void conv_span(const ConvArgs& a, const uint64_t* act_n, int64_t oh, int64_t ow, int64_t end, int64_t v0,
                      float* out_row) {
  for (; ow + 4 <= end; ow += 4) conv_block<OB, 4, DENSE>(a, act_n, oh, ow, v0, out_row + ow * a.oW);
  switch (end - ow) {
    case 3: conv_block<OB, 3, DENSE>(a, act_n, oh, ow, v0, out_row + ow * a.oW); break;
    case 2: conv_block<OB, 2, DENSE>(a, act_n, oh, ow, v0, out_row + ow * a.oW); break;
    case 1: conv_block<OB, 1, DENSE>(a, act_n, oh, ow, v0, out_row + ow * a.oW); break;
    default: break;
  }
}

// a row's dense windows (ConvArgs::dense_nnz) lie between its border columns: those take the masked steps
template <int OB>
inline void conv_row_chunk(const ConvArgs& a, const uint64_t* act_n, int64_t oh, int64_t v0, float* out_row) {
  if (a.dense_nnz == 0 || oh < a.dense_oh0 || oh >= a.dense_oh1) {
    conv_span<OB, false>(a, act_n, oh, 0, a.OW, v0, out_row);
    return;
  }
  conv_span<OB, false>(a, act_n, oh, 0, a.dense_ow0, v0, out_row);
  conv_span<OB, true>(a, act_n, oh, a.dense_ow0, a.dense_ow1, v0, out_row);
  conv_span<OB, false>(a, act_n, oh, a.dense_ow1, a.OW, v0, out_row);
}

// Packing of channel-contiguous input, one row at a time in spans of up to 8 16-channel groups (two 64-channel
// words): a span's thresholds and sign flips are loaded into registers once per row instead of once per pixel
// (those loads were most of the per-pixel cost), only the input's last group can be partial (masked), and each
// word joins its four groups' compare masks in mask registers. The same compares as the generic path, so the
// same bits.
// ONE_COMPARE: the span's two thresholds coincide (see one_compare_spans), so one compare gives each word.
template <int NG, bool ONE_COMPARE>
inline void pack_span(const PackArgs& a, int64_t r, int64_t g0) {
  constexpr int NW = (NG + 3) / 4;
  const int64_t tail = a.C - 16 * (g0 + NG - 1);   // channels in the span's last group (it may end the input)
  const __mmask16 last = static_cast<__mmask16>(tail >= 16 ? 0xFFFFu : (1u << tail) - 1u);
  __m512 tz[NG], tp[NG];
  __m512i fl[NG];
  for (int g = 0; g < NG; ++g) {
    const __mmask16 valid = g == NG - 1 ? last : static_cast<__mmask16>(0xFFFFu);
    const int64_t c = 16 * (g0 + g);
    tz[g] = _mm512_maskz_loadu_ps(valid, a.t_zero + c);
    tp[g] = _mm512_maskz_loadu_ps(valid, a.t_pos + c);
    fl[g] = _mm512_maskz_loadu_epi32(valid, a.flip + c);
  }
  const int64_t n = r / a.H, h = r % a.H;
  uint64_t* dst = a.out + (((n * a.Hp) + h + a.pad) * a.Wp + a.pad) * a.Kw * 2 + g0 / 2;
  const float* src = a.x + n * a.sN + h * a.sH + 16 * g0;
  for (int64_t w = 0; w < a.W; ++w, dst += a.Kw * 2, src += a.sW) {
    for (int k = 0; k < NW; ++k) {
      __mmask16 neg[4] = {0, 0, 0, 0}, pos[4] = {0, 0, 0, 0};
      for (int j = 0; j < 4 && 4 * k + j < NG; ++j) {
        const int g = 4 * k + j;
        if (g < NG - 1) {
          const __m512 x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_loadu_si512(src + 16 * g), fl[g]));
          neg[j] = _mm512_cmp_ps_mask(x, tz[g], _CMP_NGE_UQ);
          pos[j] = ONE_COMPARE ? static_cast<__mmask16>(0xFFFFu) : _mm512_cmp_ps_mask(x, tp[g], _CMP_GE_OQ);
        } else {
          const __m512 x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_maskz_loadu_epi32(last, src + 16 * g), fl[g]));
          neg[j] = _mm512_mask_cmp_ps_mask(last, x, tz[g], _CMP_NGE_UQ);
          pos[j] = ONE_COMPARE ? last : _mm512_mask_cmp_ps_mask(last, x, tp[g], _CMP_GE_OQ);
        }
      }
      const __mmask64 n64 = _mm512_kunpackd(_mm512_kunpackw(neg[3], neg[2]), _mm512_kunpackw(neg[1], neg[0]));
      const __mmask64 p64 = _mm512_kunpackd(_mm512_kunpackw(pos[3], pos[2]), _mm512_kunpackw(pos[1], pos[0]));
      dst[2 * k] = _cvtmask64_u64(n64);
      dst[2 * k + 1] = _cvtmask64_u64(_kor_mask64(n64, p64));
    }
  }
}

}  // namespace

namespace bnas_deploy {

void pack_rows_avx512(const PackArgs& a, int64_t r0, int64_t r1) {
  if (a.sC != 1) {
    pack_rows_generic(a, r0, r1);
    return;
  }
  const int64_t groups = (a.C + 15) / 16;
  const uint64_t one = one_compare_spans(a, 128);   // spans of 8 groups
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g0 = 0; g0 < groups; g0 += 8)
      with_group_count(groups - g0, [&](auto count) {
        constexpr int NG = decltype(count)::value;
        if (has_one_compare(one, g0 / 8))
          pack_span<NG, true>(a, r, g0);
        else
          pack_span<NG, false>(a, r, g0);
      });
}

// column_rows (kernels.h) four output columns at a time where the common case allows (one word per pixel,
// columns of at most two words, stride 1): tap kw of columns ow..ow+3 is one 512-bit load of the four pixels'
// {s, m} pairs from ow + kw * dil, shifted to bit kw * C of the column's low and high words (VPSLLVQ/VPSRLVQ
// give 0 for counts of 64 and more, so taps that miss a word drop out); the pairs are then interleaved into
// the columns' [s_lo, m_lo, s_hi, m_hi]. The same bits as the scalar loop, which does the other cases and
// the last columns of a row.
void column_rows_avx512(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil,
                        int64_t OW, uint64_t* out, int64_t r0, int64_t r1) {
  const int64_t Kc = column_words(C, KW);
  if (C > 64 || Kc > 2 || stride != 1 || KW > kMaxKernel || OW < 4) {
    column_rows(planes, Wp, C, KW, stride, dil, OW, out, r0, r1);
    return;
  }
  __m512i lo_left[kMaxKernel], hi_right[kMaxKernel], hi_left[kMaxKernel];
  for (int64_t kw = 0; kw < KW; ++kw) {
    const int64_t off = kw * C;
    lo_left[kw] = _mm512_set1_epi64(off);
    hi_right[kw] = _mm512_set1_epi64(off < 64 ? 64 - off : 64);
    hi_left[kw] = _mm512_set1_epi64(off >= 64 ? off - 64 : 64);
  }
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const int64_t quads = OW / 4 * 4;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* row = planes + r * Wp * 2;
    uint64_t* dst = out + r * OW * Kc * 2;
    for (int64_t ow = 0; ow < quads; ow += 4) {
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      for (int64_t kw = 0; kw < KW; ++kw) {
        const __m512i v = _mm512_loadu_si512(row + (ow + kw * dil) * 2);
        lo = _mm512_or_si512(lo, _mm512_sllv_epi64(v, lo_left[kw]));
        hi = _mm512_or_si512(hi, _mm512_or_si512(_mm512_srlv_epi64(v, hi_right[kw]), _mm512_sllv_epi64(v, hi_left[kw])));
      }
      if (Kc == 1) {
        _mm512_storeu_si512(dst + ow * 2, lo);
      } else {
        _mm512_storeu_si512(dst + ow * 4, _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_storeu_si512(dst + ow * 4 + 8, _mm512_permutex2var_epi64(lo, second, hi));
      }
    }
  }
  if (quads < OW) column_rows_tail(planes, Wp, C, KW, stride, dil, OW, quads, out, r0, r1);
}

void conv_rows_avx512(const ConvArgs& a, int64_t r0, int64_t r1) {
  const int64_t nv = a.Opad / 8;
  const int64_t groups = (nv + 4) / 5;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / a.OH, oh = r % a.OH;
    const uint64_t* act_n = a.act + n * a.Hp * a.Wp * a.Kw * 2;
    float* out_row = a.out + n * a.oN + oh * a.oH;
    int64_t v0 = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t ob = nv / groups + (g < nv % groups ? 1 : 0);
      switch (ob) {
        case 5: conv_row_chunk<5>(a, act_n, oh, v0, out_row); break;
        case 4: conv_row_chunk<4>(a, act_n, oh, v0, out_row); break;
        case 3: conv_row_chunk<3>(a, act_n, oh, v0, out_row); break;
        case 2: conv_row_chunk<2>(a, act_n, oh, v0, out_row); break;
        default: conv_row_chunk<1>(a, act_n, oh, v0, out_row); break;
      }
      v0 += ob;
    }
  }
}

void pool_rows_avx512(const PoolArgs& a, int64_t r0, int64_t r1) { pool_rows_generic(a, r0, r1); }

// the kernel's step ((s ^ w) & m -> VPOPCNTQ -> add) on 12 independent chains; each chain's count feeds its
// next sign word, so nothing can be hoisted out of the loop
int64_t peak_binary_avx512(int64_t iters) {
  constexpr int kChains = 12;
  __m512i acc[kChains], w[kChains];
  const __m512i m = _mm512_set1_epi64(0x5bd1e9955bd1e995LL);
  for (int j = 0; j < kChains; ++j) {
    acc[j] = _mm512_set1_epi64(j + 1);
    w[j] = _mm512_set1_epi64(0x0101010101010101LL * (j + 3));
  }
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j)
      acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(acc[j], w[j], m, 0x28)));
  __m512i sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm512_add_epi64(sum, acc[j]);
  volatile long long sink = _mm512_reduce_add_epi64(sum);
  (void)sink;
  return iters * kChains * 512;
}

int64_t peak_fma_avx512(int64_t iters) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  __m512 sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm512_add_ps(sum, acc[j]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return iters * kChains * 16;
}

}  // namespace bnas_deploy

// Plain-C interfaces between the torch binding (engine.cpp) and the per-instruction-set kernels.
//
// Each kernels_<isa>.cpp is compiled for its own instruction set (a `#pragma GCC target` after its
// includes) and defines only the functions below plus internal-linkage helpers, so no inline code of
// torch or the standard library is ever emitted with AVX-512/AVX2 instructions (the linker could pick
// such a copy for generic callers). engine.cpp does the threading and calls these on row ranges.
//
// Packed activations ("bit planes"): for every pixel of a zero-padded image, Kw = ceil(C / 64) pairs of
// 64-bit words {s, m}: bit c of s is 1 where the activation sign(BN(x)) of channel c is -1, bit c of m is
// 1 where it is non-zero. Padded pixels and channels beyond C are {0, 0}: they contribute nothing, which
// is exactly what a zero-padded convolution of {-1, 0, +1} values computes. Layout [N][Hp][Wp][Kw][2].
//
// Packed weights: bit c of word (tap, k) of filter o is 1 where the binary weight of input channel
// 64k + c is negative. Layout [taps * Kw][Opad] (output channels innermost, padded to a multiple of 8).
//
// Per output pixel and filter: dot = nnz - 2 * sum_words popcount((s ^ w) & m), where nnz counts the
// non-zero activations of the window; out = alpha[o] * dot (then ReLU), computed in float from the exact
// integer.
#pragma once
#include <cstdint>

namespace bnas_deploy {

struct PackArgs {
  const float* x;            // input, element strides below (any layout)
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;
  const float* t_zero;       // per channel: x' >= t_zero -> not negative
  const float* t_pos;        // per channel: x' >= t_pos  -> positive
  const uint32_t* flip;      // per channel: 0 or 0x80000000 (x' = -x)
  uint64_t* out;             // [N][Hp][Wp][Kw][2], border already zero
  int64_t Kw, Hp, Wp, pad;
};

struct ConvArgs {
  const uint64_t* act;       // packed input [N][Hp][Wp][Kw][2]
  int64_t N, Hp, Wp, Kw;
  const uint64_t* w;         // [KH * KW * Kw][Opad]
  const float* alpha;        // [Opad] (0 for padded lanes)
  int64_t O, Opad, KH, KW, stride, dil;
  float* out;                // output, channel stride 1
  int64_t OH, OW;
  int64_t oN, oH, oW;        // element strides of out
  int relu;
  int accumulate;            // out += result instead of out = result
};

struct PoolArgs {
  const float* x;            // input, channel stride 1
  int64_t N, C, H, W;
  int64_t sN, sH, sW;
  float* out;                // output, channel stride 1
  int64_t OH, OW;
  int64_t oN, oH, oW;
  int64_t kernel, stride, pad;
  int is_max;                // 1: max pool; 0: average over the valid (unpadded) window
  int accumulate;
};

// 0 portable, 1 avx2, 2 avx512 (engine.cpp)
bool cpu_supports_isa(int64_t isa);

// Bounds of the geometry every entry point accepts (kernel rows are at most kMaxRow output pixels long).
constexpr int64_t kMaxKernel = 16, kMaxStride = 16, kMaxDilation = 16, kMaxRow = 4096;

// Argument checks shared by engine.cpp and cell.cpp (they raise c10::Error, a RuntimeError in Python):
// kernel, stride, dilation >= 1 and bounded, 0 <= padding <= dilation * (kernel - 1) ...
void check_conv_params(int64_t kernel_h, int64_t kernel_w, int64_t stride, int64_t padding, int64_t dilation);
// ... and an H x W input (>= 1 pixel) whose padded size holds at least one window, so that every row
// and column a kernel reads lies inside the padded buffer.
void check_conv_window(int64_t H, int64_t W, int64_t kernel_h, int64_t kernel_w, int64_t padding, int64_t dilation);

// rows are n * H + h (pack) or n * OH + oh (conv, pool)
void pack_rows_portable(const PackArgs& a, int64_t r0, int64_t r1);
void conv_rows_portable(const ConvArgs& a, int64_t r0, int64_t r1);
void pool_rows_portable(const PoolArgs& a, int64_t r0, int64_t r1);

void pack_rows_avx2(const PackArgs& a, int64_t r0, int64_t r1);
void conv_rows_avx2(const ConvArgs& a, int64_t r0, int64_t r1);
void pool_rows_avx2(const PoolArgs& a, int64_t r0, int64_t r1);

void pack_rows_avx512(const PackArgs& a, int64_t r0, int64_t r1);
void conv_rows_avx512(const ConvArgs& a, int64_t r0, int64_t r1);
void pool_rows_avx512(const PoolArgs& a, int64_t r0, int64_t r1);

}  // namespace bnas_deploy

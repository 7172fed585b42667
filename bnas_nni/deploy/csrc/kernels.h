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
  int64_t wstride = 0;       // stride between the input pixels of adjacent output columns; 0: `stride`
                             // (column-packed input, see column_rows below, steps by 1)
  // Dense windows (set_dense_windows): output pixels in rows [dense_oh0, dense_oh1) x columns [dense_ow0,
  // dense_ow1) read no padding, and every input channel's non-zero bit is set (no input maps to 0), so there
  // m has every channel's bit, (s ^ w) & m is s ^ w (neither has bits beyond C), and the window count is
  // dense_nnz: a path may skip the masks there. dense_nnz 0: no such windows.
  int64_t dense_nnz = 0;
  int64_t dense_oh0 = 0, dense_oh1 = 0, dense_ow0 = 0, dense_ow1 = 0;
  int64_t col_stride() const { return wstride ? wstride : stride; }
};

// Sets the dense windows of `c` for a KH x KW conv over an H x W input of C channels (padding, stride,
// dilation as given), when `dense` (the unit's thresholds coincide for every channel, see one_compare_spans,
// and its weights have no bits beyond C); else none. Call with the conv's own geometry, before any column
// packing rewrites KW.
void set_dense_windows(ConvArgs& c, bool dense, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                       int64_t stride, int64_t padding, int64_t dilation);
// The unit-level condition of dense windows: t_zero and t_pos the same floats for all C channels, and the
// packed weights [taps * Kw][Opad] with no bits beyond C.
bool dense_unit(const float* t_zero, const float* t_pos, int64_t C, const uint64_t* w, int64_t taps, int64_t Opad);

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

// Column packing (engine.cpp): for a KH x KW kernel over C channels, the KW taps of an output column are
// concatenated bit by bit (tap kw's channel c at bit kw * C + c) into ceil(KW * C / 64) words instead of
// KW * ceil(C / 64): with C = 36 a 3-wide tap row takes 2 words instead of 3. The conv then runs as a
// KH x 1 kernel over the columns (wstride 1) with the same exact integer counts, so the same bits.
int64_t column_words(int64_t C, int64_t KW);
bool columns_pay(int64_t C, int64_t KW);
// weights [KH * KW * Kw][Opad] -> [KH * column_words][Opad] (out zeroed here)
void column_weights(const uint64_t* w, int64_t KH, int64_t KW, int64_t C, int64_t Opad, uint64_t* out);
// padded planes [Hp][Wp][Kw][2] of one image, rows [r0, r1) -> columns [Hp][OW][column_words][2]
void column_rows(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil, int64_t OW,
                 uint64_t* out, int64_t r0, int64_t r1);
// the same for output columns [ow0, OW) only (the vector path's last columns)
void column_rows_tail(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil,
                      int64_t OW, int64_t ow0, uint64_t* out, int64_t r0, int64_t r1);
// the AVX-512 path of column_rows (the same bits)
void column_rows_avx512(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil,
                        int64_t OW, uint64_t* out, int64_t r0, int64_t r1);

// int8 path of the full-precision convs (the `int8` fp-parts option; changes bits, off by default): the
// input BN(x) of one image quantized symmetrically with one scale per image, stored +128 as bytes in a
// zero-bordered [Hp][Wp][C] buffer (the border is 128 = zero); weights int8 with one scale per filter in
// VPDPBUSD order [Opad/16][K4][16][4] over K = KH * KW * C (tap-major, zero-padded to K4 * 4).
// out = float(acc - wsum128[o]) * (xscale * wscale[o]) + bias[o] (then ReLU); every path computes the same
// exact integer acc and the same float epilogue, so all instruction sets give the same bits.
struct Int8ConvArgs {
  const uint8_t* act;        // one image, [Hp][Wp][C]
  int64_t Hp, Wp, C;
  const int8_t* w;           // [Opad/16][K4][16][4]
  const int32_t* wsum128;    // [Opad] 128 * sum of each filter's weights
  const float* wscale;       // [Opad]
  const float* bias;         // [Opad]
  float xscale;
  int64_t O, Opad, K4, KH, KW, stride, dil;
  float* out;                // one image, channel stride 1
  int64_t OH, OW, oH, oW;
  int relu;
  uint8_t* scratch;          // kInt8Pixels * K4 * 4 bytes of the calling thread
};
constexpr int64_t kInt8Pixels = 4;
bool cpu_supports_vnni();
void int8_conv_rows_portable(const Int8ConvArgs& a, int64_t r0, int64_t r1);
void int8_conv_rows_vnni(const Int8ConvArgs& a, int64_t r0, int64_t r1);

// Peak-throughput micro-benchmarks of the instruction mix of each path (independent register chains, no
// memory traffic): the number of multiply-accumulates done by `iters` loops of one thread. Binary: one
// 64-channel x 8-filter (AVX-512) or x 4-filter (AVX2) XNOR/popcount step per word; fma: float32 FMAs.
int64_t peak_binary_avx512(int64_t iters);
int64_t peak_fma_avx512(int64_t iters);
int64_t peak_binary_avx2(int64_t iters);
int64_t peak_fma_avx2(int64_t iters);

// Matrix transpose of one image, dst[c][r] = src[r][c] for src rows [r0, r1) of `cols` floats (row strides
// `cols` and `rows`): the layout change NCHW <-> channels-last of the engine's float parts (a copy, so exact).
void transpose_rows_portable(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1);
void transpose_rows_avx2(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1);

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

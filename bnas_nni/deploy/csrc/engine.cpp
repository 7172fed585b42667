// Torch binding of the packed 1-bit engine: argument checks, scratch buffers, threading and the choice
// of instruction set. The kernels themselves live in kernels_<isa>.cpp (see kernels.h for the layouts).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace bnas_deploy {
namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_supports(int64_t isa) {
  switch (isa) {
    case kPortable:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
    default:
      return false;
  }
}

// Rows per thread below which a parallel region costs more than it saves (waking sleeping OpenMP
// workers takes ~10 us on a busy machine with OMP_WAIT_POLICY=PASSIVE): about 20 us of work per thread.
int64_t grain_for(int64_t work_per_row, int64_t min_work = 20000) {
  return std::max<int64_t>(1, (min_work + std::max<int64_t>(work_per_row, 1) - 1) / std::max<int64_t>(work_per_row, 1));
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kPortable && isa <= kAvx512, "unknown instruction set id ", isa);
  TORCH_CHECK(cpu_supports(isa), "this CPU does not support the requested instruction set (id ", isa, ")");
}

void check_float_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, what, " must be float32");
}

void check_channel_vector(const torch::Tensor& t, int64_t n, torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous() && t.size(0) >= n,
              what, " must be a contiguous 1-d CPU tensor of at least ", n, " elements");
}

// Bit planes of sign(BN(x)) for a zero border of width `pad` (see kernels.h); returns int64 [N, Hp, Wp, Kw, 2].
torch::Tensor pack_impl(const torch::Tensor& x, const torch::Tensor& t_zero, const torch::Tensor& t_pos,
                        const torch::Tensor& flip, int64_t pad, int64_t isa) {
  check_float_cpu(x, "input");
  TORCH_CHECK(x.dim() == 4, "input must be N x C x H x W");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_channel_vector(t_zero, C, torch::kFloat32, "t_zero");
  check_channel_vector(t_pos, C, torch::kFloat32, "t_pos");
  check_channel_vector(flip, C, torch::kInt32, "flip");
  TORCH_CHECK(pad >= 0 && pad <= kMaxDilation * (kMaxKernel - 1), "padding must be 0 to ",
              kMaxDilation * (kMaxKernel - 1), ", got ", pad);
  const int64_t Kw = (C + 63) / 64, Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto packed = torch::zeros({N, Hp, Wp, Kw, 2}, torch::dtype(torch::kInt64));
  PackArgs a{x.data_ptr<float>(), N, C, H, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
             t_zero.data_ptr<float>(), t_pos.data_ptr<float>(), reinterpret_cast<const uint32_t*>(flip.data_ptr<int32_t>()),
             reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>()), Kw, Hp, Wp, pad};
  auto fn = isa == kAvx512 ? pack_rows_avx512 : isa == kAvx2 ? pack_rows_avx2 : pack_rows_portable;
  // work units ~ a nanosecond each: a 16-channel compare group per pixel
  at::parallel_for(0, N * H, grain_for(W * ((C + 15) / 16) * (isa == kPortable ? 16 : 1)),
                   [&](int64_t b, int64_t e) { fn(a, b, e); });
  return packed;
}

}  // namespace

bool cpu_supports_isa(int64_t isa) { return cpu_supports(isa); }

void check_conv_params(int64_t kernel_h, int64_t kernel_w, int64_t stride, int64_t padding, int64_t dilation) {
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && kernel_h <= kMaxKernel && kernel_w <= kMaxKernel,
              "convolution kernel must be 1 to ", kMaxKernel, " pixels a side, got ", kernel_h, "x", kernel_w);
  TORCH_CHECK(stride >= 1 && stride <= kMaxStride, "convolution stride must be 1 to ", kMaxStride, ", got ", stride);
  TORCH_CHECK(dilation >= 1 && dilation <= kMaxDilation, "convolution dilation must be 1 to ", kMaxDilation, ", got ",
              dilation);
  const int64_t max_pad = dilation * (std::max(kernel_h, kernel_w) - 1);
  TORCH_CHECK(padding >= 0 && padding <= max_pad, "convolution padding must be 0 to dilation * (kernel - 1) = ",
              max_pad, ", got ", padding);
}

void check_conv_window(int64_t H, int64_t W, int64_t kernel_h, int64_t kernel_w, int64_t padding, int64_t dilation) {
  TORCH_CHECK(H >= 1 && W >= 1, "convolution input must have at least one pixel, got ", H, "x", W);
  TORCH_CHECK(H + 2 * padding >= dilation * (kernel_h - 1) + 1 && W + 2 * padding >= dilation * (kernel_w - 1) + 1,
              "convolution input ", H, "x", W, " with padding ", padding, " is smaller than the ", kernel_h, "x",
              kernel_w, " window (dilation ", dilation, ")");
}

void bind_cell_program(pybind11::module& m);  // cell.cpp

int64_t column_words(int64_t C, int64_t KW) { return (KW * C + 63) / 64; }

bool columns_pay(int64_t C, int64_t KW) { return KW > 1 && column_words(C, KW) < KW * ((C + 63) / 64); }

void set_dense_windows(ConvArgs& c, bool dense, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                       int64_t stride, int64_t padding, int64_t dilation) {
  c.dense_nnz = 0;
  c.dense_oh0 = c.dense_oh1 = c.dense_ow0 = c.dense_ow1 = 0;
  if (!dense) return;
  // output o reads input rows o * stride - padding + k * dilation, k < K: all inside [0, n) from the first o
  // with o * stride >= padding up to the last with o * stride - padding + (K - 1) * dilation <= n - 1
  auto inside = [&](int64_t n, int64_t K, int64_t out, int64_t& lo, int64_t& hi) {
    lo = (padding + stride - 1) / stride;
    const int64_t last = n - 1 + padding - (K - 1) * dilation;
    hi = last < 0 ? 0 : std::min<int64_t>(out, last / stride + 1);
    if (hi < lo) lo = hi = 0;
  };
  inside(H, KH, c.OH, c.dense_oh0, c.dense_oh1);
  inside(W, KW, c.OW, c.dense_ow0, c.dense_ow1);
  c.dense_nnz = KH * KW * C;
}

bool dense_unit(const float* t_zero, const float* t_pos, int64_t C, const uint64_t* w, int64_t taps, int64_t Opad) {
  if (std::memcmp(t_zero, t_pos, sizeof(float) * C) != 0) return false;
  const int64_t Kw = (C + 63) / 64, tail = C - 64 * (Kw - 1);
  if (tail == 64) return true;
  const uint64_t beyond = ~((uint64_t(1) << tail) - 1);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t o = 0; o < Opad; ++o)
      if (w[(t * Kw + Kw - 1) * Opad + o] & beyond) return false;
  return true;
}

namespace {
// dst bits [off, off + nbits) |= v (v has no bits at or above nbits); dst words `step` apart
inline void or_bits(uint64_t* dst, int64_t step, uint64_t v, int64_t off, int64_t nbits) {
  const int64_t j = off / 64, s = off % 64;
  dst[j * step] |= v << s;
  if (s != 0 && s + nbits > 64) dst[(j + 1) * step] |= v >> (64 - s);
}
}  // namespace

void column_weights(const uint64_t* w, int64_t KH, int64_t KW, int64_t C, int64_t Opad, uint64_t* out) {
  const int64_t Kw = (C + 63) / 64, Kc = column_words(C, KW);
  std::memset(out, 0, sizeof(uint64_t) * KH * Kc * Opad);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw)
      for (int64_t k = 0; k < Kw; ++k) {
        const int64_t nbits = std::min<int64_t>(64, C - 64 * k);
        const uint64_t keep = nbits == 64 ? ~uint64_t(0) : (uint64_t(1) << nbits) - 1;
        const uint64_t* src = w + ((kh * KW + kw) * Kw + k) * Opad;
        for (int64_t o = 0; o < Opad; ++o)
          or_bits(out + kh * Kc * Opad + o, Opad, src[o] & keep, kw * C + 64 * k, nbits);
      }
}

void column_rows(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil, int64_t OW,
                 uint64_t* out, int64_t r0, int64_t r1) {
  column_rows_tail(planes, Wp, C, KW, stride, dil, OW, 0, out, r0, r1);
}

void column_rows_tail(const uint64_t* planes, int64_t Wp, int64_t C, int64_t KW, int64_t stride, int64_t dil,
                      int64_t OW, int64_t ow0, uint64_t* out, int64_t r0, int64_t r1) {
  const int64_t Kw = (C + 63) / 64, Kc = column_words(C, KW);
  if (Kw == 1 && Kc <= 2) {   // the common case (C <= 42 for 3 taps): a column is built in 128-bit registers
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t* row = planes + r * Wp * 2;
      uint64_t* dst = out + (r * OW + ow0) * Kc * 2;
      for (int64_t ow = ow0; ow < OW; ++ow, dst += Kc * 2) {
        unsigned __int128 s = 0, m = 0;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const uint64_t* px = row + (ow * stride + kw * dil) * 2;
          s |= static_cast<unsigned __int128>(px[0]) << (kw * C);
          m |= static_cast<unsigned __int128>(px[1]) << (kw * C);
        }
        dst[0] = static_cast<uint64_t>(s);
        dst[1] = static_cast<uint64_t>(m);
        if (Kc == 2) {
          dst[2] = static_cast<uint64_t>(s >> 64);
          dst[3] = static_cast<uint64_t>(m >> 64);
        }
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* row = planes + r * Wp * Kw * 2;
    uint64_t* dst_row = out + r * OW * Kc * 2;
    std::memset(dst_row + ow0 * Kc * 2, 0, sizeof(uint64_t) * (OW - ow0) * Kc * 2);
    for (int64_t ow = ow0; ow < OW; ++ow) {
      uint64_t* dst = dst_row + ow * Kc * 2;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const uint64_t* px = row + (ow * stride + kw * dil) * Kw * 2;
        for (int64_t k = 0; k < Kw; ++k) {  // planes hold no bits beyond C (kernels.h)
          const int64_t nbits = std::min<int64_t>(64, C - 64 * k), off = kw * C + 64 * k;
          or_bits(dst, 2, px[2 * k], off, nbits);
          or_bits(dst + 1, 2, px[2 * k + 1], off, nbits);
        }
      }
    }
  }
}

torch::Tensor pack_signs(const torch::Tensor& x, const torch::Tensor& t_zero, const torch::Tensor& t_pos,
                         const torch::Tensor& flip, int64_t pad, int64_t isa) {
  check_isa(isa);
  return pack_impl(x, t_zero, t_pos, flip, pad, isa);
}

// out (+)= relu(alpha * conv(sign(BN(x)), sign weights)) with the BN folded into thresholds.
// weight: int64 [KH * KW * Kw, Opad] (kernels.h); out: N x O x OH x OW with channel stride 1 (a channel
// slice of a channels-last tensor is fine).
void binary_conv(const torch::Tensor& x, const torch::Tensor& t_zero, const torch::Tensor& t_pos,
                 const torch::Tensor& flip, const torch::Tensor& weight, const torch::Tensor& alpha,
                 torch::Tensor out, int64_t kernel_h, int64_t kernel_w, int64_t stride, int64_t padding,
                 int64_t dilation, bool relu, bool accumulate, int64_t isa) {
  check_isa(isa);
  check_float_cpu(x, "input");
  check_float_cpu(out, "output");
  TORCH_CHECK(x.dim() == 4, "input must be N x C x H x W");
  TORCH_CHECK(out.dim() == 4 && out.stride(1) == 1, "output must be N x O x OH x OW with channel stride 1");
  check_conv_params(kernel_h, kernel_w, stride, padding, dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = out.size(1), OH = out.size(2), OW = out.size(3);
  const int64_t Kw = (C + 63) / 64;
  const int64_t Opad = (O + 7) / 8 * 8;
  check_conv_window(H, W, kernel_h, kernel_w, padding, dilation);
  check_channel_vector(t_zero, C, torch::kFloat32, "t_zero");
  check_channel_vector(t_pos, C, torch::kFloat32, "t_pos");
  check_channel_vector(flip, C, torch::kInt32, "flip");
  TORCH_CHECK(out.size(0) == N, "output batch size differs from the input's");
  TORCH_CHECK(OH == (H + 2 * padding - dilation * (kernel_h - 1) - 1) / stride + 1 &&
                  OW == (W + 2 * padding - dilation * (kernel_w - 1) - 1) / stride + 1,
              "output spatial size does not match the convolution");
  TORCH_CHECK(OW <= kMaxRow, "output rows longer than ", kMaxRow, " pixels are not supported");
  TORCH_CHECK(weight.scalar_type() == torch::kInt64 && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(0) == kernel_h * kernel_w * Kw && weight.size(1) == Opad,
              "packed weight must be int64 [KH*KW*ceil(C/64), ceil(O/8)*8]");
  check_channel_vector(alpha, Opad, torch::kFloat32, "alpha");
  // One parallel region: every task packs the input rows it needs into a buffer of its own thread, then
  // convolves. Tasks are whole images when there are several (no halo is packed twice), else bands of rows.
  const int64_t Hp = H + 2 * padding, Wp = W + 2 * padding;
  const int64_t row_words = Wp * Kw * 2;
  PackArgs pa{x.data_ptr<float>(), 1, C, H, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
              t_zero.data_ptr<float>(), t_pos.data_ptr<float>(), reinterpret_cast<const uint32_t*>(flip.data_ptr<int32_t>()),
              nullptr, Kw, Hp, Wp, padding};
  ConvArgs ca{nullptr, 1, Hp, Wp, Kw, reinterpret_cast<const uint64_t*>(weight.data_ptr<int64_t>()),
              alpha.data_ptr<float>(), O, Opad, kernel_h, kernel_w, stride, dilation, out.data_ptr<float>(), OH, OW,
              out.stride(0), out.stride(2), out.stride(3), relu ? 1 : 0, accumulate ? 1 : 0};
  set_dense_windows(ca, dense_unit(t_zero.data_ptr<float>(), t_pos.data_ptr<float>(), C, ca.w,
                                   kernel_h * kernel_w, Opad),
                    C, H, W, kernel_h, kernel_w, stride, padding, dilation);
  auto pack_fn = isa == kAvx512 ? pack_rows_avx512 : isa == kAvx2 ? pack_rows_avx2 : pack_rows_portable;
  auto conv_fn = isa == kAvx512 ? conv_rows_avx512 : isa == kAvx2 ? conv_rows_avx2 : conv_rows_portable;
  // column packing where it saves words (kernels.h): the conv then reads KH x 1 columns
  const bool columns = columns_pay(C, kernel_w);
  const int64_t Kc = column_words(C, kernel_w), col_words = OW * Kc * 2;
  std::vector<uint64_t> wcols;
  if (columns) {
    wcols.resize(kernel_h * Kc * Opad);
    column_weights(ca.w, kernel_h, kernel_w, C, Opad, wcols.data());
  }
  auto task = [&](int64_t n, int64_t oh0, int64_t oh1) {
    thread_local std::vector<uint64_t> buffer, cols;
    if (buffer.size() < static_cast<size_t>(Hp * row_words)) buffer.resize(Hp * row_words);
    const int64_t pr0 = oh0 * stride, pr1 = (oh1 - 1) * stride + (kernel_h - 1) * dilation + 1;  // padded rows read
    std::memset(buffer.data() + pr0 * row_words, 0, sizeof(uint64_t) * (pr1 - pr0) * row_words);
    PackArgs p = pa;
    p.x = pa.x + n * pa.sN;
    p.out = buffer.data();
    const int64_t h0 = std::max<int64_t>(0, pr0 - padding), h1 = std::min<int64_t>(H, pr1 - padding);
    if (h1 > h0) pack_fn(p, h0, h1);
    ConvArgs c = ca;
    c.act = buffer.data();
    c.out = ca.out + n * ca.oN;
    if (columns) {
      if (cols.size() < static_cast<size_t>(Hp * col_words)) cols.resize(Hp * col_words);
      (isa == kAvx512 ? column_rows_avx512 : column_rows)(buffer.data(), Wp, C, kernel_w, stride, dilation, OW,
                                                         cols.data(), pr0, pr1);
      c.act = cols.data();
      c.Wp = OW;
      c.Kw = Kc;
      c.w = wcols.data();
      c.KW = 1;
      c.wstride = 1;
    }
    conv_fn(c, oh0, oh1);
  };
  // work units: one 512-bit word operation (8 filters x 64 inputs); the other paths do more per unit
  const int64_t per_row = OW * (Opad / 8) * kernel_h * kernel_w * Kw * (isa == kAvx512 ? 1 : isa == kAvx2 ? 4 : 40) +
                          W * ((C + 15) / 16) * stride;
  if (N > 1) {
    at::parallel_for(0, N, grain_for(per_row * OH), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) task(n, 0, OH);
    });
  } else {
    at::parallel_for(0, OH, grain_for(per_row), [&](int64_t b, int64_t e) { task(0, b, e); });
  }
}

// out (+)= pool(x) over kernel x kernel windows; x and out with channel stride 1.
void pool2d(const torch::Tensor& x, torch::Tensor out, int64_t kernel, int64_t stride, int64_t padding, bool is_max,
            bool accumulate, int64_t isa) {
  check_isa(isa);
  check_float_cpu(x, "input");
  check_float_cpu(out, "output");
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1 && out.dim() == 4 && out.stride(1) == 1,
              "pool input and output must have channel stride 1 (channels last)");
  TORCH_CHECK(kernel >= 1 && kernel <= kMaxKernel, "pool kernel must be 1 to ", kMaxKernel, ", got ", kernel);
  TORCH_CHECK(stride >= 1 && stride <= kMaxStride, "pool stride must be 1 to ", kMaxStride, ", got ", stride);
  TORCH_CHECK(padding >= 0 && padding < kernel, "pool padding must be 0 to kernel - 1, got ", padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = out.size(2), OW = out.size(3);
  // every window then holds at least one input pixel (the max starts from one, the average divides by the count)
  TORCH_CHECK(H >= 1 && W >= 1 && H + 2 * padding >= kernel && W + 2 * padding >= kernel,
              "pool input ", H, "x", W, " is smaller than its window");
  TORCH_CHECK(out.size(0) == N && out.size(1) == C, "pool output must have the input's batch and channels");
  TORCH_CHECK(OH == (H + 2 * padding - kernel) / stride + 1 && OW == (W + 2 * padding - kernel) / stride + 1,
              "pool output spatial size does not match");
  PoolArgs a{x.data_ptr<float>(), N, C, H, W, x.stride(0), x.stride(2), x.stride(3), out.data_ptr<float>(), OH, OW,
             out.stride(0), out.stride(2), out.stride(3), kernel, stride, padding, is_max ? 1 : 0, accumulate ? 1 : 0};
  auto fn = isa == kAvx512 ? pool_rows_avx512 : isa == kAvx2 ? pool_rows_avx2 : pool_rows_portable;
  at::parallel_for(0, N * OH, grain_for(OW * kernel * kernel * ((C + 15) / 16)), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// dst = src between the two dense layouts of an N x C x H x W float tensor, NCHW-contiguous and channels-last
// (either way): per image a C x (H*W) matrix transposed (kernels.h). A plain copy: the same bits. PyTorch's
// strided copy_ takes longer on the engine's shapes (the stem's output, the float residual convs' input).
void relayout(const torch::Tensor& src, torch::Tensor dst, int64_t isa) {
  check_isa(isa);
  check_float_cpu(src, "source");
  check_float_cpu(dst, "destination");
  TORCH_CHECK(src.dim() == 4 && src.sizes() == dst.sizes(), "relayout: source and destination must be N x C x H x W "
              "of the same shape");
  const bool to_cl = src.is_contiguous() && dst.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool to_nchw = src.is_contiguous(at::MemoryFormat::ChannelsLast) && dst.is_contiguous();
  TORCH_CHECK(to_cl || to_nchw, "relayout: one tensor must be NCHW-contiguous and the other channels-last");
  const int64_t N = src.size(0), C = src.size(1), P = src.size(2) * src.size(3);
  // per image: a rows x cols matrix transposed
  const int64_t rows = to_cl ? C : P, cols = to_cl ? P : C;
  const float* sp = src.data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  auto fn = isa == kPortable ? transpose_rows_portable : transpose_rows_avx2;
  constexpr int64_t kTile = 16;
  const int64_t tiles = (rows + kTile - 1) / kTile;
  at::parallel_for(0, N * tiles, grain_for(kTile * cols), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / tiles, r0 = (t % tiles) * kTile;
      fn(sp + n * rows * cols, dp + n * rows * cols, rows, cols, r0, std::min(rows, r0 + kTile));
    }
  });
}

// out = 0 for a channels-last view (a cell's Zeroise-only node): one memset per pixel.
void zero_fill(torch::Tensor out) {
  check_float_cpu(out, "output");
  TORCH_CHECK(out.dim() == 4 && out.stride(1) == 1, "zero_fill needs N x C x H x W with channel stride 1");
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  float* base = out.data_ptr<float>();
  const int64_t sN = out.stride(0), sH = out.stride(2), sW = out.stride(3);
  at::parallel_for(0, N * H, grain_for(W * C / 4), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = base + (r / H) * sN + (r % H) * sH;
      for (int64_t w = 0; w < W; ++w) std::memset(row + w * sW, 0, sizeof(float) * C);
    }
  });
}

// out = conv(BN(x)) (+ bias, ReLU) on int8 (kernels.h, Int8ConvArgs): BN as y = x * bn_a + bn_b, quantized
// per image with scale max|y| / 127; weight: int8 [Opad/16, K4, 16, 4]; out N x O x OH x OW, channel stride 1.
void int8_conv(const torch::Tensor& x, const torch::Tensor& bn_a, const torch::Tensor& bn_b,
               const torch::Tensor& weight, const torch::Tensor& wsum128, const torch::Tensor& wscale,
               const torch::Tensor& bias, torch::Tensor out, int64_t kernel_h, int64_t kernel_w, int64_t stride,
               int64_t padding, int64_t dilation, bool relu, int64_t isa) {
  check_isa(isa);
  check_float_cpu(x, "input");
  check_float_cpu(out, "output");
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && out.stride(1) == 1, "int8_conv: N x C x H x W input, output with "
              "channel stride 1");
  check_conv_params(kernel_h, kernel_w, stride, padding, dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = out.size(1), OH = out.size(2), OW = out.size(3), Opad = (O + 15) / 16 * 16;
  const int64_t K4 = (kernel_h * kernel_w * C + 3) / 4;
  check_conv_window(H, W, kernel_h, kernel_w, padding, dilation);
  TORCH_CHECK(out.size(0) == N && OH == (H + 2 * padding - dilation * (kernel_h - 1) - 1) / stride + 1 &&
                  OW == (W + 2 * padding - dilation * (kernel_w - 1) - 1) / stride + 1,
              "int8_conv: output shape does not match the convolution");
  check_channel_vector(bn_a, C, torch::kFloat32, "bn_a");
  check_channel_vector(bn_b, C, torch::kFloat32, "bn_b");
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.is_contiguous() && weight.numel() == Opad * K4 * 4,
              "int8_conv: weight must be contiguous int8 [Opad/16, K4, 16, 4]");
  check_channel_vector(wsum128, Opad, torch::kInt32, "wsum128");
  check_channel_vector(wscale, Opad, torch::kFloat32, "wscale");
  check_channel_vector(bias, Opad, torch::kFloat32, "bias");
  const int64_t Hp = H + 2 * padding, Wp = W + 2 * padding;
  auto q = torch::full({N, Hp, Wp, C}, 128, torch::dtype(torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  const float* ba = bn_a.data_ptr<float>();
  const float* bb = bn_b.data_ptr<float>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  // pass 1: max |BN(x)| of each row, then of each image; pass 2: quantize into the bordered byte buffer
  std::vector<float> row_max(N * H, 0.0f), xscale(N, 1.0f);
  at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = xp + (r / H) * sN + (r % H) * sH;
      float m = 0.0f;
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) m = std::max(m, std::fabs(row[w * sW + c * sC] * ba[c] + bb[c]));
      row_max[r] = m;
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    float m = 0.0f;
    for (int64_t h = 0; h < H; ++h) m = std::max(m, row_max[n * H + h]);
    xscale[n] = m > 0.0f ? m / 127.0f : 1.0f;
  }
  uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, h = r % H;
      const float* row = xp + n * sN + h * sH;
      uint8_t* dst = qp + ((n * Hp + h + padding) * Wp + padding) * C;
      const float s = xscale[n];
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) {
          const float v = std::nearbyint((row[w * sW + c * sC] * ba[c] + bb[c]) / s);
          dst[w * C + c] = static_cast<uint8_t>(static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, v))) + 128);
        }
    }
  });
  const bool vnni = isa == kAvx512 && cpu_supports_vnni();
  auto fn = vnni ? int8_conv_rows_vnni : int8_conv_rows_portable;
  Int8ConvArgs base{qp, Hp, Wp, C, weight.data_ptr<int8_t>(), wsum128.data_ptr<int32_t>(), wscale.data_ptr<float>(),
                    bias.data_ptr<float>(), 1.0f, O, Opad, K4, kernel_h, kernel_w, stride, dilation,
                    out.data_ptr<float>(), OH, OW, out.stride(2), out.stride(3), relu ? 1 : 0, nullptr};
  at::parallel_for(0, N * OH, grain_for(OW * Opad * K4 / (vnni ? 16 : 1)), [&](int64_t b, int64_t e) {
    thread_local std::vector<uint8_t> scratch;
    if (scratch.size() < static_cast<size_t>(kInt8Pixels * K4 * 4)) scratch.resize(kInt8Pixels * K4 * 4);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      Int8ConvArgs a = base;
      a.act = qp + n * Hp * Wp * C;
      a.out = base.out + n * out.stride(0);
      a.xscale = xscale[n];
      a.scratch = scratch.data();
      fn(a, oh, oh + 1);
    }
  });
}

// Peak multiply-accumulates per second of `kind` ("binary": the XNOR/popcount step of the isa's conv
// kernel; "fma": float32 FMAs of its vector width) over all threads, each running `iters` loops; for the
// bench's roofline.
double peak_macs(const std::string& kind, int64_t isa, int64_t iters) {
  check_isa(isa);
  TORCH_CHECK(isa != kPortable, "peak_macs: the portable path has no micro-benchmark");
  TORCH_CHECK(kind == "binary" || kind == "fma", "peak_macs: kind must be binary or fma, got ", kind);
  TORCH_CHECK(kind != "fma" || __builtin_cpu_supports("fma"), "peak_macs: this CPU has no FMA");
  TORCH_CHECK(iters >= 1, "peak_macs: iters must be >= 1");
  auto fn = kind == "binary" ? (isa == kAvx512 ? peak_binary_avx512 : peak_binary_avx2)
                             : (isa == kAvx512 ? peak_fma_avx512 : peak_fma_avx2);
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> done(threads, 0);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) done[t] = fn(iters);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t total = 0;
  for (int64_t d : done) total += d;
  return static_cast<double>(total) / seconds;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  const char* names[] = {"portable", "avx2", "avx512"};
  for (int64_t i = kPortable; i <= kAvx512; ++i)
    if (cpu_supports(i)) out.emplace_back(names[i]);
  return out;
}

}  // namespace bnas_deploy

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnas-nni packed 1-bit CPU engine";
  m.def("supported_isas", &bnas_deploy::supported_isas, "instruction sets usable on this CPU");
  m.def("peak_macs", &bnas_deploy::peak_macs, "peak binary (XNOR/popcount) or fp32 FMA MACs/s of an isa path");
  m.def("pack_signs", &bnas_deploy::pack_signs, "bit planes {negative, non-zero} of thresholded input");
  m.def("binary_conv", &bnas_deploy::binary_conv, "fused threshold + sign + pack + XNOR/popcount conv (+ ReLU)");
  m.def("int8_conv", &bnas_deploy::int8_conv, "conv(BN(x)) on int8 with a per-image input scale (fp-parts int8)");
  m.def("has_vnni", &bnas_deploy::cpu_supports_vnni, "whether the int8 convs run on AVX-512 VNNI");
  m.def("zero_fill", &bnas_deploy::zero_fill, "zero a channels-last view");
  m.def("relayout", &bnas_deploy::relayout, "copy between NCHW-contiguous and channels-last layouts");
  m.def("pool2d", &bnas_deploy::pool2d, "max / average pooling on channels-last tensors");
  bnas_deploy::bind_cell_program(m);
}

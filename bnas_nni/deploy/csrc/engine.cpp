// Torch binding of the packed 1-bit engine: argument checks, scratch buffers, threading and the choice
// of instruction set. The kernels themselves live in kernels_<isa>.cpp (see kernels.h for the layouts).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
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
  auto pack_fn = isa == kAvx512 ? pack_rows_avx512 : isa == kAvx2 ? pack_rows_avx2 : pack_rows_portable;
  auto conv_fn = isa == kAvx512 ? conv_rows_avx512 : isa == kAvx2 ? conv_rows_avx2 : conv_rows_portable;
  auto task = [&](int64_t n, int64_t oh0, int64_t oh1) {
    thread_local std::vector<uint64_t> buffer;
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
  m.def("pack_signs", &bnas_deploy::pack_signs, "bit planes {negative, non-zero} of thresholded input");
  m.def("binary_conv", &bnas_deploy::binary_conv, "fused threshold + sign + pack + XNOR/popcount conv (+ ReLU)");
  m.def("zero_fill", &bnas_deploy::zero_fill, "zero a channels-last view");
  m.def("pool2d", &bnas_deploy::pool2d, "max / average pooling on channels-last tensors");
  bnas_deploy::bind_cell_program(m);
}

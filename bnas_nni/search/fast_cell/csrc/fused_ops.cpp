// Fused elementwise passes of the fast search cell (bnas_nni/search/fast_cell/) on CPU, float32.
//
// Each function does in one pass over memory what the cell otherwise does with several torch ops (each a
// full read and write of an activation-sized tensor): a conv's ReLU backward together with the per-channel
// dot products that the architecture gradient needs, the softmax-weighted sum of the convs' outputs, the
// sign and straight-through mask of a normalised state, ... The values are the same: selections and masks
// are bit-identical to the torch ops; sums and dot products are the same terms added in another order (dot
// products accumulated in double, per thread, then over threads in a fixed order).
//
// Tensors are float32 (masks and signs uint8), dense; "rows" are the pixels of a channels-last (NHWC)
// tensor, "C" its channels. The Python side (bnas_nni/search/fast_cell/kernels.py) checks dtypes and layouts and
// falls back to torch ops for anything else.
//
// Built with -ffp-contract=off so that a * b + c stays two roundings (as in torch's own kernels), and with
// target_clones on x86-64 with GCC, so one build runs the AVX-512, AVX2 or baseline version of each loop
// as the CPU allows (they compute the same values: no reassociation is allowed without -ffast-math).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BNAS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BNAS_CLONES
#endif

namespace {

// rows [r0, r1): gm = z > 0 ? g : +0 (threshold_backward), acc[c] += g * z
BNAS_CLONES void relu_backward_rows(const float* g, const float* z, float* gm, double* acc, int64_t C, int64_t r0,
                                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * C;
    const float* zr = z + r * C;
    float* o = gm + r * C;
    if (acc != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        const float zz = zr[c];
        o[c] = zz > 0.f ? gr[c] : 0.f;
        acc[c] += static_cast<double>(gr[c]) * static_cast<double>(zz);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = zr[c] > 0.f ? gr[c] : 0.f;
    }
  }
}

BNAS_CLONES void weighted_sum_rows(const float* const* z, const float* const* p, float* y, int64_t K, int64_t C,
                                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* o = y + r * C;
    const float* z0 = z[0] + r * C;
    const float* p0 = p[0];
    for (int64_t c = 0; c < C; ++c) o[c] = z0[c] * p0[c];
    for (int64_t k = 1; k < K; ++k) {
      const float* zr = z[k] + r * C;
      const float* pk = p[k];
      for (int64_t c = 0; c < C; ++c) o[c] = o[c] + zr[c] * pk[c];
    }
  }
}

// s = sign(x) + 1 (0, 1, 2), m = |x| < 1
BNAS_CLONES void sign_mask_range(const float* x, uint8_t* s, uint8_t* m, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float v = x[i];
    s[i] = static_cast<uint8_t>(1 + (v > 0.f) - (v < 0.f));
    if (m != nullptr) m[i] = static_cast<uint8_t>(v < 1.f && v > -1.f);
  }
}

BNAS_CLONES void masked_range(const float* g, const uint8_t* m, float* o, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) o[i] = m[i] ? g[i] : 0.f;
}

// y[r, e * Cb + c] += xh[r, c] * p[e]
BNAS_CLONES void add_blocks_rows(float* y, const float* xh, const float* p, int64_t E, int64_t Cb, int64_t r0,
                                 int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = xh + r * Cb;
    for (int64_t e = 0; e < E; ++e) {
      float* o = y + (r * E + e) * Cb;
      const float pe = p[e];
      for (int64_t c = 0; c < Cb; ++c) o[c] = o[c] + xr[c] * pe;
    }
  }
}

// gxh[r, c] = sum_e g[r, e * Cb + c] * p[e];  dots[e] += sum_c g[r, e * Cb + c] * (pooled[r, c] - mean[c]) * invstd[c]
BNAS_CLONES void pool_backward_rows(const float* g, const float* pooled, const float* mean, const float* invstd,
                                    const float* p, float* gxh, double* dots, int64_t E, int64_t Cb, int64_t r0,
                                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* pr = pooled + r * Cb;
    float* o = gxh != nullptr ? gxh + r * Cb : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      const float* gr = g + (r * E + e) * Cb;
      const float pe = p[e];
      if (o != nullptr) {
        if (e == 0) {
          for (int64_t c = 0; c < Cb; ++c) o[c] = gr[c] * pe;
        } else {
          for (int64_t c = 0; c < Cb; ++c) o[c] = o[c] + gr[c] * pe;
        }
      }
      if (dots != nullptr) {
        double acc = 0.0;
        for (int64_t c = 0; c < Cb; ++c) {
          const float xh = (pr[c] - mean[c]) * invstd[c];
          acc += static_cast<double>(gr[c]) * static_cast<double>(xh);
        }
        dots[e] += acc;
      }
    }
  }
}

// Tasks for n units of work with at least min_per_task each, at most one per thread.
int64_t tasks_for(int64_t n, int64_t min_per_task) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(1, min_per_task)));
}

// Split [0, n) into `tasks` fixed ranges (so sums over tasks do not depend on scheduling) and run
// fn(task, begin, end) on each, in parallel.
template <typename Fn>
void run_tasks(int64_t n, int64_t tasks, const Fn& fn) {
  if (tasks <= 1) {
    fn(0, 0, n);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(t, n * t / tasks, n * (t + 1) / tasks);
  });
}

constexpr int64_t kMinElems = 16384;  // elements per task below which threads cost more than they save

int64_t rows_per_task(int64_t row_elems) { return std::max<int64_t>(1, kMinElems / std::max<int64_t>(1, row_elems)); }

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(), what,
              " must be channels-last contiguous (4-d) or contiguous");
}

int64_t channels(const torch::Tensor& t) { return t.dim() >= 2 ? t.size(1) : 1; }

}  // namespace

// ReLU backward of a conv: gm = g where z > 0 else +0, and, with want_dots, the double-precision
// per-channel dot products sum_{pixels} g * z ([C]; undefined otherwise).
std::vector<torch::Tensor> relu_backward(const torch::Tensor& g, const torch::Tensor& z, bool want_dots) {
  check_rows(g, "g");
  check_rows(z, "z");
  TORCH_CHECK(z.sizes() == g.sizes(), "z and g must have the same shape");
  const int64_t C = channels(g), R = g.numel() / std::max<int64_t>(1, C);
  auto gm = torch::empty_like(g);
  const int64_t tasks = tasks_for(R, rows_per_task(C));
  std::vector<double> partial(want_dots ? static_cast<size_t>(tasks * C) : 0, 0.0);
  const float* gp = g.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* op = gm.data_ptr<float>();
  run_tasks(R, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    relu_backward_rows(gp, zp, op, want_dots ? partial.data() + t * C : nullptr, C, r0, r1);
  });
  torch::Tensor dots;
  if (want_dots) {
    dots = torch::zeros({C}, g.options().dtype(torch::kFloat64));
    double* d = dots.data_ptr<double>();
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < C; ++c) d[c] += partial[t * C + c];
  }
  return {gm, dots};
}

// y = sum_k z_k * p_k (p_k one weight per channel), accumulated in the order of the list.
torch::Tensor weighted_sum(const std::vector<torch::Tensor>& zs, const std::vector<torch::Tensor>& ps) {
  TORCH_CHECK(!zs.empty() && zs.size() == ps.size(), "weighted_sum needs as many weights as tensors");
  const int64_t K = static_cast<int64_t>(zs.size());
  const int64_t C = channels(zs[0]), R = zs[0].numel() / std::max<int64_t>(1, C);
  std::vector<const float*> z(K), p(K);
  for (int64_t k = 0; k < K; ++k) {
    check_rows(zs[k], "z");
    TORCH_CHECK(zs[k].sizes() == zs[0].sizes(), "all z must have the same shape");
    TORCH_CHECK(ps[k].scalar_type() == torch::kFloat32 && ps[k].is_contiguous() && ps[k].numel() == C,
                "each weight vector must be float32, contiguous, one value per channel");
    z[k] = zs[k].data_ptr<float>();
    p[k] = ps[k].data_ptr<float>();
  }
  auto y = torch::empty_like(zs[0]);
  float* yp = y.data_ptr<float>();
  run_tasks(R, tasks_for(R, rows_per_task(C * K)),
            [&](int64_t, int64_t r0, int64_t r1) { weighted_sum_rows(z.data(), p.data(), yp, K, C, r0, r1); });
  return y;
}

// (sign(x) + 1 as uint8, |x| < 1 as uint8 or an undefined tensor), same strides as x.
std::vector<torch::Tensor> sign_and_mask(const torch::Tensor& x, bool want_mask) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_non_overlapping_and_dense(),
              "x must be a dense float32 CPU tensor");
  auto s = torch::empty_like(x, x.options().dtype(torch::kUInt8));
  torch::Tensor m = want_mask ? torch::empty_like(x, x.options().dtype(torch::kUInt8)) : torch::Tensor();
  const float* xp = x.data_ptr<float>();
  uint8_t* sp = s.data_ptr<uint8_t>();
  uint8_t* mp = want_mask ? m.data_ptr<uint8_t>() : nullptr;
  run_tasks(x.numel(), tasks_for(x.numel(), kMinElems),
            [&](int64_t, int64_t i0, int64_t i1) { sign_mask_range(xp, sp, mp, i0, i1); });
  return {s, m};
}

// g where the uint8 mask is set, else +0 (g and mask with the same strides).
torch::Tensor through_mask(const torch::Tensor& g, const torch::Tensor& mask) {
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == torch::kFloat32 && g.is_non_overlapping_and_dense(),
              "g must be a dense float32 CPU tensor");
  TORCH_CHECK((mask.scalar_type() == torch::kUInt8 || mask.scalar_type() == torch::kBool) &&
                  mask.sizes() == g.sizes() && mask.strides() == g.strides(),
              "mask must be uint8 or bool with the shape and strides of g");
  auto o = torch::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const uint8_t* mp = static_cast<const uint8_t*>(mask.data_ptr());
  float* op = o.data_ptr<float>();
  run_tasks(g.numel(), tasks_for(g.numel(), kMinElems),
            [&](int64_t, int64_t i0, int64_t i1) { masked_range(gp, mp, op, i0, i1); });
  return o;
}

// y[:, e * Cb : (e + 1) * Cb] += xh * p[e] for every block e (in place).
void add_blocks_(torch::Tensor& y, const torch::Tensor& xh, const torch::Tensor& p) {
  check_rows(y, "y");
  check_rows(xh, "xh");
  const int64_t Cb = channels(xh), E = p.numel();
  TORCH_CHECK(p.scalar_type() == torch::kFloat32 && p.is_contiguous(), "p must be contiguous float32");
  TORCH_CHECK(channels(y) == E * Cb && y.numel() == xh.numel() * E, "y must have one block of xh's shape per weight");
  const int64_t R = xh.numel() / std::max<int64_t>(1, Cb);
  float* yp = y.data_ptr<float>();
  const float* xp = xh.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  run_tasks(R, tasks_for(R, rows_per_task(E * Cb)),
            [&](int64_t, int64_t r0, int64_t r1) { add_blocks_rows(yp, xp, pp, E, Cb, r0, r1); });
}

// Backward of y[:, block e] += BN(pooled) * p[e]: (sum_e g_e * p[e] or undefined, [E] double dot products
// sum g_e * BN(pooled) (zeros unless want_dots)).
std::vector<torch::Tensor> pool_backward(const torch::Tensor& g, const torch::Tensor& pooled, const torch::Tensor& mean,
                                         const torch::Tensor& invstd, const torch::Tensor& p, bool want_gxh,
                                         bool want_dots) {
  check_rows(g, "g");
  check_rows(pooled, "pooled");
  const int64_t Cb = channels(pooled), E = p.numel();
  TORCH_CHECK(channels(g) == E * Cb && g.numel() == pooled.numel() * E, "g must have one block per weight");
  for (const auto* t : {&mean, &invstd, &p})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "statistics must be contiguous float32");
  TORCH_CHECK(mean.numel() == Cb && invstd.numel() == Cb, "one mean and invstd per channel");
  const int64_t R = pooled.numel() / std::max<int64_t>(1, Cb);
  torch::Tensor gxh = want_gxh ? torch::empty_like(pooled) : torch::Tensor();
  const int64_t tasks = tasks_for(R, rows_per_task(E * Cb));
  std::vector<double> partial(want_dots ? static_cast<size_t>(tasks * E) : 0, 0.0);
  const float* gp = g.data_ptr<float>();
  const float* pp = pooled.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = p.data_ptr<float>();
  float* op = want_gxh ? gxh.data_ptr<float>() : nullptr;
  run_tasks(R, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    pool_backward_rows(gp, pp, mp, ip, wp, op, want_dots ? partial.data() + t * E : nullptr, E, Cb, r0, r1);
  });
  auto dots = torch::zeros({E}, g.options().dtype(torch::kFloat64));
  if (want_dots) {
    double* d = dots.data_ptr<double>();
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t e = 0; e < E; ++e) d[e] += partial[t * E + e];
  }
  return {gxh, dots};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("relu_backward", &relu_backward);
  m.def("weighted_sum", &weighted_sum);
  m.def("sign_and_mask", &sign_and_mask);
  m.def("through_mask", &through_mask);
  m.def("add_blocks_", &add_blocks_);
  m.def("pool_backward", &pool_backward);
}

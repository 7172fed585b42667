// A whole all-binary cell in one call, image by image: each thread takes whole images and runs every op of
// the cell on one image before the next, so an image's preprocessed states, node outputs and bit planes
// stay in its core's L2 cache from op to op, and no thread waits for another between ops. With fewer images
// than threads (batch 1) the threads work on each image together instead, splitting every op by rows.
//
// Without it the engine calls one kernel per op from Python, and at batch 32 (BNAS-A: ~6,000 kernel calls
// per forward pass) the per-call overhead and the thread wake-ups between ops cost more than the
// XNOR/popcount arithmetic. The kernels are the same ones (kernels_<isa>.cpp), called on one image at a
// time, in the same order of float operations as the per-op path: the two give the same bits.
//
// A unit may have the react block's epilogue (set_epilogue): the conv output goes to a per-thread buffer,
// then the real-valued shortcut (identity, or the 2x2 ceil-mode average pool without padding) is added and
// (R)PReLU or ReLU applied, element by element with the float operations of the float model's PyTorch ops
// in their order (no contraction: built with -ffp-contract=off), before the result goes into the node; the
// elementwise part runs over whole rows, vectorised for the path's instruction set (EpilogueRow).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace bnas_deploy {
namespace {

enum Shortcut : int64_t { kNoShortcut = 0, kIdentityShortcut = 1, kPoolShortcut = 2 };

// BN -> sign -> binary conv -> (ReLU), the BN folded into thresholds (see engine.cpp's binary_conv).
struct Unit {
  torch::Tensor t_zero, t_pos, flip, words, alpha;
  int64_t in_ch, out_ch, kh, kw, stride, pad, dil;
  bool relu;
  bool columns = false;             // column-packed (kernels.h): KH x 1 columns of column_words words
  std::vector<uint64_t> wcols;      // the weights in that layout
  bool dense = false;               // dense windows apply (dense_unit, kernels.h)
  // the react epilogue (set_epilogue): shortcut, then (y - gamma) -> prelu(slope) -> + zeta, else ReLU
  int64_t shortcut = kNoShortcut;
  bool prelu = false;
  torch::Tensor gamma, slope, zeta;   // [out_ch] float32; gamma and zeta undefined when absent
  std::vector<float> tiled_gamma, tiled_slope, tiled_zeta;   // tiled to `tile` entries (see EpilogueRow)
  int64_t tile = 0;
  bool epilogue() const { return prelu || shortcut != kNoShortcut; }
  int64_t out_size(int64_t n, int64_t k) const { return (n + 2 * pad - dil * (k - 1) - 1) / stride + 1; }
};

enum OpKind : int64_t { kZeroise = 0, kUnit = 1, kMaxPool = 2, kAvgPool = 3 };

struct Op {
  int64_t kind, unit, stride, input;
};

// A per-image activation: channel stride 1, pixel stride `px`, row stride `row`.
struct View {
  float* data;
  int64_t C, H, W, px, row;
};

struct ConstView {
  const float* data;
  int64_t C, H, W, sC, sH, sW;
};

using Clock = std::chrono::steady_clock;

// One row of the react epilogue: out[j] (+)= f(y[j] (+ add[j])) for j < n, n a whole number of pixels of O
// channels, the per-channel vectors tiled to T = a multiple of O entries (pixel-aligned chunks of T).
// f: v - gamma -> (v > 0 ? v : slope * v) -> + zeta, or ReLU. An absent gamma is tiled as +0 and an absent
// zeta as -0, which leave every float unchanged (x - +0 = x and x + -0 = x, signed zeros included); no
// (R)PReLU and no ReLU is slope 1 (1 * v = v). Each element gets the float model's operations in its order.
struct EpilogueRow {
  const float* y;
  const float* add;           // the shortcut term, or nullptr
  const float* gamma;         // [T] each
  const float* slope;
  const float* zeta;
  float* out;
  int64_t n, T;
};

template <bool kAdd, bool kRelu, bool kAccumulate>
inline __attribute__((always_inline)) void epilogue_row_body(const EpilogueRow& a) {
  for (int64_t i0 = 0; i0 < a.n; i0 += a.T) {
    const int64_t m = a.n - i0 < a.T ? a.n - i0 : a.T;
    const float* __restrict__ y = a.y + i0;
    const float* __restrict__ add = kAdd ? a.add + i0 : nullptr;
    float* __restrict__ out = a.out + i0;
    const float* __restrict__ gamma = a.gamma;
    const float* __restrict__ slope = a.slope;
    const float* __restrict__ zeta = a.zeta;
    for (int64_t j = 0; j < m; ++j) {
      float v = y[j];
      if (kAdd) v = v + add[j];
      if (kRelu) {
        v = v > 0.0f ? v : 0.0f;
      } else {
        v = v - gamma[j];
        v = v > 0.0f ? v : slope[j] * v;
        v = v + zeta[j];
      }
      out[j] = kAccumulate ? out[j] + v : v;
    }
  }
}

// the eight variants, compiled for the instruction set of the caller's path (plain loops only: no torch or
// standard-library code is emitted with AVX2/AVX-512 instructions, see kernels.h)
#define BNAS_EPILOGUE_ROW(attr, name)                                              \
  attr static void name(const EpilogueRow& a, bool add, bool relu, bool acc) {    \
    if (add) {                                                                     \
      if (relu) acc ? epilogue_row_body<true, true, true>(a) : epilogue_row_body<true, true, false>(a);      \
      else acc ? epilogue_row_body<true, false, true>(a) : epilogue_row_body<true, false, false>(a);         \
    } else {                                                                       \
      if (relu) acc ? epilogue_row_body<false, true, true>(a) : epilogue_row_body<false, true, false>(a);    \
      else acc ? epilogue_row_body<false, false, true>(a) : epilogue_row_body<false, false, false>(a);       \
    }                                                                              \
  }
BNAS_EPILOGUE_ROW(, epilogue_row_portable)
BNAS_EPILOGUE_ROW(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))), epilogue_row_avx512)
#undef BNAS_EPILOGUE_ROW

// AVX2 by hand (GCC 12 leaves most of the loops above scalar for AVX2): the same operations per element
// (compare ordered > 0, so NaN takes the negative branch as `v > 0.0f` does), eight lanes at a time
__attribute__((target("avx2"))) static void epilogue_row_avx2(const EpilogueRow& a, bool add, bool relu, bool acc) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < a.n; i0 += a.T) {
    const int64_t m = a.n - i0 < a.T ? a.n - i0 : a.T;
    const float* y = a.y + i0;
    const float* sc = add ? a.add + i0 : nullptr;
    float* out = a.out + i0;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      __m256 v = _mm256_loadu_ps(y + j);
      if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(sc + j));
      if (relu) {
        v = _mm256_and_ps(v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
      } else {
        v = _mm256_sub_ps(v, _mm256_loadu_ps(a.gamma + j));
        const __m256 positive = _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
        v = _mm256_blendv_ps(_mm256_mul_ps(_mm256_loadu_ps(a.slope + j), v), v, positive);
        v = _mm256_add_ps(v, _mm256_loadu_ps(a.zeta + j));
      }
      if (acc) v = _mm256_add_ps(_mm256_loadu_ps(out + j), v);
      _mm256_storeu_ps(out + j, v);
    }
    for (; j < m; ++j) {
      float v = y[j];
      if (add) v = v + sc[j];
      if (relu) {
        v = v > 0.0f ? v : 0.0f;
      } else {
        v = v - a.gamma[j];
        v = v > 0.0f ? v : a.slope[j] * v;
        v = v + a.zeta[j];
      }
      out[j] = acc ? out[j] + v : v;
    }
  }
}

// A barrier for the tasks of one parallel region that share an image: each task arrives with the number of
// ranks it stands for (at::parallel_for may give one task several ranks, or run them all in one task), and
// all are released once every rank has arrived. Spins briefly, then yields (a shared machine may have
// switched a team member out).
class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t ranks) : ranks_(ranks) {}
  void wait(int64_t weight) {
    const int64_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == ranks_) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins < 20000) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  const int64_t ranks_;
  std::atomic<int64_t> arrived_{0}, phase_{0};
};

// A thread's scratch buffers, kept from call to call: a cell's planes, states and node outputs take up to a
// few MB per image, and allocating them per call meant fresh zeroed pages (page faults and a memset) for every
// cell of every forward pass. Every buffer is written before it is read, so it needs no clearing.
struct Workspace {
  std::vector<uint64_t> planes, cols;
  std::vector<float> buf, ybuf, abuf;
  std::vector<float> ring;   // run_chain: the outputs of a chain's inner cells, three per image
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

template <typename T>
std::vector<T>& grown(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v;
}

// One task's part of a parallel region over a cell's images: a team's ranks [lo, hi) of `ranks` (sharing
// each image, split by rows, synchronising at `barrier`), or a thread on whole images (ranks 1, no barrier).
struct Team {
  int64_t lo, hi, ranks;
  SpinBarrier* barrier;
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * lo / ranks, n * hi / ranks}; }
  void sync() const {
    if (barrier) barrier->wait(hi - lo);
  }
};

// Fewer images than threads (batch 1): the threads share each image as a team, every stage split by rows with
// a barrier between stages, in the calling thread's scratch; otherwise each thread takes whole images in its
// own. Either way each row gets the same operations, so the same bits.
struct TeamPlan {
  int64_t ranks = 1, tasks = 0;
  Workspace* shared = nullptr;
  std::unique_ptr<SpinBarrier> barrier;
  Team team(int64_t b, int64_t e) const {
    return shared ? Team{b, e, ranks, barrier.get()} : Team{0, 1, 1, nullptr};
  }
  int64_t first_image(int64_t b) const { return shared ? 0 : b; }
  int64_t end_image(int64_t e, int64_t N) const { return shared ? N : e; }
};

// Below this many binary MACs per image (the whole call) a team costs more than it saves: waking the other
// threads takes 10-100 us on a VM with OMP_WAIT_POLICY=PASSIVE, while the binary kernels do ~250 G MAC/s per
// thread (so ~25 us of work per thread at the threshold).
std::atomic<int64_t> team_min_macs{12'000'000};

template <typename Grow>
TeamPlan team_plan(int64_t N, int64_t macs_per_image, Grow grow) {
  TeamPlan tp;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (N < threads && threads > 1 && macs_per_image >= team_min_macs.load(std::memory_order_relaxed)) {
    tp.ranks = tp.tasks = threads;
    tp.shared = &workspace();
    grow(*tp.shared);
    tp.barrier = std::make_unique<SpinBarrier>(threads);
  } else {
    tp.tasks = N;
  }
  return tp;
}

}  // namespace

class CellProgram {
 public:
  // units: (t_zero, t_pos, flip, words, alpha, in, out, kh, kw, stride, pad, dil, relu); ops: (kind, unit,
  // stride, input); node i's ops are 2i and 2i + 1, inputs index [pre0, pre1, node 0, node 1, ...].
  CellProgram(const std::vector<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>>& units,
              int64_t pre0, int64_t pre1, const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>& ops,
              std::vector<int64_t> concat, int64_t channels, int64_t stride, bool identity_residual)
      : pre0_(pre0), pre1_(pre1), concat_(std::move(concat)), C_(channels), stride_(stride),
        identity_residual_(identity_residual) {
    for (const auto& u : units) {
      Unit v{std::get<0>(u), std::get<1>(u), std::get<2>(u), std::get<3>(u), std::get<4>(u), std::get<5>(u),
             std::get<6>(u), std::get<7>(u), std::get<8>(u), std::get<9>(u), std::get<10>(u), std::get<11>(u),
             std::get<12>(u)};
      TORCH_CHECK(v.in_ch >= 1 && v.out_ch >= 1, "cell program: a unit needs at least one input and output channel");
      check_conv_params(v.kh, v.kw, v.stride, v.pad, v.dil);
      const int64_t Kw = (v.in_ch + 63) / 64, Opad = (v.out_ch + 7) / 8 * 8;
      TORCH_CHECK(v.words.scalar_type() == torch::kInt64 && v.words.is_contiguous() && v.words.dim() == 2 &&
                      v.words.size(0) == v.kh * v.kw * Kw && v.words.size(1) == Opad,
                  "cell program: packed weight of a unit has the wrong layout");
      for (const torch::Tensor* t : {&v.t_zero, &v.t_pos})
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() >= v.in_ch,
                    "cell program: threshold vectors must be contiguous float32 with one entry per input channel");
      TORCH_CHECK(v.flip.scalar_type() == torch::kInt32 && v.flip.is_contiguous() && v.flip.numel() >= v.in_ch,
                  "cell program: flip must be contiguous int32");
      TORCH_CHECK(v.alpha.scalar_type() == torch::kFloat32 && v.alpha.is_contiguous() && v.alpha.numel() >= Opad,
                  "cell program: alpha must be contiguous float32 covering the padded filters");
      v.dense = dense_unit(v.t_zero.data_ptr<float>(), v.t_pos.data_ptr<float>(), v.in_ch,
                           reinterpret_cast<const uint64_t*>(v.words.data_ptr<int64_t>()), v.kh * v.kw, Opad);
      v.columns = columns_pay(v.in_ch, v.kw);
      if (v.columns) {
        v.wcols.resize(v.kh * column_words(v.in_ch, v.kw) * Opad);
        column_weights(reinterpret_cast<const uint64_t*>(v.words.data_ptr<int64_t>()), v.kh, v.kw, v.in_ch, Opad,
                       v.wcols.data());
      }
      units_.push_back(std::move(v));
    }
    const int64_t nunits = static_cast<int64_t>(units_.size());
    TORCH_CHECK(pre0 >= 0 && pre0 < nunits && pre1 >= 0 && pre1 < nunits, "cell program: bad preprocess unit");
    TORCH_CHECK(ops.size() % 2 == 0, "cell program: ops must pair up into nodes");
    TORCH_CHECK(C_ >= 1 && stride_ >= 1 && stride_ <= kMaxStride, "cell program: bad channels or stride");
    TORCH_CHECK(!concat_.empty(), "cell program: the concat is empty");
    for (size_t k = 0; k < ops.size(); ++k) {
      Op o{std::get<0>(ops[k]), std::get<1>(ops[k]), std::get<2>(ops[k]), std::get<3>(ops[k])};
      TORCH_CHECK(o.kind >= kZeroise && o.kind <= kAvgPool, "cell program: unknown op kind");
      TORCH_CHECK(o.kind != kUnit || (o.unit >= 0 && o.unit < nunits), "cell program: bad op unit");
      TORCH_CHECK(o.stride >= 1 && o.stride <= kMaxStride, "cell program: op stride must be 1 to ", kMaxStride,
                  ", got ", o.stride);
      TORCH_CHECK(o.input >= 0 && o.input < 2 + static_cast<int64_t>(k / 2), "cell program: op input out of range");
      ops_.push_back(o);
    }
    const int64_t nstates = 2 + static_cast<int64_t>(ops_.size() / 2);
    for (int64_t idx : concat_) TORCH_CHECK(idx >= 0 && idx < nstates, "cell program: concat index out of range");
    // a node whose two ops are both Zeroise is all zeros: it gets no buffer unless a later op reads it
    const int64_t nnodes = nstates - 2;
    std::vector<bool> zero_node(nnodes, true);
    stored_.assign(nnodes, false);
    for (size_t k = 0; k < ops_.size(); ++k)
      if (ops_[k].kind != kZeroise) zero_node[k / 2] = false;
    for (const Op& o : ops_)
      if (o.kind != kZeroise && o.input >= 2) stored_[o.input - 2] = true;
    for (int64_t i = 0; i < nnodes; ++i) stored_[i] = stored_[i] || !zero_node[i];
  }

  // The react block's epilogue of unit `unit`: shortcut 0 none, 1 identity (stride 1), 2 average pool 2x2
  // (stride 2, ceil mode, padding not counted); then with `prelu`: y - gamma (if defined), prelu(slope),
  // + zeta (if defined); without: the unit's ReLU flag applies after the shortcut. Undefined or empty
  // tensors are absent.
  void set_epilogue(int64_t unit, int64_t shortcut, bool prelu, const torch::Tensor& gamma,
                    const torch::Tensor& slope, const torch::Tensor& zeta) {
    TORCH_CHECK(unit >= 0 && unit < static_cast<int64_t>(units_.size()), "cell program: bad epilogue unit");
    TORCH_CHECK(shortcut >= kNoShortcut && shortcut <= kPoolShortcut, "cell program: unknown shortcut ", shortcut);
    Unit& u = units_[unit];
    TORCH_CHECK(shortcut == kNoShortcut || (u.in_ch == u.out_ch && u.stride == (shortcut == kPoolShortcut ? 2 : 1)),
                "cell program: a shortcut needs as many output as input channels and stride 1 (identity) or 2 "
                "(average pool)");
    auto vec = [&](const torch::Tensor& t, bool required, const char* what) {
      if (!t.defined() || (!required && t.numel() == 0)) {
        TORCH_CHECK(!required, "cell program: the epilogue needs ", what);
        return torch::Tensor();
      }
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == u.out_ch,
                  "cell program: ", what, " must be contiguous float32 with one entry per output channel");
      return t;
    };
    u.shortcut = shortcut;
    u.prelu = prelu;
    u.gamma = prelu ? vec(gamma, false, "gamma") : torch::Tensor();
    u.slope = prelu ? vec(slope, true, "a prelu slope") : torch::Tensor();
    u.zeta = prelu ? vec(zeta, false, "zeta") : torch::Tensor();
    // the vectors tiled over whole pixels (about 256 floats) for the flat rows of EpilogueRow
    const int64_t O = u.out_ch;
    u.tile = O * std::max<int64_t>(1, 256 / O);
    u.tiled_gamma.assign(u.tile, 0.0f);
    u.tiled_slope.assign(u.tile, 1.0f);
    u.tiled_zeta.assign(u.tile, -0.0f);
    for (int64_t i = 0; i < u.tile; ++i) {
      if (u.gamma.defined()) u.tiled_gamma[i] = u.gamma.data_ptr<float>()[i % O];
      if (prelu) u.tiled_slope[i] = u.slope.data_ptr<float>()[i % O];
      if (u.zeta.defined()) u.tiled_zeta[i] = u.zeta.data_ptr<float>()[i % O];
    }
  }

  // Entries of the `times` vector of run(): preprocess0, preprocess1, each op, then concat + residual.
  int64_t timing_slots() const { return 3 + static_cast<int64_t>(ops_.size()); }

  // The geometry of a call whose s0 is c0 x H0 x W0 and s1 c1 x H x W, checked against the cell, and the
  // scratch it needs per image (see Workspace).
  struct Plan {
    int64_t H0, W0, H, W, OH, OW, out_ch;
    int64_t plane_words = 0, column_plane_words = 0, epilogue_floats = 0, state = 0, node = 0, scratch_nodes = 0;
    int64_t macs = 0;   // binary multiply-accumulates per image
  };

  Plan plan(int64_t c0, int64_t H0, int64_t W0, int64_t c1, int64_t H, int64_t W) const {
    const Unit& u0 = units_[pre0_];
    const Unit& u1 = units_[pre1_];
    TORCH_CHECK(c0 == u0.in_ch && c1 == u1.in_ch, "cell program: input channels do not match");
    check_conv_window(H0, W0, u0.kh, u0.kw, u0.pad, u0.dil);
    check_conv_window(H, W, u1.kh, u1.kw, u1.pad, u1.dil);
    TORCH_CHECK(W <= kMaxRow && W0 <= kMaxRow, "cell program: rows longer than ", kMaxRow, " pixels are not supported");
    TORCH_CHECK(u0.out_size(H0, u0.kh) == H && u0.out_size(W0, u0.kw) == W &&
                    u1.out_size(H, u1.kh) == H && u1.out_size(W, u1.kw) == W && u0.out_ch == C_ && u1.out_ch == C_,
                "cell program: preprocess geometry does not match the inputs");
    Plan g{H0, W0, H, W, (H - 1) / stride_ + 1, (W - 1) / stride_ + 1, static_cast<int64_t>(concat_.size()) * C_};
    const int64_t OH = g.OH, OW = g.OW;
    TORCH_CHECK(!identity_residual_ || (c1 == g.out_ch && H == OH && W == OW),
                "cell program: identity residual needs the input shape of the output");
    // the largest bit planes of any unit, the two preprocessed states, and the nodes kept in scratch
    auto plane_size = [&](const Unit& u, int64_t h, int64_t w) {
      g.plane_words = std::max(g.plane_words, (h + 2 * u.pad) * (w + 2 * u.pad) * ((u.in_ch + 63) / 64) * 2);
      if (u.columns)
        g.column_plane_words = std::max(g.column_plane_words,
                                        (h + 2 * u.pad) * u.out_size(w, u.kw) * column_words(u.in_ch, u.kw) * 2);
    };
    plane_size(u0, H0, W0);
    plane_size(u1, H, W);
    g.macs = (u0.in_ch * u0.kh * u0.kw + u1.in_ch * u1.kh * u1.kw) * C_ * H * W;   // the preprocess units
    // an epilogue's conv output goes to a scratch buffer first; a shortcut needs the conv to keep the map
    // (identity) or to give the 2x2 ceil-mode pool's map (average pool), as the float model's add does
    auto epilogue_size = [&](const Unit& u, int64_t ih, int64_t iw) {
      if (!u.epilogue()) return;
      const int64_t oh = u.out_size(ih, u.kh), ow = u.out_size(iw, u.kw);
      g.epilogue_floats = std::max(g.epilogue_floats, oh * ow * u.out_ch);
      if (u.shortcut == kIdentityShortcut)
        TORCH_CHECK(oh == ih && ow == iw, "cell program: an identity shortcut needs the conv to keep the map size");
      if (u.shortcut == kPoolShortcut)
        TORCH_CHECK(oh == (ih + 1) / 2 && ow == (iw + 1) / 2,
                    "cell program: a pooled shortcut needs the conv's output of the 2x2 average pool's size");
    };
    epilogue_size(u0, H0, W0);
    epilogue_size(u1, H, W);
    for (const Op& o : ops_) {
      const bool on_input = o.input < 2;
      const int64_t ih = on_input ? H : OH, iw = on_input ? W : OW;
      if (o.kind == kUnit) {
        const Unit& u = units_[o.unit];
        check_conv_window(ih, iw, u.kh, u.kw, u.pad, u.dil);
        TORCH_CHECK(u.in_ch == C_ && u.out_ch == C_ && u.out_size(ih, u.kh) == OH && u.out_size(iw, u.kw) == OW,
                    "cell program: an op's convolution does not map its input to the node's shape");
        plane_size(u, ih, iw);
        epilogue_size(u, ih, iw);
        g.macs += C_ * C_ * u.kh * u.kw * OH * OW;
      } else if (o.kind != kZeroise) {
        TORCH_CHECK((ih - 1) / o.stride + 1 == OH && (iw - 1) / o.stride + 1 == OW,
                    "cell program: a pool's stride does not map its input to the node's shape");
      }
    }
    for (bool stored : stored_) g.scratch_nodes += stored;
    g.state = C_ * H * W;
    g.node = C_ * OH * OW;
    return g;
  }

  // One image's inputs and output: channel stride 1, row and pixel strides; the residual (if any) with any
  // strides (the identity residual is s1 itself).
  struct ImageIO {
    const float* s0;
    int64_t s0_row, s0_px;
    const float* s1;
    int64_t s1_row, s1_px;
    float* out;
    int64_t out_row, out_px;
    const float* res;
    int64_t res_c, res_row, res_px;
  };

  // The kernels of one instruction-set path.
  struct Paths {
    void (*pack)(const PackArgs&, int64_t, int64_t);
    void (*conv)(const ConvArgs&, int64_t, int64_t);
    void (*pool)(const PoolArgs&, int64_t, int64_t);
    void (*epilogue)(const EpilogueRow&, bool, bool, bool);
    void (*columns)(const uint64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint64_t*, int64_t, int64_t);
  };

  static Paths paths_for(int64_t isa) {
    TORCH_CHECK(cpu_supports_isa(isa), "this CPU does not support the requested instruction set (id ", isa, ")");
    if (isa == 2) return {pack_rows_avx512, conv_rows_avx512, pool_rows_avx512, epilogue_row_avx512, column_rows_avx512};
    if (isa == 1) return {pack_rows_avx2, conv_rows_avx2, pool_rows_avx2, epilogue_row_avx2, column_rows};
    return {pack_rows_portable, conv_rows_portable, pool_rows_portable, epilogue_row_portable, column_rows};
  }

  static void grow(Workspace& ws, const Plan& g) {
    grown(ws.planes, g.plane_words);
    grown(ws.cols, g.column_plane_words);
    grown(ws.buf, 2 * g.state + g.scratch_nodes * g.node);
    grown(ws.ybuf, g.epilogue_floats);
    grown(ws.abuf, g.epilogue_floats);
  }

  // The whole cell on one image, by one thread or by a team (each its share of the rows of every stage, with
  // a barrier wherever a stage reads rows another wrote); `local` (or null) gathers per-op thread-seconds.
  void image(const Plan& g, const Paths& paths, Workspace& ws, const Team& t, const ImageIO& io, double* local) const {
    const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW, state = g.state, node = g.node;
    const int64_t nnodes = static_cast<int64_t>(ops_.size() / 2), nslots = timing_slots();
    const Unit& u0 = units_[pre0_];
    const Unit& u1 = units_[pre1_];
    auto tick = [&](Clock::time_point& t0, int64_t slot) {
      if (!local) return;
      const auto t1 = Clock::now();
      local[slot] += std::chrono::duration<double>(t1 - t0).count();
      t0 = t1;
    };
    // the react epilogue of unit u on output rows [h0, h1) of one image: yb holds the conv output
    // [y.H][y.W][O] (see set_epilogue); the shortcut term goes to abuf (the pool) or is read in place (the
    // identity on a dense input)
    auto epilogue_on = [&](const Unit& u, const ConstView& x, const float* yb, const View& y, bool accumulate,
                           int64_t h0r, int64_t h1r) {
      const int64_t O = u.out_ch, n = y.W * O;
      const float* add = nullptr;
      int64_t add_row = n;
      if (u.shortcut == kIdentityShortcut && x.sW == O) {
        add = x.data;
        add_row = x.sH;
      } else if (u.shortcut == kIdentityShortcut) {
        for (int64_t h = h0r; h < h1r; ++h)
          for (int64_t w = 0; w < y.W; ++w)
            for (int64_t c = 0; c < O; ++c) ws.abuf[(h * y.W + w) * O + c] = x.data[h * x.sH + w * x.sW + c];
        add = ws.abuf.data();
      } else if (u.shortcut == kPoolShortcut) {
        // avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False) as PyTorch's CPU kernel computes it:
        // a float sum from 0 over the valid window, row by row, then divided by the window's size
        for (int64_t h = h0r; h < h1r; ++h)
          for (int64_t w = 0; w < y.W; ++w) {
            const int64_t h0 = 2 * h, h1 = std::min(h0 + 2, x.H), w0 = 2 * w, w1 = std::min(w0 + 2, x.W);
            float* sp = ws.abuf.data() + (h * y.W + w) * O;
            for (int64_t c = 0; c < O; ++c) sp[c] = 0.0f;
            for (int64_t ih = h0; ih < h1; ++ih)
              for (int64_t iw = w0; iw < w1; ++iw) {
                const float* xp = x.data + ih * x.sH + iw * x.sW;
                for (int64_t c = 0; c < O; ++c) sp[c] += xp[c];
              }
            const float count = static_cast<float>((h1 - h0) * (w1 - w0));
            for (int64_t c = 0; c < O; ++c) sp[c] = sp[c] / count;
          }
        add = ws.abuf.data();
      }
      const bool relu = !u.prelu && u.relu;
      for (int64_t h = h0r; h < h1r; ++h) {
        EpilogueRow r{yb + h * n, add ? add + h * add_row : nullptr, u.tiled_gamma.data(), u.tiled_slope.data(),
                      u.tiled_zeta.data(), y.data + h * y.row, n, u.tile};
        paths.epilogue(r, add != nullptr, relu, accumulate);
      }
    };
    // one unit on one image: pack the whole (padded) image, then convolve every output row (a team: each
    // its share of the rows of every stage, with a barrier wherever a stage reads rows another wrote). Zeroing,
    // packing and column packing share one split of the padded rows (a column row reads its own plane row
    // only), so they need no barrier between them.
    auto unit_on = [&](const Unit& u, const ConstView& x, const View& y, bool accumulate) {
      const int64_t Kw = (u.in_ch + 63) / 64, Hp = x.H + 2 * u.pad, Wp = x.W + 2 * u.pad;
      PackArgs p{x.data, 1, u.in_ch, x.H, x.W, 0, x.sC, x.sH, x.sW, u.t_zero.data_ptr<float>(),
                 u.t_pos.data_ptr<float>(), reinterpret_cast<const uint32_t*>(u.flip.data_ptr<int32_t>()),
                 ws.planes.data(), Kw, Hp, Wp, u.pad};
      const auto [plo, phi] = t.share(Hp);
      if (u.pad > 0)   // else all packed
        std::memset(ws.planes.data() + plo * Wp * Kw * 2, 0, sizeof(uint64_t) * (phi - plo) * Wp * Kw * 2);
      const int64_t h0 = std::max<int64_t>(0, plo - u.pad), h1 = std::min<int64_t>(x.H, phi - u.pad);
      if (h1 > h0) paths.pack(p, h0, h1);
      if (u.columns) paths.columns(ws.planes.data(), Wp, u.in_ch, u.kw, u.stride, u.dil, y.W, ws.cols.data(), plo, phi);
      t.sync();
      // with an epilogue: the plain conv output (no ReLU) into ybuf, [y.H][y.W][out_ch]
      const bool epi = u.epilogue();
      ConvArgs c{ws.planes.data(), 1, Hp, Wp, Kw, reinterpret_cast<const uint64_t*>(u.words.data_ptr<int64_t>()),
                 u.alpha.data_ptr<float>(), u.out_ch, u.words.size(1), u.kh, u.kw, u.stride, u.dil,
                 epi ? ws.ybuf.data() : y.data, y.H, y.W, 0, epi ? y.W * u.out_ch : y.row, epi ? u.out_ch : y.px,
                 (u.relu && !epi) ? 1 : 0, (accumulate && !epi) ? 1 : 0};
      set_dense_windows(c, u.dense, u.in_ch, x.H, x.W, u.kh, u.kw, u.stride, u.pad, u.dil);
      if (u.columns) {
        c.act = ws.cols.data();
        c.Wp = y.W;
        c.Kw = column_words(u.in_ch, u.kw);
        c.w = u.wcols.data();
        c.KW = 1;
        c.wstride = 1;
      }
      const auto [lo, hi] = t.share(y.H);
      paths.conv(c, lo, hi);
      if (epi) epilogue_on(u, x, ws.ybuf.data(), y, accumulate, lo, hi);
      t.sync();   // before the next stage reuses the planes or reads this node
    };
    auto as_input = [](const View& v) { return ConstView{v.data, v.C, v.H, v.W, 1, v.row, v.px}; };
    auto t0 = Clock::now();
    float* out_n = io.out;
    const int64_t opx = io.out_px, orow = io.out_row;
    std::vector<View> states;
    states.reserve(2 + nnodes);
    View p0{ws.buf.data(), C_, H, W, C_, C_ * W}, p1{ws.buf.data() + state, C_, H, W, C_, C_ * W};
    unit_on(u0, ConstView{io.s0, u0.in_ch, g.H0, g.W0, 1, io.s0_row, io.s0_px}, p0, false);
    tick(t0, 0);
    unit_on(u1, ConstView{io.s1, u1.in_ch, H, W, 1, io.s1_row, io.s1_px}, p1, false);
    tick(t0, 1);
    states.push_back(p0);
    states.push_back(p1);
    // nodes go to per-image buffers (cache-resident; the output is written once, in the final pass)
    float* scratch = ws.buf.data() + 2 * state;
    for (int64_t i = 0; i < nnodes; ++i) {
      if (!stored_[i]) {
        states.push_back(View{nullptr, C_, OH, OW, C_, C_ * OW});
        continue;
      }
      const View target{scratch, C_, OH, OW, C_, C_ * OW};
      scratch += node;
      bool written = false;
      for (int64_t k = 2 * i; k < 2 * i + 2; ++k) {
        const Op& o = ops_[k];
        if (o.kind == kZeroise) continue;
        const View& x = states[o.input];
        if (o.kind == kUnit) {
          unit_on(units_[o.unit], as_input(x), target, written);
        } else {
          PoolArgs a{x.data, 1, x.C, x.H, x.W, 0, x.row, x.px, target.data, OH, OW, 0, target.row, target.px,
                     3, o.stride, 1, o.kind == kMaxPool ? 1 : 0, written ? 1 : 0};
          const auto [lo, hi] = t.share(OH);
          paths.pool(a, lo, hi);
          t.sync();
        }
        written = true;
        tick(t0, 2 + k);
      }
      if (!written) {
        const auto [lo, hi] = t.share(OH);
        std::memset(target.data + lo * target.row, 0, sizeof(float) * (hi - lo) * target.row);
        t.sync();
      }
      states.push_back(target);
    }
    // the output in one pass: concat of the states (all-Zeroise nodes are 0), plus the residual; the
    // same float additions as the op-by-op path's copy followed by out += residual
    const float* r = io.res;
    const int64_t rc = io.res_c, rh = io.res_row, rw = io.res_px;
    const auto [h_lo, h_hi] = t.share(OH);
    for (int64_t h = h_lo; h < h_hi; ++h)
      for (int64_t w = 0; w < OW; ++w) {
        float* o = out_n + h * orow + w * opx;
        const float* rp = r ? r + h * rh + w * rw : nullptr;
        for (size_t sl = 0; sl < concat_.size(); ++sl) {
          const View& v = states[concat_[sl]];
          float* oc = o + sl * C_;
          const float* rs = rp ? rp + static_cast<int64_t>(sl) * C_ * rc : nullptr;
          if (v.data == nullptr) {
            if (!rs) std::memset(oc, 0, sizeof(float) * C_);
            else if (rc == 1) for (int64_t c = 0; c < C_; ++c) oc[c] = 0.0f + rs[c];
            else for (int64_t c = 0; c < C_; ++c) oc[c] = 0.0f + rs[c * rc];
          } else {
            const float* x = v.data + h * v.row + w * v.px;
            if (!rs) std::memcpy(oc, x, sizeof(float) * C_);
            else if (rc == 1) for (int64_t c = 0; c < C_; ++c) oc[c] = x[c] + rs[c];
            else for (int64_t c = 0; c < C_; ++c) oc[c] = x[c] + rs[c * rc];
          }
        }
      }
    tick(t0, nslots - 1);
    t.sync();   // the next image (or cell) reuses the buffers
  }

  // out = cell(s0, s1) (+ residual): s0, s1 and out channel stride 1; res (if defined) any strides; times
  // (if defined) gathers each op's thread-seconds. A chain of one cell (run_chain, below). Returns how many
  // threads shared each image (1: each thread took whole images).
  int64_t run(const torch::Tensor& s0, const torch::Tensor& s1, torch::Tensor out, const c10::optional<torch::Tensor>& res,
              int64_t isa, const c10::optional<torch::Tensor>& times) const;

  void check_residual(const c10::optional<torch::Tensor>& res, int64_t N, const Plan& g) const {
    if (res.has_value())
      TORCH_CHECK(res->device().is_cpu() && res->scalar_type() == torch::kFloat32 && res->dim() == 4 &&
                      res->size(0) == N && res->size(1) == g.out_ch && res->size(2) == g.OH && res->size(3) == g.OW,
                  "cell program: residual shape does not match the output");
  }

  // the residual of image n: the identity (s1 itself) or `res`
  void residual_io(ImageIO& io, const c10::optional<torch::Tensor>& res, int64_t n) const {
    if (identity_residual_) {
      io.res = io.s1;
      io.res_c = 1, io.res_row = io.s1_row, io.res_px = io.s1_px;
    } else if (res.has_value()) {
      io.res = res->data_ptr<float>() + n * res->stride(0);
      io.res_c = res->stride(1), io.res_row = res->stride(2), io.res_px = res->stride(3);
    }
  }


 private:
  std::vector<Unit> units_;
  std::vector<Op> ops_;
  int64_t pre0_, pre1_;
  std::vector<int64_t> concat_;
  std::vector<bool> stored_;      // node i needs a buffer (it is computed, or a later op reads it)
  int64_t C_, stride_;
  bool identity_residual_;
};

// Consecutive cells in one parallel region: each thread (or, below as many images as threads, the team) takes
// an image through every cell of the chain before the next image, so the image's states go from cell to cell
// in cache and the threads are woken once per chain instead of once per cell. The inner cells' outputs stay in
// per-image scratch; the last two cells' outputs (the next cells' inputs) go to `out_prev` and `out_last`.
// `res`: the first cell's residual (computed beforehand); the other cells have none or the identity. Each
// image gets CellProgram::image of each cell in turn, so a chain gives the bits of its cells run one by one
// (CellProgram::run is a chain of one cell). Returns how many threads shared each image.
int64_t run_chain(const std::vector<const CellProgram*>& cells, const torch::Tensor& s0, const torch::Tensor& s1,
                  const c10::optional<torch::Tensor>& res, const c10::optional<torch::Tensor>& out_prev,
                  torch::Tensor out_last, int64_t isa, const c10::optional<std::vector<torch::Tensor>>& times) {
  const int64_t m = static_cast<int64_t>(cells.size());
  TORCH_CHECK(m >= 1, "run_chain: no cells");
  TORCH_CHECK(out_prev.has_value() == (m >= 2), "run_chain: out_prev is the output of the next-to-last cell");
  std::vector<const torch::Tensor*> tensors{&s0, &s1, &out_last};
  if (out_prev.has_value()) tensors.push_back(&*out_prev);
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->dim() == 4 && t->stride(1) == 1,
                "run_chain: inputs and outputs must be float32 N x C x H x W with channel stride 1");
  const int64_t N = s1.size(0);
  for (const torch::Tensor* t : tensors) TORCH_CHECK(t->size(0) == N, "run_chain: batch sizes differ");
  // every cell's plan: cell k reads the outputs of cells k - 2 and k - 1 (s0 and s1 for the first two)
  struct Shape {
    int64_t C, H, W;
  };
  std::vector<CellProgram::Plan> plans;
  std::vector<Shape> outs;
  int64_t ring_floats = 0;
  auto shape_of = [&](int64_t j) {   // the input of index j: -2 s0, -1 s1, else cell j's output
    if (j == -2) return Shape{s0.size(1), s0.size(2), s0.size(3)};
    if (j == -1) return Shape{s1.size(1), s1.size(2), s1.size(3)};
    return outs[j];
  };
  for (int64_t k = 0; k < m; ++k) {
    const Shape a = shape_of(k - 2), b = shape_of(k - 1);
    plans.push_back(cells[k]->plan(a.C, a.H, a.W, b.C, b.H, b.W));
    const CellProgram::Plan& g = plans.back();
    outs.push_back({g.out_ch, g.OH, g.OW});
    if (k < m - 2) ring_floats = std::max(ring_floats, g.out_ch * g.OH * g.OW);
  }
  const Shape last = outs[m - 1];
  TORCH_CHECK(out_last.size(1) == last.C && out_last.size(2) == last.H && out_last.size(3) == last.W,
              "run_chain: out_last does not match the last cell's output");
  if (m >= 2) {
    const Shape prev = outs[m - 2];
    TORCH_CHECK(out_prev->size(1) == prev.C && out_prev->size(2) == prev.H && out_prev->size(3) == prev.W,
                "run_chain: out_prev does not match the next-to-last cell's output");
  }
  cells[0]->check_residual(res, N, plans[0]);
  // profiling: per cell, the thread-seconds of each op (CellProgram::timing_slots entries)
  std::vector<double*> time_acc(m, nullptr);
  if (times.has_value()) {
    TORCH_CHECK(static_cast<int64_t>(times->size()) == m, "run_chain: one times vector per cell");
    for (int64_t k = 0; k < m; ++k) {
      const torch::Tensor& t = (*times)[k];
      TORCH_CHECK(t.scalar_type() == torch::kFloat64 && t.is_contiguous() && t.numel() >= cells[k]->timing_slots(),
                  "run_chain: times must be float64 vectors of each cell's timing_slots() entries");
      time_acc[k] = t.data_ptr<double>();
    }
  }
  std::mutex time_mutex;
  const CellProgram::Paths paths = CellProgram::paths_for(isa);
  auto grow_all = [&](Workspace& ws) {
    for (const CellProgram::Plan& g : plans) CellProgram::grow(ws, g);
    grown(ws.ring, 3 * ring_floats);
  };
  int64_t macs = 0;
  for (const CellProgram::Plan& g : plans) macs += g.macs;
  const TeamPlan tp = team_plan(N, macs, grow_all);
  at::parallel_for(0, tp.tasks, 1, [&](int64_t b, int64_t e) {
    Workspace& ws = tp.shared ? *tp.shared : workspace();
    if (!tp.shared) grow_all(ws);
    const Team t = tp.team(b, e);
    std::vector<std::vector<double>> local(m);
    if (times.has_value())
      for (int64_t k = 0; k < m; ++k) local[k].assign(cells[k]->timing_slots(), 0.0);
    for (int64_t n = tp.first_image(b); n < tp.end_image(e, N); ++n) {
      struct Ref {
        float* data;
        int64_t row, px;
      };
      // where image n's input j lives: s0 / s1, a ring slot, or the chain's two outputs
      auto ref = [&](int64_t j) -> Ref {
        if (j == -2) return {s0.data_ptr<float>() + n * s0.stride(0), s0.stride(2), s0.stride(3)};
        if (j == -1) return {s1.data_ptr<float>() + n * s1.stride(0), s1.stride(2), s1.stride(3)};
        if (j == m - 1) return {out_last.data_ptr<float>() + n * out_last.stride(0), out_last.stride(2),
                                out_last.stride(3)};
        if (j == m - 2) return {out_prev->data_ptr<float>() + n * out_prev->stride(0), out_prev->stride(2),
                                out_prev->stride(3)};
        return {ws.ring.data() + (j % 3) * ring_floats, outs[j].W * outs[j].C, outs[j].C};
      };
      for (int64_t k = 0; k < m; ++k) {
        const Ref a = ref(k - 2), c = ref(k - 1), o = ref(k);
        CellProgram::ImageIO io{a.data, a.row, a.px, c.data, c.row, c.px, o.data, o.row, o.px, nullptr, 0, 0, 0};
        cells[k]->residual_io(io, k == 0 ? res : c10::nullopt, n);
        cells[k]->image(plans[k], paths, ws, t, io, times.has_value() ? local[k].data() : nullptr);
      }
    }
    if (times.has_value()) {
      std::lock_guard<std::mutex> lock(time_mutex);
      for (int64_t k = 0; k < m; ++k)
        for (size_t j = 0; j < local[k].size(); ++j) time_acc[k][j] += local[k][j];
    }
  });
  return tp.shared ? tp.ranks : 1;
}

int64_t CellProgram::run(const torch::Tensor& s0, const torch::Tensor& s1, torch::Tensor out,
                         const c10::optional<torch::Tensor>& res, int64_t isa,
                         const c10::optional<torch::Tensor>& times) const {
  c10::optional<std::vector<torch::Tensor>> chain_times;
  if (times.has_value()) chain_times = std::vector<torch::Tensor>{*times};
  return run_chain({this}, s0, s1, res, c10::nullopt, out, isa, chain_times);
}

// The team threshold (binary MACs per image; see team_min_macs), set when `value` >= 0; returns the old one.
int64_t set_team_min_macs(int64_t value) {
  return value >= 0 ? team_min_macs.exchange(value) : team_min_macs.load();
}

void bind_cell_program(pybind11::module& m) {
  pybind11::class_<CellProgram>(m, "CellProgram", "an all-binary cell (paper or react block) run image by image in one call")
      .def(pybind11::init<const std::vector<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                                        torch::Tensor, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                        int64_t, int64_t, bool>>&,
                          int64_t, int64_t, const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>&,
                          std::vector<int64_t>, int64_t, int64_t, bool>())
      .def("set_epilogue", &CellProgram::set_epilogue, pybind11::arg("unit"), pybind11::arg("shortcut"),
           pybind11::arg("prelu"), pybind11::arg("gamma"), pybind11::arg("slope"), pybind11::arg("zeta"))
      .def("timing_slots", &CellProgram::timing_slots)
      .def("run", &CellProgram::run, pybind11::arg("s0"), pybind11::arg("s1"), pybind11::arg("out"),
           pybind11::arg("res"), pybind11::arg("isa"), pybind11::arg("times"));
  m.def("team_min_macs", &set_team_min_macs, "binary MACs per image from which threads share an image (set if >= 0)",
        pybind11::arg("value") = -1);
  m.def("run_chain", &run_chain, "consecutive cell programs, each image through all of them in one parallel region",
        pybind11::arg("cells"), pybind11::arg("s0"), pybind11::arg("s1"), pybind11::arg("res"),
        pybind11::arg("out_prev"), pybind11::arg("out_last"), pybind11::arg("isa"), pybind11::arg("times") = pybind11::none());
}

}  // namespace bnas_deploy

// ProGrad-SGD for CPU tensors: one call per parameter group.
//
// Two passes over the group, both vectorised (at::vec::Vectorized) and multi-threaded
// (at::parallel_for):
//   1. reduce  <d,g>, ||g||^2, ||d||^2 per tensor.  The work is cut into fixed chunks of
//      kChunk elements; each chunk writes its own partial sums and the partials are added
//      in chunk order afterwards, so the result does not depend on the thread count.
//   2. update  u = d - coef*g where the (per tensor or global) conflict holds, then the full
//      torch.optim.SGD update (weight decay after the projection, momentum, dampening,
//      nesterov, maximize, lr), written back in the parameter's dtype.
// Math runs in float32 (float64 when the group holds a float64 parameter).  On the CPU the
// coefficient is known to the host after pass 1, so a tensor without a conflict skips the
// read of its general gradient in pass 2.  Semantics: prograd_fast.functional.prograd_sgd.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;      // elements per work item (fixed: deterministic sums)
constexpr int64_t kSerialElems = 65536;  // below this many elements, run on one thread

// Tests switch this on: buffers created by the kernel start NaN-filled, so an element the
// kernel fails to write shows up.
std::atomic<bool> g_poison_new_buffers{false};

// ------------------------------------------------------------------ loads and stores
// Io<scalar_t, acc_t> moves kUnit elements between memory (scalar_t) and two vectors of
// acc_t.  kVec=false means "no vector path" (float64 math on a narrower tensor): scalar loop.
template <typename scalar_t, typename acc_t>
struct Io {
  static constexpr bool kVec = false;
  static constexpr int64_t kUnit = 1;
  using V = Vectorized<acc_t>;
  static void load(const scalar_t*, V&, V&) {}
  static void store(scalar_t*, const V&, const V&) {}
};

template <typename T>
struct IoSame {  // float in float, double in double
  static constexpr bool kVec = true;
  using V = Vectorized<T>;
  static constexpr int64_t kUnit = 2 * V::size();
  static inline void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static inline void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};
template <> struct Io<float, float> : IoSame<float> {};
template <> struct Io<double, double> : IoSame<double> {};

template <typename R>
struct IoReduced {  // Half / BFloat16 storage, float math
  static constexpr bool kVec = true;
  using V = Vectorized<float>;
  using RV = Vectorized<R>;
  static_assert(RV::size() == 2 * V::size(), "reduced vector must hold two float vectors");
  static constexpr int64_t kUnit = RV::size();
  static inline void load(const R* p, V& a, V& b) {
    auto ab = at::vec::convert_to_float<R>(RV::loadu(p));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
  static inline void store(R* p, const V& a, const V& b) {
    at::vec::convert_from_float<R>(a, b).store(p);
  }
};
template <> struct Io<at::Half, float> : IoReduced<at::Half> {};
template <> struct Io<at::BFloat16, float> : IoReduced<at::BFloat16> {};

template <typename acc_t>
struct Sums {
  acc_t dot = 0, nn = 0, dd = 0;
};

// ------------------------------------------------------------------ pass 1: reduce
// Partial sums of one contiguous range; g == nullptr means "no general gradient".
template <typename scalar_t, typename acc_t>
Sums<acc_t> reduce_range(const scalar_t* d, const scalar_t* g, int64_t n, acc_t s) {
  using IO = Io<scalar_t, acc_t>;
  using V = Vectorized<acc_t>;
  Sums<acc_t> out;
  int64_t i = 0;
  if constexpr (IO::kVec) {
    const V vs(s);
    V dd0(0), dd1(0), dot0(0), dot1(0), nn0(0), nn1(0);
    const int64_t nvec = n - n % IO::kUnit;
    if (g != nullptr) {
      for (; i < nvec; i += IO::kUnit) {
        V da, db, ga, gb;
        IO::load(d + i, da, db);
        IO::load(g + i, ga, gb);
        da = da * vs; db = db * vs; ga = ga * vs; gb = gb * vs;
        dd0 = dd0 + da * da; dd1 = dd1 + db * db;
        dot0 = dot0 + da * ga; dot1 = dot1 + db * gb;
        nn0 = nn0 + ga * ga; nn1 = nn1 + gb * gb;
      }
    } else {
      for (; i < nvec; i += IO::kUnit) {
        V da, db;
        IO::load(d + i, da, db);
        da = da * vs; db = db * vs;
        dd0 = dd0 + da * da; dd1 = dd1 + db * db;
      }
    }
    acc_t buf[3][V::size()];
    (dd0 + dd1).store(buf[0]);
    (dot0 + dot1).store(buf[1]);
    (nn0 + nn1).store(buf[2]);
    for (int64_t k = 0; k < V::size(); ++k) {
      out.dd += buf[0][k];
      out.dot += buf[1][k];
      out.nn += buf[2][k];
    }
  }
  for (; i < n; ++i) {
    const acc_t dv = static_cast<acc_t>(d[i]) * s;
    out.dd += dv * dv;
    if (g != nullptr) {
      const acc_t gv = static_cast<acc_t>(g[i]) * s;
      out.dot += dv * gv;
      out.nn += gv * gv;
    }
  }
  return out;
}

// ------------------------------------------------------------------ pass 2: update
// The update mirrors the reference's tensor ops rounding for rounding: torch's CPU
// ``add(x, alpha=a)`` is a fused multiply-add, ``mul`` / ``sub`` are not; so with float
// lr and no general gradient the result equals torch.optim.SGD(foreach=False) bit for bit.
template <typename acc_t>
struct Hyper {
  acc_t s;        // 1 / grad_scale (1 without AMP)
  acc_t lr, wd, mom, omd;  // omd = 1 - dampening
  bool nesterov, maximize;
  bool lr_tensor;  // the reference computes p - lr*u for a tensor lr, p + (-lr)*u for a float
};

// One range of one tensor.  g == nullptr: no projection (no general gradient or no
// conflict); buf == nullptr: no momentum; first: the buffer starts as u.
template <typename scalar_t, typename acc_t>
void update_range(scalar_t* p, const scalar_t* d, const scalar_t* g, scalar_t* buf, int64_t n,
                  acc_t coef, bool first, const Hyper<acc_t>& h) {
  using IO = Io<scalar_t, acc_t>;
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (IO::kVec) {
    const V vs(h.s), vcoef(coef), vlr(h.lr), vnlr(-h.lr), vwd(h.wd), vmom(h.mom), vomd(h.omd);
    const int64_t nvec = n - n % IO::kUnit;
    for (; i < nvec; i += IO::kUnit) {
      V u[2], pv[2];
      IO::load(d + i, u[0], u[1]);
      IO::load(p + i, pv[0], pv[1]);
      V gv[2];
      if (g != nullptr) IO::load(g + i, gv[0], gv[1]);
      V bv[2];
      if (buf != nullptr && !first) IO::load(buf + i, bv[0], bv[1]);
      for (int k = 0; k < 2; ++k) {
        u[k] = u[k] * vs;
        if (g != nullptr) u[k] = u[k] - vcoef * (gv[k] * vs);
        if (h.maximize) u[k] = u[k].neg();
        if (h.wd != 0) u[k] = at::vec::fmadd(pv[k], vwd, u[k]);
        if (buf != nullptr) {
          bv[k] = first ? u[k] : at::vec::fmadd(u[k], vomd, bv[k] * vmom);
          u[k] = h.nesterov ? at::vec::fmadd(bv[k], vmom, u[k]) : bv[k];
        }
        pv[k] = h.lr_tensor ? pv[k] - vlr * u[k] : at::vec::fmadd(u[k], vnlr, pv[k]);
      }
      IO::store(p + i, pv[0], pv[1]);
      if (buf != nullptr) IO::store(buf + i, bv[0], bv[1]);
    }
  }
  for (; i < n; ++i) {
    acc_t u = static_cast<acc_t>(d[i]) * h.s;
    const acc_t pv = static_cast<acc_t>(p[i]);
    if (g != nullptr) u = u - coef * (static_cast<acc_t>(g[i]) * h.s);
    if (h.maximize) u = -u;
    if (h.wd != 0) u = std::fma(pv, h.wd, u);
    if (buf != nullptr) {
      const acc_t b = first ? u : std::fma(u, h.omd, static_cast<acc_t>(buf[i]) * h.mom);
      buf[i] = static_cast<scalar_t>(b);
      u = h.nesterov ? std::fma(b, h.mom, u) : b;
    }
    p[i] = static_cast<scalar_t>(h.lr_tensor ? pv - h.lr * u : std::fma(u, -h.lr, pv));
  }
}

// ------------------------------------------------------------------ the group step
struct Work {  // one tensor as the kernels see it: dense, identical strides
  Tensor p, d, g, buf;     // g / buf undefined when absent
  Tensor p_user, buf_user; // set when p / buf are temporaries that must be copied back
  int64_t numel = 0;
  bool first = false;      // buffer created this step
};

struct Chunk {
  int32_t t;
  int64_t begin, len;
};

bool same_dense(const Tensor& ref, const Tensor& x) {
  return !x.defined() || (x.strides() == ref.strides() && x.sizes() == ref.sizes());
}

#define PG_DISPATCH(DTYPE, ...)                                        \
  switch (DTYPE) {                                                     \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }   \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__; break; } \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; } \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; } \
    default: TORCH_CHECK(false, "prograd_cpu: unsupported dtype ", DTYPE); \
  }

template <typename acc_t>
std::vector<Tensor> group_step(std::vector<Work>& work, bool has_momentum, acc_t lam, bool global,
                               const Hyper<acc_t>& hyper, bool amp, bool found_inf,
                               at::ScalarType acc_dtype, const Tensor& out_f, const Tensor& out_b) {
  const int64_t n = static_cast<int64_t>(work.size());
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = work[t].numel;
    total += numel;
    for (int64_t b = 0; b < numel; b += kChunk)
      chunks.push_back({static_cast<int32_t>(t), b, std::min(kChunk, numel - b)});
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t grain = total <= kSerialElems ? std::max<int64_t>(nchunks, 1) : 1;

  // Pass 1: partial sums per chunk, then per tensor in chunk order.
  std::vector<Sums<acc_t>> partial(nchunks);
  at::parallel_for(0, nchunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const Work& w = work[ch.t];
      PG_DISPATCH(w.p.scalar_type(), {
        const scalar_t* d = w.d.const_data_ptr<scalar_t>() + ch.begin;
        const scalar_t* g = w.g.defined() ? w.g.const_data_ptr<scalar_t>() + ch.begin : nullptr;
        partial[c] = reduce_range<scalar_t, acc_t>(d, g, ch.len, hyper.s);
      });
    }
  });
  std::vector<acc_t> dot(n, 0), nn(n, 0), dd(n, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int32_t t = chunks[c].t;
    dot[t] += partial[c].dot;
    nn[t] += partial[c].nn;
    dd[t] += partial[c].dd;
  }
  if (global) {  // the sum of the per-tensor values, in tensor order (as the reference)
    acc_t sd = 0, sn = 0, sdd = 0;
    for (int64_t t = 0; t < n; ++t) { sd += dot[t]; sn += nn[t]; sdd += dd[t]; }
    dot.assign(1, sd); nn.assign(1, sn); dd.assign(1, sdd);
  }
  const int64_t s = static_cast<int64_t>(dot.size());
  std::vector<acc_t> coef(s, 0), cosv(s, 0);
  std::vector<uint8_t> conflict(s, 0);
  acc_t nn_sum = 0, dd_sum = 0;
  for (int64_t k = 0; k < s; ++k) {
    const bool c = dot[k] < 0 && nn[k] > 0 && std::isfinite(dot[k]) && std::isfinite(nn[k]);
    conflict[k] = c;
    coef[k] = c ? lam * dot[k] / nn[k] : acc_t(0);
    const acc_t denom = std::sqrt(dd[k]) * std::sqrt(nn[k]);
    cosv[k] = denom > 0 ? dot[k] / denom : acc_t(0);
    nn_sum += nn[k];
    dd_sum += dd[k];
  }
  const bool skipped = amp && (found_inf || !std::isfinite(nn_sum) || !std::isfinite(dd_sum));

  if (skipped) {  // params and buffers unchanged; a buffer created this step stays zero
    for (auto& w : work)
      if (w.first) w.buf.zero_();
  } else {
    at::parallel_for(0, nchunks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        Work& w = work[ch.t];
        const int64_t k = global ? 0 : ch.t;
        const bool project = w.g.defined() && conflict[k];
        PG_DISPATCH(w.p.scalar_type(), {
          scalar_t* p = w.p.mutable_data_ptr<scalar_t>() + ch.begin;
          const scalar_t* d = w.d.const_data_ptr<scalar_t>() + ch.begin;
          const scalar_t* g = project ? w.g.const_data_ptr<scalar_t>() + ch.begin : nullptr;
          scalar_t* b = has_momentum ? w.buf.mutable_data_ptr<scalar_t>() + ch.begin : nullptr;
          update_range<scalar_t, acc_t>(p, d, g, b, ch.len, coef[k], w.first, hyper);
        });
      }
    });
    for (auto& w : work) {
      if (w.p_user.defined()) w.p_user.copy_(w.p);
      if (w.buf_user.defined()) w.buf_user.copy_(w.buf);
    }
  }

  if (out_f.defined()) {  // the caller's buffers: [dot | nn | dd | cos | coef], [conflict | skipped]
    acc_t* f = out_f.mutable_data_ptr<acc_t>();
    bool* b = out_b.mutable_data_ptr<bool>();
    for (int64_t k = 0; k < s; ++k) {
      f[k] = dot[k]; f[s + k] = nn[k]; f[2 * s + k] = dd[k]; f[3 * s + k] = cosv[k];
      f[4 * s + k] = coef[k];
      b[k] = conflict[k] != 0;
    }
    b[s] = skipped;
    return {};
  }
  auto opts = at::TensorOptions().dtype(acc_dtype);
  auto to_tensor = [&](const std::vector<acc_t>& v) {
    Tensor out = at::empty({s}, opts);
    std::copy(v.begin(), v.end(), out.mutable_data_ptr<acc_t>());
    return global ? out.reshape({}) : out;
  };
  Tensor conf = at::empty({s}, at::TensorOptions().dtype(at::kBool));
  std::copy(conflict.begin(), conflict.end(), conf.mutable_data_ptr<bool>());
  return {to_tensor(dot), to_tensor(nn), to_tensor(dd), to_tensor(cosv),
          global ? conf.reshape({}) : conf, to_tensor(coef),
          at::scalar_tensor(skipped, at::TensorOptions().dtype(at::kBool))};
}

// Returns ([dot, nn, dd, cos, conflict, coef, skipped], momentum buffers).  Buffers given as
// None are created (in the parameter's dtype) when momentum != 0.  With stats_f ([5 * S] of
// the accumulation dtype) and stats_b (bool [S + 1]) the statistics are written there instead
// and the first list is empty: a steady step then allocates nothing.
std::tuple<std::vector<Tensor>, std::vector<std::optional<Tensor>>> prograd_sgd_cpu(
    const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
    const std::vector<std::optional<Tensor>>& generals,
    std::vector<std::optional<Tensor>> bufs, double lr, const std::optional<Tensor>& lr_tensor,
    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
    double lam, bool global, const std::optional<Tensor>& grad_scale,
    const std::optional<Tensor>& found_inf, const std::optional<Tensor>& stats_f,
    const std::optional<Tensor>& stats_b) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "prograd_sgd_cpu needs at least one parameter");
  TORCH_CHECK(grads.size() == n && generals.size() == n && bufs.size() == n,
              "params, grads, general_grads and momentum_buffers must have equal lengths");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  const bool has_momentum = momentum != 0.0;
  bool any_double = false;
  std::vector<Work> work(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& d = grads[i];
    TORCH_CHECK(p.device().is_cpu() && d.device().is_cpu(), "prograd_sgd_cpu: tensor ", i,
                " is not on the CPU");
    TORCH_CHECK(d.scalar_type() == p.scalar_type() && d.sizes() == p.sizes(),
                "prograd_sgd_cpu: grad ", i, " must match its parameter's dtype and shape");
    Tensor g = generals[i].has_value() ? *generals[i] : Tensor();
    TORCH_CHECK(!g.defined() || (g.device().is_cpu() && g.scalar_type() == p.scalar_type() &&
                                 g.sizes() == p.sizes()),
                "prograd_sgd_cpu: general grad ", i, " must match its parameter");
    Tensor buf;
    Work& w = work[i];
    if (has_momentum) {
      if (bufs[i].has_value() && bufs[i]->defined()) {
        buf = *bufs[i];
        TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == p.scalar_type() &&
                        buf.sizes() == p.sizes(),
                    "prograd_sgd_cpu: momentum buffer ", i, " must match its parameter");
      } else {
        buf = at::empty_like(p, at::MemoryFormat::Contiguous);
        if (g_poison_new_buffers.load()) buf.fill_(std::numeric_limits<double>::quiet_NaN());
        w.first = true;
        bufs[i] = buf;
      }
    }
    any_double |= p.scalar_type() == at::kDouble;
    const bool direct = p.is_non_overlapping_and_dense() && same_dense(p, d) && same_dense(p, g) &&
                        same_dense(p, buf);
    if (direct) {
      w.p = p; w.d = d; w.g = g; w.buf = buf;
    } else {  // work on contiguous copies, copied back after the update
      w.p = p.contiguous();
      w.d = d.contiguous();
      w.g = g.defined() ? g.contiguous() : g;
      w.buf = buf.defined() ? buf.contiguous() : buf;
      if (!w.p.is_same(p)) w.p_user = p;
      if (buf.defined() && !w.buf.is_same(buf)) w.buf_user = buf;
    }
    w.numel = p.numel();
  }
  const double lr_value = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const double inv_scale = grad_scale.has_value() ? 1.0 / grad_scale->item<double>() : 1.0;
  const bool amp = grad_scale.has_value() || found_inf.has_value();
  const bool inf = found_inf.has_value() && found_inf->item<double>() != 0.0;
  Tensor out_f, out_b;
  if (stats_f.has_value() || stats_b.has_value()) {
    const int64_t S = global ? 1 : static_cast<int64_t>(n);
    TORCH_CHECK(stats_f.has_value() && stats_b.has_value(), "prograd_sgd_cpu: give both stats_f and stats_b");
    out_f = *stats_f;
    out_b = *stats_b;
    TORCH_CHECK(out_f.device().is_cpu() && out_f.is_contiguous() && out_f.numel() == 5 * S &&
                    out_f.scalar_type() == (any_double ? at::kDouble : at::kFloat),
                "prograd_sgd_cpu: stats_f must be a contiguous CPU tensor of 5 * S accumulation-dtype values");
    TORCH_CHECK(out_b.device().is_cpu() && out_b.is_contiguous() && out_b.numel() == S + 1 &&
                    out_b.scalar_type() == at::kBool,
                "prograd_sgd_cpu: stats_b must be a contiguous CPU bool tensor of S + 1 values");
  }
  std::vector<Tensor> stats;
  if (any_double) {
    Hyper<double> h{inv_scale, lr_value, weight_decay, momentum, 1.0 - dampening, nesterov,
                    maximize, lr_tensor.has_value()};
    stats = group_step<double>(work, has_momentum, lam, global, h, amp, inf, at::kDouble, out_f,
                               out_b);
  } else {
    // Hyper-parameters rounded to float32 as the reference's float32 tensor math does.
    Hyper<float> h{static_cast<float>(inv_scale), static_cast<float>(lr_value),
                   static_cast<float>(weight_decay), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), nesterov, maximize,
                   lr_tensor.has_value()};
    stats = group_step<float>(work, has_momentum, static_cast<float>(lam), global, h, amp, inf,
                              at::kFloat, out_f, out_b);
  }
  return {stats, bufs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ProGrad-SGD fused CPU kernel (prograd_fast)";
  m.def("prograd_sgd", &prograd_sgd_cpu, "One ProGrad-SGD step on one CPU parameter group",
        py::arg("params"), py::arg("grads"), py::arg("general_grads"),
        py::arg("momentum_buffers"), py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("lam"), py::arg("global_"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("stats_f") = py::none(), py::arg("stats_b") = py::none());
  m.def("set_poison_new_buffers", [](bool on) { g_poison_new_buffers.store(on); },
        "Tests only: fill momentum buffers created by the kernel with NaN before writing them");
  m.attr("CHUNK") = kChunk;
}

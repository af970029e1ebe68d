// ProGrad-SGD for CUDA tensors: one call per parameter group, no host synchronisation.
//
// Three launch plans, all deterministic (fixed chunking, fixed reduction trees, partials
// combined in a fixed order, no float atomics) and all reading the conflict decision from
// device memory:
//   small     one block does everything (reduce -> coefficient -> update): one launch, for
//             groups of at most kSmallMax elements (CoOp's 16x512 context; one SM streams
//             about 16K elements in the time of a second launch, so larger groups spread).
//   coop      one cooperative launch: every block loads its chunk of d and g into registers
//             and shared memory, writes its partial sums, grid.sync(), block 0 finalizes,
//             grid.sync(), every block updates from the on-chip copy: d and g are read once
//             (24 B/element for fp32 instead of 32).  Used when all chunks are co-resident
//             and the stream is not capturing a CUDA graph.  Full, aligned chunks load all
//             of a thread's 16-byte packs before using any (8 to 16 loads in flight per
//             thread, no branches); a tail chunk takes the guarded element path.  When the
//             launch is refused as too large (MPS, another context holding SMs), the error
//             is cleared, the capacity lowered and the step runs the two-pass plan.
//   two-pass  reduce (per-chunk partials) -> finalize (one block) -> update; any size.  The
//             update walks the chunks in reverse, so it starts on the tail of d and g that
//             the reduce left in L2.
// Tensors travel in a table passed by value in the kernel arguments (apex multi_tensor_apply
// style): addresses, sizes and each tensor's first chunk; a block finds its tensor by a scan
// of the chunk prefix.  Semantics: prograd_fast.functional.prograd_sgd.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace cg = cooperative_groups;

namespace prograd_cuda {

using at::Tensor;

constexpr int kMaxT = 36;            // tensors per launch table (kernel-argument space)
constexpr int64_t kChunk = 32768;    // elements per block (all plans)
constexpr int kThreads = 512;        // reduce / update blocks
constexpr int kSmallThreads = 1024;  // the single-block plan
constexpr int64_t kSmallMax = 16384; // elements for the single-block plan
constexpr int kCoopThreads = 1024;
constexpr int kCoopRegs = 8;         // elements of d and g per thread kept in registers
constexpr int kCoopSmem = 24;        // ... and in shared memory: 8 + 24 = 32 = kChunk / 1024
static_assert((kCoopRegs + kCoopSmem) * kCoopThreads == kChunk, "coop chunk layout");

std::atomic<bool> g_poison_new_buffers{false};

struct Table {
  const void* d[kMaxT];
  const void* g[kMaxT];  // nullptr: no general gradient
  void* p[kMaxT];
  void* buf[kMaxT];      // nullptr: no momentum
  int64_t numel[kMaxT];
  int chunk_start[kMaxT + 1];  // block prefix within this launch
  int slot[kMaxT];             // global partial slot of the tensor's first chunk
  int index[kMaxT];            // position of the tensor in the group
  unsigned char first[kMaxT];  // momentum buffer created this step
  unsigned char aligned[kMaxT];
  int n;
};

template <typename acc_t>
struct Hyper {
  acc_t lr, wd, mom, omd, lam;
  const float* lr_f32;        // device lr (0-d float32 tensor) or nullptr
  const double* lr_f64;       // device lr (0-d float64 tensor) or nullptr
  const float* scale_f32;     // grad_scale (float32) or nullptr
  const double* scale_f64;    // grad_scale (float64) or nullptr
  const float* found_inf;     // found_inf (float32) or nullptr
  bool amp, nesterov, maximize, global, has_momentum;
};

// ------------------------------------------------------------------ device helpers
template <typename acc_t>
__device__ __forceinline__ acc_t inv_scale(const Hyper<acc_t>& h) {
  if (h.scale_f32 != nullptr) return static_cast<acc_t>(1.0 / static_cast<double>(*h.scale_f32));
  if (h.scale_f64 != nullptr) return static_cast<acc_t>(1.0 / *h.scale_f64);
  return acc_t(1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t lr_of(const Hyper<acc_t>& h) {
  if (h.lr_f32 != nullptr) return static_cast<acc_t>(*h.lr_f32);
  if (h.lr_f64 != nullptr) return static_cast<acc_t>(*h.lr_f64);
  return h.lr;
}

template <typename acc_t>
__device__ __forceinline__ bool lr_on_device(const Hyper<acc_t>& h) {
  return h.lr_f32 != nullptr || h.lr_f64 != nullptr;
}

__device__ __forceinline__ int find_tensor(const Table& t, int block) {
  int k = 0;
  while (k + 1 < t.n && t.chunk_start[k + 1] <= block) ++k;
  return k;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of (a, b, c) over the block, valid in thread 0; fixed tree: deterministic.
template <typename T>
__device__ void block_sum3(T& a, T& b, T& c) {
  __shared__ T sh[3][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
  if (lane == 0) { sh[0][warp] = a; sh[1][warp] = b; sh[2][warp] = c; }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sh[0][lane] : T(0);
    b = lane < nwarps ? sh[1][lane] : T(0);
    c = lane < nwarps ? sh[2][lane] : T(0);
    a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
  }
  __syncthreads();
}

template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

// Accumulate <d,g>, |g|^2, |d|^2 of elements [lo, hi) of one tensor, thread-strided.
template <typename scalar_t, typename acc_t>
__device__ void accumulate(const scalar_t* d, const scalar_t* g, int64_t lo, int64_t hi,
                           bool aligned, acc_t s, acc_t& dot, acc_t& nn, acc_t& dd) {
  constexpr int V = 16 / sizeof(scalar_t);
  int64_t i = lo;
  if (aligned && ((lo % V) == 0)) {
    const int64_t vend = lo + ((hi - lo) / V) * V;
#pragma unroll 4
    for (int64_t j = lo + static_cast<int64_t>(threadIdx.x) * V; j < vend;
         j += static_cast<int64_t>(blockDim.x) * V) {
      const Pack<scalar_t, V> dp = *reinterpret_cast<const Pack<scalar_t, V>*>(d + j);
      if (g != nullptr) {
        const Pack<scalar_t, V> gp = *reinterpret_cast<const Pack<scalar_t, V>*>(g + j);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t dv = static_cast<acc_t>(dp.v[v]) * s, gv = static_cast<acc_t>(gp.v[v]) * s;
          dd += dv * dv; dot += dv * gv; nn += gv * gv;
        }
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t dv = static_cast<acc_t>(dp.v[v]) * s;
          dd += dv * dv;
        }
      }
    }
    i = vend;
  }
  for (int64_t j = i + threadIdx.x; j < hi; j += blockDim.x) {
    const acc_t dv = static_cast<acc_t>(d[j]) * s;
    dd += dv * dv;
    if (g != nullptr) {
      const acc_t gv = static_cast<acc_t>(g[j]) * s;
      dot += dv * gv; nn += gv * gv;
    }
  }
}

// Explicitly rounded arithmetic: the update mirrors the reference's tensor ops (torch's
// add(x, alpha=a) is a fused multiply-add on CUDA, mul and sub are single roundings), so
// nvcc's contraction cannot make it differ from the reference by more than the reductions.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// The projected SGD update of one element (all in acc_t).  dv, gv are already unscaled.
template <typename acc_t>
__device__ __forceinline__ void sgd_element(acc_t dv, acc_t gv, bool project, acc_t coef,
                                            acc_t& pv, acc_t& bv, bool first,
                                            const Hyper<acc_t>& h, acc_t lr) {
  acc_t u = project ? sub_rn(dv, mul_rn(coef, gv)) : dv;
  if (h.maximize) u = -u;
  if (h.wd != acc_t(0)) u = fma_rn(pv, h.wd, u);
  if (h.has_momentum) {
    bv = first ? u : fma_rn(u, h.omd, mul_rn(bv, h.mom));
    u = h.nesterov ? fma_rn(bv, h.mom, u) : bv;
  }
  pv = lr_on_device(h) ? sub_rn(pv, mul_rn(lr, u)) : fma_rn(u, -lr, pv);
}

// Update elements [lo, hi) of tensor k (thread-strided), reading d and g from memory.
template <typename scalar_t, typename acc_t>
__device__ void update_range(const Table& t, int k, int64_t lo, int64_t hi, bool project,
                             acc_t coef, acc_t s, const Hyper<acc_t>& h, acc_t lr) {
  const scalar_t* d = static_cast<const scalar_t*>(t.d[k]);
  const scalar_t* g = project ? static_cast<const scalar_t*>(t.g[k]) : nullptr;
  scalar_t* p = static_cast<scalar_t*>(t.p[k]);
  scalar_t* buf = h.has_momentum ? static_cast<scalar_t*>(t.buf[k]) : nullptr;
  const bool first = t.first[k];
  constexpr int V = 16 / sizeof(scalar_t);
  int64_t i = lo;
  if (t.aligned[k] && (lo % V) == 0) {
    const int64_t vend = lo + ((hi - lo) / V) * V;
    using P = Pack<scalar_t, V>;
#pragma unroll 4
    for (int64_t j = lo + static_cast<int64_t>(threadIdx.x) * V; j < vend;
         j += static_cast<int64_t>(blockDim.x) * V) {
      const P dp = *reinterpret_cast<const P*>(d + j);
      P gp, bp;
      P pp = *reinterpret_cast<const P*>(p + j);
      if (project) gp = *reinterpret_cast<const P*>(g + j);
      if (buf != nullptr && !first) bp = *reinterpret_cast<const P*>(buf + j);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t pv = static_cast<acc_t>(pp.v[v]);
        acc_t bv = (buf != nullptr && !first) ? static_cast<acc_t>(bp.v[v]) : acc_t(0);
        const acc_t gv = project ? mul_rn(static_cast<acc_t>(gp.v[v]), s) : acc_t(0);
        sgd_element<acc_t>(mul_rn(static_cast<acc_t>(dp.v[v]), s), gv, project, coef, pv, bv, first, h, lr);
        pp.v[v] = static_cast<scalar_t>(pv);
        bp.v[v] = static_cast<scalar_t>(bv);
      }
      *reinterpret_cast<P*>(p + j) = pp;
      if (buf != nullptr) *reinterpret_cast<P*>(buf + j) = bp;
    }
    i = vend;
  }
  for (int64_t j = i + threadIdx.x; j < hi; j += blockDim.x) {
    acc_t pv = static_cast<acc_t>(p[j]);
    acc_t bv = (buf != nullptr && !first) ? static_cast<acc_t>(buf[j]) : acc_t(0);
    const acc_t gv = project ? mul_rn(static_cast<acc_t>(g[j]), s) : acc_t(0);
    sgd_element<acc_t>(mul_rn(static_cast<acc_t>(d[j]), s), gv, project, coef, pv, bv, first, h, lr);
    p[j] = static_cast<scalar_t>(pv);
    if (buf != nullptr) buf[j] = static_cast<scalar_t>(bv);
  }
}

template <typename scalar_t>
__device__ void zero_range(scalar_t* buf, int64_t lo, int64_t hi) {
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) buf[j] = static_cast<scalar_t>(0.0f);
}

// Statistics layout: st = [dot | nn | dd | cos | coef] (S each), flags = [conflict (S) | skipped].
// Thread 0 only: per-slot stats from st[0..3S) already holding dot, nn, dd.
template <typename acc_t>
__device__ void finish_stats(acc_t* st, bool* flags, int S, const Hyper<acc_t>& h) {
  acc_t nn_sum = 0, dd_sum = 0;
  for (int k = 0; k < S; ++k) {
    const acc_t dot = st[k], nn = st[S + k], dd = st[2 * S + k];
    const bool c = dot < acc_t(0) && nn > acc_t(0) && isfinite(dot) && isfinite(nn);
    const acc_t denom = sqrt(dd) * sqrt(nn);
    st[3 * S + k] = denom > acc_t(0) ? dot / denom : acc_t(0);
    st[4 * S + k] = c ? h.lam * dot / nn : acc_t(0);
    flags[k] = c;
    nn_sum += nn;
    dd_sum += dd;
  }
  const bool inf = h.found_inf != nullptr && *h.found_inf != 0.0f;
  flags[S] = h.amp && (inf || !isfinite(nn_sum) || !isfinite(dd_sum));
}

// Combine chunk partials (slot-major [slot][3]) into st/flags; any block size.
template <typename acc_t>
__device__ void finalize_body(const acc_t* partials, const int* slot_start, int n, acc_t* st,
                              bool* flags, const Hyper<acc_t>& h) {
  const volatile acc_t* part = partials;  // written by other blocks (coop plan): no stale L1
  if (h.global) {
    acc_t a = 0, b = 0, c = 0;
    const int total = slot_start[n];
    for (int s = threadIdx.x; s < total; s += blockDim.x) {
      a += part[3 * s]; b += part[3 * s + 1]; c += part[3 * s + 2];
    }
    block_sum3(a, b, c);
    if (threadIdx.x == 0) {
      st[0] = a; st[1] = b; st[2] = c;
      finish_stats(st, flags, 1, h);
    }
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    for (int k = warp; k < n; k += nwarps) {  // one warp per tensor
      acc_t a = 0, b = 0, c = 0;
      for (int s = slot_start[k] + lane; s < slot_start[k + 1]; s += 32) {
        a += part[3 * s]; b += part[3 * s + 1]; c += part[3 * s + 2];
      }
      a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
      if (lane == 0) { st[k] = a; st[n + k] = b; st[2 * n + k] = c; }
    }
    __syncthreads();
    if (threadIdx.x == 0) finish_stats(st, flags, n, h);
  }
  __syncthreads();
}

// ------------------------------------------------------------------ kernels
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Table t, acc_t* partials,
                                                          Hyper<acc_t> h) {
  const int k = find_tensor(t, blockIdx.x);
  const int c = blockIdx.x - t.chunk_start[k];
  const int64_t lo = static_cast<int64_t>(c) * kChunk;
  const int64_t hi = min64(lo + kChunk, t.numel[k]);
  acc_t dot = 0, nn = 0, dd = 0;
  accumulate<scalar_t, acc_t>(static_cast<const scalar_t*>(t.d[k]),
                              static_cast<const scalar_t*>(t.g[k]), lo, hi, t.aligned[k],
                              inv_scale(h), dot, nn, dd);
  block_sum3(dot, nn, dd);
  if (threadIdx.x == 0) {
    acc_t* out = partials + 3 * static_cast<int64_t>(t.slot[k] + c);
    out[0] = dot; out[1] = nn; out[2] = dd;
  }
}

template <typename acc_t>
__global__ void finalize_kernel(const acc_t* partials, const int* slot_start, int n, acc_t* st,
                                bool* flags, Hyper<acc_t> h) {
  finalize_body(partials, slot_start, n, st, flags, h);
}

// Chunks in reverse: the blocks scheduled first take the end of the group, the part of d
// and g the reduce read last and that is most likely still in L2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) update_kernel(Table t, const acc_t* st,
                                                          const bool* flags, int S,
                                                          Hyper<acc_t> h) {
  const int block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int k = find_tensor(t, block);
  const int c = block - t.chunk_start[k];
  const int64_t lo = static_cast<int64_t>(c) * kChunk;
  const int64_t hi = min64(lo + kChunk, t.numel[k]);
  if (flags[S]) {  // skipped (AMP): leave everything, a new buffer stays zero
    if (h.has_momentum && t.first[k]) zero_range(static_cast<scalar_t*>(t.buf[k]), lo, hi);
    return;
  }
  const int slot = h.global ? 0 : t.index[k];
  const bool project = t.g[k] != nullptr && flags[slot];
  update_range<scalar_t, acc_t>(t, k, lo, hi, project, st[4 * S + slot], inv_scale(h), h,
                                lr_of(h));
}

// One block: reduce every tensor, compute the coefficient(s), update.  One dtype, n <= kMaxT.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) small_kernel(Table t, acc_t* st, bool* flags,
                                                              Hyper<acc_t> h) {
  __shared__ acc_t sums[3][kMaxT];
  const acc_t s = inv_scale(h);
  for (int k = 0; k < t.n; ++k) {
    acc_t dot = 0, nn = 0, dd = 0;
    accumulate<scalar_t, acc_t>(static_cast<const scalar_t*>(t.d[k]),
                                static_cast<const scalar_t*>(t.g[k]), 0, t.numel[k],
                                t.aligned[k], s, dot, nn, dd);
    block_sum3(dot, nn, dd);
    if (threadIdx.x == 0) { sums[0][k] = dot; sums[1][k] = nn; sums[2][k] = dd; }
  }
  const int S = h.global ? 1 : t.n;
  if (threadIdx.x == 0) {
    if (h.global) {  // the sum of the per-tensor values, in tensor order (as the reference)
      acc_t a = 0, b = 0, c = 0;
      for (int k = 0; k < t.n; ++k) { a += sums[0][k]; b += sums[1][k]; c += sums[2][k]; }
      st[0] = a; st[1] = b; st[2] = c;
    } else {
      for (int k = 0; k < t.n; ++k) { st[k] = sums[0][k]; st[S + k] = sums[1][k]; st[2 * S + k] = sums[2][k]; }
    }
    finish_stats(st, flags, S, h);
  }
  __syncthreads();  // st / flags were written by thread 0 of this block: visible after the barrier
  const bool skipped = flags[S];
  const acc_t lr = lr_of(h);
  for (int k = 0; k < t.n; ++k) {
    if (skipped) {
      if (h.has_momentum && t.first[k]) zero_range(static_cast<scalar_t*>(t.buf[k]), 0, t.numel[k]);
      continue;
    }
    const int slot = h.global ? 0 : k;
    const bool project = t.g[k] != nullptr && flags[slot];
    update_range<scalar_t, acc_t>(t, k, 0, t.numel[k], project, st[4 * S + slot], s, h, lr);
  }
}

// Single pass: d and g of the block's chunk stay on chip between the reduction and the update.
// A thread keeps kPer = 32 elements: the first kCoopRegs in registers, the rest in shared
// memory (slot q of thread tid at smem[(q - kCoopRegs) * kCoopThreads + tid]: conflict-free).
// Full chunks of aligned tensors: element q of thread tid is element (j * kCoopThreads + tid)
// * V + v of the chunk (q = j * V + v, V elements per 16-byte pack); the loads of kBatch packs
// of d and of g are issued before any is used, with no bounds checks.  Other chunks (the
// tail of a tensor, unaligned tensors): element q is q * kCoopThreads + tid, guarded.
constexpr int kPer = kChunk / kCoopThreads;
constexpr int kBatch = 2;  // 16-byte packs of each stream in flight per thread per batch

template <typename scalar_t>
__device__ __forceinline__ void coop_keep(int q, float dv, float gv, float* rd, float* rg,
                                          float* sd, float* sg, int tid) {
  if (q < kCoopRegs) {
    rd[q] = dv;
    rg[q] = gv;
  } else {
    sd[(q - kCoopRegs) * kCoopThreads + tid] = dv;
    sg[(q - kCoopRegs) * kCoopThreads + tid] = gv;
  }
}

// kBatch 16-byte packs of one stream for thread tid, starting at pack row j0 (no checks).
template <typename Pk>
__device__ __forceinline__ void load_batch(Pk (&dst)[kBatch], const Pk* __restrict__ src,
                                           int j0, int tid) {
#pragma unroll
  for (int b = 0; b < kBatch; ++b) dst[b] = src[(j0 + b) * kCoopThreads + tid];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCoopThreads, 1) coop_kernel(Table t, float* partials,
                                                               const int* slot_start, int n_all,
                                                               float* st, bool* flags, int S,
                                                               Hyper<float> h) {
  extern __shared__ float smem[];  // [2][kCoopSmem * kCoopThreads]: d then g
  float* sd = smem;
  float* sg = smem + kCoopSmem * kCoopThreads;
  constexpr int V = 16 / sizeof(scalar_t);
  constexpr int P = kPer / V;  // packs per thread
  static_assert(P % kBatch == 0 && kCoopRegs % V == 0, "coop pack layout");
  using Pk = Pack<scalar_t, V>;
  const int k = find_tensor(t, blockIdx.x);
  const int c = blockIdx.x - t.chunk_start[k];
  const int64_t lo = static_cast<int64_t>(c) * kChunk;
  const int len = static_cast<int>(min64(kChunk, t.numel[k] - lo));
  const scalar_t* __restrict__ d = static_cast<const scalar_t*>(t.d[k]) + lo;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(t.g[k]);
  if (g != nullptr) g += lo;
  const bool full = len == kChunk && t.aligned[k];
  const float s = inv_scale(h);
  const int tid = threadIdx.x;
  float rd[kCoopRegs], rg[kCoopRegs];
  float dot = 0, nn = 0, dd = 0;
  if (full) {
    const Pk* __restrict__ dpk = reinterpret_cast<const Pk*>(d);
    const Pk* __restrict__ gpk = reinterpret_cast<const Pk*>(g);
#pragma unroll
    for (int j0 = 0; j0 < P; j0 += kBatch) {
      Pk dp[kBatch], gp[kBatch];
      load_batch(dp, dpk, j0, tid);
      if (g != nullptr) load_batch(gp, gpk, j0, tid);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float dv = static_cast<float>(dp[b].v[v]) * s;
          const float gv = g != nullptr ? static_cast<float>(gp[b].v[v]) * s : 0.0f;
          coop_keep<scalar_t>((j0 + b) * V + v, dv, gv, rd, rg, sd, sg, tid);
          dd += dv * dv; dot += dv * gv; nn += gv * gv;
        }
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int e = q * kCoopThreads + tid;
      float dv = 0, gv = 0;
      if (e < len) {
        dv = static_cast<float>(d[e]) * s;
        if (g != nullptr) gv = static_cast<float>(g[e]) * s;
      }
      coop_keep<scalar_t>(q, dv, gv, rd, rg, sd, sg, tid);
      dd += dv * dv; dot += dv * gv; nn += gv * gv;
    }
  }
  block_sum3(dot, nn, dd);
  if (tid == 0) {
    float* out = partials + 3 * static_cast<int64_t>(t.slot[k] + c);
    out[0] = dot; out[1] = nn; out[2] = dd;
  }
  cg::grid_group grid = cg::this_grid();
  grid.sync();
  if (blockIdx.x == 0) finalize_body(partials, slot_start, n_all, st, flags, h);
  grid.sync();
  const volatile bool* vflags = flags;
  const volatile float* vst = st;
  const bool skipped = vflags[S];
  scalar_t* __restrict__ p = static_cast<scalar_t*>(t.p[k]) + lo;
  scalar_t* __restrict__ buf = h.has_momentum ? static_cast<scalar_t*>(t.buf[k]) + lo : nullptr;
  const bool first = t.first[k];
  if (skipped) {
    if (buf != nullptr && first) zero_range(buf, 0, len);
    return;
  }
  const int slot = h.global ? 0 : t.index[k];
  const bool project = g != nullptr && vflags[slot];
  const float coef = vst[4 * S + slot];
  const float lr = lr_of(h);
  const bool read_buf = buf != nullptr && !first;
  auto kept_d = [&](int q) { return q < kCoopRegs ? rd[q] : sd[(q - kCoopRegs) * kCoopThreads + tid]; };
  auto kept_g = [&](int q) { return q < kCoopRegs ? rg[q] : sg[(q - kCoopRegs) * kCoopThreads + tid]; };
  if (full) {
    Pk* __restrict__ ppk = reinterpret_cast<Pk*>(p);
    Pk* __restrict__ bpk = reinterpret_cast<Pk*>(buf);
#pragma unroll
    for (int j0 = 0; j0 < P; j0 += kBatch) {
      Pk pp[kBatch], bp[kBatch];
      load_batch(pp, ppk, j0, tid);
      if (read_buf) load_batch(bp, bpk, j0, tid);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int q = (j0 + b) * V + v;
          float pv = static_cast<float>(pp[b].v[v]);
          float bv = read_buf ? static_cast<float>(bp[b].v[v]) : 0.0f;
          sgd_element<float>(kept_d(q), kept_g(q), project, coef, pv, bv, first, h, lr);
          pp[b].v[v] = static_cast<scalar_t>(pv);
          bp[b].v[v] = static_cast<scalar_t>(bv);
        }
        ppk[(j0 + b) * kCoopThreads + tid] = pp[b];
        if (buf != nullptr) bpk[(j0 + b) * kCoopThreads + tid] = bp[b];
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int e = q * kCoopThreads + tid;
      if (e < len) {
        float pv = static_cast<float>(p[e]);
        float bv = read_buf ? static_cast<float>(buf[e]) : 0.0f;
        sgd_element<float>(kept_d(q), kept_g(q), project, coef, pv, bv, first, h, lr);
        p[e] = static_cast<scalar_t>(pv);
        if (buf != nullptr) buf[e] = static_cast<scalar_t>(bv);
      }
    }
  }
}

// ------------------------------------------------------------------ host side
struct Work {
  Tensor p, d, g, buf;
  Tensor p_user, buf_user;
  bool first = false;
  int slot = 0;   // first partial slot
  int chunks = 0;
};

constexpr size_t kCoopSmemBytes = 2 * kCoopSmem * kCoopThreads * sizeof(float);

// Co-resident blocks of coop_kernel<scalar_t> per device (0: not possible): computed once,
// lowered when a cooperative launch is refused as too large (the real limit can be lower than
// the occupancy query says: MPS, another context).  Tests may override it.
std::mutex g_coop_mu;
std::map<std::pair<int, int>, int> g_coop_capacity;  // (device, element size) -> blocks
std::atomic<int> g_coop_override{-1};

template <typename scalar_t>
int coop_capacity(int device) {
  std::lock_guard<std::mutex> lock(g_coop_mu);
  const int forced = g_coop_override.load();
  const auto key = std::make_pair(device, static_cast<int>(sizeof(scalar_t)));
  auto it = g_coop_capacity.find(key);
  if (it != g_coop_capacity.end()) return forced >= 0 ? forced : it->second;
  // Measured once even when a test overrides it: the measurement also raises the kernel's
  // dynamic shared-memory limit, without which any cooperative launch of it would fail.
  int capacity = 0;
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.cooperativeLaunch &&
      prop.sharedMemPerBlockOptin >= kCoopSmemBytes + 1024) {
    if (cudaFuncSetAttribute(coop_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kCoopSmemBytes)) == cudaSuccess) {
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, coop_kernel<scalar_t>,
                                                        kCoopThreads, kCoopSmemBytes) == cudaSuccess)
        capacity = per_sm * prop.multiProcessorCount;
    }
  }
  (void)cudaGetLastError();  // a refused attribute must not poison later launches
  g_coop_capacity[key] = capacity;
  return forced >= 0 ? forced : capacity;
}

template <typename scalar_t>
void lower_coop_capacity(int device, int below) {
  std::lock_guard<std::mutex> lock(g_coop_mu);
  if (g_coop_override.load() >= 0) return;  // a test's value stays
  int& cap = g_coop_capacity[std::make_pair(device, static_cast<int>(sizeof(scalar_t)))];
  cap = std::max(0, std::min(cap, below - 1));
}

// Split the tensors of one dtype into launch tables (at most kMaxT tensors each).
std::vector<Table> make_tables(std::vector<Work>& work, const std::vector<int>& members) {
  std::vector<Table> tables;
  Table t{};
  auto flush = [&]() {
    if (t.n > 0) tables.push_back(t);
    t = Table{};
  };
  for (int i : members) {
    if (t.n == kMaxT) flush();
    Work& w = work[i];
    const int k = t.n;
    t.d[k] = w.d.const_data_ptr();
    t.g[k] = w.g.defined() ? w.g.const_data_ptr() : nullptr;
    t.p[k] = w.p.data_ptr();
    t.buf[k] = w.buf.defined() ? w.buf.data_ptr() : nullptr;
    t.numel[k] = w.p.numel();
    t.chunk_start[k + 1] = t.chunk_start[k] + w.chunks;
    t.slot[k] = w.slot;
    t.index[k] = i;
    t.first[k] = w.first;
    auto al = [](const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    t.aligned[k] = al(t.d[k]) && al(t.g[k]) && al(t.p[k]) && al(t.buf[k]);
    t.n = k + 1;
  }
  flush();
  return tables;
}

#define PG_CUDA_DISPATCH(DTYPE, ...)                                         \
  switch (DTYPE) {                                                           \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }         \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__; break; }       \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; }       \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; } \
    default: TORCH_CHECK(false, "prograd_cuda: unsupported dtype ", DTYPE);  \
  }

bool same_dense(const Tensor& ref, const Tensor& x) {
  return !x.defined() || (x.strides() == ref.strides() && x.sizes() == ref.sizes());
}

enum Plan { kAuto = 0, kSmall = 1, kCoop = 2, kTwoPass = 3 };

bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

template <typename acc_t>
void run_two_pass(std::vector<Work>& work, const std::map<at::ScalarType, std::vector<int>>& by_dtype,
                  Hyper<acc_t> h, const Tensor& partials, const Tensor& slot_start, acc_t* stp,
                  bool* flp, int S, cudaStream_t stream) {
  const int n = static_cast<int>(work.size());
  acc_t* part = partials.mutable_data_ptr<acc_t>();
  std::vector<std::pair<at::ScalarType, std::vector<Table>>> launches;
  for (auto& kv : by_dtype) launches.emplace_back(kv.first, make_tables(work, kv.second));
  for (auto& l : launches)
    for (Table& t : l.second)
      if (t.chunk_start[t.n] > 0)
        PG_CUDA_DISPATCH(l.first, reduce_kernel<scalar_t, acc_t><<<t.chunk_start[t.n], kThreads, 0, stream>>>(t, part, h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<acc_t><<<1, 1024, 0, stream>>>(part, slot_start.const_data_ptr<int>(), n, stp, flp, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Last table first, each walked in reverse (update_kernel): the reverse of the reduce order.
  for (auto l = launches.rbegin(); l != launches.rend(); ++l)
    for (auto t = l->second.rbegin(); t != l->second.rend(); ++t)
      if (t->chunk_start[t->n] > 0)
        PG_CUDA_DISPATCH(l->first, update_kernel<scalar_t, acc_t><<<t->chunk_start[t->n], kThreads, 0, stream>>>(*t, stp, flp, S, h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
int run(std::vector<Work>& work, int plan, Hyper<acc_t> h, const Tensor& partials,
        const Tensor& slot_start, const Tensor& st, const Tensor& flags) {
  const int n = static_cast<int>(work.size());
  const int S = h.global ? 1 : n;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::map<at::ScalarType, std::vector<int>> by_dtype;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    by_dtype[work[i].p.scalar_type()].push_back(i);
    total += work[i].p.numel();
  }
  const int total_chunks = work.back().slot + work.back().chunks;
  const bool one_table = by_dtype.size() == 1 && n <= kMaxT;
  const at::ScalarType dtype = work[0].p.scalar_type();
  const int device = work[0].p.get_device();
  const bool capturing = stream_capturing(stream);
  acc_t* stp = st.mutable_data_ptr<acc_t>();
  bool* flp = flags.mutable_data_ptr<bool>();
  if (plan == kAuto) {
    plan = kTwoPass;
    if (one_table && total <= kSmallMax) {
      plan = kSmall;
    } else if (std::is_same<acc_t, float>::value && one_table && dtype != at::kDouble &&
               !capturing) {  // a cooperative launch is not a known-capturable plan
      int cap = 0;
      PG_CUDA_DISPATCH(dtype, cap = coop_capacity<scalar_t>(device));
      if (total_chunks > 0 && total_chunks <= cap) plan = kCoop;
    }
  }
  if (plan == kSmall) {
    TORCH_CHECK(one_table, "prograd_cuda: the small plan needs one dtype and at most ", kMaxT, " tensors");
    Table t = make_tables(work, by_dtype.begin()->second).at(0);
    PG_CUDA_DISPATCH(dtype, small_kernel<scalar_t, acc_t><<<1, kSmallThreads, 0, stream>>>(t, stp, flp, h));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return plan;
  }
  if (plan == kCoop) {
    if constexpr (std::is_same<acc_t, float>::value) {
      TORCH_CHECK(one_table && dtype != at::kDouble,
                  "prograd_cuda: the cooperative plan needs one float32/16/bf16 dtype and at most ", kMaxT, " tensors");
      TORCH_CHECK(!capturing, "prograd_cuda: the cooperative plan is not used under CUDA-graph "
                  "capture; use the auto or two_pass plan");
      int cap = 0;
      PG_CUDA_DISPATCH(dtype, cap = coop_capacity<scalar_t>(device));
      TORCH_CHECK(total_chunks > 0 && total_chunks <= cap, "prograd_cuda: cooperative plan needs ",
                  total_chunks, " co-resident blocks, the device holds ", cap);
      Table t = make_tables(work, by_dtype.begin()->second).at(0);
      float* part = partials.mutable_data_ptr<float>();
      const int* ss = slot_start.const_data_ptr<int>();
      int n_all = n;
      int S_ = S;
      Hyper<float> hf = h;
      void* args[] = {&t, &part, &ss, &n_all, &stp, &flp, &S_, &hf};
      cudaError_t err = cudaSuccess;
      PG_CUDA_DISPATCH(dtype, err = cudaLaunchCooperativeKernel(
          reinterpret_cast<void*>(coop_kernel<scalar_t>), dim3(total_chunks), dim3(kCoopThreads),
          args, kCoopSmemBytes, stream));
      if (err == cudaSuccess) return plan;
      TORCH_CHECK(err == cudaErrorCooperativeLaunchTooLarge, "prograd_cuda: cooperative launch failed: ",
                  cudaGetErrorString(err));
      (void)cudaGetLastError();  // clear it: the step continues with the two-pass plan
      PG_CUDA_DISPATCH(dtype, lower_coop_capacity<scalar_t>(device, total_chunks));
      plan = kTwoPass;
    } else {
      TORCH_CHECK(false, "prograd_cuda: the cooperative plan needs float32 math (no float64 tensors)");
    }
  }
  run_two_pass<acc_t>(work, by_dtype, h, partials, slot_start, stp, flp, S, stream);
  return kTwoPass;
}

}  // namespace prograd_cuda

using namespace prograd_cuda;

// See the binding (prograd_cuda_bind.cpp) for the argument list.  Returns (buffers, partials
// workspace, plan used).  The statistics go into the caller's stats_f ([dot | nn | dd | cos |
// coef], S each, accumulation dtype) and stats_b ([conflict (S) | skipped], bool), and the
// per-tensor partial-slot starts come from the caller's slot_starts (int32, n + 1, on the
// device): made once per group, so a step allocates nothing and copies nothing from the host
// (the workspace grows only with the group).  A device lr, grad_scale and found_inf are read
// by the kernels; a CPU lr must arrive as the float ``lr`` (the Python side does that).
std::tuple<std::vector<std::optional<Tensor>>, Tensor, int64_t>
prograd_sgd_cuda(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<std::optional<Tensor>>& generals,
                 std::vector<std::optional<Tensor>> bufs, double lr,
                 const std::optional<Tensor>& lr_tensor, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, double lam, bool global,
                 const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                 const std::optional<Tensor>& workspace, const Tensor& slot_starts,
                 const Tensor& stats_f, const Tensor& stats_b, int64_t plan) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "prograd_sgd_cuda needs at least one parameter");
  TORCH_CHECK(grads.size() == n && generals.size() == n && bufs.size() == n,
              "params, grads, general_grads and momentum_buffers must have equal lengths");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "prograd_sgd_cuda: parameters must be CUDA tensors");
  c10::cuda::CUDAGuard guard(device);
  const bool has_momentum = momentum != 0.0;
  bool any_double = false;
  std::vector<Work> work(n);
  int slot = 0;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& d = grads[i];
    TORCH_CHECK(p.device() == device && d.device() == device, "prograd_sgd_cuda: tensor ", i,
                " is not on ", device);
    TORCH_CHECK(d.scalar_type() == p.scalar_type() && d.sizes() == p.sizes(),
                "prograd_sgd_cuda: grad ", i, " must match its parameter's dtype and shape");
    TORCH_CHECK(p.numel() < (int64_t{1} << 40), "prograd_sgd_cuda: tensor too large");
    Tensor g = generals[i].has_value() ? *generals[i] : Tensor();
    TORCH_CHECK(!g.defined() || (g.device() == device && g.scalar_type() == p.scalar_type() &&
                                 g.sizes() == p.sizes()),
                "prograd_sgd_cuda: general grad ", i, " must match its parameter");
    Tensor buf;
    Work& w = work[i];
    if (has_momentum) {
      if (bufs[i].has_value() && bufs[i]->defined()) {
        buf = *bufs[i];
        TORCH_CHECK(buf.device() == device && buf.scalar_type() == p.scalar_type() &&
                        buf.sizes() == p.sizes(),
                    "prograd_sgd_cuda: momentum buffer ", i, " must match its parameter");
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
    } else {
      w.p = p.contiguous();
      w.d = d.contiguous();
      w.g = g.defined() ? g.contiguous() : g;
      w.buf = buf.defined() ? buf.contiguous() : buf;
      if (!w.p.is_same(p)) w.p_user = p;
      if (buf.defined() && !w.buf.is_same(buf)) w.buf_user = buf;
    }
    w.slot = slot;
    w.chunks = static_cast<int>((p.numel() + kChunk - 1) / kChunk);
    slot += w.chunks;
  }
  const at::ScalarType acc = any_double ? at::kDouble : at::kFloat;
  const int64_t S = global ? 1 : static_cast<int64_t>(n);
  TORCH_CHECK(slot_starts.device() == device && slot_starts.scalar_type() == at::kInt &&
                  slot_starts.numel() == static_cast<int64_t>(n) + 1 && slot_starts.is_contiguous(),
              "prograd_sgd_cuda: slot_starts must be int32 [n + 1] on ", device);
  TORCH_CHECK(stats_f.device() == device && stats_f.scalar_type() == acc &&
                  stats_f.numel() == 5 * S && stats_f.is_contiguous(),
              "prograd_sgd_cuda: stats_f must be ", acc, " [5 * S] on ", device);
  TORCH_CHECK(stats_b.device() == device && stats_b.scalar_type() == at::kBool &&
                  stats_b.numel() == S + 1 && stats_b.is_contiguous(),
              "prograd_sgd_cuda: stats_b must be bool [S + 1] on ", device);
  Tensor part;
  const int64_t need = 3 * std::max(slot, 1);
  if (workspace.has_value() && workspace->defined() && workspace->scalar_type() == acc &&
      workspace->device() == device && workspace->numel() >= need) {
    part = *workspace;
  } else {
    part = at::empty({need}, at::TensorOptions().dtype(acc).device(device));
  }
  // Device scalars: used in place when already on the device in a dtype the kernels read
  // (the usual case: no allocation, no copy); anything else is converted.
  auto on_device = [&](const Tensor& t, bool allow_f64) {
    TORCH_CHECK(t.numel() == 1, "prograd_sgd_cuda: lr, grad_scale and found_inf must have one element");
    const bool ok = t.device() == device &&
                    (t.scalar_type() == at::kFloat || (allow_f64 && t.scalar_type() == at::kDouble));
    return ok ? t : t.to(device, at::kFloat);
  };
  Tensor lr_dev, scale_dev, inf_dev;
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->device() == device,
                "prograd_sgd_cuda: a tensor lr must be on the parameters' device (", device, ")");
    lr_dev = on_device(*lr_tensor, true);
  }
  if (grad_scale.has_value()) scale_dev = on_device(*grad_scale, true);
  if (found_inf.has_value()) inf_dev = on_device(*found_inf, false);
  const bool amp = grad_scale.has_value() || found_inf.has_value();
  int used = 0;
  auto fill = [&](auto& h) {
    using acc_t = std::remove_reference_t<decltype(h.lr)>;
    h.lr = static_cast<acc_t>(lr);
    h.wd = static_cast<acc_t>(weight_decay);
    h.mom = static_cast<acc_t>(momentum);
    h.omd = static_cast<acc_t>(1.0 - dampening);
    h.lam = static_cast<acc_t>(lam);
    h.lr_f32 = lr_dev.defined() && lr_dev.scalar_type() == at::kFloat ? lr_dev.const_data_ptr<float>() : nullptr;
    h.lr_f64 = lr_dev.defined() && lr_dev.scalar_type() == at::kDouble ? lr_dev.const_data_ptr<double>() : nullptr;
    h.scale_f32 = scale_dev.defined() && scale_dev.scalar_type() == at::kFloat ? scale_dev.const_data_ptr<float>() : nullptr;
    h.scale_f64 = scale_dev.defined() && scale_dev.scalar_type() == at::kDouble ? scale_dev.const_data_ptr<double>() : nullptr;
    h.found_inf = inf_dev.defined() ? inf_dev.const_data_ptr<float>() : nullptr;
    h.amp = amp;
    h.nesterov = nesterov;
    h.maximize = maximize;
    h.global = global;
    h.has_momentum = has_momentum;
  };
  if (any_double) {
    Hyper<double> h{};
    fill(h);
    used = run<double>(work, static_cast<int>(plan), h, part, slot_starts, stats_f, stats_b);
  } else {
    Hyper<float> h{};
    fill(h);
    used = run<float>(work, static_cast<int>(plan), h, part, slot_starts, stats_f, stats_b);
  }
  for (auto& w : work) {
    if (w.p_user.defined()) w.p_user.copy_(w.p);
    if (w.buf_user.defined()) w.buf_user.copy_(w.buf);
  }
  return {bufs, part, used};
}

void set_poison_new_buffers_cuda(bool on) { g_poison_new_buffers.store(on); }
int64_t chunk_elements_cuda() { return kChunk; }
void set_coop_capacity_override_cuda(int64_t blocks) {
  g_coop_override.store(static_cast<int>(blocks));
}

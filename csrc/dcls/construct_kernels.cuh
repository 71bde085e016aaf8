// CUDA kernels of the fused DCLS kernel construction. Torch-free: compiled by nvcc (csrc/cuda/dcls.cu)
// and by g++ through the emulation header (tests/emu/dcls_emu.cpp). Math lives in dcls.h, shared
// with the CPU kernels.
//
// A block owns `cpb` channels. Per chunk of `kch` elements it builds, in shared memory, one profile
// row per (channel, element, axis) -- O(kch * (n0 + n1 + n2)) per channel, never the kernel-sized
// temporaries of the reference -- then:
//   forward:  each thread accumulates up to kMaxPerThread window taps in registers over the chunks;
//             windows larger than kMaxPerThread * blockDim.x are split across gridDim.y;
//   backward: each (element, axis, tap) contracts grad_K with the other two axes' profiles, then one
//             thread per element reduces that to grad-weight, grad-P and grad-SIG (one pass).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "trous/common.h"
#include "trous/convert.cuh"
#include "dcls/construct.h"

namespace trous {
namespace dcls {
namespace construct {

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 8;        // forward outputs a thread keeps in registers
constexpr int kSmemBudget = 48 * 1024;  // bytes of dynamic shared memory (no opt-in needed)

// Work split of one launch (computed on the host by make_plan).
struct Plan {
  int cpb;    // channels per block
  int kch;    // elements per shared-memory chunk
  int tile;   // window taps per block (forward)
  int tiles;  // gridDim.y (forward)
  index_t blocks;
  size_t smem;  // bytes
  bool ok;      // false: one element's profiles do not fit in shared memory, or too many tiles
};

// Shared-memory elements per (channel, element): forward = profiles + scale + 3 sums;
// backward = profiles, d/dmu, d/dsigma, contractions + 3 sums + 3 signs.
TROUS_HOST_DEVICE inline int fwd_stride(const ConstructArgs& a) { return a.taps() + 1; }
TROUS_HOST_DEVICE inline int fwd_per_elem(const ConstructArgs& a) { return fwd_stride(a) + kAxes; }
TROUS_HOST_DEVICE inline int bwd_per_elem(const ConstructArgs& a) { return 4 * a.taps() + 2 * kAxes; }

// `threads` = blockDim.x of the launch.
inline Plan make_plan(const ConstructArgs& a, int threads, size_t elem_bytes, bool forward) {
  Plan p{};
  const index_t window = a.window();
  const index_t per = forward ? fwd_per_elem(a) : bwd_per_elem(a);
  const index_t budget = (index_t)(kSmemBudget / elem_bytes);
  p.tile = (int)(window < (index_t)kMaxPerThread * threads ? window : (index_t)kMaxPerThread * threads);
  p.tiles = forward ? (int)ceil_div(window, p.tile) : 1;
  // Enough channels per block to give every thread work, as far as shared memory allows.
  const index_t work = forward ? window : (index_t)(a.kc > 0 ? a.kc : 1) * a.taps();
  index_t cpb = threads / (work > 0 ? work : 1);
  cpb = cpb < 1 ? 1 : (cpb > 64 ? 64 : cpb);
  if (cpb > a.channels) cpb = a.channels > 0 ? a.channels : 1;
  const index_t kc = a.kc > 0 ? a.kc : 1;
  while (cpb > 1 && cpb * per * kc > budget) --cpb;
  index_t kch = budget / (cpb * per);
  p.ok = kch >= 1 && p.tiles <= 65535;
  kch = kch > kc ? kc : (kch < 1 ? 1 : kch);
  p.cpb = (int)cpb;
  p.kch = (int)kch;
  p.blocks = ceil_div(a.channels, cpb);
  p.smem = (size_t)(cpb * kch * per) * elem_bytes;
  return p;
}

// Profile row of element k of channel c along window axis ax, and its sum. Optional derivative rows.
template <typename T, typename A>
TROUS_DEVICE inline A fill_profile(const ConstructArgs& a, const T* __restrict__ P, const T* __restrict__ SIG,
                                   index_t c, int k, int ax, A* g, A* dmu, A* dsig, A* sig_sign) {
  const int j = a.p_index(ax);
  if (j < 0) {  // padding axis of size 1
    g[0] = A(1);
    if (dmu) dmu[0] = A(0), dsig[0] = A(0), *sig_sign = A(0);
    return A(1);
  }
  const index_t off = ((index_t)j * a.channels + c) * a.kc + k;
  const AxisParams<A> ap = axis_params(a.version, to_acc<A>(P[off]), SIG ? to_acc<A>(SIG[off]) : A(0), a.off(j));
  A s = A(0);
  // An element with a NaN (or, where the formula gives NaN, infinite) P / SIG: a NaN row (params.h).
  const bool poison = axis_poisons(a.version, to_acc<A>(P[off]), SIG ? to_acc<A>(SIG[off]) : A(0));
  for (int t = 0; t < a.n(ax); ++t) {
    Tap<A> tp = tap(a.version, t, ap.mu, ap.sigma, ap.inv_sigma);
    if (poison) tp.g = tp.dmu = tp.dsig = acc_nan<A>();
    g[t] = tp.g;
    if (dmu) dmu[t] = tp.dmu, dsig[t] = tp.dsig;
    s += tp.g;
  }
  if (sig_sign) *sig_sign = ap.sig_sign;
  return s;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    construct_forward(const T* __restrict__ w, const T* __restrict__ P, const T* __restrict__ SIG, T* __restrict__ K,
                      ConstructArgs a, Plan plan) {
  TROUS_DYNAMIC_SHARED(A, smem);
  const int taps = a.taps(), stride = fwd_stride(a);
  A* sums = smem + plan.cpb * plan.kch * stride;  // [cpb * kch][3]
  const index_t c_first = (index_t)blockIdx.x * plan.cpb;
  const int nch = (int)(a.channels - c_first < plan.cpb ? a.channels - c_first : plan.cpb);
  const int window = (int)a.window();
  const int t_first = (int)blockIdx.y * plan.tile;
  const int ntap = window - t_first < plan.tile ? window - t_first : plan.tile;
  const int items = nch * ntap;
  const int n1 = a.size[1], n2 = a.size[2], s1 = a.size[0], s2 = a.size[0] + a.size[1];

  A acc[kMaxPerThread];
#pragma unroll
  for (int r = 0; r < kMaxPerThread; ++r) acc[r] = A(0);

  for (int k0 = 0; k0 < a.kc; k0 += plan.kch) {
    const int nk = a.kc - k0 < plan.kch ? a.kc - k0 : plan.kch;
    for (int it = threadIdx.x; it < nch * nk * kAxes; it += blockDim.x) {
      const int ax = it % kAxes, e = it / kAxes;
      A* row = smem + e * stride + a.row_start(ax);
      sums[it] = fill_profile<T, A>(a, P, SIG, c_first + e / nk, k0 + e % nk, ax, row, nullptr, nullptr, nullptr);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nch * nk; e += blockDim.x) {
      const A* s = sums + e * kAxes;
      const index_t c = c_first + e / nk;
      const A wk = to_acc<A>(w[c * a.kc + k0 + e % nk]);
      // A non-finite weight poisons the whole window (params.h), not only the element's support.
      smem[e * stride + taps] = acc_finite(wk) ? wk / norm_denominator(a.version, s[0] * s[1] * s[2]) : acc_nan<A>();
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMaxPerThread; ++r) {
      const int item = (int)threadIdx.x + r * (int)blockDim.x;
      if (item < items) {
        const int ch = item / ntap, p = t_first + item % ntap;
        const int i0 = p / (n1 * n2), i1 = (p / n2) % n1, i2 = p % n2;
        const A* e_row = smem + ch * nk * stride;
        A sum = acc[r];
        for (int k = 0; k < nk; ++k, e_row += stride) sum += e_row[taps] * e_row[i0] * e_row[s1 + i1] * e_row[s2 + i2];
        acc[r] = sum;
      }
    }
    __syncthreads();  // the next chunk overwrites the profiles
  }
#pragma unroll
  for (int r = 0; r < kMaxPerThread; ++r) {
    const int item = (int)threadIdx.x + r * (int)blockDim.x;
    if (item < items) K[(c_first + item / ntap) * window + t_first + item % ntap] = from_acc<T>(acc[r]);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    construct_backward(const T* __restrict__ gK, const T* __restrict__ w, const T* __restrict__ P,
                       const T* __restrict__ SIG, T* __restrict__ gw, T* __restrict__ gP, T* __restrict__ gSIG,
                       ConstructArgs a, Plan plan) {
  TROUS_DYNAMIC_SHARED(A, smem);
  const int taps = a.taps();
  const int E = plan.cpb * plan.kch;
  A* g = smem;                // [E][taps] profiles
  A* dm = g + E * taps;       // [E][taps] d profile / d mu
  A* ds = dm + E * taps;      // [E][taps] d profile / d sigma
  A* u = ds + E * taps;       // [E][taps] grad_K contracted with the other axes' profiles
  A* sums = u + E * taps;     // [E][3]
  A* sgn = sums + E * kAxes;  // [E][3] dsigma / dSIG
  const index_t c_first = (index_t)blockIdx.x * plan.cpb;
  const int nch = (int)(a.channels - c_first < plan.cpb ? a.channels - c_first : plan.cpb);
  const index_t window = a.window();
  const index_t plane = a.channels * a.kc;
  const int strides[kAxes] = {a.size[1] * a.size[2], a.size[2], 1};
  const bool sigma = has_sigma(a.version);

  for (int k0 = 0; k0 < a.kc; k0 += plan.kch) {
    const int nk = a.kc - k0 < plan.kch ? a.kc - k0 : plan.kch;
    for (int it = threadIdx.x; it < nch * nk * kAxes; it += blockDim.x) {
      const int ax = it % kAxes, e = it / kAxes, o = e * taps + a.row_start(ax);
      sums[it] = fill_profile<T, A>(a, P, SIG, c_first + e / nk, k0 + e % nk, ax, g + o, dm + o, ds + o, sgn + it);
    }
    __syncthreads();
    for (int it = threadIdx.x; it < nch * nk * taps; it += blockDim.x) {
      const int e = it / taps, q = it % taps;
      const int ax = q < a.size[0] ? 0 : (q < a.size[0] + a.size[1] ? 1 : 2);
      const int t = q - a.row_start(ax);
      // Padding axes are never needed; taps where the profile and its derivatives vanish neither.
      A sum = A(0);
      if (a.p_index(ax) >= 0 && (g[it] != A(0) || dm[it] != A(0) || ds[it] != A(0))) {
        const int pa = ax == 0 ? 1 : 0, qa = ax == 2 ? 1 : 2;  // the other two axes
        const A* gp = g + e * taps + a.row_start(pa);
        const A* gq = g + e * taps + a.row_start(qa);
        const T* G = gK + (c_first + e / nk) * window + (index_t)t * pick(strides, ax);
        const int np = a.n(pa), nq = a.n(qa), sp = pick(strides, pa), sq = pick(strides, qa);
        for (int i = 0; i < np; ++i) {
          if (gp[i] == A(0)) continue;
          A inner = A(0);
          for (int jq = 0; jq < nq; ++jq) inner += gq[jq] * to_acc<A>(G[i * sp + jq * sq]);
          sum += gp[i] * inner;
        }
      }
      u[it] = sum;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nch * nk; e += blockDim.x) {
      const index_t c = c_first + e / nk;
      const int k = k0 + e % nk;
      const A* s = sums + e * kAxes;
      const int last = e * taps + a.row_start(2);  // axis 2 always moves
      A amp = A(0);
      for (int t = 0; t < a.size[2]; ++t) amp += u[last + t] * g[last + t];
      const A denom = norm_denominator(a.version, s[0] * s[1] * s[2]);
      const A scale = to_acc<A>(w[c * a.kc + k]) / denom;
      gw[c * a.kc + k] = from_acc<T>(amp / denom);
      const A norm = a.version == Version::kV0 ? A(0) : -amp * scale / denom;
      for (int ax = 0; ax < kAxes; ++ax) {
        const int j = a.p_index(ax);
        if (j < 0) continue;
        const A others = (ax == 0 ? A(1) : s[0]) * (ax == 1 ? A(1) : s[1]) * (ax == 2 ? A(1) : s[2]);
        const int o = e * taps + a.row_start(ax);
        A dmu = A(0), dsig = A(0);
        for (int t = 0; t < a.n(ax); ++t) {
          const A dg = scale * u[o + t] + norm * others;
          dmu += dg * dm[o + t];
          dsig += dg * ds[o + t];
        }
        const index_t off = (index_t)j * plane + c * a.kc + k;
        gP[off] = from_acc<T>(dmu);
        if (gSIG) gSIG[off] = from_acc<T>(sigma ? dsig * sgn[e * kAxes + ax] : A(0));
      }
    }
    __syncthreads();  // the next chunk overwrites the shared rows
  }
}

}  // namespace construct
}  // namespace dcls
}  // namespace trous

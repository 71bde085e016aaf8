// CUDA kernels of the banded grouped 1-D DCLS convolution. Torch-free: compiled by nvcc
// (csrc/cuda/dcls_banded.cu) and by g++ through the emulation header (tests/emu/dcls_banded_emu.cpp).
// Math and layouts in dcls_banded.h. Accumulation is fp32 for every input type; K, bias and grad_K
// are fp32. Every band is read through band_of (clamped), so a bad band never reads out of bounds.
//   forward_kernel          one thread per output (n, o, t): bias + gather over the row's band
//   backward_input_kernel   one thread per input (n, c, u): gather over the taps of c's group
//                           that land on u (no scatter, no atomics, every element written)
//   backward_kernel_kernel  one block per (o, i) row: per tap s, a block reduction over (n, t)
// The forward / input kernels use grid-stride loops over a 64-bit flattened index, so the launcher
// may cap the grid; the grad_K kernel strides over rows the same way.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "trous/common.h"
#include "trous/convert.cuh"
#include "dcls/banded.h"

namespace trous {
namespace dcls {
// Own namespace: dcls_conv_kernels.cuh already has dcls::kThreads / load_f in other translation units.
namespace banded {

constexpr int kThreads = 256;           // every kernel; a multiple of 32 (block_sum uses full warps)
constexpr unsigned kMaxBlocks = 65535;  // grid cap of the launchers; the kernels loop past it

TROUS_DEVICE inline int imax(int a, int b) { return a > b ? a : b; }
TROUS_DEVICE inline int imin(int a, int b) { return a < b ? a : b; }

// out[n, o, t] = bias[o] + sum_i sum_{s in band(o, i)} K[o, i, s] x[n, g I + i, t stride + s - pad].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const float* __restrict__ K, const int32_t* __restrict__ band,
                   const float* __restrict__ bias, T* __restrict__ out, BandedGeom g) {
  const int I = g.in_per_group(), opg = g.out_per_group();
  const index_t total = g.N * g.c_out * g.l_out;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t q = (index_t)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += step) {
    const int t = (int)(q % g.l_out);
    const index_t no = q / g.l_out;
    const int o = (int)(no % g.c_out);
    const index_t n = no / g.c_out;
    const int u0 = t * g.stride - g.pad;  // input position of tap 0
    // Taps whose input lies in [0, l_in): clipping the loop bounds replaces a per-tap test.
    const int s_in0 = -u0, s_in1 = g.l_in - u0;
    const T* xg = x + (n * g.c_in + (index_t)(o / opg) * I) * g.l_in;
    float acc = bias ? bias[o] : 0.f;
    for (int i = 0; i < I; ++i) {
      const index_t row = (index_t)o * I + i;
      int lo, hi;
      band_of(band, g, row, lo, hi);
      const int s0 = imax(lo, s_in0), s1 = imin(hi, s_in1);
      const float* kr = K + row * g.dks;
      const T* xr = xg + (index_t)i * g.l_in;
      for (int s = s0; s < s1; ++s) acc += kr[s] * to_float(xr[u0 + s]);
    }
    out[q] = from_float<T>(acc);
  }
}

// grad_x[n, c, u] = sum_{o in c's group} sum_{s in band(o, c % I), u + pad - s = t stride, 0 <= t < l_out}
//                   K[o, c % I, s] grad_out[n, o, t]. A gather: every grad_x element is written once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_input_kernel(const T* __restrict__ gout, const float* __restrict__ K, const int32_t* __restrict__ band,
                          T* __restrict__ gx, BandedGeom g) {
  const int I = g.in_per_group(), opg = g.out_per_group();
  const index_t total = g.N * g.c_in * g.l_in;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t q = (index_t)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += step) {
    const int u = (int)(q % g.l_in);
    const index_t nc = q / g.l_in;
    const int c = (int)(nc % g.c_in);
    const index_t n = nc / g.c_in;
    const int i = c % I, o0 = (c / I) * opg;
    const int v = u + g.pad;  // = t stride + s
    // Taps reaching an output inside [0, l_out): v - (l_out - 1) stride <= s <= v.
    const int s_out0 = v - (g.l_out - 1) * g.stride, s_out1 = v + 1;
    const T* gp = gout + (n * g.c_out + o0) * g.l_out;
    float acc = 0.f;
    for (int oo = 0; oo < opg; ++oo) {
      const index_t row = (index_t)(o0 + oo) * I + i;
      int lo, hi;
      band_of(band, g, row, lo, hi);
      const int s0 = imax(lo, s_out0), s1 = imin(hi, s_out1);
      if (s0 >= s1) continue;
      const float* kr = K + row * g.dks;
      const T* gr = gp + (index_t)oo * g.l_out;
      // First tap of the right residue: v - s must be a multiple of stride (v - s0 >= 0 here).
      for (int s = s0 + (v - s0) % g.stride; s < s1; s += g.stride) acc += kr[s] * to_float(gr[(v - s) / g.stride]);
    }
    gx[q] = from_float<T>(acc);
  }
}

// Sum of v over the block, valid in thread 0. Every thread of the block must call it (it has
// barriers) and blockDim.x must be a multiple of 32 (full-mask shuffles). red: 32 shared floats,
// reusable right after the call (the trailing barrier orders warp 0's reads before the next writes).
TROUS_DEVICE inline float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {  // a whole warp: the full mask is exact
    v = lane < nwarps ? red[lane] : 0.f;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  }
  __syncthreads();
  return v;
}

// grad_K[o, i, s] = sum_{n, t} grad_out[n, o, t] x[n, g I + i, t stride + s - pad] for s in band(o, i),
// 0 elsewhere. Block per row (o, i), rows strided by gridDim.x; block of kThreads (multiple of 32).
// Fixed reduction order: deterministic. Every branch around block_sum depends only on (row, s), so
// the whole block takes it together and the barriers stay uniform.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel_kernel(const T* __restrict__ gout, const T* __restrict__ x, const int32_t* __restrict__ band,
                           float* __restrict__ gK, BandedGeom g) {
  __shared__ float red[32];
  const int I = g.in_per_group(), opg = g.out_per_group();
  const index_t rows = (index_t)g.c_out * I;
  const int nthr = (int)blockDim.x;
  for (index_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int o = (int)(row / I), i = (int)(row % I);
    const int c = (o / opg) * I + i;
    int lo, hi;
    band_of(band, g, row, lo, hi);
    float* dst = gK + row * g.dks;
    for (int s = 0; s < g.dks; ++s) {
      if (s < lo || s >= hi) {
        if (threadIdx.x == 0) dst[s] = 0.f;
        continue;
      }
      // Outputs t whose input u = t stride + s - pad lies in [0, l_in).
      const int a = g.pad - s, b = g.l_in - 1 + g.pad - s;
      const int t0 = a > 0 ? (a + g.stride - 1) / g.stride : 0;
      const int t1 = b < 0 ? 0 : imin(g.l_out, b / g.stride + 1);
      const int cnt = t1 - t0;
      float acc = 0.f;
      if (cnt > 0) {
        // (n, t) pairs flattened as n cnt + (t - t0); each thread walks its own ones with a
        // precomputed (n, t) step instead of a 64-bit division per pair.
        const index_t pairs = g.N * cnt;
        const int dn = nthr / cnt, dt = nthr % cnt;
        index_t n = threadIdx.x / cnt;
        int t = (int)(threadIdx.x % cnt);
        for (index_t m = threadIdx.x; m < pairs; m += nthr) {
          const int tt = t0 + t;
          acc += to_float(gout[(n * g.c_out + o) * g.l_out + tt]) *
                 to_float(x[(n * g.c_in + c) * g.l_in + (tt * g.stride + s - g.pad)]);
          n += dn;
          t += dt;
          if (t >= cnt) t -= cnt, ++n;
        }
      }
      acc = block_sum(acc, red);
      if (threadIdx.x == 0) dst[s] = acc;
    }
  }
}

}  // namespace banded
}  // namespace dcls
}  // namespace trous

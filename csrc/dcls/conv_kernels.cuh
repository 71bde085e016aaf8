// CUDA kernels of the direct depthwise DCLS convolution. Torch-free: compiled by nvcc
// (csrc/cuda/dcls_conv.cu) and by g++ through the emulation header (tests/emu/dcls_conv_emu.cpp).
// Math in dcls_conv.h, shared with the CPU kernels.
//
// Every block works for one channel and first builds that channel's taps in shared memory
// (build_taps_block): element profiles (one element per thread), the dense window (one window
// position per thread, elements summed in order k = 0..kc-1), then an ordered compaction of the
// support into a tap list (position, coefficient, linear offset). Nothing kernel-sized is written to
// global memory. Then:
//   dcls_forward_kernel     one output per thread and step: sum over the taps, interior fast path
//   dcls_grad_input_kernel  one input position per thread: gather of grad_out over the flipped taps
//   dcls_grad_taps_kernel   G[tap] over a contiguous range of the channel's (n, output) positions,
//                           one tap per thread, grad_out staged in shared memory; per-split partials
//                           in a workspace [splits, C, window] (support entries only)
//   dcls_grad_params_kernel one block per channel: sums the partials in split order (deterministic),
//                           then one element per thread: dL/dw, dL/dP, dL/dSIG (element_grads).
// Accumulation is fp32 for every input type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "trous/common.h"
#include "trous/convert.cuh"
#include "dcls/conv.h"

namespace trous {
namespace dcls {

constexpr int kThreads = 256;      // every kernel; a multiple of 32 (block scans use full warps)
constexpr int kOutPerThread = 4;   // forward / grad-input outputs per thread
constexpr int kTapsPerThread = 4;  // grad-taps accumulators per thread (taps per pass: 4 * 256)
constexpr int kStage = 256;        // grad-taps: outputs staged in shared memory per step
constexpr int kPackBits = 10;      // tap coordinates packed as tz | ty << 10 | tx << 20 (dks < 1024)

// Shared-memory carve-up of the per-channel tap build (all 4-byte words).
struct TapSmem {
  float* f;         // [kc][dsum] element profiles
  float* coef;      // [kc]
  int* box;         // [kc][6] support box lo0, hi0, lo1, hi1, lo2, hi2
  float* dense;     // [window]
  int* flag;        // [window]
  int* tap_pack;    // [window] packed coordinates
  int* tap_lin;     // [window] linear offset tz * s0 + ty * s1 + tx
  float* tap_coef;  // [window]
  int* scan;        // [33]: per-warp sums, then the tap count at [32]
  float* extra;     // what follows (kernel-specific)
};

TROUS_HOST_DEVICE inline index_t tap_smem_words(const ConvGeom& g) {
  return (index_t)g.kc * (g.dsum() + 1 + 6) + (index_t)g.window() * 5 + 33;
}

TROUS_DEVICE inline TapSmem carve_taps(const ConvGeom& g, float* smem) {
  TapSmem s;
  float* p = smem;
  s.f = p;
  p += (index_t)g.kc * g.dsum();
  s.coef = p;
  p += g.kc;
  s.box = reinterpret_cast<int*>(p);
  p += 6 * g.kc;
  s.dense = p;
  p += g.window();
  s.flag = reinterpret_cast<int*>(p);
  p += g.window();
  s.tap_pack = reinterpret_cast<int*>(p);
  p += g.window();
  s.tap_lin = reinterpret_cast<int*>(p);
  p += g.window();
  s.tap_coef = p;
  p += g.window();
  s.scan = reinterpret_cast<int*>(p);
  p += 33;
  s.extra = p;
  return s;
}

// Exclusive prefix sum of v over the block; the block total lands in scan[32]. Ends with a barrier.
TROUS_DEVICE inline int block_exclusive_scan(int v, int* scan) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += u;
  }
  if (lane == 31) scan[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nwarps ? scan[lane] : 0;
    int wi = w;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, wi, d);
      if (lane >= d) wi += u;
    }
    if (lane < nwarps) scan[lane] = wi;
    if (lane == 31) scan[32] = wi;
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : scan[warp - 1];
  return before + incl - v;
}

// Builds channel c's taps in shared memory and returns their count (same for every thread).
// lin_h / lin_w: the (H, W) extents of the tensor the linear tap offsets index (D*H*W planes).
TROUS_DEVICE inline int build_taps_block(const ConvGeom& g, const Params<float>& p, index_t c, const TapSmem& s,
                                         int lin_h, int lin_w) {
  const int ds = g.dsum();
  const int W = g.window();
  for (int k = threadIdx.x; k < g.kc; k += blockDim.x) {
    AxisSummary<float> ax[kAxes];
    s.coef[k] = element_profiles<float>(g, p, c, k, s.f + (index_t)k * ds, nullptr, nullptr, ax);
    TROUS_DCLS_UNROLL
    for (int j = 0; j < kAxes; ++j) {
      s.box[6 * k + 2 * j] = ax[j].lo;
      s.box[6 * k + 2 * j + 1] = ax[j].hi;
    }
  }
  __syncthreads();
  const int b0 = g.axis_base(0), b1 = g.axis_base(1), b2 = g.axis_base(2);
  for (int i = threadIdx.x; i < W; i += blockDim.x) {
    const int x = i % g.dks[2];
    const int y = (i / g.dks[2]) % g.dks[1];
    const int z = i / (g.dks[2] * g.dks[1]);
    float acc = 0.f;
    int on = 0;
    for (int k = 0; k < g.kc; ++k) {
      const int* bx = s.box + 6 * k;
      if (z >= bx[0] && z < bx[1] && y >= bx[2] && y < bx[3] && x >= bx[4] && x < bx[5]) {
        const float* fk = s.f + (index_t)k * ds;
        acc += s.coef[k] * fk[b0 + z] * fk[b1 + y] * fk[b2 + x];
        on = 1;
      }
    }
    s.dense[i] = acc;
    s.flag[i] = on;
  }
  __syncthreads();
  // Ordered compaction: thread t owns the contiguous positions [t * chunk, (t + 1) * chunk).
  const int chunk = (W + (int)blockDim.x - 1) / (int)blockDim.x;
  const int i0 = threadIdx.x * chunk;
  const int i1 = i0 + chunk < W ? i0 + chunk : W;
  int cnt = 0;
  for (int i = i0; i < i1; ++i) cnt += s.flag[i];
  int at = block_exclusive_scan(cnt, s.scan);
  for (int i = i0; i < i1; ++i) {
    if (!s.flag[i]) continue;
    const int x = i % g.dks[2];
    const int y = (i / g.dks[2]) % g.dks[1];
    const int z = i / (g.dks[2] * g.dks[1]);
    s.tap_pack[at] = z | (y << kPackBits) | (x << (2 * kPackBits));
    s.tap_lin[at] = (z * lin_h + y) * lin_w + x;
    s.tap_coef[at] = s.dense[i];
    ++at;
  }
  __syncthreads();
  return s.scan[32];
}

TROUS_DEVICE inline int tap_z(int pk) { return pk & ((1 << kPackBits) - 1); }
TROUS_DEVICE inline int tap_y(int pk) { return (pk >> kPackBits) & ((1 << kPackBits) - 1); }
TROUS_DEVICE inline int tap_x(int pk) { return pk >> (2 * kPackBits); }
TROUS_DEVICE inline int tap_pos(const ConvGeom& g, int pk) {
  return (tap_z(pk) * g.dks[1] + tap_y(pk)) * g.dks[2] + tap_x(pk);
}

// grid (ceil(N * out_plane / (kThreads * kOutPerThread)), C), block kThreads, taps shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dcls_forward_kernel(const T* __restrict__ x, T* __restrict__ out, ConvGeom g, Params<float> p) {
  TROUS_DYNAMIC_SHARED(float, smem);
  const TapSmem s = carve_taps(g, smem);
  const index_t c = blockIdx.y;
  const int nt = build_taps_block(g, p, c, s, g.in[1], g.in[2]);
  const int out_plane = (int)g.out_plane();
  const index_t in_plane = g.in_plane();
  const int total = (int)g.N * out_plane;
  const float bias = p.bias ? p.bias[c] : 0.f;
  for (int i = 0; i < kOutPerThread; ++i) {
    const int q = ((int)blockIdx.x * kOutPerThread + i) * (int)blockDim.x + (int)threadIdx.x;
    if (q >= total) break;
    const int n = q / out_plane, o = q - n * out_plane;
    const int ox = o % g.out[2];
    const int oy = (o / g.out[2]) % g.out[1];
    const int oz = o / (g.out[2] * g.out[1]);
    const int iz0 = oz * g.stride[0] - g.pad[0];
    const int iy0 = oy * g.stride[1] - g.pad[1];
    const int ix0 = ox * g.stride[2] - g.pad[2];
    const T* xp = x + ((index_t)n * g.C + c) * in_plane;
    float acc = 0.f;
    const bool interior = iz0 >= 0 && iz0 + g.dks[0] <= g.in[0] && iy0 >= 0 && iy0 + g.dks[1] <= g.in[1] && ix0 >= 0 &&
                          ix0 + g.dks[2] <= g.in[2];
    if (interior) {
      const T* base = xp + ((index_t)iz0 * g.in[1] + iy0) * g.in[2] + ix0;
      for (int t = 0; t < nt; ++t) acc += s.tap_coef[t] * to_float(base[s.tap_lin[t]]);
    } else {
      for (int t = 0; t < nt; ++t) {
        const int pk = s.tap_pack[t];
        const int iz = iz0 + tap_z(pk), iy = iy0 + tap_y(pk), ix = ix0 + tap_x(pk);
        if ((unsigned)iz < (unsigned)g.in[0] && (unsigned)iy < (unsigned)g.in[1] && (unsigned)ix < (unsigned)g.in[2]) {
          acc += s.tap_coef[t] * to_float(xp[((index_t)iz * g.in[1] + iy) * g.in[2] + ix]);
        }
      }
    }
    out[((index_t)n * g.C + c) * out_plane + o] = from_float<T>(acc + bias);
  }
}

// grad_x[n, c, i] = sum_t coef_t * grad_out[n, c, (i + pad - t) / stride] where divisible and inside.
// grid (ceil(N * in_plane / (kThreads * kOutPerThread)), C), block kThreads, taps shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dcls_grad_input_kernel(const T* __restrict__ gout, T* __restrict__ gx, ConvGeom g, Params<float> p) {
  TROUS_DYNAMIC_SHARED(float, smem);
  const TapSmem s = carve_taps(g, smem);
  const index_t c = blockIdx.y;
  const int nt = build_taps_block(g, p, c, s, g.out[1], g.out[2]);
  const index_t out_plane = g.out_plane();
  const int in_plane = (int)g.in_plane();
  const int total = (int)g.N * in_plane;
  const bool unit = g.stride[0] == 1 && g.stride[1] == 1 && g.stride[2] == 1;
  for (int i = 0; i < kOutPerThread; ++i) {
    const int q = ((int)blockIdx.x * kOutPerThread + i) * (int)blockDim.x + (int)threadIdx.x;
    if (q >= total) break;
    const int n = q / in_plane, o = q - n * in_plane;
    const int ix = o % g.in[2];
    const int iy = (o / g.in[2]) % g.in[1];
    const int iz = o / (g.in[2] * g.in[1]);
    // Output coordinate times stride reached through tap 0: q = i + pad - t.
    const int qz = iz + g.pad[0], qy = iy + g.pad[1], qx = ix + g.pad[2];
    const T* gp = gout + ((index_t)n * g.C + c) * out_plane;
    float acc = 0.f;
    const bool interior = unit && qz - (g.dks[0] - 1) >= 0 && qz < g.out[0] && qy - (g.dks[1] - 1) >= 0 &&
                          qy < g.out[1] && qx - (g.dks[2] - 1) >= 0 && qx < g.out[2];
    if (interior) {
      const T* base = gp + ((index_t)qz * g.out[1] + qy) * g.out[2] + qx;
      for (int t = 0; t < nt; ++t) acc += s.tap_coef[t] * to_float(*(base - s.tap_lin[t]));
    } else {
      for (int t = 0; t < nt; ++t) {
        const int pk = s.tap_pack[t];
        const int rz = qz - tap_z(pk), ry = qy - tap_y(pk), rx = qx - tap_x(pk);
        if (rz < 0 || ry < 0 || rx < 0) continue;
        if (rz % g.stride[0] || ry % g.stride[1] || rx % g.stride[2]) continue;
        const int oz = rz / g.stride[0], oy = ry / g.stride[1], ox = rx / g.stride[2];
        if (oz < g.out[0] && oy < g.out[1] && ox < g.out[2]) {
          acc += s.tap_coef[t] * to_float(gp[((index_t)oz * g.out[1] + oy) * g.out[2] + ox]);
        }
      }
    }
    gx[((index_t)n * g.C + c) * in_plane + o] = from_float<T>(acc);
  }
}

// Index math inside the kernels is 32-bit: the launcher passes batch slices with N * plane < 2^31.

// Shared words the grad-taps kernel needs beyond the taps: staged grad_out, output records, and the
// cross-group reduction.
constexpr int kGradTapsExtraWords = kStage * 5 + kThreads;

// Partial kernel gradients: block (split, c) sums over the split's contiguous range of the
// channel's N * out_plane outputs. ws[(split * C + c) * window + pos] for every support position.
// Thread <-> tap: with many taps, thread t owns taps t, t + kThreads, ... (kTapsPerThread per pass);
// with nt <= kThreads / 2, kThreads / nt groups of nt threads split the staged outputs between them
// (group i takes outputs i, i + groups, ...) and meet in shared memory, summed in group order.
// Shared memory: taps, then kStage grad_out values, kStage (n, iz0, iy0, ix0) records, kThreads sums.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dcls_grad_taps_kernel(const T* __restrict__ gout, const T* __restrict__ x, float* __restrict__ ws, ConvGeom g,
                          Params<float> p) {
  TROUS_DYNAMIC_SHARED(float, smem);
  const TapSmem s = carve_taps(g, smem);
  float* g_s = s.extra;
  int* rec = reinterpret_cast<int*>(s.extra + kStage);  // [kStage][4]
  float* red = s.extra + 5 * kStage;                    // [kThreads]
  const index_t c = blockIdx.y;
  const int nt = build_taps_block(g, p, c, s, g.in[1], g.in[2]);
  const int out_plane = (int)g.out_plane();
  const index_t in_plane = g.in_plane();
  const int total = (int)g.N * out_plane;
  const int per = (total + (int)gridDim.x - 1) / (int)gridDim.x;
  const int q0 = (int)blockIdx.x * per < total ? (int)blockIdx.x * per : total;
  const int q1 = q0 + per < total ? q0 + per : total;
  float* dst = ws + ((index_t)blockIdx.x * g.C + c) * g.window();
  const int tid = threadIdx.x;
  const int groups = (nt > 0 && nt <= kThreads / 2) ? kThreads / nt : 1;
  const int grp = groups > 1 ? tid / nt : 0;
  const int step = groups;
  for (int tb = 0; tb < nt; tb += kThreads * kTapsPerThread) {
    float acc[kTapsPerThread];
    int pk[kTapsPerThread];
#pragma unroll
    for (int r = 0; r < kTapsPerThread; ++r) {
      acc[r] = 0.f;
      int t = -1;
      if (groups > 1) {
        t = (r == 0 && grp < groups) ? tid % nt : -1;
      } else {
        t = tb + r * kThreads + tid;
        t = t < nt ? t : -1;
      }
      pk[r] = t >= 0 ? s.tap_pack[t] : -1;
    }
    for (int qs = q0; qs < q1; qs += kStage) {
      __syncthreads();  // previous stage consumed
      for (int j = tid; j < kStage; j += blockDim.x) {
        const int q = qs + j;
        if (q < q1) {
          const int n = q / out_plane, o = q - n * out_plane;
          const int ox = o % g.out[2];
          const int oy = (o / g.out[2]) % g.out[1];
          const int oz = o / (g.out[2] * g.out[1]);
          g_s[j] = to_float(gout[((index_t)n * g.C + c) * out_plane + o]);
          rec[4 * j] = n;
          rec[4 * j + 1] = oz * g.stride[0] - g.pad[0];
          rec[4 * j + 2] = oy * g.stride[1] - g.pad[1];
          rec[4 * j + 3] = ox * g.stride[2] - g.pad[2];
        }
      }
      __syncthreads();
      const int m = q1 - qs < kStage ? q1 - qs : kStage;
      for (int j = grp; j < m; j += step) {
        const float gv = g_s[j];
        const T* xp = x + ((index_t)rec[4 * j] * g.C + c) * in_plane;
        const int iz0 = rec[4 * j + 1], iy0 = rec[4 * j + 2], ix0 = rec[4 * j + 3];
#pragma unroll
        for (int r = 0; r < kTapsPerThread; ++r) {
          if (pk[r] < 0) continue;
          const int iz = iz0 + tap_z(pk[r]), iy = iy0 + tap_y(pk[r]), ix = ix0 + tap_x(pk[r]);
          if ((unsigned)iz < (unsigned)g.in[0] && (unsigned)iy < (unsigned)g.in[1] &&
              (unsigned)ix < (unsigned)g.in[2]) {
            acc[r] += gv * to_float(xp[((index_t)iz * g.in[1] + iy) * g.in[2] + ix]);
          }
        }
      }
    }
    if (groups > 1) {
      red[tid] = pk[0] >= 0 ? acc[0] : 0.f;
      __syncthreads();
      if (tid < nt) {
        float sum = 0.f;
        for (int i = 0; i < groups; ++i) sum += red[i * nt + tid];
        dst[tap_pos(g, s.tap_pack[tid])] = sum;
      }
    } else {
#pragma unroll
      for (int r = 0; r < kTapsPerThread; ++r) {
        if (pk[r] >= 0) dst[tap_pos(g, pk[r])] = acc[r];
      }
    }
  }
}

// Profile slots of the parameter-gradient kernel: one per thread that owns an element.
TROUS_HOST_DEVICE inline int params_slots(const ConvGeom& g) { return g.kc < kThreads ? g.kc : kThreads; }

TROUS_HOST_DEVICE inline index_t params_smem_words(const ConvGeom& g) {
  return (index_t)g.window() + 6 * (index_t)g.kc + 3 * (index_t)params_slots(g) * g.dsum();
}

// One block per channel: G = sum over splits of the partials (support positions only, split order),
// then one element per thread. Shared memory: G [window], boxes [kc][6], then per slot f / dmu / dsig.
__global__ void __launch_bounds__(kThreads, 2)
    dcls_grad_params_kernel(const float* __restrict__ ws, int splits, ConvGeom g, Params<float> p,
                            ParamGrads<float> gr) {
  TROUS_DYNAMIC_SHARED(float, smem);
  const index_t c = blockIdx.x;
  const int W = g.window();
  const int ds = g.dsum();
  float* G = smem;
  int* box = reinterpret_cast<int*>(smem + W);
  float* f = smem + W + 6 * g.kc + (index_t)threadIdx.x * 3 * ds;  // used only by threads < kc
  float* dmu = f + ds;
  float* dsig = dmu + ds;
  for (int k = threadIdx.x; k < g.kc; k += blockDim.x) {
    AxisSummary<float> ax[kAxes];
    element_profiles<float>(g, p, c, k, f, nullptr, nullptr, ax);
    TROUS_DCLS_UNROLL
    for (int j = 0; j < kAxes; ++j) {
      box[6 * k + 2 * j] = ax[j].lo;
      box[6 * k + 2 * j + 1] = ax[j].hi;
    }
  }
  __syncthreads();
  // Support positions (the union of the element boxes, as in build_taps_block) get the partial sums.
  for (int i = threadIdx.x; i < W; i += blockDim.x) {
    const int x = i % g.dks[2];
    const int y = (i / g.dks[2]) % g.dks[1];
    const int z = i / (g.dks[2] * g.dks[1]);
    bool on = false;
    for (int k = 0; k < g.kc && !on; ++k) {
      const int* bx = box + 6 * k;
      on = z >= bx[0] && z < bx[1] && y >= bx[2] && y < bx[3] && x >= bx[4] && x < bx[5];
    }
    float sum = 0.f;
    if (on) {
      for (int sp = 0; sp < splits; ++sp) sum += ws[((index_t)sp * g.C + c) * W + i];
    }
    G[i] = sum;
  }
  __syncthreads();
  const index_t row_stride = g.C * g.kc;
  for (int k = threadIdx.x; k < g.kc; k += blockDim.x) {
    AxisSummary<float> ax[kAxes];
    element_profiles<float>(g, p, c, k, f, dmu, dsig, ax);
    const index_t ck = c * g.kc + k;
    float gw, gmu[kAxes], gsig[kAxes];
    element_grads<float, float>(g, f, dmu, dsig, ax, p.w[ck], G, &gw, gmu, gsig);
    gr.gw[ck] = gw;
#pragma unroll
    for (int j = 0; j < kAxes; ++j) {
      const int r = g.prow[j];
      if (r < 0) continue;
      gr.gP[r * row_stride + ck] = gmu[j];
      if (gr.gSIG) gr.gSIG[r * row_stride + ck] = gsig[j];
    }
  }
}

}  // namespace dcls
}  // namespace trous

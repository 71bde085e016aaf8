// The warp-level tensor-core helpers of the attention kernels (attention_kernels.cuh): the operand
// fragments of one mma m16n8k16 (A 16x16 row-major, B 16x8 col-major, C/D 16x8 fp32), their loads
// from shared memory, the C -> A conversion that feeds P (or dS) from registers into the next
// product, and the mma itself. Torch-free.
//
// Two implementations behind one interface:
// - real (nvcc, sm_80+, 16-bit types): ldmatrix.x4 (.trans) and mma.sync.m16n8k16 (f16 / bf16 -> f32)
//   as inline PTX;
// - plain (always for fp32, under TROUS_CUDA_EMULATION for every type, on GPUs below sm_80, or with
//   TROUS_ATTN_PLAIN_MMA to test the real one against it on a GPU): the same lane fragments read
//   straight from shared memory, and the product through a per-warp shared scratch and __syncwarp
//   (each lane publishes its fragments, then computes its own four accumulators from its
//   warp-mates' fragments). The emulation tests run this path, so everything around it (tiling,
//   masks, softmax, barriers) runs under ASan/UBSan and TSan.
//
// Lane layout (PTX ISA "mma.m16n8k16", g = lane / 4, t = lane % 4), element e of register r:
//   A: r0 (row g, cols 2t+e), r1 (row g+8, cols 2t+e), r2 (row g, cols 8+2t+e), r3 (row g+8, 8+2t+e)
//   B: r0 (rows k 2t+e, col n g), r1 (rows k 8+2t+e, col g)
//   C: c[0..1] (row g, cols 2t+e), c[2..3] (row g+8, cols 2t+e)
// A 16-bit fragment register holds two elements (e = 0 in the low half); an fp32 fragment holds
// them as two floats, element index 2 r + e.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "trous/common.h"
#include "trous/convert.cuh"

namespace trous {
namespace attention {
namespace mma {

constexpr int kMaxWarps = 4;  // warps per block of every kernel using these helpers (the scratch)

template <typename T>
constexpr bool kIs16 = sizeof(T) == 2;

// Whether this compilation uses the PTX path (16-bit element types only).
#if defined(TROUS_CUDA_EMULATION) || defined(TROUS_ATTN_PLAIN_MMA) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
#define TROUS_ATTN_PTX 0
#else
#define TROUS_ATTN_PTX 1
#endif
template <typename T>
constexpr bool kUsePtx = TROUS_ATTN_PTX && kIs16<T>;

template <typename T, bool = kIs16<T>>
struct FragA {
  uint32_t r[4];
};
template <typename T>
struct FragA<T, false> {
  float r[8];
};
template <typename T, bool = kIs16<T>>
struct FragB {
  uint32_t r[2];
};
template <typename T>
struct FragB<T, false> {
  float r[4];
};

// Element e (0..7 for A, 0..3 for B) of a fragment, as float.
template <typename T>
TROUS_DEVICE inline float frag_elem(const uint32_t* r, int e) {
  T h[2];
  std::memcpy(static_cast<void*>(h), &r[e >> 1], sizeof(h));
  return to_float(h[e & 1]);
}
template <typename T>
TROUS_DEVICE inline float frag_elem(const float* r, int e) {
  return r[e];
}
template <typename T>
TROUS_DEVICE inline uint32_t pack2(T lo, T hi) {
  T h[2] = {lo, hi};
  uint32_t v;
  std::memcpy(&v, h, sizeof(v));
  return v;
}
template <typename T>
TROUS_DEVICE inline uint32_t pack2f(float lo, float hi) {
  return pack2<T>(from_float<T>(lo), from_float<T>(hi));
}

TROUS_DEVICE inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

#if TROUS_ATTN_PTX
TROUS_DEVICE inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// A (16 x 16) from row-major shared memory: A[r][c] = s[r * ld + c]. ld * sizeof(T) must be a
// multiple of 16 bytes and s 16-byte aligned (ldmatrix rows).
template <typename T>
TROUS_DEVICE inline void load_a(FragA<T>& a, const T* s, int ld) {
  const int lane = lane_id();
  if constexpr (kUsePtx<T>) {
#if TROUS_ATTN_PTX
    const T* p = s + (lane & 15) * ld + (lane >> 4) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3])
                 : "r"(smem_addr(p)));
#endif
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
      if constexpr (kIs16<T>)
        a.r[r] = pack2<T>(s[row * ld + col], s[row * ld + col + 1]);
      else
        a.r[2 * r] = to_float(s[row * ld + col]), a.r[2 * r + 1] = to_float(s[row * ld + col + 1]);
    }
  }
}

// Two B fragments b[0], b[1] (n-tiles n 0..7 and 8..15, k 0..15) from shared memory holding B transposed,
// row-major by n: B[k][n] = s[n * ld + k] (K rows for Q K^T, Q rows for K Q^T).
template <typename T>
TROUS_DEVICE inline void load_b_nk(FragB<T>* b, const T* s, int ld) {
  const int lane = lane_id();
  if constexpr (kUsePtx<T>) {
#if TROUS_ATTN_PTX
    const int m = lane >> 3;
    const T* p = s + ((m >> 1) * 8 + (lane & 7)) * ld + (m & 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0].r[0]), "=r"(b[0].r[1]), "=r"(b[1].r[0]), "=r"(b[1].r[1])
                 : "r"(smem_addr(p)));
#endif
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const T* p = s + (nt * 8 + g) * ld + 2 * t + r * 8;
        if constexpr (kIs16<T>)
          b[nt].r[r] = pack2<T>(p[0], p[1]);
        else
          b[nt].r[2 * r] = to_float(p[0]), b[nt].r[2 * r + 1] = to_float(p[1]);
      }
  }
}

// Two B fragments from row-major shared memory by k: B[k][n] = s[k * ld + n] (V for P V, dO / Q / K
// for the backward products).
template <typename T>
TROUS_DEVICE inline void load_b_kn(FragB<T>* b, const T* s, int ld) {
  const int lane = lane_id();
  if constexpr (kUsePtx<T>) {
#if TROUS_ATTN_PTX
    const int m = lane >> 3;
    const T* p = s + ((m & 1) * 8 + (lane & 7)) * ld + (m >> 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0].r[0]), "=r"(b[0].r[1]), "=r"(b[1].r[0]), "=r"(b[1].r[1])
                 : "r"(smem_addr(p)));
#endif
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int k = 2 * t + r * 8, n = nt * 8 + g;
        if constexpr (kIs16<T>)
          b[nt].r[r] = pack2<T>(s[k * ld + n], s[(k + 1) * ld + n]);
        else
          b[nt].r[2 * r] = to_float(s[k * ld + n]), b[nt].r[2 * r + 1] = to_float(s[(k + 1) * ld + n]);
      }
  }
}

// The A fragment of a 16 x 16 block whose columns 0..7 are accumulator tile c0 and 8..15 tile c1
// (rounded to T for 16-bit types).
template <typename T>
TROUS_DEVICE inline void a_from_acc(FragA<T>& a, const float (&c0)[4], const float (&c1)[4]) {
  if constexpr (kIs16<T>) {
    a.r[0] = pack2f<T>(c0[0], c0[1]);
    a.r[1] = pack2f<T>(c0[2], c0[3]);
    a.r[2] = pack2f<T>(c1[0], c1[1]);
    a.r[3] = pack2f<T>(c1[2], c1[3]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) a.r[e] = c0[e], a.r[4 + e] = c1[e];
  }
}

// The plain product of one warp: c[n] += A b[n] for n < N, through the warp's scratch (one
// exchange for the N products).
template <typename T, int N>
TROUS_DEVICE inline void mma_plain(float (*c)[4], const FragA<T>& a, const FragB<T>* b) {
  constexpr int W = 8 + 4 * N;
#ifdef TROUS_CUDA_EMULATION
  // Two scratch buffers used in turn (a lane's count of exchanges is its warp's: mma is warp-wide),
  // so one __syncwarp per exchange suffices: a lane writes buffer k again only after the next
  // exchange's barrier, which every lane reaches after reading buffer k. (Warp rendezvous are the
  // costly part of the emulation.)
  __shared__ float xch2[2][kMaxWarps][32][W];
  static thread_local unsigned phase = 0;
  float (*xch)[32][W] = xch2[phase++ & 1u];
#else
  __shared__ float xch[kMaxWarps][32][W];
#endif
  const int lane = lane_id(), w = static_cast<int>(threadIdx.x) >> 5;
  float* mine = xch[w][lane];
#pragma unroll
  for (int e = 0; e < 8; ++e) mine[e] = frag_elem<T>(a.r, e);
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mine[8 + 4 * n + e] = frag_elem<T>(b[n].r, e);
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
  float out[N][4];
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
      float acc = c[n][e];
      for (int k = 0; k < 16; ++k) {
        // A(row, k): lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2
        const float av = xch[w][(row & 7) * 4 + ((k & 7) >> 1)][2 * ((row >> 3) + 2 * (k >> 3)) + (k & 1)];
        // B(k, col): lane col * 4 + (k % 8) / 2, register k >= 8, half k % 2
        const float bv = xch[w][col * 4 + ((k & 7) >> 1)][8 + 4 * n + 2 * (k >> 3) + (k & 1)];
        acc += av * bv;
      }
      out[n][e] = acc;
    }
#ifndef TROUS_CUDA_EMULATION
  __syncwarp();  // everyone has read the scratch before the next exchange writes it
#endif
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = out[n][e];
}

// c[n] += A b[n] for n < N (N m16n8k16 products sharing A), fp32 accumulation.
template <int N, typename T>
TROUS_DEVICE inline void mma_n(float (*c)[4], const FragA<T>& a, const FragB<T>* b) {
  if constexpr (kUsePtx<T>) {
#if TROUS_ATTN_PTX
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if constexpr (std::is_same_v<T, __half>)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[n][0]), "+f"(c[n][1]), "+f"(c[n][2]), "+f"(c[n][3])
            : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b[n].r[0]), "r"(b[n].r[1]));
      else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[n][0]), "+f"(c[n][1]), "+f"(c[n][2]), "+f"(c[n][3])
            : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b[n].r[0]), "r"(b[n].r[1]));
    }
#endif
  } else {
    mma_plain<T, N>(c, a, b);
  }
}

// The largest of 8, 6, 4, 2 dividing n (n-tiles per product batch).
TROUS_HOST_DEVICE constexpr int batch_of(int n) { return n % 8 == 0 ? 8 : n % 6 == 0 ? 6 : n % 4 == 0 ? 4 : 2; }
// Products per batch for element type T: fp32 fragments are twice as wide, so two (registers).
template <typename T>
TROUS_HOST_DEVICE constexpr int batch_for(int n) {
  return kIs16<T> ? batch_of(n) : 2;
}

}  // namespace mma
}  // namespace attention
}  // namespace trous

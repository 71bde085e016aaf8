// CUDA kernels of the sparse attention core (launchers: attention_cuda.cu). Torch-free; compiled by
// nvcc and, in the tests, by g++ through tests/emu/cuda_emu.h.
//
// Every kernel works on the tiles of attention/pattern.h: per (query tile, key span tile) the
// pattern AND the block layout (tile_kind, with the table of the (batch, query head): head_blocks)
// say skip (never loaded), full (no element mask: only the ragged tile ends and the rows that other
// tiles own are cut) or partial (pair_allowed per element: pair_counted and block_ok). With a block
// layout the forward / dQ key tiles step by next_key_tile, so a tile never straddles two key blocks
// (their sizes, multiples of 64, are multiples of every kTk). Blocks are 4 warps; a warp
// owns 16 rows of the block's tile and runs the tensor-core products of mma_kernels.cuh:
// - attn_fwd_kernel: one block per (query tile of 64 rows, head, batch); online softmax over the
//   key tiles of the query tile's spans; writes out (0 for fully masked rows) and the fp32 lse
//   (natural log, -inf there).
// - attn_bwd_delta_kernel: delta = rowsum(grad_out * out) in fp32 (workspace).
// - attn_bwd_dkdv_kernel: one block per (key tile of 64 keys, kv head, batch), key-tile-outer over
//   the query tiles pattern.h's query_tile_range gives, for every query head of the kv head's group
//   (GQA): recomputes P^T = exp(S^T - lse) and dS^T, accumulates dV += P^T dO and dK += dS^T Q in
//   registers. Without global tokens each key is in one key tile and the block writes dK / dV; with
//   them a key can be in up to three tiles (its local class, the global keys, all keys), so each tile
//   kind writes fp32 partials to its own workspace slot and attn_bwd_finalize_kernel sums them.
// - attn_bwd_dq_kernel: one block per query tile (query-tile-outer), dQ += dS K in registers.
// Each output element is written by exactly one thread and nothing is accumulated atomically: the
// backward is bitwise deterministic by construction.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention/attention.h"
#include "attention/mma_kernels.cuh"
#include "trous/common.h"
#include "trous/convert.cuh"

#if defined(__CUDACC__) && !defined(TROUS_CUDA_EMULATION)
#define TROUS_ATTN_GRID_CONSTANT __grid_constant__
#else
#define TROUS_ATTN_GRID_CONSTANT
#endif

namespace trous {
namespace attention {

constexpr int kAttnThreads = 128;  // 4 warps (mma::kMaxWarps)
static_assert(kAttnThreads == 32 * mma::kMaxWarps, "the mma scratch is sized for the block");

// Tile sizes of element type T and head-dim instance Dp (a multiple of 16; D <= Dp is zero padded in
// shared memory). fp32 fragments take twice the registers of 16-bit ones: smaller steps there.
template <typename T, int Dp>
struct AttnTiles {
  static constexpr bool k32 = sizeof(T) == 4;
  static constexpr int kTq = 64;  // forward / dQ: query rows (16 a warp)
  // forward / dQ: keys per step (fp32 at 128: 32, its 64-key step took all 255 registers)
  static constexpr int kTk = Dp > 128 ? (k32 ? 16 : 32) : (k32 && Dp > 96 ? 32 : 64);
  static constexpr int kTkB = 64;                                   // dK/dV: keys per block (16 a warp)
  static constexpr int kTqB = k32 ? 16 : (Dp > 64 ? 32 : 64);       // dK/dV: queries per step
  static constexpr bool kSplitDkdv = Dp > 128 || (k32 && Dp > 64);  // dV, then dK (registers)
  // Blocks per SM the forward is compiled for (ptxas caps its registers at 64K / (128 x this)): the
  // occupancy it had before block layouts. Without it, ptxas's own choice spilled (D 32, 128).
  static constexpr int kFwdMinBlocks = k32 ? (Dp <= 32 ? 3 : 2) : (Dp <= 32 ? 4 : Dp <= 96 ? 3 : 2);
  static constexpr int kLd = Dp + 8;  // shared row stride: 16-byte rows, no ldmatrix bank conflicts
  static_assert(Dp % 16 == 0 && kTk % 16 == 0 && kTqB % 16 == 0, "tiles are whole mma blocks");
  // Block layouts have block sizes of multiples of 64: an aligned tile never straddles two blocks.
  static_assert(64 % kTq == 0 && 64 % kTk == 0 && 64 % kTkB == 0 && 64 % kTqB == 0, "tiles divide 64");
};

// Which tensors allow 16-byte loads (base and strides aligned, D a multiple of the vector).
enum : uint32_t { kVecQ = 1, kVecK = 2, kVecV = 4, kVecDO = 8 };

template <typename T>
TROUS_DEVICE inline T zero_of() {
  return from_float<T>(0.f);
}

// dst[r][c] = src row idx[r] (batch b, head h), column c, for r < rows and c < Dp; 0 where idx[r] < 0
// or c >= D. Called by the whole block.
template <typename T, int Dp>
TROUS_DEVICE inline void load_rows(T* dst, const T* src, BSHStrides st, index_t b, index_t h, const index_t* idx,
                                   int rows, index_t D, bool vec) {
  constexpr int V = 16 / sizeof(T), kChunks = Dp / V, kLd = AttnTiles<T, Dp>::kLd;
  for (int c = static_cast<int>(threadIdx.x); c < rows * kChunks; c += kAttnThreads) {
    const int r = c / kChunks, c0 = (c % kChunks) * V;
    const index_t i = idx[r];
    T* d = dst + r * kLd + c0;
    const T* s = src + b * st.b + (i >= 0 ? i : 0) * st.s + h * st.h + c0;
    if (vec && i >= 0 && c0 + V <= D) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
    } else {
      for (int e = 0; e < V; ++e) d[e] = i >= 0 && c0 + e < D ? s[e] : zero_of<T>();
    }
  }
}

// The score of one element: scale, then softcap; dsc = d(softcapped) / d(scaled).
TROUS_DEVICE inline float score(float acc, float scale, float softcap, float& dsc) {
  float x = acc * scale;
  dsc = 1.f;
  if (softcap > 0.f) {
    const float th = tanhf(x / softcap);
    x = softcap * th;
    dsc = 1.f - th * th;
  }
  return x;
}

TROUS_DEVICE inline float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
TROUS_DEVICE inline float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The counted elements of a warp's 16 x (8 NT) score tile as bits 4 n + e (accumulator tile n,
// element e: row r = e / 2 of this lane, column n * 8 + 2 t4 + e % 2). Rows are this lane's two rows
// (row0 / row1, -1 = none), columns the tile's column indices in shared memory (-1 = none); rows are
// queries and columns keys, or the other way round (kRowsAreKeys). tbl: the block layout's table of
// the tile's (batch, query head), or nullptr. A rolled loop: pair_allowed is inlined once, not once
// per element of the unrolled tile.
template <int NT, bool kRowsAreKeys>
TROUS_DEVICE inline uint32_t counted_bits(const Pattern& pat, const int32_t* tbl, TileKind kind, int8_t span_kind,
                                          index_t row0, index_t row1, const index_t* cols, int t4) {
  static_assert(NT * 4 <= 32, "one bit per element");
  uint32_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < 4 * NT; ++x) {
    const index_t r = (x & 2) ? row1 : row0, c = cols[(x >> 2) * 8 + 2 * t4 + (x & 1)];
    const bool ok = r >= 0 && c >= 0 &&
                    (kind == kFull || pair_allowed(pat, tbl, span_kind, kRowsAreKeys ? c : r, kRowsAreKeys ? r : c));
    bits |= static_cast<uint32_t>(ok) << x;
  }
  return bits;
}

// Rows of a query tile in shared memory: the query index of each row, -1 where the row is past the
// tile's end or computed by another tile (row_active false).
TROUS_DEVICE inline void tile_rows(const Pattern& pat, const QueryTile& qt, index_t* qidx, int rows) {
  for (int r = static_cast<int>(threadIdx.x); r < rows; r += kAttnThreads) {
    index_t i = -1;
    if (r < qt.count) {
      const index_t ii = query_row(pat, qt, r);
      if (row_active(pat, qt, ii)) i = ii;
    }
    qidx[r] = i;
  }
}
TROUS_DEVICE inline void span_keys(const Pattern& pat, const KeySpan& sp, index_t u0, index_t u1, index_t* kidx,
                                   int rows) {
  for (int r = static_cast<int>(threadIdx.x); r < rows; r += kAttnThreads)
    kidx[r] = u0 + r < u1 ? key_index(pat, sp, u0 + r) : -1;
}

// acc (16 x Dp, Dp / 8 accumulator tiles) += A (16 x 16) B, B[k][n] = s[k * kLd + n] (16 rows of a
// row-major tile in shared memory).
template <typename T, int Dp>
TROUS_DEVICE inline void product_kn(float (*acc)[4], const mma::FragA<T>& a, const T* s) {
  constexpr int ND = Dp / 8, NB = mma::batch_for<T>(ND), LD = AttnTiles<T, Dp>::kLd;
#pragma unroll
  for (int c = 0; c < ND / NB; ++c) {
    mma::FragB<T> bb[NB];
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) mma::load_b_kn(bb + 2 * np, s + c * NB * 8 + np * 16, LD);
    mma::mma_n<NB>(acc + c * NB, a, bb);
  }
}

// acc (16 x 8 NTILES) += A (16 x 16) B with B[k][n] = s[n * kLd + k] (B transposed in shared memory:
// K rows for Q K^T, Q / dO rows for K Q^T / V dO^T).
template <typename T, int Dp, int NTILES>
TROUS_DEVICE inline void product_nk(float (*acc)[4], const mma::FragA<T>& a, const T* s) {
  constexpr int NB = mma::batch_for<T>(NTILES), LD = AttnTiles<T, Dp>::kLd;
  static_assert(NTILES % NB == 0 && NB % 2 == 0, "whole batches of n-tile pairs");
#pragma unroll
  for (int c = 0; c < NTILES / NB; ++c) {
    mma::FragB<T> bb[NB];
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) mma::load_b_nk(bb + 2 * np, s + (c * NB + 2 * np) * 8 * LD, LD);
    mma::mma_n<NB>(acc + c * NB, a, bb);
  }
}

template <typename T, int Dp>
constexpr size_t fwd_smem_bytes() {
  using C = AttnTiles<T, Dp>;
  return (size_t)(C::kTq + 2 * C::kTk) * C::kLd * sizeof(T) + (size_t)(C::kTq + C::kTk) * sizeof(index_t);
}

template <typename T, int Dp>
__global__ void __launch_bounds__(kAttnThreads, AttnTiles<T, Dp>::kFwdMinBlocks)
    attn_fwd_kernel(const TROUS_ATTN_GRID_CONSTANT AttnFwdParams p, uint32_t vec) {
  using C = AttnTiles<T, Dp>;
  constexpr int Tq = C::kTq, Tk = C::kTk, LD = C::kLd, NT = Tk / 8, ND = Dp / 8;
  TROUS_DYNAMIC_SHARED(unsigned char, smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + Tq * LD;
  T* Vs = Ks + Tk * LD;
  index_t* qidx = reinterpret_cast<index_t*>(Vs + Tk * LD);
  index_t* kidx = qidx + Tq;
  const Pattern& pat = p.pattern;
  const index_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const QueryTile qt = query_tile(pat, Tq, blockIdx.x);
  const int32_t* tbl = head_blocks(pat, b, h);  // the block layout of (b, h), or nullptr
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, g = (tid & 31) >> 2, t4 = tid & 3;

  // The spans in shared memory: key_spans fills an array by a running index, which would put a
  // per-thread copy in local memory.
  __shared__ KeySpan spans[2];
  __shared__ int s_nspans;
  tile_rows(pat, qt, qidx, Tq);
  if (tid == 0) s_nspans = key_spans(pat, qt, spans);
  __syncthreads();
  const int nspans = s_nspans;
  load_rows<T, Dp>(Qs, static_cast<const T*>(p.q), p.sq, b, h, qidx, Tq, p.D, vec & kVecQ);
  const index_t qi[2] = {qidx[warp * 16 + g], qidx[warp * 16 + g + 8]};

  float o[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

#pragma unroll
  for (int si = 0; si < 2; ++si) {
    if (si >= nspans) break;
    const KeySpan sp = spans[si];
    for (index_t u0 = sp.first, u1 = 0; u0 < sp.end; u0 = u1) {
      u1 = next_key_tile(pat, sp, u0, Tk);  // block-aligned with a block layout
      const TileKind kind = tile_kind(pat, tbl, qt, sp, u0, u1);
      if (kind == kSkip) continue;  // uniform over the block
      __syncthreads();              // the previous tile's K / V (and the Q load) are done with
      span_keys(pat, sp, u0, u1, kidx, Tk);
      __syncthreads();
      load_rows<T, Dp>(Ks, static_cast<const T*>(p.k), p.sk, b, hk, kidx, Tk, p.D, vec & kVecK);
      load_rows<T, Dp>(Vs, static_cast<const T*>(p.v), p.sv, b, hk, kidx, Tk, p.D, vec & kVecV);
      __syncthreads();
      // The mask before the scores: its loop then runs with o live but not s (registers).
      const uint32_t bits = counted_bits<NT, false>(pat, tbl, kind, sp.kind, qi[0], qi[1], kidx, t4);

      float s[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        mma::FragA<T> a;
        mma::load_a(a, Qs + warp * 16 * LD + kk * 16, LD);
        product_nk<T, Dp, NT>(s, a, Ks + kk * 16);
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dsc;
          const float x = score(s[n][e], p.scale, p.softcap, dsc);
          s[n][e] = (bits >> (4 * n + e) & 1u) ? x : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
      float msub[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mn = fmaxf(m[r], quad_max(mx[r]));
        const float alpha = mn == -INFINITY ? 1.f : expf(m[r] - mn);
        msub[r] = mn == -INFINITY ? 0.f : mn;
        m[r] = mn;
        l[r] *= alpha;
#pragma unroll
        for (int d = 0; d < ND; ++d) o[d][2 * r] *= alpha, o[d][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = expf(s[n][e] - msub[e >> 1]);
          l[e >> 1] += s[n][e];
        }
#pragma unroll
      for (int kk = 0; kk < Tk / 16; ++kk) {
        mma::FragA<T> a;
        mma::a_from_acc(a, s[2 * kk], s[2 * kk + 1]);
        product_kn<T, Dp>(o, a, Vs + kk * 16 * LD);
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lr = quad_sum(l[r]);
    const index_t i = qi[r];
    if (i < 0) continue;
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    T* row = out + b * p.so.b + i * p.so.s + h * p.so.h;
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = d * 8 + 2 * t4 + e;
        if (c < p.D) row[c] = from_float<T>(o[d][2 * r + e] * inv);
      }
    if (t4 == 0) p.lse[(b * p.Hq + h) * p.Sq + i] = lr > 0.f ? m[r] + logf(lr) : -INFINITY;
  }
}

// delta[(b * Hq + h) * Sq + i] = sum_c grad_out[b, i, h, c] * out[b, i, h, c] (fp32), one warp a row.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_delta_kernel(const TROUS_ATTN_GRID_CONSTANT AttnBwdParams p, float* delta) {
  const index_t rows = p.B * p.Hq * p.Sq;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const index_t step = (index_t)gridDim.x * (kAttnThreads / 32);
  for (index_t r = (index_t)blockIdx.x * (kAttnThreads / 32) + (threadIdx.x >> 5); r < rows; r += step) {
    const index_t i = r % p.Sq, h = r / p.Sq % p.Hq, b = r / (p.Sq * p.Hq);
    const T* go = static_cast<const T*>(p.grad_out) + b * p.sdo.b + i * p.sdo.s + h * p.sdo.h;
    const T* o = static_cast<const T*>(p.out) + b * p.so.b + i * p.so.s + h * p.so.h;
    float acc = 0.f;
    for (index_t c = lane; c < p.D; c += 32) acc += to_float(go[c]) * to_float(o[c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[r] = acc;
  }
}

template <typename T, int Dp>
constexpr size_t dq_smem_bytes() {
  using C = AttnTiles<T, Dp>;
  return (size_t)(2 * C::kTq + 2 * C::kTk) * C::kLd * sizeof(T) + (size_t)(C::kTq + C::kTk) * sizeof(index_t);
}

template <typename T, int Dp>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_dq_kernel(const TROUS_ATTN_GRID_CONSTANT AttnBwdParams p, const float* delta, uint32_t vec) {
  using C = AttnTiles<T, Dp>;
  constexpr int Tq = C::kTq, Tk = C::kTk, LD = C::kLd, NT = Tk / 8, ND = Dp / 8;
  TROUS_DYNAMIC_SHARED(unsigned char, smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = Qs + Tq * LD;
  T* Ks = dOs + Tq * LD;
  T* Vs = Ks + Tk * LD;
  index_t* qidx = reinterpret_cast<index_t*>(Vs + Tk * LD);
  index_t* kidx = qidx + Tq;
  const Pattern& pat = p.pattern;
  const index_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const QueryTile qt = query_tile(pat, Tq, blockIdx.x);
  const int32_t* tbl = head_blocks(pat, b, h);  // the block layout of (b, h), or nullptr
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, g = (tid & 31) >> 2, t4 = tid & 3;

  // The spans in shared memory: key_spans fills an array by a running index, which would put a
  // per-thread copy in local memory.
  __shared__ KeySpan spans[2];
  __shared__ int s_nspans;
  tile_rows(pat, qt, qidx, Tq);
  if (tid == 0) s_nspans = key_spans(pat, qt, spans);
  __syncthreads();
  const int nspans = s_nspans;
  load_rows<T, Dp>(Qs, static_cast<const T*>(p.q), p.sq, b, h, qidx, Tq, p.D, vec & kVecQ);
  load_rows<T, Dp>(dOs, static_cast<const T*>(p.grad_out), p.sdo, b, h, qidx, Tq, p.D, vec & kVecDO);
  const index_t qi[2] = {qidx[warp * 16 + g], qidx[warp * 16 + g + 8]};
  float lse[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t at = (b * p.Hq + h) * p.Sq + (qi[r] >= 0 ? qi[r] : 0);
    lse[r] = qi[r] >= 0 ? p.lse[at] : -INFINITY;
    dl[r] = qi[r] >= 0 ? delta[at] : 0.f;
  }

  float dq[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[d][e] = 0.f;

#pragma unroll
  for (int si = 0; si < 2; ++si) {
    if (si >= nspans) break;
    const KeySpan sp = spans[si];
    for (index_t u0 = sp.first, u1 = 0; u0 < sp.end; u0 = u1) {
      u1 = next_key_tile(pat, sp, u0, Tk);  // block-aligned with a block layout
      const TileKind kind = tile_kind(pat, tbl, qt, sp, u0, u1);
      if (kind == kSkip) continue;
      __syncthreads();
      span_keys(pat, sp, u0, u1, kidx, Tk);
      __syncthreads();
      load_rows<T, Dp>(Ks, static_cast<const T*>(p.k), p.sk, b, hk, kidx, Tk, p.D, vec & kVecK);
      load_rows<T, Dp>(Vs, static_cast<const T*>(p.v), p.sv, b, hk, kidx, Tk, p.D, vec & kVecV);
      __syncthreads();

      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.f, dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        mma::FragA<T> a;
        mma::load_a(a, Qs + warp * 16 * LD + kk * 16, LD);
        product_nk<T, Dp, NT>(s, a, Ks + kk * 16);
        mma::load_a(a, dOs + warp * 16 * LD + kk * 16, LD);
        product_nk<T, Dp, NT>(dp, a, Vs + kk * 16);
      }
      const uint32_t bits = counted_bits<NT, false>(pat, tbl, kind, sp.kind, qi[0], qi[1], kidx, t4);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float dsc;
          const float x = score(s[n][e], p.scale, p.softcap, dsc);
          const bool ok = (bits >> (4 * n + e) & 1u) && lse[r] != -INFINITY;
          const float pr = ok ? expf(x - lse[r]) : 0.f;
          dp[n][e] = pr * (dp[n][e] - dl[r]) * dsc;
        }
#pragma unroll
      for (int kk = 0; kk < Tk / 16; ++kk) {
        mma::FragA<T> a;
        mma::a_from_acc(a, dp[2 * kk], dp[2 * kk + 1]);
        product_kn<T, Dp>(dq, a, Ks + kk * 16 * LD);
      }
    }
  }

  T* gq = static_cast<T*>(p.grad_q);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t i = qi[r];
    if (i < 0) continue;
    T* row = gq + b * p.sdq.b + i * p.sdq.s + h * p.sdq.h;
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = d * 8 + 2 * t4 + e;
        if (c < p.D) row[c] = from_float<T>(dq[d][2 * r + e] * p.scale);
      }
  }
}

template <typename T, int Dp>
constexpr size_t dkdv_smem_bytes() {
  using C = AttnTiles<T, Dp>;
  return (size_t)(2 * C::kTkB + 2 * C::kTqB) * C::kLd * sizeof(T) + (size_t)(C::kTkB + C::kTqB) * sizeof(index_t) +
         (size_t)2 * C::kTqB * sizeof(float);
}

// Where the dK / dV partials of key-tile kind `kind` go in the workspace (global-token patterns).
struct DkdvSlots {
  float* base = nullptr;                // nullptr: no global tokens, the kernel writes grad_k / grad_v itself
  index_t per = 0;                      // floats of one (dK or dV) slot: B * Hkv * Sk * D
  int global_keys = -1, all_keys = -1;  // slot of those kinds (local keys: slot 0), -1 = none
  TROUS_INLINE int slot(int8_t kind) const {
    return kind == kGlobalKeys ? global_keys : kind == kAllKeys ? all_keys : 0;
  }
};

template <typename T, int Dp, bool kDK, bool kDV>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_dkdv_kernel(const TROUS_ATTN_GRID_CONSTANT AttnBwdParams p, const float* delta, DkdvSlots slots,
                         uint32_t vec) {
  using C = AttnTiles<T, Dp>;
  constexpr int Tk = C::kTkB, Tq = C::kTqB, LD = C::kLd, NQ = Tq / 8, ND = Dp / 8;
  TROUS_DYNAMIC_SHARED(unsigned char, smem);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + Tk * LD;
  T* Qs = Vs + Tk * LD;
  T* dOs = Qs + Tq * LD;
  index_t* kidx = reinterpret_cast<index_t*>(dOs + Tq * LD);
  index_t* qidx = kidx + Tk;
  float* qlse = reinterpret_cast<float*>(qidx + Tq);
  float* qdl = qlse + Tq;
  const Pattern& pat = p.pattern;
  const index_t b = blockIdx.z, hk = blockIdx.y, group = p.Hq / p.Hkv;
  const KeySpan kt = key_tile(pat, Tk, blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, g = (tid & 31) >> 2, t4 = tid & 3;

  span_keys(pat, kt, kt.first, kt.end, kidx, Tk);
  __syncthreads();
  load_rows<T, Dp>(Ks, static_cast<const T*>(p.k), p.sk, b, hk, kidx, Tk, p.D, vec & kVecK);
  if (kDK) load_rows<T, Dp>(Vs, static_cast<const T*>(p.v), p.sv, b, hk, kidx, Tk, p.D, vec & kVecV);
  const index_t kj[2] = {kidx[warp * 16 + g], kidx[warp * 16 + g + 8]};

  float dk[kDK ? ND : 1][4], dv[kDV ? ND : 1][4];
#pragma unroll
  for (int d = 0; d < (kDK ? ND : 1); ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = 0.f;
#pragma unroll
  for (int d = 0; d < (kDV ? ND : 1); ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[d][e] = 0.f;

  index_t qb = 0, qe = 0;
  query_tile_range(pat, Tq, kt, &qb, &qe);
  for (index_t hh = 0; hh < group; ++hh) {
    const index_t h = hk * group + hh;
    const int32_t* tbl = head_blocks(pat, b, h);  // the layout is per query head
    for (index_t qti = qb; qti < qe; ++qti) {
      const QueryTile qt = query_tile(pat, Tq, qti);
      const TileKind kind = tile_kind(pat, tbl, qt, kt, kt.first, kt.end);
      if (kind == kSkip) continue;
      __syncthreads();  // the previous step's Q / dO / rows (and the K / V loads) are done with
      tile_rows(pat, qt, qidx, Tq);
      __syncthreads();
      for (int r = tid; r < Tq; r += kAttnThreads) {
        const index_t i = qidx[r];
        const index_t at = (b * p.Hq + h) * p.Sq + (i >= 0 ? i : 0);
        qlse[r] = i >= 0 ? p.lse[at] : -INFINITY;
        qdl[r] = i >= 0 && kDK ? delta[at] : 0.f;
      }
      load_rows<T, Dp>(dOs, static_cast<const T*>(p.grad_out), p.sdo, b, h, qidx, Tq, p.D, vec & kVecDO);
      load_rows<T, Dp>(Qs, static_cast<const T*>(p.q), p.sq, b, h, qidx, Tq, p.D, vec & kVecQ);
      __syncthreads();

      // S^T (this warp's 16 keys x Tq queries) = K Q^T and dP^T = V dO^T.
      float st[NQ][4], dpt[kDK ? NQ : 1][4];
#pragma unroll
      for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[n][e] = 0.f;
#pragma unroll
      for (int n = 0; n < (kDK ? NQ : 1); ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        mma::FragA<T> a;
        mma::load_a(a, Ks + warp * 16 * LD + kk * 16, LD);
        product_nk<T, Dp, NQ>(st, a, Qs + kk * 16);
        if constexpr (kDK) {
          mma::load_a(a, Vs + warp * 16 * LD + kk * 16, LD);
          product_nk<T, Dp, NQ>(dpt, a, dOs + kk * 16);
        }
      }
      const uint32_t bits = counted_bits<NQ, true>(pat, tbl, kind, kt.kind, kj[0], kj[1], qidx, t4);
#pragma unroll
      for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + 2 * t4 + (e & 1);
          const float ls = qlse[col];
          float dsc;
          const float x = score(st[n][e], p.scale, p.softcap, dsc);
          const bool ok = (bits >> (4 * n + e) & 1u) && ls != -INFINITY;
          const float pr = ok ? expf(x - ls) : 0.f;
          st[n][e] = pr;
          if constexpr (kDK) dpt[n][e] = pr * (dpt[n][e] - qdl[col]) * dsc;
        }
#pragma unroll
      for (int kk = 0; kk < Tq / 16; ++kk) {
        if constexpr (kDV) {
          mma::FragA<T> a;
          mma::a_from_acc(a, st[2 * kk], st[2 * kk + 1]);
          product_kn<T, Dp>(dv, a, dOs + kk * 16 * LD);
        }
        if constexpr (kDK) {
          mma::FragA<T> a;
          mma::a_from_acc(a, dpt[2 * kk], dpt[2 * kk + 1]);
          product_kn<T, Dp>(dk, a, Qs + kk * 16 * LD);
        }
      }
    }
  }

  const int slot = slots.slot(kt.kind);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t j = kj[r];
    if (j < 0) continue;
    if (slots.base) {
      const index_t at = ((b * p.Hkv + hk) * p.Sk + j) * p.D;
      float* wk = slots.base + (index_t)(2 * slot) * slots.per + at;
      float* wv = wk + slots.per;
#pragma unroll
      for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = d * 8 + 2 * t4 + e;
          if (c >= p.D) continue;
          if constexpr (kDK) wk[c] = dk[d][2 * r + e] * p.scale;
          if constexpr (kDV) wv[c] = dv[d][2 * r + e];
        }
    } else {
      T* rk = static_cast<T*>(p.grad_k) + b * p.sdk.b + j * p.sdk.s + hk * p.sdk.h;
      T* rv = static_cast<T*>(p.grad_v) + b * p.sdv.b + j * p.sdv.s + hk * p.sdv.h;
#pragma unroll
      for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = d * 8 + 2 * t4 + e;
          if (c >= p.D) continue;
          if constexpr (kDK) rk[c] = from_float<T>(dk[d][2 * r + e] * p.scale);
          if constexpr (kDV) rv[c] = from_float<T>(dv[d][2 * r + e]);
        }
    }
  }
}

// grad_k / grad_v = the sum of the slots' partials (global-token patterns), in slot order.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_finalize_kernel(const TROUS_ATTN_GRID_CONSTANT AttnBwdParams p, DkdvSlots slots, int nslots) {
  const index_t n = p.B * p.Hkv * p.Sk * p.D;
  const index_t step = (index_t)gridDim.x * kAttnThreads;
  for (index_t x = (index_t)blockIdx.x * kAttnThreads + threadIdx.x; x < n; x += step) {
    const index_t c = x % p.D, j = x / p.D % p.Sk, hk = x / (p.D * p.Sk) % p.Hkv, b = x / (p.D * p.Sk * p.Hkv);
    float sk = 0.f, sv = 0.f;
    for (int s = 0; s < nslots; ++s) {
      sk += slots.base[(index_t)(2 * s) * slots.per + x];
      sv += slots.base[(index_t)(2 * s + 1) * slots.per + x];
    }
    static_cast<T*>(p.grad_k)[b * p.sdk.b + j * p.sdk.s + hk * p.sdk.h + c] = from_float<T>(sk);
    static_cast<T*>(p.grad_v)[b * p.sdv.b + j * p.sdv.s + hk * p.sdv.h + c] = from_float<T>(sv);
  }
}

}  // namespace attention
}  // namespace trous

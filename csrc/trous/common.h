// Torch-free definitions shared by CPU code, CUDA kernels and the emulation tests.
#pragma once
#include <cstdint>

#include "trous/dtype.h"

#if defined(__CUDACC__) || defined(TROUS_CUDA_EMULATION)
#define TROUS_HOST_DEVICE __host__ __device__
#define TROUS_DEVICE __device__
#else
#define TROUS_HOST_DEVICE
#define TROUS_DEVICE
#endif

#define TROUS_INLINE TROUS_HOST_DEVICE inline

// Dynamic shared memory as a typed pointer (the CUDA emulation header defines its own version).
#ifndef TROUS_DYNAMIC_SHARED
#define TROUS_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char trous_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(trous_dynamic_smem_)
#endif

namespace trous {

// Element counts and offsets are 64-bit: a KV cache or an activation can exceed 2^31 elements.
using index_t = int64_t;

TROUS_INLINE index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// Strides (in elements) of a 4-D tensor [B, H, T, D] whose last dimension is contiguous.
struct RowStrides {
  index_t b, h, t;
};

// Offset of row r (flattened over B, H, T) of a 4-D tensor with arbitrary outer strides.
TROUS_INLINE index_t row_offset(index_t r, index_t H, index_t T, RowStrides s) {
  const index_t t = r % T;
  const index_t bh = r / T;
  return (bh / H) * s.b + (bh % H) * s.h + t * s.t;
}

// row_offset of consecutive rows r, r + 1, ... without a division per row (CPU loops over rows of
// D ~ 128 elements, where two 64-bit divisions cost about a cycle per element).
struct RowCursor {
  index_t H, T;
  RowStrides s;
  index_t t, h, offset;
  TROUS_INLINE RowCursor(index_t r, index_t H_, index_t T_, RowStrides s_)
      : H(H_), T(T_), s(s_), t(r % T_), h((r / T_) % H_), offset(row_offset(r, H_, T_, s_)) {}
  TROUS_INLINE void next() {
    offset += s.t;
    if (++t < T) return;
    t = 0;
    offset += s.h - T * s.t;
    if (++h < H) return;
    h = 0;
    offset += s.b - H * s.h;
  }
};

}  // namespace trous

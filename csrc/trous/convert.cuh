// The fp32 <-> element-type conversions of every CUDA kernel (written once), through the intrinsics (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__). Torch-free.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "trous/common.h"

namespace trous {

TROUS_DEVICE inline float to_float(float v) { return v; }
TROUS_DEVICE inline float to_float(__half v) { return __half2float(v); }
TROUS_DEVICE inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> TROUS_DEVICE inline T from_float(float v);
template <> TROUS_DEVICE inline float from_float<float>(float v) { return v; }
template <> TROUS_DEVICE inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> TROUS_DEVICE inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The same through the accumulation type A (fp32, or fp64 for fp64 elements: no rounding).
template <typename A, typename T> TROUS_DEVICE inline A to_acc(T v) {
  if constexpr (sizeof(T) == sizeof(double))
    return (A)v;
  else
    return (A)to_float(v);
}
template <typename T, typename A> TROUS_DEVICE inline T from_acc(A v) {
  if constexpr (sizeof(A) == sizeof(double))
    return (T)v;
  else
    return from_float<T>(v);
}

}  // namespace trous

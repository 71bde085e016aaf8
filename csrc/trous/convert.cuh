// fp32 <-> element-type conversions of the CUDA kernels, through the intrinsics (torch builds with
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

}  // namespace trous

// Helpers shared by the torch-free CUDA launchers: error checks and the float-type dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "trous/common.h"

namespace trous {

// Errors become exceptions; the op layer turns them into Python RuntimeErrors.
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline void check_launch(const char* what) { cuda_check(cudaGetLastError(), what); }

// Calls f(T{}) with the CUDA element type of dtype (float, __half or __nv_bfloat16).
template <typename F>
void dispatch_float_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace trous

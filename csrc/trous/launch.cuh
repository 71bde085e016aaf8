// Helpers shared by the torch-free CUDA launchers: error checks and the element-type dispatch.
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

// The CUDA element types of DType::kFloat16 / kBFloat16, for dispatch_dtype (trous/dtype.h).
struct CudaTypes {
  using f16 = __half;
  using bf16 = __nv_bfloat16;
};

}  // namespace trous

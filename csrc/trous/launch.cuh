// Helpers shared by the torch-free CUDA launchers: the launch macro, error checks and the element-type
// dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "trous/common.h"

// Every kernel launch of a launcher: TROUS_LAUNCH(grid, block, smem, stream, kernel)(args...) is
// kernel<<<grid, block, smem, stream>>>(args...). The kernel comes last so that a template-id with
// commas (quantize_token_lanes<T, VEC, L>) needs no parentheses. The CUDA emulation of the tests
// (tests/emu/cuda_emu.h, included first) defines its own version, so that the launchers run
// unchanged on the CPU; the CUDA runtime calls they make have host stand-ins there.
#ifndef TROUS_LAUNCH
#ifdef TROUS_CUDA_EMULATION
#error "TROUS_CUDA_EMULATION without TROUS_LAUNCH: include tests/emu/cuda_emu.h before the launchers"
#endif
#define TROUS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

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

// The one element-type vocabulary of every kernel: the DType enum, the accumulation type, and the one
// dispatch helper used by CPU kernels, CUDA launchers and the op layer. Torch-free.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

namespace trous {

// Floating element types of kernel inputs and outputs.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

// 16-bit types and fp32 accumulate in fp32, fp64 in fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f(T{}) with the element type of `dtype` on a backend: `Types` names the backend's 16-bit
// types (CpuTypes in trous/simd_cpu.h, CudaTypes in trous/launch.cuh). Kernels without an fp64
// instance leave kWithFloat64 false, and an fp64 dtype then throws (the op layer refuses it first).
template <typename Types, bool kWithFloat64 = false, typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(typename Types::f16{}); return;
    case DType::kBFloat16: f(typename Types::bf16{}); return;
    case DType::kFloat64:
      if constexpr (kWithFloat64) {
        f(double{});
        return;
      }
      break;
  }
  throw std::invalid_argument(std::string("trous: no kernel instance for ") + dtype_name(dtype));
}

}  // namespace trous

// Launchers of the KV-cache kernels: raw pointers and a stream, no torch headers.
#include "trous/launch.cuh"
#include "kvcache/quantize_cuda.h"
#include "kvcache/quantize_kernels.cuh"

namespace trous {
namespace kv {
namespace {

unsigned blocks_for(index_t work) { return (unsigned)ceil_div(work, kThreads); }

// 16-byte vector loads need the base pointer and every row start 16-byte aligned.
bool rows_aligned(const void* x, const RowLayout& in, size_t elem) {
  const auto ok = [elem](index_t stride) { return (stride * (index_t)elem) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && ok(in.stride.b) && ok(in.stride.h) && ok(in.stride.t);
}

template <typename T, bool VEC>
void quantize_token_typed(const T* x, uint8_t* codes, void* params, const TokenQuantArgs& a, cudaStream_t s) {
  const index_t lanes = a.group / kPack;
  const unsigned blocks = blocks_for(a.in.rows() * (a.in.D / kPack));
  // A macro per case, which clang-format cannot lay out stably.
  // clang-format off
  switch (lanes) {
#define TROUS_LANES_CASE(L) \
  case L: TROUS_LAUNCH(blocks, kThreads, 0, s, quantize_token_lanes<T, VEC, L>)(x, codes, params, a); return;
    TROUS_LANES_CASE(1) TROUS_LANES_CASE(2) TROUS_LANES_CASE(4) TROUS_LANES_CASE(8) TROUS_LANES_CASE(16)
    TROUS_LANES_CASE(32)
#undef TROUS_LANES_CASE
    default:
      TROUS_LAUNCH(blocks_for(a.in.rows() * (a.in.D / a.group)), kThreads, 0, s, quantize_token_serial<T>)(
          x, codes, params, a);
  }
  // clang-format on
}

}  // namespace

void launch_quantize_token(DType dtype, const void* x, uint8_t* codes, void* params, const TokenQuantArgs& a,
                           void* stream) {
  if (a.in.rows() == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (rows_aligned(x, a.in, sizeof(T))) {
      quantize_token_typed<T, true>(xt, codes, params, a, s);
    } else {
      quantize_token_typed<T, false>(xt, codes, params, a, s);
    }
  });
  check_launch("trous kv_quantize");
}

void launch_dequantize_token(DType dtype, const uint8_t* codes, const void* params, void* out,
                             const TokenDequantArgs& a, void* stream) {
  if (a.rows == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(blocks_for(a.rows * (a.D / kPack)), kThreads, 0, s, dequantize_token<T>)(codes, params,
                                                                                          static_cast<T*>(out), a);
  });
  check_launch("trous kv_dequantize");
}

void launch_quantize_channel(DType dtype, const void* x, uint8_t* codes, void* params, const ChannelQuantArgs& a,
                             void* stream) {
  if (a.in.rows() == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(a.in.B * a.in.H * (a.in.T / a.group) * (a.in.D / kPack));
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (rows_aligned(x, a.in, sizeof(T))) {
      TROUS_LAUNCH(blocks, kThreads, 0, s, quantize_channel<T, true>)(xt, codes, params, a);
    } else {
      TROUS_LAUNCH(blocks, kThreads, 0, s, quantize_channel<T, false>)(xt, codes, params, a);
    }
  });
  check_launch("trous kv_quantize_channel");
}

void launch_dequantize_channel(DType dtype, const uint8_t* codes, const void* params, void* out,
                               const ChannelDequantArgs& a, void* stream) {
  if (a.rows == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    TROUS_LAUNCH(blocks_for(a.rows * (a.D / kPack)), kThreads, 0, s, dequantize_channel<T>)(codes, params,
                                                                                            static_cast<T*>(out), a);
  });
  check_launch("trous kv_dequantize_channel");
}

void launch_quantize_fp8(DType dtype, const void* x, const float* scale, uint8_t* codes, const Fp8Args& a,
                         void* stream) {
  if (a.in.rows() == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(a.in.rows() * (a.in.D / kPack));
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (rows_aligned(x, a.in, sizeof(T))) {
      TROUS_LAUNCH(blocks, kThreads, 0, s, quantize_fp8<T, true>)(xt, scale, codes, a);
    } else {
      TROUS_LAUNCH(blocks, kThreads, 0, s, quantize_fp8<T, false>)(xt, scale, codes, a);
    }
  });
  check_launch("trous kv_quantize_fp8");
}

void launch_dequantize_fp8(DType dtype, const uint8_t* codes, const float* scale, void* out, index_t rows, index_t H,
                           index_t T, index_t D, Fp8Format format, bool per_head, void* stream) {
  if (rows == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    TROUS_LAUNCH(blocks_for(rows * (D / kPack)), kThreads, 0, s, dequantize_fp8<Elem>)(
        codes, scale, static_cast<Elem*>(out), rows, H, T, D, format, per_head);
  });
  check_launch("trous kv_dequantize_fp8");
}

}  // namespace kv
}  // namespace trous

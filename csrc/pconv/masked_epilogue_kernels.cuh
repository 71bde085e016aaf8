// CUDA kernels of the mask-aware partial convolution's epilogue (math: masked_epilogue.h). Torch-free.
//
// Forward: one thread per output element, grid-stride over the 64-bit flat index (p fastest for
// NC[spatial] strides, c fastest for channels_last, so a warp touches consecutive addresses); the
// coefficients come from S (fp32; fp64 for fp64) in registers, and the threads of the first channel
// of each S channel write the new mask. One read of raw, one write of out (out may be raw: the
// in-place variant; each element is read and written by one thread).
// Backward: one block per (channel c, chunk): grad_raw = grad_out * a for its elements and the block's
// sum of grad_out * cb (the bias gradient) reduced in shared memory into partial[chunk, c].
#pragma once
#include "pconv/masked_epilogue.h"
#include "trous/convert.cuh"

namespace trous {
namespace pconv {

constexpr int kMaskedBlock = 256;

TROUS_INLINE void masked_unflatten(const MaskedEpilogueArgs& a, index_t idx, index_t& n, index_t& c, index_t& p) {
  if (a.sc == 1 && a.C > 1) {  // channels_last: (n, p, c)
    c = idx % a.C;
    const index_t r = idx / a.C;
    p = r % a.P;
    n = r / a.P;
  } else {
    p = idx % a.P;
    const index_t r = idx / a.P;
    c = r % a.C;
    n = r / a.C;
  }
}

template <typename T, typename Acc>
__global__ void masked_epilogue_kernel(const T* raw, const Acc* __restrict__ S, const T* __restrict__ bias,
                                       T* __restrict__ out, T* __restrict__ new_mask, MaskedEpilogueArgs a) {
  const index_t total = a.numel();
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t cg = a.C / a.G;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    index_t n, c, p;
    masked_unflatten(a, idx, n, c, p);
    const index_t si = a.s_index(n, c, p);
    const Acc s = S[si];
    const MaskedCoeffs<Acc> k = masked_coeffs<Acc>(s, static_cast<Acc>(a.K), a.mode, a.has_bias);
    const index_t o = n * a.sn + c * a.sc + p * a.sp;
    const Acc b = a.has_bias ? to_acc<Acc>(bias[c]) : Acc(0);
    const Acc v = k.keep ? to_acc<Acc>(raw[o]) * k.a + b * k.cb : Acc(0);
    out[o] = from_acc<T>(v);
    if (c % cg == 0 && n < a.Ns) new_mask[si] = from_acc<T>(masked_new_mask<Acc>(s));
  }
}

template <typename T, typename Acc>
__global__ void masked_epilogue_backward_kernel(const T* __restrict__ grad_out, const Acc* __restrict__ S,
                                                T* __restrict__ grad_raw, Acc* __restrict__ partial,
                                                MaskedEpilogueArgs a, index_t chunks) {
  __shared__ Acc red[kMaskedBlock];
  const index_t c = static_cast<index_t>(blockIdx.x) % a.C;
  const index_t chunk = static_cast<index_t>(blockIdx.x) / a.C;
  const index_t total = a.N * a.P;
  Acc sum = Acc(0);
  for (index_t j = chunk * kMaskedBlock + threadIdx.x; j < total; j += chunks * kMaskedBlock) {
    const index_t n = j / a.P, p = j % a.P;
    const MaskedCoeffs<Acc> k = masked_coeffs<Acc>(S[a.s_index(n, c, p)], static_cast<Acc>(a.K), a.mode, a.has_bias);
    const index_t o = n * a.sn + c * a.sc + p * a.sp;
    const Acc g = to_acc<Acc>(grad_out[o]);
    grad_raw[o] = from_acc<T>(k.keep ? g * k.a : Acc(0));
    if (k.keep) sum += g * k.cb;
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kMaskedBlock / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0 && a.has_bias) partial[chunk * a.C + c] = red[0];
}

}  // namespace pconv
}  // namespace trous

// Launchers of the direct depthwise DCLS convolution kernels: raw pointers and a stream, no torch.
#include "trous/launch.cuh"
#include "dcls/conv_cuda.h"
#include "dcls/conv_kernels.cuh"

namespace trous {
namespace dcls {
namespace {

int device_attr(cudaDeviceAttr a) {
  int dev = 0, v = 0;
  cuda_check(cudaGetDevice(&dev), "trous dcls_conv: cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&v, a, dev), "trous dcls_conv: cudaDeviceGetAttribute");
  return v;
}

size_t taps_bytes(const ConvGeom& g) { return (size_t)tap_smem_words(g) * 4; }
size_t grad_taps_bytes(const ConvGeom& g) { return taps_bytes(g) + (size_t)kGradTapsExtraWords * 4; }
size_t params_bytes(const ConvGeom& g) { return (size_t)params_smem_words(g) * 4; }

// Kernels above 48 KiB of dynamic shared memory must opt in (once per kernel and size).
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
               "trous dcls_conv: cudaFuncSetAttribute");
  }
}

unsigned blocks_for(index_t work) { return (unsigned)ceil_div(work, (index_t)kThreads * kOutPerThread); }

// Batch slices keep the kernels' per-channel index math 32-bit: slice * plane < 2^31.
index_t slice_n(const ConvGeom& g) {
  const index_t plane = g.in_plane() > g.out_plane() ? g.in_plane() : g.out_plane();
  const index_t n = ((index_t)1 << 31) / (plane + (index_t)kThreads * kOutPerThread);
  return n < 1 ? 1 : n;
}

template <typename F>
void for_slices(const ConvGeom& g, F&& f) {
  const index_t step = slice_n(g);
  int i = 0;
  for (index_t n0 = 0; n0 < g.N; n0 += step, ++i) {
    ConvGeom gs = g;
    gs.N = g.N - n0 < step ? g.N - n0 : step;
    f(gs, n0, i);
  }
}

int num_slices(const ConvGeom& g) { return (int)ceil_div(g.N, slice_n(g)); }

// Splits of the grad-taps reduction: about four blocks per SM over all channels.
int taps_splits(const ConvGeom& g) {
  const index_t sms = device_attr(cudaDevAttrMultiProcessorCount);
  const index_t n = g.N < slice_n(g) ? g.N : slice_n(g);
  const index_t per_channel = n * g.out_plane();
  index_t s = ceil_div(4 * sms, g.C);
  s = s < ceil_div(per_channel, (index_t)kStage) ? s : ceil_div(per_channel, (index_t)kStage);
  return (int)(s < 1 ? 1 : (s > 1024 ? 1024 : s));
}

}  // namespace

size_t cuda_smem_bytes(const ConvGeom& g) {
  size_t b = grad_taps_bytes(g);
  return params_bytes(g) > b ? params_bytes(g) : b;
}

bool cuda_geometry_supported(const ConvGeom& g) {
  if (g.dks[0] >= (1 << kPackBits) || g.dks[1] >= (1 << kPackBits) || g.dks[2] >= (1 << kPackBits)) return false;
  if (g.C > 65535) return false;
  return cuda_smem_bytes(g) <= (size_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

size_t cuda_backward_workspace(const ConvGeom& g) { return (size_t)num_slices(g) * taps_splits(g) * g.C * g.window(); }

void launch_forward(DType dtype, const void* x, void* out, const ConvGeom& g, const Params<float>& p, void* stream) {
  if (g.N * g.C == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t smem = taps_bytes(g);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    allow_smem(dcls_forward_kernel<T>, smem);
    for_slices(g, [&](const ConvGeom& gs, index_t n0, int) {
      const dim3 grid(blocks_for(gs.N * gs.out_plane()), (unsigned)g.C);
      TROUS_LAUNCH(grid, kThreads, smem, s, dcls_forward_kernel<T>)(
          static_cast<const T*>(x) + n0 * g.C * g.in_plane(), static_cast<T*>(out) + n0 * g.C * g.out_plane(), gs, p);
    });
  });
  check_launch("trous dcls_conv forward");
}

void launch_backward(DType dtype, const void* grad_out, const void* x, void* grad_x, const ConvGeom& g,
                     const Params<float>& p, const ParamGrads<float>& gr, float* workspace, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (g.N * g.C == 0) {
    if (gr.gw) {
      const size_t n = (size_t)g.C * g.kc;
      cuda_check(cudaMemsetAsync(gr.gw, 0, n * 4, s), "trous dcls_conv backward");
      cuda_check(cudaMemsetAsync(gr.gP, 0, n * g.ndim * 4, s), "trous dcls_conv backward");
      if (gr.gSIG) cuda_check(cudaMemsetAsync(gr.gSIG, 0, n * g.ndim * 4, s), "trous dcls_conv backward");
    }
    return;
  }
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_out);
    if (grad_x) {
      const size_t smem = taps_bytes(g);
      allow_smem(dcls_grad_input_kernel<T>, smem);
      for_slices(g, [&](const ConvGeom& gs, index_t n0, int) {
        const dim3 grid(blocks_for(gs.N * gs.in_plane()), (unsigned)g.C);
        TROUS_LAUNCH(grid, kThreads, smem, s, dcls_grad_input_kernel<T>)(
            go + n0 * g.C * g.out_plane(), static_cast<T*>(grad_x) + n0 * g.C * g.in_plane(), gs, p);
      });
      check_launch("trous dcls_conv backward (input)");
    }
    if (gr.gw) {
      const int splits = taps_splits(g);
      const size_t smem = grad_taps_bytes(g);
      allow_smem(dcls_grad_taps_kernel<T>, smem);
      for_slices(g, [&](const ConvGeom& gs, index_t n0, int i) {
        TROUS_LAUNCH(dim3((unsigned)splits, (unsigned)g.C), kThreads, smem, s, dcls_grad_taps_kernel<T>)(
            go + n0 * g.C * g.out_plane(), static_cast<const T*>(x) + n0 * g.C * g.in_plane(),
            workspace + (size_t)i * splits * g.C * g.window(), gs, p);
      });
      check_launch("trous dcls_conv backward (taps)");
      const size_t psmem = params_bytes(g);
      allow_smem(dcls_grad_params_kernel, psmem);
      TROUS_LAUNCH((unsigned)g.C, kThreads, psmem, s, dcls_grad_params_kernel)(workspace, splits * num_slices(g), g, p,
                                                                               gr);
      check_launch("trous dcls_conv backward (params)");
    }
  });
}

}  // namespace dcls
}  // namespace trous

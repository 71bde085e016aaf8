// Mask-aware partial convolution (NVIDIA's PartialConv2d/3d), the epilogue math shared by the CPU and
// CUDA kernels. Torch-free.
//
// The convolution raw = conv(X . M, W) (no bias) runs in oneDNN / cuDNN through ATen; S is the box sum
// of the single-channel mask over each output's window (fp32, [Ns, G, P]: Ns = 1 or N, G = 1 or the
// number of groups with multi_channel "exact", P = the output positions). This epilogue is the one
// pass that reads raw and writes out, the new mask and nothing else:
//
//   exact:  out = raw * K / S + b          where S > 0, 0 where S = 0 (even if raw is NaN or Inf)
//   nvidia: U = clamp(S, 0, 1); r = K / (S + 1e-8) * U;
//           out = raw * r * U + b * U  (with bias: the reference's ((raw + b - b) * r + b) * U)
//           out = raw * r              (without bias)
//   new mask = min(S, 1) where S > 0, else 0 (both modes)
//
// S and the ratio are fp32 (fp64 for fp64 inputs), so fp16 / bf16 never give Inf or NaN from the ratio.
// Output channel c reads S channel c / (C / G). raw, out (and grad_out, grad_raw in backward) share
// the strides (n, c, p) of `MaskedEpilogueArgs` (NC[spatial] contiguous: sp = 1; channels_last:
// sc = 1); S and the new mask are contiguous [Ns, G, P].
#pragma once
#include "trous/common.h"

namespace trous {
namespace pconv {

enum class MaskedMode : int { kExact = 0, kNvidia = 1 };

struct MaskedEpilogueArgs {
  index_t N, C, P;     // raw / out: [N, C, P]
  index_t Ns, G;       // S / new mask: [Ns, G, P], Ns in {1, N}, C % G == 0
  index_t sn, sc, sp;  // strides of raw / out in elements
  double K;            // window size (kh * kw [* Cin / groups or Cin])
  MaskedMode mode;
  bool has_bias;
  TROUS_INLINE index_t numel() const { return N * C * P; }
  TROUS_INLINE index_t s_index(index_t n, index_t c, index_t p) const {
    return ((Ns == 1 ? 0 : n) * G + c / (C / G)) * P + p;
  }
};

// The per-position coefficients: out = keep ? raw * a + b * cb : 0 (keep is false only where S = 0 in
// exact mode); the gradient is grad_raw = keep ? grad_out * a : 0, grad_b += keep ? grad_out * cb : 0.
template <typename Acc>
struct MaskedCoeffs {
  Acc a, cb;
  bool keep;
};

template <typename Acc>
TROUS_INLINE MaskedCoeffs<Acc> masked_coeffs(Acc S, Acc K, MaskedMode mode, bool has_bias) {
  MaskedCoeffs<Acc> r;
  if (mode == MaskedMode::kExact) {
    r.keep = S > Acc(0);
    r.a = r.keep ? K / S : Acc(0);
    r.cb = r.keep ? Acc(1) : Acc(0);
  } else {
    const Acc U = S > Acc(0) ? (S < Acc(1) ? S : Acc(1)) : Acc(0);
    const Acc ratio = K / (S + Acc(1e-8)) * U;
    r.keep = true;
    r.a = has_bias ? ratio * U : ratio;
    r.cb = U;
  }
  return r;
}

template <typename Acc>
TROUS_INLINE Acc masked_new_mask(Acc S) {
  return S > Acc(0) ? (S < Acc(1) ? S : Acc(1)) : Acc(0);
}

}  // namespace pconv
}  // namespace trous

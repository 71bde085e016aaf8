// CPU kernels of the mask-aware partial convolution's epilogue (math: masked_epilogue.h).
//
// The per-position coefficients (a, cb of masked_coeffs) and the new mask are computed once over the
// small [Ns, G, P] tensor S (1/C of the output); then one pass over the output: one task of
// at::parallel_for per block of (n, c) rows when rows are contiguous (NC[spatial]; the row loop is an
// `omp simd` loop, fp32 accumulation), per block of (n, p) positions otherwise (channels_last: the
// channel loop is contiguous). Backward is the same pass with the bias gradient's partial sums per
// (n, c) (fp32; fp64 for fp64), summed over n by the caller. TROUS_CPU_SIMD=0: portable loops only.
#include "pconv/masked_epilogue_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "trous/simd_cpu.h"

namespace trous {
namespace pconv {
namespace {

template <typename Acc, typename T>
inline Acc ld(T v) {
  return static_cast<Acc>(static_cast<float>(v));
}
template <>
inline double ld<double, double>(double v) {
  return v;
}
template <typename T, typename Acc>
inline T st(Acc v) {
  return static_cast<T>(static_cast<float>(v));
}
template <>
inline double st<double, double>(double v) {
  return v;
}

// A[i], B[i] (the coefficients a, cb; A = 0 where exact mode drops the output) and the new mask.
template <typename T, typename Acc>
void coefficients(const Acc* S, T* new_mask, std::vector<Acc>& A, std::vector<Acc>& B, const MaskedEpilogueArgs& a) {
  const index_t n = a.Ns * a.G * a.P;
  A.resize(static_cast<size_t>(n));
  B.resize(static_cast<size_t>(n));
  const Acc K = static_cast<Acc>(a.K);
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const MaskedCoeffs<Acc> k = masked_coeffs<Acc>(S[i], K, a.mode, a.has_bias);
      A[i] = k.keep ? k.a : Acc(0);
      B[i] = k.keep ? k.cb : Acc(0);
      if (new_mask) new_mask[i] = st<T>(masked_new_mask<Acc>(S[i]));
    }
  });
}

// One row of P outputs: y = x * A + b * B (kSelect: 0 where A <= 0, i.e. S = 0 in exact mode, even for a
// NaN / Inf x). Generic element types convert through fp32 (fp64 for fp64); fp32 has AVX2 clones.
template <typename T, typename Acc, bool kSelect>
inline void fwd_row(const T* x, T* y, const Acc* A, const Acc* B, Acc b, index_t P) {
#pragma omp simd
  for (index_t p = 0; p < P; ++p) {
    Acc v = ld<Acc>(x[p]) * A[p] + b * B[p];
    if constexpr (kSelect) v = A[p] > Acc(0) ? v : Acc(0);
    y[p] = st<T>(v);
  }
}
typedef float v8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));
// (through references: a v8 argument or return value of a non-AVX function would change the ABI)
inline void loadu(v8& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }
inline void storeu(float* p, const v8& v) { std::memcpy(p, &v, sizeof(v)); }
// GCC vectors: the select is a bitwise and with the comparison's lane mask (no branch).
TROUS_CPU_CLONES void fwd_row_f32_select(const float* x, float* y, const float* A, const float* B, float b, index_t P) {
  index_t p = 0;
  for (; p + 8 <= P; p += 8) {
    v8 a, xv, bv;
    loadu(a, A + p), loadu(xv, x + p), loadu(bv, B + p);
    const v8 v = xv * a + b * bv;
    const i8 keep = a > v8{};
    const v8 r = reinterpret_cast<v8>(reinterpret_cast<i8>(v) & keep);
    storeu(y + p, r);
  }
  for (; p < P; ++p) y[p] = A[p] > 0.f ? x[p] * A[p] + b * B[p] : 0.f;
}
TROUS_CPU_CLONES void fwd_row_f32(const float* x, float* y, const float* A, const float* B, float b, index_t P) {
#pragma omp simd
  for (index_t p = 0; p < P; ++p) y[p] = x[p] * A[p] + b * B[p];
}
// TROUS_CPU_SIMD=0: the portable loops (the scalar twins) for fp32 too.
template <>
inline void fwd_row<float, float, true>(const float* x, float* y, const float* A, const float* B, float b, index_t P) {
  if (cpu::simd_allowed()) return fwd_row_f32_select(x, y, A, B, b, P);
  for (index_t p = 0; p < P; ++p) y[p] = A[p] > 0.f ? x[p] * A[p] + b * B[p] : 0.f;
}
template <>
inline void fwd_row<float, float, false>(const float* x, float* y, const float* A, const float* B, float b, index_t P) {
  if (cpu::simd_allowed()) return fwd_row_f32(x, y, A, B, b, P);
  for (index_t p = 0; p < P; ++p) y[p] = x[p] * A[p] + b * B[p];
}

// One row of the backward: y = g * A, returns sum(g * B) (kSelect: both 0 where A <= 0).
template <typename T, typename Acc, bool kSelect>
inline Acc bwd_row(const T* g, T* y, const Acc* A, const Acc* B, index_t P) {
  Acc sum = Acc(0);
#pragma omp simd reduction(+ : sum)
  for (index_t p = 0; p < P; ++p) {
    const Acc gv = ld<Acc>(g[p]);
    Acc v = gv * A[p];
    Acc s = gv * B[p];
    if constexpr (kSelect) {
      v = A[p] > Acc(0) ? v : Acc(0);
      s = A[p] > Acc(0) ? s : Acc(0);
    }
    y[p] = st<T>(v);
    sum += s;
  }
  return sum;
}
TROUS_CPU_CLONES float bwd_row_f32_select(const float* g, float* y, const float* A, const float* B, index_t P) {
  v8 acc{};
  index_t p = 0;
  for (; p + 8 <= P; p += 8) {
    v8 a, gv, bv;
    loadu(a, A + p), loadu(gv, g + p), loadu(bv, B + p);
    const i8 keep = a > v8{};
    const v8 r = reinterpret_cast<v8>(reinterpret_cast<i8>(gv * a) & keep);
    storeu(y + p, r);
    acc += reinterpret_cast<v8>(reinterpret_cast<i8>(gv * bv) & keep);
  }
  float sum = 0.f;
  for (int j = 0; j < 8; ++j) sum += acc[j];
  for (; p < P; ++p) {
    const bool keep = A[p] > 0.f;
    y[p] = keep ? g[p] * A[p] : 0.f;
    sum += keep ? g[p] * B[p] : 0.f;
  }
  return sum;
}
TROUS_CPU_CLONES float bwd_row_f32(const float* g, float* y, const float* A, const float* B, index_t P) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (index_t p = 0; p < P; ++p) {
    y[p] = g[p] * A[p];
    sum += g[p] * B[p];
  }
  return sum;
}
template <>
inline float bwd_row<float, float, true>(const float* g, float* y, const float* A, const float* B, index_t P) {
  if (cpu::simd_allowed()) return bwd_row_f32_select(g, y, A, B, P);
  float sum = 0.f;
  for (index_t p = 0; p < P; ++p) {
    const bool keep = A[p] > 0.f;
    y[p] = keep ? g[p] * A[p] : 0.f;
    sum += keep ? g[p] * B[p] : 0.f;
  }
  return sum;
}
template <>
inline float bwd_row<float, float, false>(const float* g, float* y, const float* A, const float* B, index_t P) {
  if (cpu::simd_allowed()) return bwd_row_f32(g, y, A, B, P);
  float sum = 0.f;
  for (index_t p = 0; p < P; ++p) {
    y[p] = g[p] * A[p];
    sum += g[p] * B[p];
  }
  return sum;
}

template <typename T, typename Acc, bool kSelect>
void forward_rows(const T* raw, const T* bias, T* out, const Acc* A, const Acc* B, const MaskedEpilogueArgs& a) {
  const index_t P = a.P, C = a.C, cg = a.C / a.G;
  at::parallel_for(0, a.N * C, std::max<int64_t>(1, 32768 / std::max<index_t>(P, 1)), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const index_t n = r / C, c = r % C;
      const index_t so = ((a.Ns == 1 ? 0 : n) * a.G + c / cg) * P;
      const Acc* Ar = A + so;
      const Acc* Br = B + so;
      const T* x = raw + n * a.sn + c * a.sc;
      T* y = out + n * a.sn + c * a.sc;
      const Acc b = bias ? ld<Acc>(bias[c]) : Acc(0);
      fwd_row<T, Acc, kSelect>(x, y, Ar, Br, b, P);
    }
  });
}

template <typename T, typename Acc, bool kSelect>
void forward_positions(const T* raw, const T* bias, T* out, const Acc* A, const Acc* B, const MaskedEpilogueArgs& a) {
  const index_t P = a.P, C = a.C, cg = a.C / a.G;
  at::parallel_for(0, a.N * P, std::max<int64_t>(1, 32768 / std::max<index_t>(C, 1)), [&](int64_t qb, int64_t qe) {
    for (int64_t q = qb; q < qe; ++q) {
      const index_t n = q / P, p = q % P;
      const index_t base = (a.Ns == 1 ? 0 : n) * a.G * P + p;
      const T* x = raw + n * a.sn + p * a.sp;
      T* y = out + n * a.sn + p * a.sp;
      for (index_t c = 0; c < C; ++c) {
        const index_t si = base + (c / cg) * P;
        const Acc b = bias ? ld<Acc>(bias[c]) : Acc(0);
        Acc v = ld<Acc>(x[c * a.sc]) * A[si] + b * B[si];
        if constexpr (kSelect) v = A[si] > Acc(0) ? v : Acc(0);
        y[c * a.sc] = st<T>(v);
      }
    }
  });
}

template <typename T, bool kSelect>
void backward_impl(const T* go, T* gr, typename std::conditional_t<std::is_same_v<T, double>, double, float>* partial,
                   const std::vector<acc_t<T>>& Av, const std::vector<acc_t<T>>& Bv, const MaskedEpilogueArgs& a) {
  using Acc = acc_t<T>;
  const Acc* A = Av.data();
  const Acc* B = Bv.data();
  const index_t P = a.P, C = a.C, cg = a.C / a.G;
  if (a.sp == 1) {
    at::parallel_for(0, a.N * C, std::max<int64_t>(1, 32768 / std::max<index_t>(P, 1)), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const index_t n = r / C, c = r % C;
        const index_t so = ((a.Ns == 1 ? 0 : n) * a.G + c / cg) * P;
        const Acc* Ar = A + so;
        const Acc* Br = B + so;
        const T* g = go + n * a.sn + c * a.sc;
        T* y = gr + n * a.sn + c * a.sc;
        const Acc sum = bwd_row<T, Acc, kSelect>(g, y, Ar, Br, P);
        if (partial) partial[r] = sum;
      }
    });
    return;
  }
  at::parallel_for(0, a.N, 1, [&](int64_t nb, int64_t ne) {
    std::vector<Acc> sums(static_cast<size_t>(C));
    for (int64_t n = nb; n < ne; ++n) {
      std::fill(sums.begin(), sums.end(), Acc(0));
      for (index_t p = 0; p < P; ++p) {
        const index_t base = (a.Ns == 1 ? 0 : n) * a.G * P + p;
        const T* g = go + n * a.sn + p * a.sp;
        T* y = gr + n * a.sn + p * a.sp;
        for (index_t c = 0; c < C; ++c) {
          const index_t si = base + (c / cg) * P;
          const Acc gv = ld<Acc>(g[c * a.sc]);
          Acc v = gv * A[si];
          Acc s = gv * B[si];
          if constexpr (kSelect) {
            v = A[si] > Acc(0) ? v : Acc(0);
            s = A[si] > Acc(0) ? s : Acc(0);
          }
          y[c * a.sc] = st<T>(v);
          sums[c] += s;
        }
      }
      if (partial)
        for (index_t c = 0; c < C; ++c) partial[n * C + c] = sums[c];
    }
  });
}

}  // namespace

void cpu_masked_epilogue(DType dtype, const void* raw, const void* S, const void* bias, void* out, void* new_mask,
                         const MaskedEpilogueArgs& a) {
  dispatch_dtype<cpu::CpuTypes, true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    std::vector<Acc> A, B;
    coefficients<T, Acc>(static_cast<const Acc*>(S), static_cast<T*>(new_mask), A, B, a);
    if (a.numel() == 0) return;
    const T* r = static_cast<const T*>(raw);
    const T* b = a.has_bias ? static_cast<const T*>(bias) : nullptr;
    T* o = static_cast<T*>(out);
    const bool exact = a.mode == MaskedMode::kExact;
    if (a.sp == 1) {
      if (exact)
        forward_rows<T, Acc, true>(r, b, o, A.data(), B.data(), a);
      else
        forward_rows<T, Acc, false>(r, b, o, A.data(), B.data(), a);
    } else {
      if (exact)
        forward_positions<T, Acc, true>(r, b, o, A.data(), B.data(), a);
      else
        forward_positions<T, Acc, false>(r, b, o, A.data(), B.data(), a);
    }
  });
}

void cpu_masked_epilogue_backward(DType dtype, const void* grad_out, const void* S, void* grad_raw,
                                  void* grad_bias_partial, const MaskedEpilogueArgs& a) {
  dispatch_dtype<cpu::CpuTypes, true>(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    std::vector<Acc> A, B;
    coefficients<T, Acc>(static_cast<const Acc*>(S), nullptr, A, B, a);
    if (a.numel() == 0) return;
    Acc* partial = a.has_bias ? static_cast<Acc*>(grad_bias_partial) : nullptr;
    if (a.mode == MaskedMode::kExact)
      backward_impl<T, true>(static_cast<const T*>(grad_out), static_cast<T*>(grad_raw), partial, A, B, a);
    else
      backward_impl<T, false>(static_cast<const T*>(grad_out), static_cast<T*>(grad_raw), partial, A, B, a);
  });
}

}  // namespace pconv
}  // namespace trous

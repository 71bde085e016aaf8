// CPU kernel of the direct channel-partial convolution (math: channel_partial.h).
//
// One task of at::parallel_for per (n, output row h). In a task:
//   * pass-through: rows x[n, c, h, :] of the channels c >= cp are copied to out (memcpy when both
//     rows are contiguous);
//   * convolution (rows contiguous in w): the kh input rows of each of the cp input channels that the
//     output row reads are converted to fp32 into a zero-padded scratch (padding on both sides and up
//     to whole vectors past the end), so every tap is one plain vector load; then blocks of 6 output
//     channels x 16 columns accumulate in registers (GCC vectors, cloned for AVX2/FMA with a portable
//     default) over i < cp, kernel rows and columns, each loaded input vector used for 6 channels (the last
//     8 columns in a one-vector block);
//   * any other strides (channels_last, transposed views): the scalar twin, one output at a time
//     (the op routes channels_last through oneDNN by default).
// fp16/bf16 accumulate in fp32. TROUS_CPU_SIMD=0 forces the scalar twin.
#include "pconv/channel_partial_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "trous/simd_cpu.h"

namespace trous {
namespace pconv {
namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kCols = 16;  // columns per register block (2 vectors of 8)
constexpr int kOcBlock = 6;

inline v8 loadu(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storeu(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// acc[j][0..Wr) for J output channels starting at oc of one output row, from the padded rows
// buf[(i * kh + r) * Wp + ...] (column 0 of buf is input column -pw). KW > 0: the kernel width as a
// compile-time constant (the tap loop unrolled); KW == 0: a.kw at run time. J <= 6 keeps the 2 J
// accumulators, two input vectors and a broadcast in the 16 AVX2 registers.
template <int J, int KW>
TROUS_CPU_CLONES void conv_row_block(const float* buf, index_t Wp, const float* wt, const ChannelPartialArgs& a,
                                     index_t oc, float* acc, index_t Wr) {
  const int kh = a.kh, kw = KW > 0 ? KW : a.kw, dw = a.dw;
  const index_t cp = a.cp;
  index_t x0 = 0;
  for (; x0 + kCols <= Wr; x0 += kCols) {
    v8 s0[J], s1[J];
    for (int j = 0; j < J; ++j) s0[j] = s1[j] = v8{};
    for (index_t i = 0; i < cp; ++i) {
      for (int r = 0; r < kh; ++r) {
        const float* row = buf + (i * kh + r) * Wp + x0;
        // wt is [i][r][s][oc]: the J weights of one tap are adjacent.
        const float* wtap = wt + ((i * kh + r) * kw) * cp + oc;
#pragma GCC unroll 8
        for (int s = 0; s < kw; ++s) {
          const v8 x_lo = loadu(row + s * dw), x_hi = loadu(row + s * dw + 8);
          for (int j = 0; j < J; ++j) {
            const float wv = wtap[s * cp + j];
            s0[j] += wv * x_lo;
            s1[j] += wv * x_hi;
          }
        }
      }
    }
    for (int j = 0; j < J; ++j) {
      storeu(acc + j * Wr + x0, s0[j]);
      storeu(acc + j * Wr + x0 + 8, s1[j]);
    }
  }
  if (x0 < Wr) {  // the last 8 columns (Wr is a multiple of 8)
    v8 s0[J];
    for (int j = 0; j < J; ++j) s0[j] = v8{};
    for (index_t i = 0; i < cp; ++i) {
      for (int r = 0; r < kh; ++r) {
        const float* row = buf + (i * kh + r) * Wp + x0;
        const float* wtap = wt + ((i * kh + r) * kw) * cp + oc;
#pragma GCC unroll 8
        for (int s = 0; s < kw; ++s) {
          const v8 xv = loadu(row + s * dw);
          for (int j = 0; j < J; ++j) s0[j] += wtap[s * cp + j] * xv;
        }
      }
    }
    for (int j = 0; j < J; ++j) storeu(acc + j * Wr + x0, s0[j]);
  }
}

template <int KW>
void conv_row(const float* buf, index_t Wp, const float* wt, const ChannelPartialArgs& a, index_t oc, float* acc,
              index_t Wr, index_t J) {
  switch (J) {
    case 6: conv_row_block<6, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
    case 5: conv_row_block<5, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
    case 4: conv_row_block<4, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
    case 3: conv_row_block<3, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
    case 2: conv_row_block<2, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
    default: conv_row_block<1, KW>(buf, Wp, wt, a, oc, acc, Wr); break;
  }
}

template <typename T>
void run(const T* x, const T* weight, T* out, const ChannelPartialArgs& a) {
  const index_t rows = a.N * a.H;
  const bool rows_contiguous = a.xs.w == 1 && a.os.w == 1;
  const bool simd = rows_contiguous && cpu::simd_allowed();
  const int ph = a.ph(), pw = a.pw();
  // Weights as fp32 [i][r][s][oc].
  std::vector<float> wt(static_cast<size_t>(a.cp * a.cp * a.kh * a.kw));
  for (index_t oc = 0; oc < a.cp; ++oc)
    for (index_t i = 0; i < a.cp; ++i)
      for (int r = 0; r < a.kh; ++r)
        for (int s = 0; s < a.kw; ++s)
          wt[((i * a.kh + r) * a.kw + s) * a.cp + oc] =
              static_cast<float>(weight[((oc * a.cp + i) * a.kh + r) * a.kw + s]);
  const index_t Wr = ceil_div(a.W, 8) * 8;  // columns computed (blocks of 16, then at most one of 8)
  const index_t Wp = Wr + 2 * pw + kCols;   // padded scratch row
  at::parallel_for(0, rows, 1, [&](index_t begin, index_t end) {
    std::vector<float> buf, acc;
    if (simd) {
      buf.assign(static_cast<size_t>(a.cp * a.kh * Wp), 0.f);
      acc.resize(static_cast<size_t>(kOcBlock * Wr));
    }
    for (index_t t = begin; t < end; ++t) {
      const index_t n = t / a.H, h = t % a.H;
      // Pass-through channels.
      for (index_t c = a.cp; c < a.out_channels; ++c) {
        const T* src = x + n * a.xs.n + c * a.xs.c + h * a.xs.h;
        T* dst = out + n * a.os.n + c * a.os.c + h * a.os.h;
        if (rows_contiguous) {
          std::memcpy(dst, src, sizeof(T) * a.W);
        } else {
          for (index_t w = 0; w < a.W; ++w) dst[w * a.os.w] = src[w * a.xs.w];
        }
      }
      if (!simd) {
        for (index_t c = 0; c < a.cp; ++c)
          for (index_t w = 0; w < a.W; ++w)
            out[n * a.os.n + c * a.os.c + h * a.os.h + w * a.os.w] = static_cast<T>(channel_partial_point<float>(
                a, n, c, h, w, [&](index_t off) { return static_cast<float>(x[off]); },
                [&](index_t k) { return static_cast<float>(weight[k]); }));
        continue;
      }
      for (index_t i = 0; i < a.cp; ++i) {
        for (int r = 0; r < a.kh; ++r) {
          float* dst = buf.data() + (i * a.kh + r) * Wp + pw;  // column 0 of the input
          const index_t y = h + static_cast<index_t>(r) * a.dh - ph;
          if (y < 0 || y >= a.H) {
            std::fill(dst, dst + a.W, 0.f);
          } else {
            const T* src = x + n * a.xs.n + i * a.xs.c + y * a.xs.h;
            if constexpr (std::is_same_v<T, float>) {
              std::memcpy(dst, src, sizeof(float) * a.W);
            } else {
              for (index_t w = 0; w < a.W; ++w) dst[w] = static_cast<float>(src[w]);
            }
          }
        }
      }
      for (index_t oc = 0; oc < a.cp; oc += kOcBlock) {
        const index_t J = std::min<index_t>(kOcBlock, a.cp - oc);
        switch (a.kw) {
          case 1: conv_row<1>(buf.data(), Wp, wt.data(), a, oc, acc.data(), Wr, J); break;
          case 3: conv_row<3>(buf.data(), Wp, wt.data(), a, oc, acc.data(), Wr, J); break;
          case 5: conv_row<5>(buf.data(), Wp, wt.data(), a, oc, acc.data(), Wr, J); break;
          default: conv_row<0>(buf.data(), Wp, wt.data(), a, oc, acc.data(), Wr, J); break;
        }
        for (index_t j = 0; j < J; ++j) {
          T* dst = out + n * a.os.n + (oc + j) * a.os.c + h * a.os.h;
          const float* src = acc.data() + j * Wr;
          if constexpr (std::is_same_v<T, float>) {
            std::memcpy(dst, src, sizeof(float) * a.W);
          } else {
            for (index_t w = 0; w < a.W; ++w) dst[w] = static_cast<T>(src[w]);
          }
        }
      }
    }
  });
}

}  // namespace

void cpu_channel_partial_conv2d(DType dtype, const void* x, const void* weight, void* out,
                                const ChannelPartialArgs& a) {
  if (a.out_numel() == 0) return;
  dispatch_dtype<cpu::CpuTypes>(dtype, [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(out), a);
  });
}

}  // namespace pconv
}  // namespace trous

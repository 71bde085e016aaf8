// Runs the channel-partial convolution kernel (csrc/pconv/channel_partial_kernels.cuh) through its
// real launcher (csrc/pconv/channel_partial_cuda.cu) under the CUDA emulation, on small grids and
// edge shapes (work not a multiple of the block, partial warps, a grid capped below the work so the
// grid-stride loop runs, NCHW and NHWC strides, out = C channels or cp only, dilation, 1x1 and
// non-square kernels, empty tensors), against a double-precision host reference written here from
// shared/spec/partial_conv.md section 1. Passed-through channels must be bit-exact; convolved ones
// within fp32 accumulation error plus one rounding of the output type. Exit status 0 iff all pass.
#include "cuda_emu.h"
#include "emu_check.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "pconv/channel_partial_cuda.cu"

using namespace trous;
using namespace trous::pconv;

namespace {

template <typename T> float to_f(T v);
template <> float to_f(float v) { return v; }
template <> float to_f(__half v) { return __half2float(v); }
template <> float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_f(float v);
template <> float from_f(float v) { return v; }
template <> __half from_f(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <typename T> double out_eps();
template <> double out_eps<float>() { return 1e-6; }
template <> double out_eps<__half>() { return 1e-3; }
template <> double out_eps<__nv_bfloat16>() { return 8e-3; }

struct Case {
  index_t N, C, H, W, cp;
  int kh, kw, dh, dw;
  bool conv_only;  // out has cp channels (the in-place variant's scratch)
  bool nhwc;       // x (and out) channels_last
  index_t max_blocks;
};

Strides4 strides(index_t C, index_t H, index_t W, bool nhwc) {
  if (nhwc) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

template <typename T>
void run_case(const Case& k) {
  const index_t OC = k.conv_only ? k.cp : k.C;
  Check chk{std::string("channel_partial ") + tname<T>() + " N" + std::to_string(k.N) + " C" + std::to_string(k.C) +
            " H" + std::to_string(k.H) + " W" + std::to_string(k.W) + " cp" + std::to_string(k.cp) + " k" +
            std::to_string(k.kh) + "x" + std::to_string(k.kw) + " d" + std::to_string(k.dh) + "," +
            std::to_string(k.dw) + (k.conv_only ? " conv-only" : "") + (k.nhwc ? " nhwc" : "") +
            " blocks<=" + std::to_string(k.max_blocks)};
  ChannelPartialArgs a{};
  a.N = k.N, a.C = k.C, a.H = k.H, a.W = k.W, a.cp = k.cp, a.out_channels = OC;
  a.kh = k.kh, a.kw = k.kw, a.dh = k.dh, a.dw = k.dw;
  a.xs = strides(k.C, k.H, k.W, k.nhwc);
  a.os = strides(OC, k.H, k.W, k.nhwc);
  std::vector<T> x(static_cast<size_t>(k.N * k.C * k.H * k.W)), w(static_cast<size_t>(k.cp * k.cp * k.kh * k.kw));
  std::vector<T> out(static_cast<size_t>(k.N * OC * k.H * k.W), from_f<T>(12345.f));
  for (auto& v : x) v = from_f<T>(static_cast<float>(uniform()));
  for (auto& v : w) v = from_f<T>(static_cast<float>(uniform() * 0.3));
  launch_channel_partial_conv2d(dtype_of<T>(), x.data(), w.data(), out.data(), a, nullptr, k.max_blocks);
  trous_emu::launches().clear();
  const int ph = k.dh * (k.kh - 1) / 2, pw = k.dw * (k.kw - 1) / 2;
  for (index_t n = 0; n < k.N; ++n)
    for (index_t c = 0; c < OC; ++c)
      for (index_t h = 0; h < k.H; ++h)
        for (index_t wc = 0; wc < k.W; ++wc) {
          const float got = to_f(out[n * a.os.n + c * a.os.c + h * a.os.h + wc * a.os.w]);
          if (c >= k.cp) {
            const float want = to_f(x[n * a.xs.n + c * a.xs.c + h * a.xs.h + wc * a.xs.w]);
            if (std::memcmp(&got, &want, sizeof(float)) != 0)
              chk.fail("pass-through (" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," +
                       std::to_string(wc) + ")");
            continue;
          }
          double ref = 0, mag = 0;
          for (index_t i = 0; i < k.cp; ++i)
            for (int r = 0; r < k.kh; ++r)
              for (int s = 0; s < k.kw; ++s) {
                const index_t y = h + r * k.dh - ph, xx = wc + s * k.dw - pw;
                if (y < 0 || y >= k.H || xx < 0 || xx >= k.W) continue;
                const double p = static_cast<double>(to_f(w[((c * k.cp + i) * k.kh + r) * k.kw + s])) *
                                 to_f(x[n * a.xs.n + i * a.xs.c + y * a.xs.h + xx * a.xs.w]);
                ref += p;
                mag += std::fabs(p);
              }
          const double tol = 1e-6 * mag + out_eps<T>() * std::fabs(ref) + 1e-7;
          if (!(std::fabs(got - ref) <= tol))
            chk.fail("conv (" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," +
                     std::to_string(wc) + "): got " + std::to_string(got) + " want " + std::to_string(ref));
        }
  chk.done();
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const Case cases[] = {
      {1, 4, 5, 7, 1, 3, 3, 1, 1, false, false, kChannelPartialMaxBlocks},  // 140 outputs: one partial block
      {2, 6, 5, 9, 2, 3, 3, 2, 1, false, false, kChannelPartialMaxBlocks},  // 540: 3 blocks, partial warp
      {1, 8, 4, 6, 3, 5, 3, 1, 2, false, true, kChannelPartialMaxBlocks},   // NHWC, non-square kernel
      {2, 5, 6, 7, 5, 1, 1, 1, 1, false, false, kChannelPartialMaxBlocks},  // cp == C, 1x1
      {1, 12, 3, 5, 4, 3, 3, 1, 1, true, false, kChannelPartialMaxBlocks},  // conv-only scratch
      {1, 9, 6, 6, 3, 3, 3, 3, 3, false, true, 1},                          // one block loops over 324 outputs
      {2, 7, 3, 11, 2, 3, 5, 1, 1, true, true, 2},                          // conv-only, NHWC, grid-stride
      {1, 3, 2, 2, 1, 7, 7, 2, 2, false, false, kChannelPartialMaxBlocks},  // every tap of most windows padded
      {0, 4, 5, 5, 1, 3, 3, 1, 1, false, false, kChannelPartialMaxBlocks},  // empty: no launch
      {1, 4, 0, 5, 2, 3, 3, 1, 1, false, true, kChannelPartialMaxBlocks},   // empty rows
  };
  for (const Case& k : cases) {
    run_case<float>(k);
    run_case<__half>(k);
    run_case<__nv_bfloat16>(k);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("pconv_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

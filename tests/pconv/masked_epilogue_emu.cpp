// Runs the mask-aware partial convolution's epilogue kernels (csrc/pconv/masked_epilogue_kernels.cuh)
// through their real launchers (csrc/pconv/masked_epilogue_cuda.cu) under the CUDA emulation, on
// small grids and edge shapes (work not a multiple of the block, partial warps, a grid capped below
// the work so the grid-stride loop runs, NC[spatial] and channels_last strides, S broadcast over the
// batch, G > 1 mask groups, all-hole / no-hole / soft masks, exact and nvidia modes, with and without
// bias, a NaN in raw where S = 0, empty tensors), against a double-precision host reference written
// here from shared/spec/partial_conv.md section 2. Exit status 0 iff all pass.
#include "cuda_emu.h"
#include "emu_check.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "pconv/masked_epilogue_cuda.cu"

using namespace trous;
using namespace trous::pconv;

namespace {

template <typename T> double to_d(T v);
template <> double to_d(float v) { return v; }
template <> double to_d(double v) { return v; }
template <> double to_d(__half v) { return __half2float(v); }
template <> double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v);
template <> float from_d(double v) { return static_cast<float>(v); }
template <> double from_d(double v) { return v; }
template <> __half from_d(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<double>() { return "f64"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<double>() { return DType::kFloat64; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <typename T> double out_eps();
template <> double out_eps<float>() { return 1e-6; }
template <> double out_eps<double>() { return 1e-12; }
template <> double out_eps<__half>() { return 1e-3; }
template <> double out_eps<__nv_bfloat16>() { return 8e-3; }

enum MaskKind { kRandom, kAllHole, kNoHole, kSoft };

struct Case {
  index_t N, C, P, Ns, G;
  double K;
  MaskedMode mode;
  bool bias, nhwc;
  MaskKind mask;
  index_t max_blocks;
};

// The spec's formulas in double.
void reference(double S, double K, MaskedMode mode, bool has_bias, double raw, double b, double g, double& out,
               double& graw, double& gb, double& nm) {
  nm = S > 0 ? std::fmin(S, 1.0) : 0.0;
  if (mode == MaskedMode::kExact) {
    out = S > 0 ? raw * K / S + b : 0.0;
    graw = S > 0 ? g * K / S : 0.0;
    gb = S > 0 ? g : 0.0;
  } else {
    const double U = std::fmin(std::fmax(S, 0.0), 1.0);
    const double r = K / (S + 1e-8) * U;
    out = has_bias ? ((raw + b - b) * r + b) * U : raw * r;
    graw = has_bias ? g * r * U : g * r;
    gb = g * U;
  }
}

template <typename T>
void run_case(const Case& k) {
  using Acc = acc_t<T>;
  Check chk{std::string("masked_epilogue ") + tname<T>() + " N" + std::to_string(k.N) + " C" + std::to_string(k.C) +
            " P" + std::to_string(k.P) + " Ns" + std::to_string(k.Ns) + " G" + std::to_string(k.G) +
            (k.mode == MaskedMode::kExact ? " exact" : " nvidia") + (k.bias ? " bias" : "") + (k.nhwc ? " nhwc" : "") +
            " mask" + std::to_string(k.mask) + " blocks<=" + std::to_string(k.max_blocks)};
  MaskedEpilogueArgs a{};
  a.N = k.N, a.C = k.C, a.P = k.P, a.Ns = k.Ns, a.G = k.G, a.K = k.K, a.mode = k.mode, a.has_bias = k.bias;
  if (k.nhwc)
    a.sn = k.P * k.C, a.sc = 1, a.sp = k.C;
  else
    a.sn = k.C * k.P, a.sc = k.P, a.sp = 1;
  const size_t n = static_cast<size_t>(k.N * k.C * k.P), ns = static_cast<size_t>(k.Ns * k.G * k.P);
  std::vector<T> raw(n), go(n), out(n, from_d<T>(12345.)), gr(n, from_d<T>(12345.)), bias(static_cast<size_t>(k.C));
  std::vector<T> nm(ns, from_d<T>(777.));
  std::vector<Acc> S(ns);
  for (auto& v : raw) v = from_d<T>(uniform() * 4);
  for (auto& v : go) v = from_d<T>(uniform());
  for (auto& v : bias) v = from_d<T>(uniform());
  for (size_t i = 0; i < ns; ++i) {
    const double u = uniform();
    double s = 0;
    switch (k.mask) {
      case kRandom: s = std::floor((u + 1) * 0.5 * (k.K + 1)); break;  // integers 0..K (some holes)
      case kAllHole: s = 0; break;
      case kNoHole: s = k.K; break;
      case kSoft: s = (u + 1) * 0.5 * k.K * 0.3; break;  // fractions, some below 1
    }
    if (i % 7 == 3) s = 0;  // always some S = 0 positions
    S[i] = static_cast<Acc>(s);
  }
  // A NaN in raw where S = 0: exact mode must still give 0 there (the nvidia mode keeps NaN * 0).
  size_t nan_at = n;
  for (size_t e = 0; e < n && k.mode == MaskedMode::kExact; ++e) {
    const index_t c = k.nhwc ? static_cast<index_t>(e) % k.C : (static_cast<index_t>(e) / k.P) % k.C;
    const index_t p = k.nhwc ? (static_cast<index_t>(e) / k.C) % k.P : static_cast<index_t>(e) % k.P;
    const index_t nn = static_cast<index_t>(e) / (k.C * k.P);
    if (S[a.s_index(nn, c, p)] == 0) {
      raw[e] = from_d<T>(NAN);
      go[e] = from_d<T>(NAN);
      nan_at = e;
      break;
    }
  }
  const index_t chunks = masked_backward_chunks(a);
  std::vector<Acc> partial(static_cast<size_t>(chunks * k.C), Acc(0));
  launch_masked_epilogue(dtype_of<T>(), raw.data(), S.data(), k.bias ? bias.data() : nullptr, out.data(), nm.data(), a,
                         nullptr, k.max_blocks);
  launch_masked_epilogue_backward(dtype_of<T>(), go.data(), S.data(), gr.data(), partial.data(), a, nullptr);
  trous_emu::launches().clear();
  std::vector<double> gb_ref(static_cast<size_t>(k.C), 0.0), gb_mag(static_cast<size_t>(k.C), 0.0);
  for (index_t nn = 0; nn < k.N; ++nn)
    for (index_t c = 0; c < k.C; ++c)
      for (index_t p = 0; p < k.P; ++p) {
        const index_t o = nn * a.sn + c * a.sc + p * a.sp;
        const index_t si = a.s_index(nn, c, p);
        double ro, rg, rb, rm;
        reference(static_cast<double>(S[si]), k.K, k.mode, k.bias, to_d(raw[o]), k.bias ? to_d(bias[c]) : 0.0,
                  to_d(go[o]), ro, rg, rb, rm);
        const std::string at = "(" + std::to_string(nn) + "," + std::to_string(c) + "," + std::to_string(p) + ")";
        if (static_cast<size_t>(o) == nan_at) {
          if (to_d(out[o]) != 0.0)
            chk.fail("exact out at a NaN raw with S = 0 " + at + " = " + std::to_string(to_d(out[o])));
          if (to_d(gr[o]) != 0.0) chk.fail("exact grad_raw at a NaN grad with S = 0 " + at);
          continue;
        }
        const double tol = out_eps<T>() * (std::fabs(ro) + 1e-3) + 1e-6;
        if (!(std::fabs(to_d(out[o]) - ro) <= tol))
          chk.fail("out " + at + ": got " + std::to_string(to_d(out[o])) + " want " + std::to_string(ro));
        const double tg = out_eps<T>() * (std::fabs(rg) + 1e-3) + 1e-6;
        if (!(std::fabs(to_d(gr[o]) - rg) <= tg))
          chk.fail("grad_raw " + at + ": got " + std::to_string(to_d(gr[o])) + " want " + std::to_string(rg));
        gb_ref[c] += rb;
        gb_mag[c] += std::fabs(rb);
        if (c % (k.C / k.G) == 0 && nn < k.Ns && to_d(nm[si]) != to_d(from_d<T>(rm)))
          chk.fail("new mask " + at + ": got " + std::to_string(to_d(nm[si])) + " want " + std::to_string(rm));
      }
  if (k.bias)
    for (index_t c = 0; c < k.C; ++c) {
      double got = 0;
      for (index_t j = 0; j < chunks; ++j) got += static_cast<double>(partial[j * k.C + c]);
      if (!(std::fabs(got - gb_ref[c]) <= 1e-5 * gb_mag[c] + out_eps<T>() * gb_mag[c] + 1e-6))
        chk.fail("grad_bias " + std::to_string(c) + ": got " + std::to_string(got) + " want " +
                 std::to_string(gb_ref[c]));
    }
  chk.done();
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const auto E = MaskedMode::kExact, V = MaskedMode::kNvidia;
  const Case cases[] = {
      {1, 3, 47, 1, 1, 9, E, true, false, kRandom, kMaskedMaxBlocks},   // 141 outputs: one partial block
      {2, 4, 70, 2, 1, 9, V, true, false, kRandom, kMaskedMaxBlocks},   // 560: 3 blocks, partial warp
      {2, 6, 33, 1, 3, 18, E, true, true, kSoft, kMaskedMaxBlocks},     // channels_last, G = 3, broadcast S
      {3, 5, 21, 3, 1, 25, V, false, true, kSoft, 1},                   // one block loops; nvidia no bias
      {2, 4, 300, 2, 2, 9, E, false, false, kAllHole, 2},               // all holes, grid-stride
      {1, 8, 17, 1, 8, 27, V, true, false, kNoHole, kMaskedMaxBlocks},  // no holes, G = C
      {2, 2, 600, 1, 1, 9, E, true, false, kNoHole, kMaskedMaxBlocks},  // backward: several chunks per channel
      {0, 4, 5, 1, 1, 9, E, true, false, kRandom, kMaskedMaxBlocks},    // empty batch: no launch
      {2, 3, 0, 2, 1, 9, V, true, true, kRandom, kMaskedMaxBlocks},     // empty spatial
  };
  for (const Case& k : cases) {
    run_case<float>(k);
    run_case<double>(k);
    run_case<__half>(k);
    run_case<__nv_bfloat16>(k);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("masked_epilogue_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

// Runs the banded grouped 1-D DCLS convolution kernels of csrc/dcls/banded_kernels.cuh
// through the CUDA emulation (cuda_emu.h) on small grids and edge shapes, and compares with a scalar
// fp64 host reference written here from the formulas of dcls_banded.h (deliberately NOT using its
// band_of: the clamp is restated, and grad_x is computed by scatter where the kernel gathers).
// Inputs are rounded to the element type first, so the reference sees exactly what the kernel reads;
// tolerances: fp32 accumulation 1e-5 of the sum of |terms|, plus the output rounding of fp16 / bf16.
// Outputs start as NaN: every element must be written (grad_K exactly 0 outside the bands).
// The kernels are launched by the real launchers of csrc/dcls/banded_cuda.cu, compiled here unchanged
// against the emulation, on host buffers; each case prints the grids they chose. Only the "capped
// grid" cases launch the kernels directly, on a grid of 1 or 2 blocks: the launchers cap their grids
// at banded::kMaxBlocks = 65535 blocks, far beyond emulation sizes, and the kernels' grid-stride
// loops must cover the rest. Usage: dcls_banded_emu [filter]; exit status 0 iff every case passes.
#include "cuda_emu.h"
#include "emu_check.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "dcls/banded_cuda.cu"

using namespace trous;
using namespace trous::dcls;

namespace {

// ---------------------------------------------------------------- launches
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

// Prints the kernels launched since the last call with their grids ("[kernel x blocks] ") and
// forgets them; returns how many there were.
size_t print_launches() {
  const size_t n = trous_emu::launches().size();
  for (const trous_emu::LaunchRecord& r : trous_emu::launches()) std::printf("[%s x %u] ", r.kernel.c_str(), r.grid.x);
  trous_emu::launches().clear();
  return n;
}

// cap 0: the launcher; otherwise the kernel alone on a grid of `cap` blocks (see the top).
template <typename T>
void run_forward(const T* x, const float* K, const int32_t* band, const float* bias, T* out, const BandedGeom& g,
                 unsigned cap) {
  if (!cap) return launch_banded_forward(dtype_of<T>(), x, K, band, bias, out, g, nullptr);
  std::printf("[forward_kernel alone x %u] ", cap);
  trous_emu::launch(banded::forward_kernel<T>, cap, banded::kThreads, x, K, band, bias, out, g);
}

template <typename T>
void run_backward_input(const T* gout, const float* K, const int32_t* band, T* gx, const BandedGeom& g, unsigned cap) {
  if (!cap) return launch_banded_backward_input(dtype_of<T>(), gout, K, band, gx, g, nullptr);
  std::printf("[backward_input_kernel alone x %u] ", cap);
  trous_emu::launch(banded::backward_input_kernel<T>, cap, banded::kThreads, gout, K, band, gx, g);
}

template <typename T>
void run_backward_kernel(const T* gout, const T* x, const int32_t* band, float* gK, const BandedGeom& g, unsigned cap) {
  if (!cap) return launch_banded_backward_kernel(dtype_of<T>(), gout, x, band, gK, g, nullptr);
  std::printf("[backward_kernel_kernel alone x %u] ", cap);
  trous_emu::launch(banded::backward_kernel_kernel<T>, cap, banded::kThreads, gout, x, band, gK, g);
}

// ---------------------------------------------------------------- cases
enum class Bands { kMixed, kFull, kEmpty, kOutOfRange };

struct Case {
  std::string name;
  int N, c_in, c_out, groups, l_in, dks, stride, pad;
  Bands bands;
  bool bias;
  unsigned cap;  // 0: the launchers; else the kernels alone on `cap` blocks
};

template <typename T> T to_t(double v);
template <> float to_t<float>(double v) { return (float)v; }
template <> __half to_t<__half>(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(double v) { return __float2bfloat16_rn((float)v); }
double from_t(float v) { return v; }
double from_t(__half v) { return __half2float(v); }
double from_t(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "fp32"; }
template <> const char* tname<__half>() { return "fp16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }

// Output rounding (unit roundoff of T) and an absolute floor for fp16 subnormals.
template <typename T> double out_rel() { return sizeof(T) == 4 ? 0.0 : std::is_same<T, __half>::value ? 6e-4 : 4.5e-3; }
template <typename T> double out_abs() { return std::is_same<T, __half>::value ? 1e-7 : 0.0; }
constexpr double kAccRel = 1e-5;  // fp32 accumulation, relative to the sum of |terms|

// Non-zero, magnitude in [1/8, 1].
double nz() {
  const double u = uniform();
  return (u < 0 ? -1 : 1) * (0.125 + 0.875 * std::fabs(u));
}

// Raw (unclamped) band of a row: mode kMixed cycles through partial, full, empty (lo == hi),
// inverted (lo > hi), both ends outside, hi past dks, lo past dks, single tap.
void make_band(Bands mode, int row, int dks, int32_t& lo, int32_t& hi) {
  const int a = (int)((uniform() + 1) * 0.5 * (dks + 1)) % (dks + 1);  // 0..dks
  const int b = (int)((uniform() + 1) * 0.5 * (dks + 1)) % (dks + 1);
  int kind = 0;
  switch (mode) {
    case Bands::kFull: kind = 1; break;
    case Bands::kEmpty: kind = row % 2 ? 2 : 3; break;
    case Bands::kOutOfRange: kind = 4 + row % 3; break;
    case Bands::kMixed: kind = row % 8; break;
  }
  switch (kind) {
    case 0:  // partial, at least one tap
      lo = std::min(a, b), hi = std::max(a, b);
      if (lo == hi) {
        if (hi < dks)
          ++hi;
        else
          --lo;
      }
      break;
    case 1: lo = 0, hi = dks; break;
    case 2: lo = hi = a; break;
    case 3: lo = dks - 1, hi = 1; break;
    case 4: lo = -3 - a, hi = dks + 2 + b; break;
    case 5: lo = a < dks ? a : dks - 1, hi = dks + 7; break;
    case 6: lo = dks + 1, hi = dks + 4; break;
    default: lo = a < dks ? a : dks - 1, hi = lo + 1; break;
  }
}

// The clamp of dcls_banded.h, restated: lo into [0, dks], hi into [lo, dks].
void ref_band(int32_t lo_raw, int32_t hi_raw, int dks, int& lo, int& hi) {
  lo = std::min(std::max((int)lo_raw, 0), dks);
  hi = std::min(std::max((int)hi_raw, lo), dks);
}

bool close(double got, double ref, double abssum, double rel_out, double abs_out) {
  if (!std::isfinite(got)) return false;
  return std::fabs(got - ref) <= kAccRel * abssum + rel_out * std::fabs(ref) + abs_out;
}

template <typename T>
void run_case(const Case& cs) {
  BandedGeom g{};
  g.N = cs.N, g.c_in = cs.c_in, g.c_out = cs.c_out, g.groups = cs.groups, g.l_in = cs.l_in, g.dks = cs.dks;
  g.stride = cs.stride, g.pad = cs.pad;
  g.l_out = (cs.l_in + 2 * cs.pad - cs.dks) / cs.stride + 1;
  const int I = cs.c_in / cs.groups, opg = cs.c_out / cs.groups, L = g.l_out;
  const size_t xn = (size_t)cs.N * cs.c_in * cs.l_in, on = (size_t)cs.N * cs.c_out * L;
  const size_t kn = (size_t)cs.c_out * I * cs.dks;

  // Inputs, rounded to T; the reference works on the rounded values.
  std::vector<T> xd(xn), god(on);
  std::vector<double> x(xn), gout(on), K(kn);
  std::vector<float> Kf(kn), bias(cs.c_out);
  for (size_t i = 0; i < xn; ++i) xd[i] = to_t<T>(nz()), x[i] = from_t(xd[i]);
  for (size_t i = 0; i < on; ++i) god[i] = to_t<T>(nz()), gout[i] = from_t(god[i]);
  for (size_t i = 0; i < kn; ++i) Kf[i] = (float)nz(), K[i] = Kf[i];  // non-zero outside the bands too
  for (auto& b : bias) b = (float)nz();
  std::vector<int32_t> band((size_t)cs.c_out * I * 2);
  for (int r = 0; r < cs.c_out * I; ++r) make_band(cs.bands, r, cs.dks, band[2 * r], band[2 * r + 1]);
  std::vector<int> blo(cs.c_out * I), bhi(cs.c_out * I);
  for (int r = 0; r < cs.c_out * I; ++r) ref_band(band[2 * r], band[2 * r + 1], cs.dks, blo[r], bhi[r]);
  const float* bias_p = cs.bias ? bias.data() : nullptr;
  const std::string base = cs.name + " " + tname<T>();
  const auto xat = [&](int n, int c, int u) { return x[((size_t)n * cs.c_in + c) * cs.l_in + u]; };
  const auto gat = [&](int n, int o, int t) { return gout[((size_t)n * cs.c_out + o) * L + t]; };
  const auto kat = [&](int o, int i, int s) { return K[((size_t)o * I + i) * cs.dks + s]; };

  {  // forward
    Check chk(base + " forward");
    std::vector<T> out(on, to_t<T>(NAN));
    run_forward<T>(xd.data(), Kf.data(), band.data(), bias_p, out.data(), g, cs.cap);
    if (print_launches() != 0 && on == 0) chk.fail("a kernel was launched for an empty output");
    for (int n = 0; n < cs.N; ++n)
      for (int o = 0; o < cs.c_out; ++o)
        for (int t = 0; t < L; ++t) {
          const int grp = o / opg;
          double ref = cs.bias ? bias[o] : 0.0, abssum = std::fabs(ref);
          for (int i = 0; i < I; ++i)
            for (int s = blo[o * I + i]; s < bhi[o * I + i]; ++s) {
              const int u = t * cs.stride + s - cs.pad;
              if (u < 0 || u >= cs.l_in) continue;
              const double term = kat(o, i, s) * xat(n, grp * I + i, u);
              ref += term, abssum += std::fabs(term);
            }
          const double got = from_t(out[((size_t)n * cs.c_out + o) * L + t]);
          if (!close(got, ref, abssum, out_rel<T>(), out_abs<T>()))
            chk.fail("out[" + std::to_string(n) + "," + std::to_string(o) + "," + std::to_string(t) +
                     "] = " + std::to_string(got) + ", want " + std::to_string(ref));
        }
    chk.done();
  }

  {  // grad_x, reference by scatter over (n, o, t, i, s)
    Check chk(base + " backward_input");
    std::vector<T> gx(xn, to_t<T>(NAN));
    run_backward_input<T>(god.data(), Kf.data(), band.data(), gx.data(), g, cs.cap);
    if (print_launches() != 0 && xn == 0) chk.fail("a kernel was launched for an empty grad_x");
    std::vector<double> ref(xn, 0.0), abssum(xn, 0.0);
    for (int n = 0; n < cs.N; ++n)
      for (int o = 0; o < cs.c_out; ++o)
        for (int t = 0; t < L; ++t)
          for (int i = 0; i < I; ++i)
            for (int s = blo[o * I + i]; s < bhi[o * I + i]; ++s) {
              const int u = t * cs.stride + s - cs.pad;
              if (u < 0 || u >= cs.l_in) continue;
              const size_t at = ((size_t)n * cs.c_in + (o / opg) * I + i) * cs.l_in + u;
              const double term = kat(o, i, s) * gat(n, o, t);
              ref[at] += term, abssum[at] += std::fabs(term);
            }
    for (size_t e = 0; e < xn; ++e) {
      const double got = from_t(gx[e]);
      if (!close(got, ref[e], abssum[e], out_rel<T>(), out_abs<T>()))
        chk.fail("grad_x[" + std::to_string(e) + "] = " + std::to_string(got) + ", want " + std::to_string(ref[e]));
    }
    chk.done();
  }

  {  // grad_K
    Check chk(base + " backward_kernel");
    std::vector<float> gK(kn, NAN);
    run_backward_kernel<T>(god.data(), xd.data(), band.data(), gK.data(), g, cs.cap);
    print_launches();
    for (int o = 0; o < cs.c_out; ++o)
      for (int i = 0; i < I; ++i)
        for (int s = 0; s < cs.dks; ++s) {
          const size_t at = ((size_t)o * I + i) * cs.dks + s;
          const bool in_band = s >= blo[o * I + i] && s < bhi[o * I + i];
          double ref = 0, abssum = 0;
          if (in_band) {
            for (int n = 0; n < cs.N; ++n)
              for (int t = 0; t < L; ++t) {
                const int u = t * cs.stride + s - cs.pad;
                if (u < 0 || u >= cs.l_in) continue;
                const double term = gat(n, o, t) * xat(n, (o / opg) * I + i, u);
                ref += term, abssum += std::fabs(term);
              }
          }
          // fp32 output: accumulation error only; exact zero outside the band.
          const bool ok = in_band ? close(gK[at], ref, abssum, 0.0, 0.0) : gK[at] == 0.f;
          if (!ok)
            chk.fail("grad_K[" + std::to_string(o) + "," + std::to_string(i) + "," + std::to_string(s) + "] = " +
                     std::to_string(gK[at]) + ", want " + std::to_string(ref) + (in_band ? "" : " (outside band)"));
        }
    chk.done();
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress survives a sanitizer abort
  const std::string only = argc > 1 ? argv[1] : "";
  const auto t0 = std::chrono::steady_clock::now();
  const unsigned M = 0;  // the launchers
  // dtypes: bit 0 fp32, bit 1 fp16, bit 2 bf16.
  struct Entry {
    Case cs;
    int dtypes;
  };
  const Entry entries[] = {
      // name, N, c_in, c_out, groups, l_in, dks, stride, pad, bands, bias, cap
      {{"groups1 s1 p3", 3, 3, 4, 1, 37, 7, 1, 3, Bands::kMixed, true, M}, 7},
      {{"groups2 s2 p0", 1, 4, 6, 2, 50, 5, 2, 0, Bands::kMixed, false, M}, 1},
      {{"depthwise s3 p4", 3, 5, 5, 5, 23, 9, 3, 4, Bands::kMixed, true, M}, 7},
      {{"depthwise x2 s1 p2", 1, 3, 6, 3, 29, 5, 1, 2, Bands::kMixed, false, M}, 1},
      {{"l_out 1", 3, 2, 2, 1, 6, 8, 2, 1, Bands::kMixed, true, M}, 7},
      // SNN delays: dks 25, left pad dks - 1; L = 300 > a block, several partial blocks.
      {{"full dks25 L300", 1, 2, 3, 1, 300, 25, 1, 24, Bands::kFull, true, M}, 1},
      {{"empty bands", 3, 4, 4, 2, 20, 5, 1, 2, Bands::kEmpty, true, M}, 1},
      // pad > dks: the first windows lie entirely left of the input.
      {{"out-of-range bands pad7", 1, 2, 2, 1, 19, 6, 2, 7, Bands::kOutOfRange, false, M}, 1},
      // Grids capped at 2 blocks (1 for grad_K): the grid-stride loops run several rounds.
      {{"capped grid", 3, 3, 4, 1, 90, 7, 1, 3, Bands::kMixed, true, 2}, 3},
      {{"capped grid 1", 3, 4, 6, 2, 41, 5, 3, 1, Bands::kMixed, true, 1}, 1},
      // grad_K: more (n, t) pairs than threads, so the per-thread (n, t) stepping carries across n.
      {{"pairs N5 L70", 5, 2, 2, 1, 70, 5, 1, 2, Bands::kMixed, false, M}, 1},
      {{"pairs N70 L9 s2", 70, 2, 2, 1, 9, 3, 2, 1, Bands::kFull, true, M}, 1},
      // N = 0: nothing launched for out / grad_x; grad_K still written (zeros).
      {{"N0", 0, 2, 2, 1, 10, 3, 1, 1, Bands::kMixed, true, M}, 1},
  };
  for (const Entry& e : entries) {
    if (!only.empty() && e.cs.name.find(only) == std::string::npos) continue;
    if (e.dtypes & 1) run_case<float>(e.cs);
    if (e.dtypes & 2) run_case<__half>(e.cs);
    if (e.dtypes & 4) run_case<__nv_bfloat16>(e.cs);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dcls_banded_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

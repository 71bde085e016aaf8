// Runs both kernels of csrc/dcls/construct_kernels.cuh (DCLS kernel construction, forward and
// backward) through the CUDA emulation (cuda_emu.h) on small grids and edge shapes, and compares
// them with a dense scalar host reference in double written here from the formulas of
// shared/spec/dcls.md (deliberately not using params.h's tap helpers: only ConstructArgs / make_args
// and the launchers, with their plan and kernels, come from the project).
//
// The kernels are launched by the real launchers of csrc/dcls/construct_cuda.cu, compiled here
// unchanged against the emulation, on host buffers; each case prints the plan they chose (blocks x
// tiles, channels per block, elements per shared-memory chunk), and a last check asserts that the
// cases reached each shape of plan. Shapes cover 1-D / 2-D / 3-D windows, all four versions, kc 1 and
// kc 0, channels that are not a multiple of the channels per block, windows split over several
// blocks (gridDim.y > 1: more than kMaxPerThread * kThreads taps) and several shared-memory chunks of
// elements (kc large enough to overflow the 48 KiB budget).
// Positions and widths lie on a 1/16 grid so that every dtype holds them exactly and fp32 sees the
// non-differentiable points (|t - mu| = 0 or 1) exactly where the reference does.
// Exit status 0 iff every case passes.
#include "cuda_emu.h"
#include "emu_check.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "dcls/construct_cuda.cu"

using namespace trous;
using namespace trous::dcls;
using namespace trous::dcls::construct;

namespace {

// ---------------------------------------------------------------- launches
// What the plans of the cases covered (checked at the end of a full run).
bool g_tiles = false, g_fwd_chunks = false, g_bwd_chunks = false, g_partial_block = false;

// Prints the launches since the last call with their plans and forgets them; returns how many.
size_t print_launches(const ConstructArgs& a) {
  const size_t n = trous_emu::launches().size();
  for (const trous_emu::LaunchRecord& r : trous_emu::launches()) {
    const Plan* p = r.arg<Plan>();
    const bool fwd = r.kernel.rfind("construct_forward", 0) == 0;
    std::printf("[%s: %u x %u blocks, %d ch, %d el/chunk] ", r.kernel.c_str(), r.grid.x, r.grid.y, p ? p->cpb : -1,
                p ? p->kch : -1);
    if (!p) continue;
    g_tiles = g_tiles || r.grid.y > 1;
    (fwd ? g_fwd_chunks : g_bwd_chunks) = (fwd ? g_fwd_chunks : g_bwd_chunks) || p->kch < a.kc;
    g_partial_block = g_partial_block || (p->cpb > 1 && a.channels % p->cpb != 0);
  }
  trous_emu::launches().clear();
  return n;
}

// ---------------------------------------------------------------- element types
template <typename T> double to_d(T v) { return (double)v; }
template <> double to_d(__half v) { return __half2float(v); }
template <> double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v) { return (T)v; }
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
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
// Relative tolerance (to the largest reference value) of results stored in T (accumulated in acc_t<T>).
template <typename T> double tolerance();
template <> double tolerance<float>() { return 2e-5; }
template <> double tolerance<double>() { return 1e-11; }
template <> double tolerance<__half>() { return 4e-3; }
template <> double tolerance<__nv_bfloat16>() { return 3e-2; }

// ---------------------------------------------------------------- dense reference (spec formulas)
struct Profile {  // one axis of one element: values and derivatives over the axis' taps
  std::vector<double> g, dmu, dsig;
  double sum = 0, dsum_mu = 0, dsum_sig = 0;
};

// g(t) per version; derivatives by torch's conventions (relu'(0) = 0, |x|'(0) = 0).
Profile profile(int version, int n, double mu, double sig) {
  Profile p;
  p.g.assign(n, 0), p.dmu.assign(n, 0), p.dsig.assign(n, 0);
  for (int t = 0; t < n; ++t) {
    const double d = t - mu;
    if (version == 0) {
      const double fl = std::floor(mu), r = mu - fl;
      if (t == fl) p.g[t] = 1 - r, p.dmu[t] = -1;
      if (t == fl + 1) p.g[t] = r, p.dmu[t] = 1;
    } else if (version == 3) {
      const double s = std::fabs(sig) + 0.27, z = d / s;
      p.g[t] = std::exp(-0.5 * z * z);
      p.dmu[t] = p.g[t] * z / s;
      p.dsig[t] = p.g[t] * z * z / s;
    } else {
      const double s = version == 1 ? 1.0 : std::fabs(sig) + 1.0;
      if (s - std::fabs(d) > 0) {
        p.g[t] = s - std::fabs(d);
        p.dmu[t] = d > 0 ? 1 : (d < 0 ? -1 : 0);
        p.dsig[t] = 1;
      }
    }
    p.sum += p.g[t], p.dsum_mu += p.dmu[t], p.dsum_sig += p.dsig[t];
  }
  return p;
}

struct Ref {
  std::vector<double> K, gw, gP, gS;
};

// Dense: every window position of every element, the normalisation differentiated by hand.
Ref reference(const ConstructArgs& a, const std::vector<double>& w, const std::vector<double>& P,
              const std::vector<double>& SIG, const std::vector<double>& G) {
  const index_t C = a.channels, W = a.window(), plane = C * a.kc;
  const int v = (int)a.version;
  Ref r;
  r.K.assign(C * W, 0), r.gw.assign(C * a.kc, 0), r.gP.assign(a.ndim * plane, 0), r.gS.assign(a.ndim * plane, 0);
  const int n[3] = {a.size[0], a.size[1], a.size[2]};
  for (index_t c = 0; c < C; ++c) {
    for (int k = 0; k < a.kc; ++k) {
      Profile pr[3];
      int jax[3] = {-1, -1, -1};  // P index of each window axis
      for (int j = 0; j < a.ndim; ++j) {
        const index_t off = j * plane + c * a.kc + k;
        jax[a.axis[j]] = j;
        pr[a.axis[j]] = profile(v, n[a.axis[j]], P[off] + a.offset[j], SIG.empty() ? 0.0 : SIG[off]);
      }
      for (int ax = 0; ax < 3; ++ax)
        if (jax[ax] < 0) pr[ax] = Profile{{1.0}, {0.0}, {0.0}, 1.0, 0.0, 0.0};
      const double S = pr[0].sum * pr[1].sum * pr[2].sum;
      const double D = v == 0 ? 1.0 : S + 1e-7;
      const double wk = w[c * a.kc + k];
      double amp = 0, dmu_num[3] = {0, 0, 0}, dsig_num[3] = {0, 0, 0};
      for (int i0 = 0; i0 < n[0]; ++i0)
        for (int i1 = 0; i1 < n[1]; ++i1)
          for (int i2 = 0; i2 < n[2]; ++i2) {
            const index_t pos = ((index_t)i0 * n[1] + i1) * n[2] + i2;
            const double g0 = pr[0].g[i0], g1 = pr[1].g[i1], g2 = pr[2].g[i2];
            r.K[c * W + pos] += wk * g0 * g1 * g2 / D;
            const double gk = G[c * W + pos];
            amp += gk * g0 * g1 * g2;
            dmu_num[0] += gk * pr[0].dmu[i0] * g1 * g2, dsig_num[0] += gk * pr[0].dsig[i0] * g1 * g2;
            dmu_num[1] += gk * g0 * pr[1].dmu[i1] * g2, dsig_num[1] += gk * g0 * pr[1].dsig[i1] * g2;
            dmu_num[2] += gk * g0 * g1 * pr[2].dmu[i2], dsig_num[2] += gk * g0 * g1 * pr[2].dsig[i2];
          }
      r.gw[c * a.kc + k] = amp / D;
      for (int ax = 0; ax < 3; ++ax) {
        const int j = jax[ax];
        if (j < 0) continue;
        double others = 1;
        for (int b = 0; b < 3; ++b)
          if (b != ax) others *= pr[b].sum;
        const double norm = v == 0 ? 0.0 : amp / (D * D);
        const index_t off = j * plane + c * a.kc + k;
        r.gP[off] = wk * (dmu_num[ax] / D - norm * pr[ax].dsum_mu * others);
        if (v >= 2) {
          const double sgn = SIG[off] > 0 ? 1 : (SIG[off] < 0 ? -1 : 0);
          r.gS[off] = sgn * wk * (dsig_num[ax] / D - norm * pr[ax].dsum_sig * others);
        }
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------- test bookkeeping
double on_grid(double x) { return std::round(x * 16) / 16; }  // exact in every dtype for |x| < 16

template <typename T>
void compare(Check& chk, const char* what, const std::vector<T>& got, const std::vector<double>& want) {
  double scale = 1e-3;  // floor: results that cancel to ~0 are judged on the computation's scale
  for (double x : want) scale = std::max(scale, std::fabs(x));
  const double tol = tolerance<T>() * scale;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = to_d(got[i]);
    if (!(std::fabs(g - want[i]) <= tol)) {
      char msg[160];
      std::snprintf(msg, sizeof msg, "%s[%zu] = %.9g, want %.9g (tol %.3g)", what, i, g, want[i], tol);
      chk.fail(msg);
    }
  }
}

struct Case {
  index_t C;
  int kc;
  std::vector<int64_t> dks;
  bool all_dtypes;  // every dtype (else fp32, and every dtype for every third case)
};

template <typename T>
void run_case(const Case& cs, Version version) {
  const ConstructArgs a = make_args(cs.C, cs.kc, (int)cs.dks.size(), cs.dks.data(), version);
  const bool sig = version == Version::kMax || version == Version::kGauss;
  const index_t W = a.window(), plane = a.channels * a.kc;
  std::vector<T> w(plane), P(a.ndim * plane), SIG(sig ? a.ndim * plane : 0), G(a.channels * W);
  std::vector<double> wd(w.size()), Pd(P.size()), Sd(SIG.size()), Gd(G.size());
  for (size_t i = 0; i < w.size(); ++i) w[i] = from_d<T>(uniform()), wd[i] = to_d(w[i]);
  for (size_t i = 0; i < P.size(); ++i) {
    const int j = (int)(i / plane);
    const double lim = cs.dks[j] / 2 + 2.0;  // some elements partly or wholly outside the window
    P[i] = from_d<T>(i % 7 == 3 ? std::round(uniform() * lim) : on_grid(uniform() * lim)), Pd[i] = to_d(P[i]);
  }
  for (size_t i = 0; i < SIG.size(); ++i)
    SIG[i] = from_d<T>(i % 5 == 2 ? 0.0 : on_grid(1.25 * uniform() + 0.25)), Sd[i] = to_d(SIG[i]);
  for (size_t i = 0; i < G.size(); ++i) G[i] = from_d<T>(uniform()), Gd[i] = to_d(G[i]);
  const Ref ref = reference(a, wd, Pd, Sd, Gd);

  std::string dks;
  for (auto d : cs.dks) dks += (dks.empty() ? "" : "x") + std::to_string(d);
  char name[320];
  std::snprintf(name, sizeof name, "%s %s C=%ld kc=%d dks=%s", tname<T>(), kVersionNames[(int)version], (long)cs.C,
                cs.kc, dks.c_str());
  Check chk{name};
  const T poison = from_d<T>(-12345.0);  // every output element must be written
  std::vector<T> K(a.channels * W, poison), gw(plane, poison), gP(P.size(), poison), gS(SIG.size(), poison);
  launch_construct_forward(dtype_of<T>(), w.data(), P.data(), sig ? SIG.data() : nullptr, K.data(), a, nullptr);
  if (print_launches(a) != 0 && a.channels * W == 0) chk.fail("a kernel was launched for an empty kernel");
  compare(chk, "K", K, ref.K);
  launch_construct_backward(dtype_of<T>(), G.data(), w.data(), P.data(), sig ? SIG.data() : nullptr, gw.data(),
                            gP.data(), sig ? gS.data() : nullptr, a, nullptr);
  if (print_launches(a) != 0 && plane == 0) chk.fail("a kernel was launched for no parameters");
  if (a.kc > 0) {
    compare(chk, "grad_weight", gw, ref.gw);
    compare(chk, "grad_P", gP, ref.gP);
    if (sig) compare(chk, "grad_SIG", gS, ref.gS);
  }
  chk.done();
}

void run_all_dtypes(const Case& cs, Version v, bool all_dtypes) {
  run_case<float>(cs, v);
  if (!all_dtypes) return;
  run_case<double>(cs, v);
  run_case<__half>(cs, v);
  run_case<__nv_bfloat16>(cs, v);
}

// Non-finite parameters (params.h, issue 9): a poisoning element (NaN P, infinite v0 P, infinite
// max SIG, infinite gauss P and SIG on one axis, non-finite weight) makes its channel's whole window
// NaN; an infinite P of v1 / max / gauss leaves the window (the channel stays finite).
void run_nonfinite() {
  struct Poison {
    const char* name;
    int what;  // 0 P, 1 SIG, 2 weight, 3 P and SIG
    float value;
  };
  const float inf = INFINITY;
  const Poison kinds[] = {{"P=nan", 0, NAN},     {"P=inf", 0, inf}, {"P=-inf", 0, -inf}, {"SIG=nan", 1, NAN},
                          {"SIG=-inf", 1, -inf}, {"w=inf", 2, inf}, {"w=nan", 2, NAN},   {"P,SIG=inf", 3, inf}};
  const std::vector<int64_t> dks{5, 4};
  for (int vi = 0; vi < 4; ++vi) {
    const Version v = (Version)vi;
    const bool sig = v == Version::kMax || v == Version::kGauss;
    for (const Poison& k : kinds) {
      if ((k.what == 1 || k.what == 3) && !sig) continue;
      const ConstructArgs a = make_args(3, 3, 2, dks.data(), v);
      const index_t W = a.window(), plane = a.channels * a.kc;
      std::vector<float> w(plane), P(2 * plane), SIG(sig ? 2 * plane : 0), K(a.channels * W, -12345.f);
      for (auto& e : w) e = (float)uniform();
      for (auto& e : P) e = (float)uniform();
      for (auto& e : SIG) e = (float)(0.3 + std::fabs(uniform()));
      const index_t c = 1, off = 0 * plane + c * a.kc + 2;
      if (k.what == 0 || k.what == 3) P[off] = k.value;
      if (k.what == 1 || k.what == 3) SIG[off] = k.value;
      if (k.what == 2) w[c * a.kc + 2] = k.value;
      const bool poisons = k.what == 2 || k.value != k.value || (k.what == 0 && v == Version::kV0) ||
                           (k.what == 1 && v == Version::kMax) || (k.what == 3 && sig);
      launch_construct_forward(DType::kFloat32, w.data(), P.data(), sig ? SIG.data() : nullptr, K.data(), a, nullptr);
      print_launches(a);
      char name[160];
      std::snprintf(name, sizeof name, "nonfinite %s %s: %s", kVersionNames[vi], k.name,
                    poisons ? "the channel's window is all NaN" : "finite");
      Check chk{name};
      for (index_t ch = 0; ch < a.channels; ++ch)
        for (index_t t = 0; t < W; ++t) {
          const float y = K[ch * W + t];
          if (!(ch == c && poisons ? std::isnan(y) : std::isfinite(y))) {
            chk.fail("K[" + std::to_string(ch) + ", " + std::to_string(t) + "] = " + std::to_string(y));
            break;
          }
        }
      chk.done();
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);          // progress survives a sanitizer abort
  const std::string only = argc > 1 ? argv[1] : "";  // optional filter: a version name
  const auto t0 = std::chrono::steady_clock::now();
  const Case cases[] = {
      {5, 3, {7}, false},        // 1-D, several channels per block
      {37, 1, {25}, false},      // SNN-like kc 1: 10 channels per block, 4 blocks, partial last block
      {3, 4, {5, 7}, false},     // 2-D non-square
      {2, 6, {17, 17}, false},   // window 289: one channel per block
      {3, 9, {4, 6}, true},      // 2-D, several channels per block (backward: one)
      {4, 3, {3, 5, 4}, false},  // 3-D
      {2, 11, {3, 2, 4}, true},  // 3-D
      {3, 2, {1, 6}, false},     // an axis of size 1
      {2, 0, {5, 5}, false},     // kc 0: zero kernel, no backward launch
  };
  // Run after the cases above, which thus keep their random inputs.
  const Case large[] = {
      {1, 900, {4, 6}, true},      // profiles of 900 elements overflow 48 KiB: several chunks, both passes
      {2, 400, {3, 2, 4}, false},  // 3-D, backward chunks
      {1, 2, {47, 47}, false},     // window 2209 > kMaxPerThread * kThreads: split over gridDim.y = 2 tiles
  };
  for (int vi = 0; vi < 4; ++vi) {
    if (!only.empty() && only != kVersionNames[vi]) continue;
    int i = 0;
    for (const Case& cs : cases) run_all_dtypes(cs, (Version)vi, i++ % 3 == 0 || cs.all_dtypes);
  }
  // Empty input: the launchers return before launching (a zero-block grid is invalid in CUDA).
  run_case<float>(Case{0, 3, {5, 5}, false}, Version::kGauss);
  for (int vi = 0; vi < 4; ++vi) {
    if (!only.empty() && only != kVersionNames[vi]) continue;
    for (const Case& cs : large) run_all_dtypes(cs, (Version)vi, cs.all_dtypes);
  }
  if (only.empty() || only == "nonfinite") run_nonfinite();
  if (only.empty()) {  // the cases must reach each shape of plan
    Check chk{"coverage: plans with tiles, forward chunks, backward chunks, a partial last block"};
    if (!g_tiles) chk.fail("no forward launch split its window over gridDim.y");
    if (!g_fwd_chunks) chk.fail("no forward launch took several shared-memory chunks");
    if (!g_bwd_chunks) chk.fail("no backward launch took several shared-memory chunks");
    if (!g_partial_block) chk.fail("no launch had a partial last block of channels");
    chk.done();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dcls_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

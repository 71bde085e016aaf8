// Runs both kernels of csrc/include/trous/dcls_kernels.cuh (DCLS kernel construction, forward and
// backward) through the CUDA emulation (cuda_emu.h) on small grids and edge shapes, and compares
// them with a dense scalar host reference in double written here from the formulas of
// shared/spec/dcls.md (deliberately not using params.h's tap helpers: only ConstructArgs / make_args,
// the launch plan and the kernels come from the project).
//
// Shapes cover 1-D / 2-D / 3-D windows, all four versions, kc 1 and kc 0, channels that are not a
// multiple of the channels per block, windows split over several blocks (gridDim.y > 1), several
// shared-memory chunks of elements (a lowered budget) and block sizes of 32, 64 and 96 threads.
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

#include "dcls/construct_kernels.cuh"

using namespace trous;
using namespace trous::dcls;
using namespace trous::dcls::construct;
using trous_emu::launch_smem;

namespace {

// ---------------------------------------------------------------- launch policy (dcls.cu)
template <typename T, typename A>
void launch_forward(const T* w, const T* P, const T* SIG, T* K, const ConstructArgs& a, int threads, size_t budget) {
  if (a.channels == 0 || a.window() == 0) return;
  const Plan plan = make_plan(a, threads, sizeof(A), true, budget);
  if (!plan.ok) trous_emu::fail("bad plan", "forward plan not ok");
  launch_smem(construct_forward<T, A>, dim3((unsigned)plan.blocks, (unsigned)plan.tiles), dim3(threads), plan.smem, w,
              P, SIG, K, a, plan);
}

template <typename T, typename A>
void launch_backward(const T* gK, const T* w, const T* P, const T* SIG, T* gw, T* gP, T* gSIG, const ConstructArgs& a,
                     int threads, size_t budget) {
  if (a.channels == 0 || a.kc == 0) return;
  const Plan plan = make_plan(a, threads, sizeof(A), false, budget);
  if (!plan.ok) trous_emu::fail("bad plan", "backward plan not ok");
  launch_smem(construct_backward<T, A>, dim3((unsigned)plan.blocks), dim3(threads), plan.smem, gK, w, P, SIG, gw, gP,
              gSIG, a, plan);
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
// Relative tolerance (to the largest reference value) of results stored in T, computed in A.
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
    if (!(std::fabs(g - want[i]) <= tol))
      chk.fail(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(g) + ", want " +
               std::to_string(want[i]) + " (tol " + std::to_string(tol) + ")");
  }
}

struct Case {
  index_t C;
  int kc;
  std::vector<int64_t> dks;
  int threads;
  size_t budget;  // shared-memory budget of the plan (small: several chunks)
};

template <typename T, typename A>
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
  const Plan fp = make_plan(a, cs.threads, sizeof(A), true, cs.budget);
  const Plan bp = make_plan(a, cs.threads, sizeof(A), false, cs.budget);
  char name[320];
  std::snprintf(name, sizeof name,
                "%s %s C=%ld kc=%d dks=%s threads=%d (fwd: %ld x %d blocks, %d ch, %d el/chunk; bwd: %ld blocks, %d ch,"
                " %d el/chunk)", tname<T>(), kVersionNames[(int)version], (long)cs.C, cs.kc, dks.c_str(), cs.threads,
                (long)fp.blocks, fp.tiles, fp.cpb, fp.kch, (long)bp.blocks, bp.cpb, bp.kch);
  Check chk{name};
  const T poison = from_d<T>(-12345.0);  // every output element must be written
  std::vector<T> K(a.channels * W, poison), gw(plane, poison), gP(P.size(), poison), gS(SIG.size(), poison);
  launch_forward<T, A>(w.data(), P.data(), sig ? SIG.data() : nullptr, K.data(), a, cs.threads, cs.budget);
  compare(chk, "K", K, ref.K);
  launch_backward<T, A>(G.data(), w.data(), P.data(), sig ? SIG.data() : nullptr, gw.data(), gP.data(),
                        sig ? gS.data() : nullptr, a, cs.threads, cs.budget);
  if (a.kc > 0) {
    compare(chk, "grad_weight", gw, ref.gw);
    compare(chk, "grad_P", gP, ref.gP);
    if (sig) compare(chk, "grad_SIG", gS, ref.gS);
  }
  chk.done();
}

void run_all_dtypes(const Case& cs, Version v, bool all_dtypes) {
  run_case<float, float>(cs, v);
  if (!all_dtypes) return;
  run_case<double, double>(cs, v);
  run_case<__half, float>(cs, v);
  run_case<__nv_bfloat16, float>(cs, v);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress survives a sanitizer abort
  const std::string only = argc > 1 ? argv[1] : "";  // optional filter: a version name
  const auto t0 = std::chrono::steady_clock::now();
  const size_t big = kSmemBudget;
  const Case cases[] = {
      {5, 3, {7}, 64, big},            // 1-D, several channels per block, partial last block
      {37, 1, {25}, 96, big},          // SNN-like kc 1: 3 channels per block, 13 blocks, partial warp
      {3, 4, {5, 7}, 64, big},         // 2-D non-square
      {2, 6, {17, 17}, 32, big},       // window 289 > 8 * 32: split over gridDim.y = 2 tiles
      {3, 9, {4, 6}, 64, 400},         // small budget: several chunks of elements
      {4, 3, {3, 5, 4}, 64, big},      // 3-D
      {2, 11, {3, 2, 4}, 32, 400},     // 3-D, chunks
      {3, 2, {1, 6}, 64, big},         // an axis of size 1
      {2, 0, {5, 5}, 64, big},         // kc 0: zero kernel, no backward launch
  };
  for (int vi = 0; vi < 4; ++vi) {
    if (!only.empty() && only != kVersionNames[vi]) continue;
    int i = 0;
    for (const Case& cs : cases) run_all_dtypes(cs, (Version)vi, i++ % 3 == 0 || cs.budget != big);
  }
  // Empty input: the launchers return before launching (a zero-block grid is invalid in CUDA).
  run_case<float, float>(Case{0, 3, {5, 5}, 64, big}, Version::kGauss);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dcls_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

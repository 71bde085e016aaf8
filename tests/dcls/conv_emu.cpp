// Runs the direct depthwise DCLS convolution kernels of csrc/dcls/conv_kernels.cuh
// through the CUDA emulation (cuda_emu.h) on small grids and edge shapes, and compares with a scalar
// fp64 host reference written here from shared/spec/dcls.md (deliberately NOT using dcls_conv.h's
// math: its own profiles, axis map and dense kernel; parameter gradients by central differences of
// the reference loss sum(grad_out * out)). The kernels are launched by the real launchers of
// csrc/dcls/conv_cuda.cu, compiled here unchanged against the emulation, on host buffers, with the
// workspace size they ask for: grids, shared memory (opted in above 48 KiB), and the grad-taps split
// count, which they derive from the emulated device's SM count (132, or what a case sets). Each case
// prints its launches; a last check asserts that the cases reached 1, 2 and 3 or more splits and the
// shared-memory opt-in. Usage: dcls_conv_emu [filter]; exit status 0 iff every case passes.
#include "cuda_emu.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dcls/conv_cuda.cu"

using namespace trous;
using namespace trous::dcls;

namespace {

// ---------------------------------------------------------------- reference (fp64, from the spec)
struct Case {
  std::string name;
  Version version;
  int N, C, kc;
  std::vector<int> sp, dks, stride, pad;  // spatial, first spatial axis first
  double p_spread;                        // P ~ U(+-(dks // 2 + p_spread))
  double sig;                             // SIG base value (gauss / max)
  int dtype;                              // 0 fp32, 1 fp16, 2 bf16
  int sms = 132;                          // SMs of the emulated device (the launcher's split count)
};

const char* vname(Version v) {
  return v == Version::kV0 ? "v0" : v == Version::kV1 ? "v1" : v == Version::kMax ? "max" : "gauss";
}

// P row of each spatial axis, per the quirks list of the spec.
std::vector<int> ref_prow(int nd, Version v) {
  const bool v0 = v == Version::kV0;
  if (nd == 1) return {0};
  if (nd == 2) return v0 ? std::vector<int>{0, 1} : std::vector<int>{1, 0};
  return v0 ? std::vector<int>{0, 2, 1} : std::vector<int>{2, 1, 0};
}

double ref_profile(Version v, int i, double mu, double sig) {
  if (v == Version::kV0) {
    const double fl = std::floor(mu), r = mu - fl;
    return i == (int)fl ? 1 - r : (i == (int)fl + 1 ? r : 0.0);
  }
  if (v == Version::kV1) return std::max(0.0, 1 - std::fabs(i - mu));
  if (v == Version::kMax) return std::max(0.0, std::fabs(sig) + 1 - std::fabs(i - mu));
  const double u = (i - mu) / (std::fabs(sig) + 0.27);
  return std::exp(-0.5 * u * u);
}

struct RefParams {
  std::vector<double> w, P, SIG;  // [C, kc], [nd, C, kc], [nd, C, kc]
};

// Dense window of channel c, spatial layout [dks0][dks1][dks2] (first spatial axis first).
std::vector<double> ref_dense(const Case& cs, const RefParams& rp, int c) {
  const int nd = (int)cs.dks.size();
  const auto prow = ref_prow(nd, cs.version);
  int W = 1;
  for (int d : cs.dks) W *= d;
  std::vector<double> K(W, 0.0);
  for (int k = 0; k < cs.kc; ++k) {
    std::vector<std::vector<double>> f(nd);
    double S = 1;
    for (int s = 0; s < nd; ++s) {
      const int r = prow[s];
      const double mu = rp.P[((size_t)r * cs.C + c) * cs.kc + k] + cs.dks[r] / 2;
      const double sg = rp.SIG.empty() ? 0 : rp.SIG[((size_t)r * cs.C + c) * cs.kc + k];
      double sum = 0;
      for (int i = 0; i < cs.dks[s]; ++i) {
        f[s].push_back(ref_profile(cs.version, i, mu, sg));
        sum += f[s].back();
      }
      S *= sum;
    }
    const double norm = cs.version == Version::kV0 ? 1.0 : S + 1e-7;
    for (int i = 0; i < W; ++i) {
      double prod = 1;
      int rem = i;
      for (int s = nd - 1; s >= 0; --s) {
        prod *= f[s][rem % cs.dks[s]];
        rem /= cs.dks[s];
      }
      K[i] += rp.w[(size_t)c * cs.kc + k] * prod / norm;
    }
  }
  return K;
}

struct Geo {
  int nd;
  std::vector<int> in, out;
  long in_plane, out_plane;
};

Geo geo_of(const Case& cs) {
  Geo g;
  g.nd = (int)cs.sp.size();
  g.in = cs.sp;
  g.in_plane = g.out_plane = 1;
  for (int s = 0; s < g.nd; ++s) {
    g.out.push_back((cs.sp[s] + 2 * cs.pad[s] - cs.dks[s]) / cs.stride[s] + 1);
    g.in_plane *= g.in[s];
    g.out_plane *= g.out.back();
  }
  return g;
}

// Visits every (output index, input index, window index) triple of a plane with the input inside.
template <typename F>
void for_pairs(const Case& cs, const Geo& g, F&& f) {
  const int nd = g.nd;
  int Wn = 1;
  for (int d : cs.dks) Wn *= d;
  for (long o = 0; o < g.out_plane; ++o) {
    int oc[3];  // nd <= 3 (no allocation: this loop is most of the reference's time)
    long rem = o;
    for (int s = nd - 1; s >= 0; --s) {
      oc[s] = (int)(rem % g.out[s]);
      rem /= g.out[s];
    }
    for (int t = 0; t < Wn; ++t) {
      long in_idx = 0;
      bool inside = true;
      int trem = t;
      int tc[3];
      for (int s = nd - 1; s >= 0; --s) {
        tc[s] = trem % cs.dks[s];
        trem /= cs.dks[s];
      }
      for (int s = 0; s < nd; ++s) {
        const int i = oc[s] * cs.stride[s] - cs.pad[s] + tc[s];
        inside = inside && i >= 0 && i < g.in[s];
        in_idx = in_idx * g.in[s] + i;
      }
      if (inside) f(o, in_idx, t);
    }
  }
}

// sum over (n, o) of gout * conv(x, K) for channel c.
double ref_loss_channel(const Case& cs, const Geo& g, const std::vector<double>& K, const std::vector<double>& x,
                        const std::vector<double>& gout, int c) {
  double L = 0;
  for (int n = 0; n < cs.N; ++n) {
    const double* xp = x.data() + ((size_t)n * cs.C + c) * g.in_plane;
    const double* gp = gout.data() + ((size_t)n * cs.C + c) * g.out_plane;
    for_pairs(cs, g, [&](long o, long i, int t) { L += gp[o] * K[t] * xp[i]; });
  }
  return L;
}

// ---------------------------------------------------------------- device side (emulated)
template <typename T> T to_t(float v);
template <> float to_t<float>(float v) { return v; }
template <> __half to_t<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
double from_t(float v) { return v; }
double from_t(__half v) { return __half2float(v); }
double from_t(__nv_bfloat16 v) { return __bfloat162float(v); }

ConvGeom device_geom(const Case& cs) {
  ConvGeom g{};
  const int nd = (int)cs.sp.size();
  g.N = cs.N;
  g.C = cs.C;
  g.kc = cs.kc;
  g.ndim = nd;
  g.version = cs.version;
  set_axis_map(g, nd, cs.dks.data());
  const int lead = kAxes - nd;
  for (int j = 0; j < kAxes; ++j) {
    if (j < lead) {
      g.in[j] = g.out[j] = g.stride[j] = 1;
      g.pad[j] = 0;
    } else {
      const int s = j - lead;
      g.in[j] = cs.sp[s];
      g.stride[j] = cs.stride[s];
      g.pad[j] = cs.pad[s];
      g.out[j] = (cs.sp[s] + 2 * cs.pad[s] - cs.dks[s]) / cs.stride[s] + 1;
    }
  }
  return g;
}

int g_passed = 0, g_failed = 0;
std::set<unsigned> g_splits;  // grad-taps split counts the launchers chose
bool g_optin = false;         // a launch above 48 KiB of dynamic shared memory

void check(const std::string& what, bool ok) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Prints one line with the launches since the last call ("name: kernel grid.x x grid.y smem B, ...")
// and forgets them; returns how many there were.
size_t print_launches(const std::string& name) {
  const auto& ls = trous_emu::launches();
  std::string s;
  for (const trous_emu::LaunchRecord& r : ls) {
    s += (s.empty() ? "" : ", ") + r.kernel + " " + std::to_string(r.grid.x) + "x" + std::to_string(r.grid.y) + " " +
         std::to_string(r.smem) + " B";
    if (r.kernel.rfind("dcls_grad_taps_kernel", 0) == 0) g_splits.insert(r.grid.x);
    g_optin = g_optin || r.smem > 48 * 1024;
  }
  std::printf("%s: %s\n", name.c_str(), s.empty() ? "no launch" : s.c_str());
  const size_t n = ls.size();
  trous_emu::launches().clear();
  return n;
}

void report(const std::string& what, double err, double scale, double tol) {
  const bool ok = err <= tol * std::max(scale, 1e-3) && std::isfinite(err);
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s: max err %.3e, scale %.3e (tol %.1e)\n", what.c_str(), err, scale, tol);
  }
}

template <typename T>
void run_case(const Case& cs) {
  std::mt19937 rng(1234 + cs.N * 7 + cs.kc);
  std::uniform_real_distribution<double> U(-1, 1);
  const int nd = (int)cs.sp.size();
  const Geo g = geo_of(cs);
  const ConvGeom dg = device_geom(cs);
  const size_t xn = (size_t)cs.N * cs.C * g.in_plane, on = (size_t)cs.N * cs.C * g.out_plane;
  std::vector<T> xd(xn), god(on), out(on), gx(xn);
  std::vector<double> x(xn), gout(on);
  for (size_t i = 0; i < xn; ++i) {
    xd[i] = to_t<T>((float)U(rng));
    x[i] = from_t(xd[i]);
  }
  for (size_t i = 0; i < on; ++i) {
    god[i] = to_t<T>((float)U(rng));
    gout[i] = from_t(god[i]);
  }
  const size_t pn = (size_t)nd * cs.C * cs.kc;
  const bool has_sig = cs.version == Version::kMax || cs.version == Version::kGauss;
  std::vector<float> w(cs.C * cs.kc), P(pn), SIG(has_sig ? pn : 0), bias(cs.C);
  for (auto& v : w) v = (float)U(rng);
  for (int r = 0; r < nd; ++r) {
    for (int i = 0; i < cs.C * cs.kc; ++i)
      P[(size_t)r * cs.C * cs.kc + i] = (float)(U(rng) * (cs.dks[r] / 2 + cs.p_spread));
  }
  for (auto& v : SIG) v = (float)(cs.sig * (1 + 0.5 * U(rng)) * (U(rng) < 0 ? -1 : 1));
  for (auto& v : bias) v = (float)U(rng);
  RefParams rp;
  rp.w.assign(w.begin(), w.end());
  rp.P.assign(P.begin(), P.end());
  rp.SIG.assign(SIG.begin(), SIG.end());
  const Params<float> dp{w.data(), P.data(), has_sig ? SIG.data() : nullptr, bias.data()};
  trous_emu::device().sm_count = cs.sms;
  check(cs.name + " supported on CUDA", cuda_geometry_supported(dg));

  // forward
  launch_forward(dtype_of<T>(), xd.data(), out.data(), dg, dp, nullptr);
  std::vector<std::vector<double>> K(cs.C);
  for (int c = 0; c < cs.C; ++c) K[c] = ref_dense(cs, rp, c);
  {
    std::vector<double> ref(on, 0.0);
    for (int n = 0; n < cs.N; ++n) {
      for (int c = 0; c < cs.C; ++c) {
        const double* xp = x.data() + ((size_t)n * cs.C + c) * g.in_plane;
        double* op = ref.data() + ((size_t)n * cs.C + c) * g.out_plane;
        for (long o = 0; o < g.out_plane; ++o) op[o] = bias[c];
        for_pairs(cs, g, [&](long o, long i, int t) { op[o] += K[c][t] * xp[i]; });
      }
    }
    double err = 0, scale = 0;
    for (size_t i = 0; i < on; ++i) {
      err = std::max(err, std::fabs(from_t(out[i]) - ref[i]));
      scale = std::max(scale, std::fabs(ref[i]));
    }
    report(cs.name + " forward", err, scale, sizeof(T) == 4 ? 2e-5 : 1e-2);
  }

  // backward: grad input, then the parameter gradients (taps partials per split, then per channel)
  std::vector<float> ws(cuda_backward_workspace(dg), NAN);  // non-support entries stay NaN
  std::vector<float> gw(cs.C * cs.kc, NAN), gP(pn, NAN), gS(has_sig ? pn : 0, NAN);
  launch_backward(dtype_of<T>(), god.data(), xd.data(), gx.data(), dg, dp,
                  ParamGrads<float>{gw.data(), gP.data(), has_sig ? gS.data() : nullptr}, ws.data(), nullptr);
  if (print_launches(cs.name) != 0) check(cs.name + " launches nothing for an empty batch", cs.N > 0);
  trous_emu::device() = trous_emu::Device{};
  {
    std::vector<double> ref(xn, 0.0);
    for (int n = 0; n < cs.N; ++n) {
      for (int c = 0; c < cs.C; ++c) {
        double* xp = ref.data() + ((size_t)n * cs.C + c) * g.in_plane;
        const double* gp = gout.data() + ((size_t)n * cs.C + c) * g.out_plane;
        for_pairs(cs, g, [&](long o, long i, int t) { xp[i] += K[c][t] * gp[o]; });
      }
    }
    double err = 0, scale = 0;
    for (size_t i = 0; i < xn; ++i) {
      err = std::max(err, std::fabs(from_t(gx[i]) - ref[i]));
      scale = std::max(scale, std::fabs(ref[i]));
    }
    report(cs.name + " grad_input", err, scale, sizeof(T) == 4 ? 2e-5 : 1e-2);
  }

  {
    // Central differences of the fp64 reference loss, per parameter.
    const double h = 1e-6;
    double err_w = 0, sc_w = 0, err_p = 0, sc_p = 0, err_s = 0, sc_s = 0;
    for (int c = 0; c < cs.C; ++c) {
      for (int k = 0; k < cs.kc; ++k) {
        auto fd = [&](std::vector<double>& vec, size_t idx) {
          const double keep = vec[idx];
          vec[idx] = keep + h;
          const double lp = ref_loss_channel(cs, g, ref_dense(cs, rp, c), x, gout, c);
          vec[idx] = keep - h;
          const double lm = ref_loss_channel(cs, g, ref_dense(cs, rp, c), x, gout, c);
          vec[idx] = keep;
          return (lp - lm) / (2 * h);
        };
        const size_t ck = (size_t)c * cs.kc + k;
        const double rw = fd(rp.w, ck);
        err_w = std::max(err_w, std::fabs(gw[ck] - rw));
        sc_w = std::max(sc_w, std::fabs(rw));
        for (int r = 0; r < nd; ++r) {
          const size_t idx = (size_t)r * cs.C * cs.kc + ck;
          const double rpv = fd(rp.P, idx);
          err_p = std::max(err_p, std::fabs(gP[idx] - rpv));
          sc_p = std::max(sc_p, std::fabs(rpv));
          if (has_sig) {
            const double rs = fd(rp.SIG, idx);
            err_s = std::max(err_s, std::fabs(gS[idx] - rs));
            sc_s = std::max(sc_s, std::fabs(rs));
          }
        }
      }
    }
    const double tol = sizeof(T) == 4 ? 1e-4 : 2e-2;
    report(cs.name + " grad_weight", err_w, sc_w, tol);
    report(cs.name + " grad_P", err_p, sc_p, tol);
    if (has_sig) report(cs.name + " grad_SIG", err_s, sc_s, tol);
  }
}

// Non-finite parameters (params.h, issue 9): an element with a NaN P, an infinite v0 P, an infinite
// max SIG, an infinite gauss P and SIG on one axis, or a non-finite weight makes every output of
// its channel NaN; an infinite P of v1 / max / gauss (the element leaves the window) keeps it finite.
void run_nonfinite() {
  const Version all[] = {Version::kV0, Version::kV1, Version::kMax, Version::kGauss};
  struct Poison {
    const char* name;
    int what;  // 0 P, 1 SIG, 2 weight, 3 P and SIG
    float value;
  };
  const float inf = INFINITY;
  const Poison kinds[] = {{"P=nan", 0, NAN},   {"P=inf", 0, inf},  {"P=-inf", 0, -inf}, {"SIG=nan", 1, NAN},
                          {"SIG=inf", 1, inf}, {"w=inf", 2, -inf}, {"w=nan", 2, NAN},   {"P,SIG=inf", 3, inf}};
  for (Version v : all) {
    const bool has_sig = v == Version::kMax || v == Version::kGauss;
    for (const Poison& k : kinds) {
      if ((k.what == 1 || k.what == 3) && !has_sig) continue;
      const Case cs{
          std::string(vname(v)) + " nonfinite " + k.name, v, 2, 3, 3, {7, 8}, {5, 3}, {1, 1}, {2, 1}, 0.5, 0.4, 0};
      const Geo g = geo_of(cs);
      const ConvGeom dg = device_geom(cs);
      std::mt19937 rng(77);
      std::uniform_real_distribution<double> U(-1, 1);
      const size_t xn = (size_t)cs.N * cs.C * g.in_plane, on = (size_t)cs.N * cs.C * g.out_plane;
      const size_t pn = (size_t)2 * cs.C * cs.kc;
      std::vector<float> x(xn), out(on), w(cs.C * cs.kc), P(pn), SIG(has_sig ? pn : 0), bias(cs.C);
      for (auto& e : x) e = (float)U(rng);
      for (auto& e : w) e = (float)U(rng);
      for (auto& e : P) e = (float)U(rng);
      for (auto& e : SIG) e = (float)(0.3 + 0.5 * std::fabs(U(rng)));
      for (auto& e : bias) e = (float)U(rng);
      const int c = 1, elem = 2;  // channel 1, element 2, P row 1
      const size_t pi = (size_t)1 * cs.C * cs.kc + c * cs.kc + elem;
      if (k.what == 0 || k.what == 3) P[pi] = k.value;
      if (k.what == 1 || k.what == 3) SIG[pi] = k.value;
      if (k.what == 2) w[c * cs.kc + elem] = k.value;
      const bool poisons = k.what == 2 || k.value != k.value || (k.what == 0 && v == Version::kV0) ||
                           (k.what == 1 && v == Version::kMax) || (k.what == 3 && has_sig);
      const Params<float> dp{w.data(), P.data(), has_sig ? SIG.data() : nullptr, bias.data()};
      trous_emu::device().sm_count = cs.sms;
      launch_forward(DType::kFloat32, x.data(), out.data(), dg, dp, nullptr);
      bool ok = true;
      for (int n = 0; n < cs.N; ++n)
        for (int ch = 0; ch < cs.C; ++ch)
          for (long o = 0; o < g.out_plane; ++o) {
            const float y = out[((size_t)n * cs.C + ch) * g.out_plane + o];
            ok = ok && (ch == c && poisons ? std::isnan(y) : std::isfinite(y));
          }
      check(cs.name + (poisons ? ": the channel's outputs are all NaN" : ": finite"), ok);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress survives a sanitizer abort
  const auto t0 = std::chrono::steady_clock::now();
  const std::string only = argc > 1 ? argv[1] : "";
  std::vector<Case> cases;
  const Version all[] = {Version::kV0, Version::kV1, Version::kMax, Version::kGauss};
  for (Version v : all) {
    const std::string vn = vname(v);
    // name, version, N, C, kc, spatial, dks, stride, pad, p_spread, sig, dtype[, SMs]; the batch sizes give
    // the launcher's grad-taps split count ceil(N * out_plane / kStage): 1, 3, 2, 2.
    cases.push_back({vn + " 1d", v, 2, 3, 4, {37}, {9}, {1}, {4}, 0.8, 0.4, 0});
    cases.push_back({vn + " 2d", v, 6, 2, 5, {9, 11}, {5, 7}, {1, 1}, {2, 3}, 0.8, 0.3, 0});
    cases.push_back({vn + " 2d stride2", v, 11, 2, 3, {10, 9}, {3, 5}, {2, 2}, {1, 2}, 0.6, 0.3, 0});
    cases.push_back({vn + " 3d", v, 3, 2, 3, {5, 6, 7}, {3, 5, 3}, {1, 2, 1}, {1, 2, 1}, 0.6, 0.3, 0});
  }
  // Window of 289 > 256 threads (chunked compaction), partial last block, 2 splits.
  cases.push_back({"gauss 17x17", Version::kGauss, 1, 2, 6, {20, 19}, {17, 17}, {1, 1}, {8, 8}, 0.5, 0.23, 0});
  // kc > 256 threads (elements looped per thread), a single channel.
  cases.push_back({"v1 kc300", Version::kV1, 1, 1, 300, {15}, {7}, {1}, {3}, 0.5, 0, 0});
  // P far outside the window: no taps at all (v0 / gauss; v1 renormalises nothing either).
  cases.push_back({"v0 empty", Version::kV0, 1, 2, 2, {8}, {5}, {1}, {2}, 40, 0, 0});
  // Large sigma (SNN delays): the whole window is support; 2 splits.
  cases.push_back({"gauss large sigma", Version::kGauss, 5, 2, 2, {30}, {25}, {1}, {24}, 0.3, 8.0, 0});
  // More than kThreads * kTapsPerThread = 1024 taps: two grad-taps passes (large sigma, 33x35 window); 5 splits.
  cases.push_back({"gauss 1155 taps", Version::kGauss, 1, 1, 2, {36, 34}, {33, 35}, {1, 1}, {16, 17}, 0.3, 20.0, 0});
  // Between kThreads / 2 and kThreads taps: one group, a single pass (7x7 dense support of 49 * ...); 3 splits.
  cases.push_back({"gauss 15x15 dense", Version::kGauss, 4, 1, 3, {12, 13}, {15, 15}, {1, 1}, {7, 7}, 0.3, 6.0, 0});
  cases.push_back({"v1 fp16", Version::kV1, 2, 2, 4, {8, 9}, {5, 5}, {1, 1}, {2, 2}, 0.6, 0, 1});
  cases.push_back({"gauss bf16", Version::kGauss, 2, 2, 4, {8, 9}, {5, 5}, {2, 1}, {2, 2}, 0.6, 0.3, 2});
  // A device of 1 SM: the split count is bound by the SMs, ceil(4 * 1 / C) = 2, not by the work (3).
  cases.push_back({"v1 2d 1 SM", Version::kV1, 6, 2, 5, {9, 11}, {5, 7}, {1, 1}, {2, 3}, 0.8, 0.3, 0, 1});
  // A 49x51 window: the taps need more than 48 KiB of shared memory (the launcher opts in).
  cases.push_back({"gauss 49x51 opt-in", Version::kGauss, 1, 1, 2, {8, 8}, {49, 51}, {1, 1}, {22, 23}, 0.3, 20.0, 0});
  // Empty batch: no kernel; the parameter gradients are zeroed (cudaMemsetAsync).
  cases.push_back({"gauss N0", Version::kGauss, 0, 2, 3, {9, 11}, {5, 7}, {1, 1}, {2, 3}, 0.8, 0.3, 0});
  for (const Case& cs : cases) {
    if (!only.empty() && cs.name.find(only) == std::string::npos) continue;
    if (cs.dtype == 0) run_case<float>(cs);
    if (cs.dtype == 1) run_case<__half>(cs);
    if (cs.dtype == 2) run_case<__nv_bfloat16>(cs);
  }
  if (only.empty() || only == "nonfinite") run_nonfinite();
  if (only.empty()) {  // the cases must reach each split regime and the shared-memory opt-in
    check("coverage: 1 grad-taps split", g_splits.count(1) > 0);
    check("coverage: 2 grad-taps splits", g_splits.count(2) > 0);
    check("coverage: 3 or more grad-taps splits", g_splits.upper_bound(2) != g_splits.end());
    check("coverage: more than 48 KiB of dynamic shared memory", g_optin);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dcls_conv_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed == 0 ? 0 : 1;
}

// Runs the CUDA kernels of the quantized KV cache in use (csrc/kvcache/cache_kernels.cuh, through the
// real launchers of cache_cuda.cu compiled unchanged against the emulation, cuda_emu.h) on small
// grids, and compares with a host reference written here from shared/spec/kvcache.md and the
// storage description of cache.h: the residual rule, the addressing (contiguous and paged) and the
// quantization formulas are re-derived below, not taken from cache.h / quantize.h, and fp16 / bf16 /
// fp8 roundings come from CUDA's own host conversions.
//
// kv_append: after every call of a seeded sequence of prefill / decode appends (on subsets of the
// batch, as the Python class slices lengths, block table and residual), the cache must hold the
// reference quantization of the whole history under the group rule: codes and stored parameters
// bit for bit, the residual ring exactly, lengths updated.
// quantized_decode_attention: out / lse against an fp64 attention over the dequantized cache (the
// kernel's stored codes decoded by the host formulas, themselves checked bit for bit above).
// Exit status 0 iff every case passes.
#include "cuda_emu.h"
#include "emu_check.h"

#include <cuda_fp8.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcache/cache_cuda.cu"

using namespace trous;
using namespace trous::kv;

namespace {

std::set<std::string> g_kernels;
void note_launches() {
  for (const trous_emu::LaunchRecord& r : trous_emu::launches()) g_kernels.insert(r.kernel);
  trous_emu::launches().clear();
}

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

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0; }

// ---------------------------------------------------------------- format and reference math
struct Fmt {
  CacheScheme scheme;
  int bits;
  int G;
  ParamType pt;
  Fp8Format f8;
  bool per_head;  // fp8 scale per KV head
  index_t R;
};

const char* sname(const Fmt& f) {
  switch (f.scheme) {
    case CacheScheme::kPerToken: return f.bits == 2 ? "tok2" : f.bits == 4 ? "tok4" : "tok8";
    case CacheScheme::kSymmetric: return "sym8";
    case CacheScheme::kKivi: return f.bits == 2 ? "kivi2" : f.bits == 4 ? "kivi4" : "kivi8";
    case CacheScheme::kFp8: return f.f8 == Fp8Format::kE4M3 ? "e4m3" : "e5m2";
  }
  return "?";
}

// Residual rule (spec): token group g = G for KIVI, else 1; the R most recent tokens stay in full
// precision, older ones are quantized in whole groups; ring capacity R + g - 1.
index_t ref_tgroup(const Fmt& f) { return f.scheme == CacheScheme::kKivi ? f.G : 1; }
index_t ref_cap(const Fmt& f) { return f.R + ref_tgroup(f) - 1; }
index_t ref_qlen(const Fmt& f, index_t T) {
  if (T <= f.R) return 0;
  const index_t g = ref_tgroup(f);
  return (T - f.R) / g * g;
}

float round_to(float v, ParamType t) { return t == ParamType::kFloat16 ? __half2float(__float2half_rn(v)) : v; }
float floor_scale(float s, ParamType t) {
  const float r = t == ParamType::kFloat16 ? __half2float(__float2half_ru(s)) : s;
  return std::max(r, t == ParamType::kFloat16 ? 0x1p-24f : 0x1p-126f);
}

struct RefGroup {
  float s = 0.f, z = 0.f;
  std::vector<int> q;
};

RefGroup ref_asym(const std::vector<float>& x, int bits, ParamType pt) {
  RefGroup g;
  g.q.assign(x.size(), 0);
  float mn = INFINITY, mx = -INFINITY;
  for (float v : x) mn = std::min(mn, v), mx = std::max(mx, v);
  const int qmax = (1 << bits) - 1;
  g.s = floor_scale((mx - mn) / (float)qmax, pt);
  g.z = round_to(mn, pt);
  const float inv = 1.f / g.s;
  for (size_t i = 0; i < x.size(); ++i)
    g.q[i] = (int)std::min(std::max(std::nearbyint((x[i] - g.z) * inv), 0.f), (float)qmax);
  return g;
}

RefGroup ref_sym(const std::vector<float>& x, ParamType pt) {
  RefGroup g;
  g.q.assign(x.size(), 0);
  float amax = 0.f;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  g.s = floor_scale(amax / 127.f, pt);
  const float inv = 1.f / g.s;
  for (size_t i = 0; i < x.size(); ++i)
    g.q[i] = (int)std::min(std::max(std::nearbyint(x[i] * inv), -127.f), 127.f) & 0xff;
  return g;
}

int unpack(const uint8_t* row, index_t col, int bits) {
  const int per_byte = 8 / bits;
  return (row[col / per_byte] >> ((col % per_byte) * bits)) & ((1 << bits) - 1);
}

__nv_fp8_interpretation_t interp(Fp8Format f) { return f == Fp8Format::kE4M3 ? __NV_E4M3 : __NV_E5M2; }
float fp8_decode(uint8_t c, Fp8Format f) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, interp(f)))); }

// ---------------------------------------------------------------- host cache
template <typename T>
struct HostCache {
  Fmt f;
  index_t B, H, D;
  bool paged;
  index_t page_size, max_pages, pages;
  std::vector<uint8_t> kc, vc, kp, vp;  // codes, params (bytes)
  std::vector<float> ks8, vs8;          // fp8 scales
  std::vector<T> kr, vr;                // residual rings (from element ring_off)
  index_t ring_off = 0, poff = 0;       // misaligned: rings 1 element, params 1 parameter off 16 bytes
  std::vector<int32_t> lengths, bt;
  std::vector<std::vector<float>> hk, hv;  // history per (b, h): tokens x D, as T values

  HostCache(const Fmt& f_, index_t B_, index_t H_, index_t D_, bool paged_, index_t page_size_, index_t max_pages_,
            bool misaligned)
      : f(f_), B(B_), H(H_), D(D_), paged(paged_), page_size(page_size_), max_pages(paged_ ? max_pages_ : 1) {
    ring_off = misaligned ? 1 : 0;
    poff = misaligned ? (index_t)ps() : 0;
    pages = paged ? B * max_pages + 2 : B;  // paged: two pages no sequence uses
    const index_t cb = D * (f.scheme == CacheScheme::kFp8 ? 8 : f.bits) / 8;
    kc.assign(pages * H * page_size * cb, 0xcd);
    vc = kc;
    const size_t ps = f.pt == ParamType::kFloat16 ? 2 : 4;
    const index_t np = f.scheme == CacheScheme::kSymmetric ? 1 : 2;
    if (f.scheme == CacheScheme::kFp8) {
      ks8.assign(f.per_head ? H : 1, 0.f);
      vs8 = ks8;
      for (size_t i = 0; i < ks8.size(); ++i)
        ks8[i] = (3.f + (float)i) / 448.f, vs8[i] = (2.f + 0.5f * (float)i) / 448.f;
    } else {
      vp.assign(poff + pages * H * page_size * (D / f.G) * np * ps, 0xcd);
      kp = f.scheme == CacheScheme::kKivi
               ? std::vector<uint8_t>(poff + pages * H * (page_size / f.G) * D * 2 * ps, 0xcd)
               : vp;
    }
    kr.assign(ring_off + B * H * ref_cap(f) * D, from_f<T>(-7.f));
    vr = kr;
    lengths.assign(B, 0);
    if (paged) {  // a shuffled page pool
      std::vector<int32_t> perm(pages);
      for (index_t i = 0; i < pages; ++i) perm[i] = (int32_t)i;
      for (index_t i = pages - 1; i > 0; --i)
        std::swap(perm[i], perm[(index_t)((uniform() + 1.0) * 0.5 * (double)(i + 1)) % (i + 1)]);
      bt.assign(perm.begin(), perm.begin() + B * max_pages);
    }
    hk.assign(B * H, {});
    hv.assign(B * H, {});
  }
  index_t capacity() const { return paged ? max_pages * page_size : page_size; }
  index_t cb() const { return D * (f.scheme == CacheScheme::kFp8 ? 8 : f.bits) / 8; }
  size_t ps() const { return f.pt == ParamType::kFloat16 ? 2 : 4; }

  // Addressing re-derived from cache.h's storage description.
  index_t page(index_t b, index_t t) const { return paged ? bt[b * max_pages + t / page_size] : b; }
  index_t trow(index_t b, index_t h, index_t t) const { return (page(b, t) * H + h) * page_size + t % page_size; }
  index_t kgrow(index_t b, index_t h, index_t t) const {
    return (page(b, t) * H + h) * (page_size / f.G) + (t % page_size) / f.G;
  }
  index_t rrow(index_t b, index_t h, index_t t) const { return (b * H + h) * ref_cap(f) + t % ref_cap(f); }
  index_t relem(index_t b, index_t h, index_t t) const { return ring_off + rrow(b, h, t) * D; }
  float param(const std::vector<uint8_t>& buf, index_t i) const {
    if (f.pt == ParamType::kFloat32) {
      float v;
      std::memcpy(&v, buf.data() + poff + 4 * i, 4);
      return v;
    }
    __half h;
    std::memcpy(&h, buf.data() + poff + 2 * i, 2);
    return __half2float(h);
  }

  // The cache of sequences [b0, b0 + nb), as the Python class slices it.
  CacheRef ref(index_t b0, index_t nb) {
    CacheRef c;
    c.fmt = CacheFormat{f.scheme, f.scheme == CacheScheme::kFp8 ? 8 : f.bits, f.G, f.pt, f.f8, D, f.R};
    c.map = PageMap{paged ? bt.data() + b0 * max_pages : nullptr, max_pages, page_size, H};
    const index_t coff = paged ? 0 : b0 * H * page_size * cb();
    c.k_codes = kc.data() + coff;
    c.v_codes = vc.data() + coff;
    if (f.scheme == CacheScheme::kFp8) {
      c.k_params = ks8.data();
      c.v_params = vs8.data();
      c.fp8_scale_per_head = f.per_head;
    } else {
      const index_t np = f.scheme == CacheScheme::kSymmetric ? 1 : 2;
      const index_t voff = paged ? 0 : b0 * H * page_size * (D / f.G) * np * ps();
      const index_t koff =
          f.scheme == CacheScheme::kKivi ? (paged ? 0 : b0 * H * (page_size / f.G) * D * 2 * ps()) : voff;
      c.k_params = kp.data() + poff + koff;
      c.v_params = vp.data() + poff + voff;
    }
    c.k_residual = ref_cap(f) ? kr.data() + ring_off + b0 * H * ref_cap(f) * D : nullptr;
    c.v_residual = ref_cap(f) ? vr.data() + ring_off + b0 * H * ref_cap(f) * D : nullptr;
    c.lengths = lengths.data() + b0;
    c.batch = nb;
    c.act = dtype_of<T>();
    return c;
  }
};

// New K or V [nb, H, n, D] with padded strides, BHTD or BTHD.
template <typename T>
struct NewTokens {
  std::vector<T> buf;
  BHTStrides s;
  NewTokens(index_t nb, index_t H, index_t n, index_t D, bool bthd, int salt) {
    const index_t rs = D + 8;
    s = bthd ? BHTStrides{n * H * rs, rs, H * rs} : BHTStrides{H * n * rs, n * rs, rs};
    buf.assign((size_t)std::max<index_t>(nb * H * n * rs, 1), from_f<T>(NAN));  // padding is NaN
    for (index_t b = 0; b < nb; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t t = 0; t < n; ++t) {
          const float centre = 2.f * (float)uniform(), spread = std::ldexp(1.f, (int)((t + h + salt) % 5) - 2);
          for (index_t d = 0; d < D; ++d)
            at(b, h, t, d) = from_f<T>(centre + spread * (float)uniform() * (1.f + (float)(d % 7) * 0.3f));
          // Constant groups: channel 3 of every token (a constant KIVI key channel), and every
          // channel of some tokens (constant per-token groups): scale = the smallest scale, codes 0.
          at(b, h, t, 3) = from_f<T>(0.75f);
          if ((t + salt) % 5 == 4)
            for (index_t d = 0; d < D; ++d) at(b, h, t, d) = from_f<T>(-1.25f);
        }
  }
  T& at(index_t b, index_t h, index_t t, index_t d) { return buf[b * s.b + h * s.h + t * s.t + d]; }
};

// Checks the whole cache state of every sequence against the reference of its history.
template <typename T>
void check_state(HostCache<T>& c, Check& chk) {
  const Fmt& f = c.f;
  const index_t D = c.D, cb = c.cb();
  for (index_t b = 0; b < c.B; ++b) {
    const index_t L = (index_t)c.hk[b * c.H].size() / D;
    if (c.lengths[b] != L)
      chk.fail("lengths[" + std::to_string(b) + "] = " + std::to_string(c.lengths[b]) + ", expected " +
               std::to_string(L));
    const index_t Q = ref_qlen(f, L);
    for (index_t h = 0; h < c.H; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        const std::vector<float>& hist = kv ? c.hv[b * c.H + h] : c.hk[b * c.H + h];
        const std::vector<uint8_t>& codes = kv ? c.vc : c.kc;
        const std::vector<uint8_t>& params = kv ? c.vp : c.kp;
        const std::vector<T>& ring = kv ? c.vr : c.kr;
        const std::string who = std::string(kv ? "V" : "K") + " b" + std::to_string(b) + " h" + std::to_string(h);
        // Ring: tokens [Q, L) exactly.
        for (index_t t = Q; t < L; ++t)
          for (index_t d = 0; d < D; ++d)
            if (!same(to_f(ring[c.relem(b, h, t) + d]), hist[t * D + d]))
              chk.fail(who + " ring token " + std::to_string(t) + " ch " + std::to_string(d));
        if (f.scheme == CacheScheme::kFp8) {
          const float s = (kv ? c.vs8 : c.ks8)[f.per_head ? h : 0];
          for (index_t t = 0; t < Q; ++t)
            for (index_t d = 0; d < D; ++d) {
              const uint8_t want = __nv_cvt_float_to_fp8(hist[t * D + d] / s, __NV_SATFINITE, interp(f.f8));
              const uint8_t got = codes[c.trow(b, h, t) * cb + d];
              if (got != want)
                chk.fail(who + " fp8 token " + std::to_string(t) + " ch " + std::to_string(d) + " code " +
                         std::to_string(got) + " != " + std::to_string(want));
            }
        } else if (!kv && f.scheme == CacheScheme::kKivi) {
          for (index_t t0 = 0; t0 < Q; t0 += f.G)
            for (index_t d = 0; d < D; ++d) {
              std::vector<float> xs(f.G);
              for (int t = 0; t < f.G; ++t) xs[t] = hist[(t0 + t) * D + d];
              const RefGroup g = ref_asym(xs, f.bits, f.pt);
              const index_t pi = (c.kgrow(b, h, t0) * D + d) * 2;
              if (!same(c.param(params, pi), g.s) || !same(c.param(params, pi + 1), g.z))
                chk.fail(who + " key group at " + std::to_string(t0) + " ch " + std::to_string(d) + " params (" +
                         std::to_string(c.param(params, pi)) + ", " + std::to_string(c.param(params, pi + 1)) +
                         ") != (" + std::to_string(g.s) + ", " + std::to_string(g.z) + ")");
              for (int t = 0; t < f.G; ++t) {
                const int q = unpack(codes.data() + c.trow(b, h, t0 + t) * cb, d, f.bits);
                if (q != g.q[t])
                  chk.fail(who + " key token " + std::to_string(t0 + t) + " ch " + std::to_string(d) + " code " +
                           std::to_string(q) + " != " + std::to_string(g.q[t]));
              }
            }
        } else {
          const bool sym = f.scheme == CacheScheme::kSymmetric;
          const index_t np = sym ? 1 : 2, ng = D / f.G;
          for (index_t t = 0; t < Q; ++t)
            for (index_t g = 0; g < ng; ++g) {
              std::vector<float> xs(hist.begin() + t * D + g * f.G, hist.begin() + t * D + (g + 1) * f.G);
              const RefGroup r = sym ? ref_sym(xs, f.pt) : ref_asym(xs, f.bits, f.pt);
              const index_t pi = (c.trow(b, h, t) * ng + g) * np;
              if (!same(c.param(params, pi), r.s) || (!sym && !same(c.param(params, pi + 1), r.z)))
                chk.fail(who + " token " + std::to_string(t) + " group " + std::to_string(g) + " params");
              for (int e = 0; e < f.G; ++e) {
                const int q = unpack(codes.data() + c.trow(b, h, t) * cb, g * f.G + e, sym ? 8 : f.bits);
                if (q != r.q[e])
                  chk.fail(who + " token " + std::to_string(t) + " ch " + std::to_string(g * f.G + e) + " code " +
                           std::to_string(q) + " != " + std::to_string(r.q[e]));
              }
            }
        }
      }
    }
  }
}

struct Step {
  index_t b0, nb, n;
};

template <typename T>
void run_appends(HostCache<T>& c, const std::vector<Step>& steps, Check& chk, bool check_each) {
  int salt = 0;
  for (const Step& st : steps) {
    NewTokens<T> k(st.nb, c.H, st.n, c.D, salt % 2 == 1, salt), v(st.nb, c.H, st.n, c.D, salt % 3 == 0, salt + 1);
    ++salt;
    AppendParams p;
    p.cache = c.ref(st.b0, st.nb);
    p.k = k.buf.data();
    p.v = v.buf.data();
    p.sk = k.s;
    p.sv = v.s;
    p.n_new = st.n;
    launch_kv_append(p, nullptr);
    const size_t n_launch = trous_emu::launches().size();
    if (st.n > 0 && n_launch != 1) chk.fail("append: " + std::to_string(n_launch) + " launches, expected 1");
    note_launches();
    for (index_t b = 0; b < st.nb; ++b)
      for (index_t h = 0; h < c.H; ++h)
        for (index_t t = 0; t < st.n; ++t)
          for (index_t d = 0; d < c.D; ++d) {
            c.hk[(st.b0 + b) * c.H + h].push_back(to_f(k.at(b, h, t, d)));
            c.hv[(st.b0 + b) * c.H + h].push_back(to_f(v.at(b, h, t, d)));
          }
    if (check_each) check_state(c, chk);
  }
  if (!check_each) check_state(c, chk);
}

// ---------------------------------------------------------------- decode reference
// Dequantized token t of (b, h), from the stored codes / params (host formulas) or the ring.
template <typename T>
void ref_dequant(const HostCache<T>& c, bool keys, index_t b, index_t h, index_t t, index_t Q, double* out) {
  const Fmt& f = c.f;
  const index_t D = c.D, cb = c.cb();
  if (t >= Q) {
    const std::vector<T>& ring = keys ? c.kr : c.vr;
    for (index_t d = 0; d < D; ++d) out[d] = to_f(ring[c.relem(b, h, t) + d]);
    return;
  }
  const uint8_t* row = (keys ? c.kc : c.vc).data() + c.trow(b, h, t) * cb;
  const std::vector<uint8_t>& params = keys ? c.kp : c.vp;
  for (index_t d = 0; d < D; ++d) {
    float v;
    if (f.scheme == CacheScheme::kFp8) {
      v = fp8_decode(row[d], f.f8) * (keys ? c.ks8 : c.vs8)[f.per_head ? h : 0];
    } else if (keys && f.scheme == CacheScheme::kKivi) {
      const index_t pi = (c.kgrow(b, h, t) * D + d) * 2;
      v = std::fma((float)unpack(row, d, f.bits), c.param(params, pi), c.param(params, pi + 1));
    } else if (f.scheme == CacheScheme::kSymmetric) {
      v = (float)(int8_t)row[d] * c.param(params, c.trow(b, h, t) * (D / f.G) + d / f.G);
    } else {
      const index_t pi = (c.trow(b, h, t) * (D / f.G) + d / f.G) * 2;
      v = std::fma((float)unpack(row, d, f.bits), c.param(params, pi), c.param(params, pi + 1));
    }
    out[d] = v;
  }
}

template <typename T>
void check_decode(HostCache<T>& c, index_t Hq, index_t Sq, float softcap, Check& chk) {
  const index_t B = c.B, H = c.H, D = c.D, grp = Hq / H;
  std::vector<T> q((size_t)(B * Hq * Sq * (D + 4)));
  const BHTStrides sq{Hq * Sq * (D + 4), Sq * (D + 4), D + 4};  // padded rows
  for (auto& e : q) e = from_f<T>((float)uniform());
  std::vector<T> out((size_t)(B * Hq * Sq * D), from_f<T>(NAN));
  std::vector<float> lse((size_t)(B * Hq * Sq), NAN);
  DecodeParams p;
  p.cache = c.ref(0, B);
  p.q = q.data();
  p.sq = sq;
  p.out = out.data();
  p.lse = lse.data();
  p.Hq = Hq;
  p.Sq = Sq;
  p.scale = 1.f / std::sqrt((float)D);
  p.softcap = softcap;
  const size_t ws_bytes = decode_workspace_bytes(p);
  std::vector<float> ws(ws_bytes / 4 + 1, NAN);
  p.workspace = ws.data();
  launch_quantized_decode(p, nullptr);
  int splits = 0;
  for (const auto& r : trous_emu::launches())
    if (r.kernel.rfind("quantized_decode_kernel", 0) == 0) splits = (int)r.grid.y;
  std::printf("[splits %d] ", splits);
  note_launches();
  const double tol = std::is_same<T, float>::value ? 2e-5 : std::is_same<T, __half>::value ? 2e-3 : 1.6e-2;
  std::vector<double> kd(D), vd(D);
  for (index_t b = 0; b < B; ++b) {
    const index_t L = c.lengths[b], Q = ref_qlen(c.f, L);
    for (index_t h = 0; h < H; ++h) {
      std::vector<double> K(L * D), V(L * D);
      for (index_t t = 0; t < L; ++t) {
        ref_dequant(c, true, b, h, t, Q, K.data() + t * D);
        ref_dequant(c, false, b, h, t, Q, V.data() + t * D);
      }
      for (index_t g = 0; g < grp; ++g)
        for (index_t s = 0; s < Sq; ++s) {
          const index_t hq = h * grp + g, pos = L - Sq + s;
          const index_t o = (b * Hq + hq) * Sq + s;
          std::vector<double> sc(std::max<index_t>(pos + 1, 0));
          double m = -INFINITY;
          for (index_t t = 0; t <= pos; ++t) {
            double dot = 0;
            for (index_t d = 0; d < D; ++d) dot += (double)to_f(q[b * sq.b + hq * sq.h + s * sq.t + d]) * K[t * D + d];
            dot *= p.scale;
            if (softcap > 0) dot = softcap * std::tanh(dot / softcap);
            sc[t] = dot;
            m = std::max(m, dot);
          }
          double l = 0;
          for (index_t t = 0; t <= pos; ++t) l += std::exp(sc[t] - m);
          const double want_lse = pos < 0 ? -INFINITY : m + std::log(l);
          const std::string who = "b" + std::to_string(b) + " hq" + std::to_string(hq) + " s" + std::to_string(s);
          if (pos < 0 ? !(std::isinf(lse[o]) && lse[o] < 0)
                      : !(std::fabs(lse[o] - want_lse) <= 1e-4 * (1 + std::fabs(want_lse))))
            chk.fail(who + " lse " + std::to_string(lse[o]) + " != " + std::to_string(want_lse));
          for (index_t d = 0; d < D; ++d) {
            double want = 0;
            for (index_t t = 0; t <= pos; ++t) want += std::exp(sc[t] - m) / l * V[t * D + d];
            const double got = to_f(out[o * D + d]);
            if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want))))
              chk.fail(who + " d" + std::to_string(d) + " out " + std::to_string(got) + " != " + std::to_string(want));
          }
        }
    }
  }
}

// ---------------------------------------------------------------- cases
struct Case {
  Fmt f;
  index_t B, H, D;
  bool paged;
  index_t page_size, max_pages;
  std::vector<Step> steps;
  index_t Hq, Sq;  // decode (Hq 0: append only)
  float softcap = 0.f;
  int sm_count = 0;  // emulated SMs (fewer: fewer splits of more tiles); 0: alternate 132 and 1
};

template <typename T>
void run_case(const Case& k) {
  char name[256];
  std::snprintf(name, sizeof name, "%s %s %s G=%d R=%d %s D=%d B=%d Hkv=%d Hq=%d Sq=%d%s", sname(k.f), tname<T>(),
                k.f.pt == ParamType::kFloat16 ? "p16" : "p32", k.f.G, (int)k.f.R,
                k.paged ? ("paged/" + std::to_string(k.page_size)).c_str() : "contig", (int)k.D, (int)k.B, (int)k.H,
                (int)k.Hq, (int)k.Sq, k.softcap > 0 ? " softcap" : "");
  static int n_runs = 0;
  const bool misaligned = n_runs % 3 == 2;  // rings and params off 16 bytes: the scalar loads
  if (misaligned) std::strcat(name, " misaligned");
  Check chk{name};
  trous_emu::device().sm_count = k.sm_count ? k.sm_count : (n_runs % 2 ? 1 : 132);
  ++n_runs;
  HostCache<T> c(k.f, k.B, k.H, k.D, k.paged, k.page_size, k.max_pages, misaligned);
  run_appends(c, k.steps, chk, true);
  if (k.Hq) check_decode(c, k.Hq, k.Sq, k.softcap, chk);
  trous_emu::device().sm_count = 132;
  chk.done();
}

template <typename T> struct F {
  static void run(const Case& k) { run_case<T>(k); }
};

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const ParamType P16 = ParamType::kFloat16, P32 = ParamType::kFloat32;
  const Fp8Format E4 = Fp8Format::kE4M3, E5 = Fp8Format::kE5M2;
  const CacheScheme TOK = CacheScheme::kPerToken, SYM = CacheScheme::kSymmetric, KIVI = CacheScheme::kKivi,
                    FP8 = CacheScheme::kFp8;
  // Appends: a prefill of sequence 0 that wraps the ring, others on subsets, decode steps on all.
  const std::vector<Step> mixed = {{0, 1, 29}, {1, 1, 3}, {0, 2, 1}, {1, 1, 9}, {0, 2, 2}, {0, 2, 1}};
  const std::vector<Step> one_seq_empty = {{0, 1, 21}, {0, 1, 1}, {0, 1, 3}};  // sequence 1 stays empty
  const std::vector<Step> long_ctx = {{0, 2, 97}, {0, 1, 40}, {0, 2, 1}, {1, 1, 2}};
  std::vector<Case> cases = {
      // per-token int2 / int4 / int8, residual empty, partial, full; contiguous and paged
      {{TOK, 4, 32, P16, E4, false, 4}, 2, 2, 64, false, 48, 1, mixed, 8, 1},
      {{TOK, 2, 64, P32, E4, false, 0}, 2, 1, 64, true, 8, 6, mixed, 4, 3},
      {{TOK, 8, 16, P16, E4, false, 7}, 2, 2, 80, true, 16, 3, mixed, 2, 2},
      {{SYM, 8, 32, P32, E4, false, 5}, 2, 2, 64, false, 48, 1, mixed, 2, 1, 30.f},
      {{SYM, 8, 64, P16, E4, false, 0}, 2, 1, 64, true, 16, 3, one_seq_empty, 4, 1},
      // KIVI: G tokens per key group, R a multiple of G; page = whole key groups
      {{KIVI, 2, 8, P16, E4, false, 16}, 2, 2, 64, false, 48, 1, mixed, 8, 2},
      {{KIVI, 4, 8, P32, E4, false, 8}, 2, 2, 64, true, 16, 3, mixed, 4, 1},
      {{KIVI, 8, 16, P16, E4, false, 0}, 2, 1, 128, true, 16, 3, mixed, 1, 8},
      {{KIVI, 4, 16, P16, E4, false, 16}, 2, 1, 80, false, 48, 1, one_seq_empty, 4, 3},
      // fp8 per-head / per-tensor scale
      {{FP8, 8, 8, P32, E4, true, 3}, 2, 2, 64, true, 8, 6, mixed, 8, 1},
      {{FP8, 8, 8, P32, E5, false, 0}, 2, 2, 96, false, 48, 1, mixed, 2, 4},
      // 40 query rows per KV head (GQA 8 x Sq 5): two row blocks; few SMs: one split of many tiles
      {{TOK, 4, 32, P16, E4, false, 6}, 2, 1, 64, false, 48, 1, mixed, 8, 5},
      {{KIVI, 2, 8, P16, E4, false, 8}, 2, 2, 64, true, 16, 3, mixed, 4, 2, 0.f, 1},
      // a longer context: many splits of one tile, the last one partial, with residual tokens
      {{KIVI, 4, 16, P16, E4, false, 32}, 2, 2, 64, true, 16, 10, long_ctx, 8, 1},
      {{FP8, 8, 8, P32, E4, true, 16}, 2, 2, 64, true, 16, 10, long_ctx, 4, 3, 0.f, 3},  // 3 splits of 2 tiles
      {{TOK, 4, 32, P32, E4, false, 5}, 2, 2, 64, false, 160, 1, long_ctx, 4, 2},
  };
  int i = 0;
  for (const Case& k : cases) {
    // Every case runs once per dtype for the main formats; the rest cycle over dtypes.
    for (int dt = 0; dt < 3; ++dt) {
      if (i >= 4 && dt != i % 3) continue;
      if (dt == 0) F<float>::run(k);
      if (dt == 1) F<__half>::run(k);
      if (dt == 2) F<__nv_bfloat16>::run(k);
    }
    ++i;
  }
  {
    // A format the kernels cannot address (D % 8 != 0, G not dividing D) is refused before any launch.
    Check chk{"unsupported formats refused, nothing launched"};
    for (const Fmt& f : {Fmt{TOK, 4, 32, P16, E4, false, 4}, Fmt{KIVI, 4, 12, P16, E4, false, 12}}) {
      HostCache<__half> c(f, 1, 1, 60, false, 48, 1, false);
      NewTokens<__half> k(1, 1, 2, 60, false, 0);
      AppendParams p;
      p.cache = c.ref(0, 1);
      p.k = p.v = k.buf.data();
      p.sk = p.sv = k.s;
      p.n_new = 2;
      bool threw = false;
      try {
        launch_kv_append(p, nullptr);
      } catch (const std::invalid_argument&) {
        threw = true;
      }
      DecodeParams d;
      d.cache = p.cache;
      d.Hq = d.Sq = 1;
      bool threw_decode = false;
      try {
        launch_quantized_decode(d, nullptr);
      } catch (const std::invalid_argument&) {
        threw_decode = true;
      }
      if (!threw || !threw_decode) chk.fail(std::string(sname(f)) + " D=60 not refused");
      if (!trous_emu::launches().empty() || c.lengths[0] != 0) chk.fail("a refused call launched a kernel");
      trous_emu::launches().clear();
    }
    chk.done();
  }
  {
    // Lengths the op layer cannot check on the device: a sequence that would overflow its pages is
    // left unchanged (lengths included) while the others append; decode gives that sequence NaN rows.
    Check chk{"invalid lengths on the device: sequence untouched, NaN rows"};
    HostCache<__half> c(Fmt{TOK, 4, 32, P16, E4, false, 4}, 2, 2, 64, false, 16, 1, false);
    run_appends(c, {{0, 2, 10}}, chk, true);
    c.lengths[1] = 14;  // 14 + 3 > 16
    NewTokens<__half> k(2, 2, 3, 64, false, 1), v(2, 2, 3, 64, true, 2);
    AppendParams p;
    p.cache = c.ref(0, 2);
    p.k = k.buf.data();
    p.v = v.buf.data();
    p.sk = k.s;
    p.sv = v.s;
    p.n_new = 3;
    launch_kv_append(p, nullptr);
    note_launches();
    if (c.lengths[1] != 14) chk.fail("lengths[1] changed to " + std::to_string(c.lengths[1]));
    c.lengths[1] = 10;
    for (index_t h = 0; h < 2; ++h)
      for (index_t t = 0; t < 3; ++t)
        for (index_t d = 0; d < 64; ++d) {
          c.hk[h].push_back(__half2float(k.at(0, h, t, d)));
          c.hv[h].push_back(__half2float(v.at(0, h, t, d)));
        }
    check_state(c, chk);  // sequence 0 appended, sequence 1 exactly as before
    std::vector<__half> q(2 * 4 * 64, __float2half(0.5f)), out(2 * 4 * 64);
    std::vector<float> lse(2 * 4);
    c.lengths[1] = 17;
    DecodeParams d;
    d.cache = c.ref(0, 2);
    d.q = q.data();
    d.sq = BHTStrides{4 * 64, 64, 64};
    d.out = out.data();
    d.lse = lse.data();
    d.Hq = 4;
    d.Sq = 1;
    d.scale = 0.125f;
    std::vector<float> ws(decode_workspace_bytes(d) / 4 + 1);
    d.workspace = ws.data();
    launch_quantized_decode(d, nullptr);
    note_launches();
    for (int r = 0; r < 8; ++r) {
      const bool nan_row = std::isnan(lse[r]) && std::isnan(__half2float(out[r * 64 + 7]));
      if (nan_row != (r >= 4)) chk.fail("row " + std::to_string(r) + " lse " + std::to_string(lse[r]));
    }
    chk.done();
  }
  {
    Check chk{"coverage: every kernel instance launched"};
    for (const char* t : {"float", "__half", "__nv_bfloat16"})
      for (const char* kname : {"kv_append_kernel<", "quantized_decode_kernel<", "quantized_decode_merge<"})
        if (!g_kernels.count(std::string(kname) + t + ">")) chk.fail(std::string(kname) + t + "> never launched");
    chk.done();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("cache_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

// Runs the sparse attention CUDA kernels (csrc/attention/attention_kernels.cuh) through their real
// launchers (csrc/attention/attention_cuda.cu) under the CUDA emulation, with the plain twins of the
// tensor-core helpers (mma_kernels.cuh), on small grids and edge shapes: lengths that are not multiples
// of any tile, Sq != Sk both ways, fully masked rows, every pattern (dense, causal, windows, chunks,
// dilation, global tokens at both ends and all tokens global, combinations), GQA, softcap, strided
// (fused-QKV-like) inputs, every head-dim instance and fp16 / bf16 / fp32. Forward (out, lse) and
// backward (dq, dk, dv, bitwise repeatable) are checked against a float64 host reference written
// here over pattern.h's element predicate `allowed`. Block-sparse layouts (trous.BlockMask's state
// table: none / full / partial with an element mask, seeded) with block sizes 64 and 128, per (batch,
// head) or broadcast, AND-ed with the patterns; their reference reads the table directly (not
// pattern.h's block_ok), and where the layout leaves whole block rows / columns empty those Q / K / V
// rows hold NaN: a kernel that loads a tile the layout skips would spread it. Exit status 0 iff all pass.
#include "cuda_emu.h"
#include "emu_check.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention/attention_cuda.cu"

using namespace trous;
using namespace trous::attention;

namespace {

template <typename T> double to_d(T v);
template <> double to_d(float v) { return v; }
template <> double to_d(__half v) { return __half2float(v); }
template <> double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v);
template <> float from_d(double v) { return static_cast<float>(v); }
template <> __half from_d(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
// Tolerances relative to max(1, max |reference|) of each output.
template <typename T> double tol_out();
template <> double tol_out<float>() { return 2e-5; }
template <> double tol_out<__half>() { return 4e-3; }
template <> double tol_out<__nv_bfloat16>() { return 3e-2; }
template <typename T> double tol_grad() { return 2.5 * tol_out<T>(); }

enum Global { kNone, kStart, kEnd, kBothEnds, kAll };

struct Case {
  index_t B, Sq, Sk, Hq, Hkv, D;
  bool causal;
  index_t left, right, chunk, dilation;
  Global global;
  index_t nglobal;
  float softcap;
  bool fused;  // q, k, v slices of one (B, S, Hq + 2 Hkv, D) buffer (needs Sq == Sk); else contiguous
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(
      buf, sizeof(buf), "B%lld Sq%lld Sk%lld Hq%lld Hkv%lld D%lld%s w(%lld,%lld) chunk%lld dil%lld g%d/%lld%s%s",
      (long long)c.B, (long long)c.Sq, (long long)c.Sk, (long long)c.Hq, (long long)c.Hkv, (long long)c.D,
      c.causal ? " causal" : "", (long long)c.left, (long long)c.right, (long long)c.chunk, (long long)c.dilation,
      (int)c.global, (long long)c.nglobal, c.softcap > 0 ? " softcap" : "", c.fused ? " fused" : "");
  return buf;
}

// A block-sparse layout for a case: the table (Bm, Hm, nqb, nkb), Bm = B or 1, Hm = Hq or 1.
struct BlockSpec {
  index_t bq, bk;
  bool per_batch, per_head;  // false: that table dimension is 1 (broadcast, stride 0)
  double p_none, p_full;     // state probabilities; the rest are partial blocks
  bool holes;                // one block row and one block column empty in every table entry
  uint32_t seed;
};

std::string describe(const Case& c, const BlockSpec& bs) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), " blocks(%lld,%lld)%s%s none%.2f full%.2f%s seed%u", (long long)bs.bq,
                (long long)bs.bk, bs.per_batch ? " per-batch" : "", bs.per_head ? " per-head" : " head-bcast",
                bs.p_none, bs.p_full, bs.holes ? " holes" : "", bs.seed);
  return describe(c) + buf;
}

// The table and element masks of a BlockSpec (seeded), and the BlockLayout the kernels read.
struct BlockData {
  index_t Bm = 0, Hm = 0, nqb = 0, nkb = 0, bq = 0, bk = 0;
  std::vector<int32_t> table;  // (Bm, Hm, nqb, nkb)
  std::vector<uint8_t> elems;  // (P, bq, bk)
  index_t hole_qb = -1, hole_kb = -1;
  BlockLayout layout() const {
    BlockLayout L;
    L.table = table.data(), L.elems = elems.empty() ? nullptr : elems.data();
    L.bq = bq, L.bk = bk, L.nqb = nqb, L.nkb = nkb;
    L.stride_h = Hm > 1 ? nqb * nkb : 0;
    L.stride_b = Bm > 1 ? Hm * nqb * nkb : 0;
    return L;
  }
  // Written from the table, independently of pattern.h's block_ok.
  bool allows(index_t b, index_t h, index_t i, index_t j) const {
    const index_t e = ((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * nqb * nkb + (i / bq) * nkb + j / bk;
    const int32_t st = table[e];
    if (st == 0 || st == 1) return st == 1;
    return elems[(static_cast<size_t>(st - 2) * bq + i % bq) * bk + j % bk] != 0;
  }
};

BlockData make_blocks(const Case& c, const BlockSpec& bs) {
  BlockData d;
  d.bq = bs.bq, d.bk = bs.bk;
  d.Bm = bs.per_batch ? c.B : 1, d.Hm = bs.per_head ? c.Hq : 1;
  d.nqb = ceil_div(c.Sq, bs.bq), d.nkb = ceil_div(c.Sk, bs.bk);
  std::mt19937 rng(bs.seed);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  // Element masks: two random (density 1/2 and 1/8), one empty (a partial block allowing nothing),
  // one all-true (partial, yet every pair allowed).
  const int P = 4;
  const double density[P] = {0.5, 0.125, 0.0, 1.0};
  d.elems.resize(static_cast<size_t>(P * bs.bq * bs.bk));
  for (int e = 0; e < P; ++e)
    for (index_t x = 0; x < bs.bq * bs.bk; ++x) d.elems[e * bs.bq * bs.bk + x] = u01(rng) < density[e];
  d.table.resize(static_cast<size_t>(d.Bm * d.Hm * d.nqb * d.nkb));
  for (auto& st : d.table) {
    const double r = u01(rng);
    // partial: the random masks three times as often as the empty / all-true ones
    const int e = std::uniform_int_distribution<int>(0, 7)(rng);
    st = r < bs.p_none ? 0 : r < bs.p_none + bs.p_full ? 1 : 2 + (e < 6 ? e % 2 : e - 4);
  }
  if (bs.holes) {
    d.hole_qb = d.nqb - 1, d.hole_kb = d.nkb / 2;
    for (index_t t = 0; t < d.Bm * d.Hm; ++t) {
      for (index_t kb = 0; kb < d.nkb; ++kb) d.table[(t * d.nqb + d.hole_qb) * d.nkb + kb] = 0;
      for (index_t qb = 0; qb < d.nqb; ++qb) d.table[(t * d.nqb + qb) * d.nkb + d.hole_kb] = 0;
    }
  }
  return d;
}

struct Tensor4 {  // (B, S, H, D) view into a buffer
  index_t off;
  BSHStrides st;
};

template <typename T>
void run_case(const Case& c, bool twice, const BlockSpec* bs = nullptr) {
  Check chk{std::string("attention ") + tname<T>() + " " + (bs ? describe(c, *bs) : describe(c))};
  const index_t B = c.B, Sq = c.Sq, Sk = c.Sk, Hq = c.Hq, Hkv = c.Hkv, D = c.D, grp = Hq / Hkv;
  // Global flags over key positions.
  std::vector<uint8_t> flags(static_cast<size_t>(Sk), 0);
  for (index_t j = 0; j < Sk; ++j) {
    const bool start = j < c.nglobal, end = j >= Sk - c.nglobal;
    flags[j] = c.global == kAll || ((c.global == kStart || c.global == kBothEnds) && start) ||
               ((c.global == kEnd || c.global == kBothEnds) && end);
  }
  const index_t shift = Sk - Sq;
  std::vector<int64_t> gkeys, grows;
  for (index_t j = 0; j < Sk; ++j)
    if (flags[j]) gkeys.push_back(j);
  for (index_t i = 0; i < Sq; ++i)
    if (i + shift >= 0 && i + shift < Sk && flags[i + shift]) grows.push_back(i);
  Pattern pat{};
  pat.Sq = Sq, pat.Sk = Sk, pat.shift = shift, pat.causal = c.causal, pat.left = c.left, pat.right = c.right;
  pat.chunk = c.chunk, pat.dilation = c.dilation;
  pat.global_flags = c.global == kNone ? nullptr : flags.data();
  pat.global_keys = gkeys.data(), pat.n_global_keys = c.global == kNone ? 0 : (index_t)gkeys.size();
  pat.global_rows = grows.data(), pat.n_global_rows = c.global == kNone ? 0 : (index_t)grows.size();
  const BlockData blk = bs ? make_blocks(c, *bs) : BlockData{};
  if (bs) pat.blocks = blk.layout();
  auto ok_pair = [&](index_t b, index_t h, index_t i, index_t j) {
    return allowed(pat, i, j) && (!bs || blk.allows(b, h, i, j));
  };

  // Inputs: fused (one buffer, q | k | v heads interleaved per token) or three contiguous buffers.
  const index_t Hf = Hq + 2 * Hkv;
  std::vector<T> qkv, qb, kb, vb;
  Tensor4 tq{}, tk{}, tv{};
  const T *qp, *kp, *vp;
  auto fill = [](std::vector<T>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = from_d<T>(uniform() * 1.5);
  };
  if (c.fused) {
    fill(qkv, static_cast<size_t>(B * Sq * Hf * D));
    const BSHStrides st{Sq * Hf * D, Hf * D, D};
    tq = {0, st}, tk = {Hq * D, st}, tv = {(Hq + Hkv) * D, st};
    qp = qkv.data(), kp = qkv.data() + tk.off, vp = qkv.data() + tv.off;
  } else {
    fill(qb, static_cast<size_t>(B * Sq * Hq * D));
    fill(kb, static_cast<size_t>(B * Sk * Hkv * D));
    fill(vb, static_cast<size_t>(B * Sk * Hkv * D));
    tq = {0, {Sq * Hq * D, Hq * D, D}}, tk = {0, {Sk * Hkv * D, Hkv * D, D}}, tv = tk;
    qp = qb.data(), kp = kb.data(), vp = vb.data();
  }
  std::vector<T> dout;
  fill(dout, static_cast<size_t>(B * Sq * Hq * D));
  // Rows of Q / dO and K / V in an empty block row / column of every table entry hold NaN: no tile the
  // layout skips is loaded. (Only with consecutive tiles, dilation 1 and no global tokens: otherwise
  // a tile mixes those rows with allowed ones, and 0 * NaN is NaN in the products.)
  if (bs && bs->holes && c.dilation == 1 && c.global == kNone && !c.fused) {
    const T nan = from_d<T>(NAN);
    for (index_t b = 0; b < B; ++b) {
      for (index_t i = blk.hole_qb * blk.bq; i < Sq; ++i)
        for (index_t x = 0; x < Hq * D; ++x) qb[(b * Sq + i) * Hq * D + x] = dout[(b * Sq + i) * Hq * D + x] = nan;
      for (index_t j = blk.hole_kb * blk.bk; j < std::min(Sk, (blk.hole_kb + 1) * blk.bk); ++j)
        for (index_t x = 0; x < Hkv * D; ++x) kb[(b * Sk + j) * Hkv * D + x] = vb[(b * Sk + j) * Hkv * D + x] = nan;
    }
  }
  const BSHStrides so{Sq * Hq * D, Hq * D, D}, skv{Sk * Hkv * D, Hkv * D, D};
  auto at = [&](const T* base, BSHStrides st, index_t b, index_t s, index_t h, index_t d) {
    return to_d(base[b * st.b + s * st.s + h * st.h + d]);
  };

  // float64 reference.
  const double scale = 1.0 / std::sqrt((double)D);
  std::vector<double> ro(B * Sq * Hq * D, 0.0), rlse(B * Hq * Sq), rdq(B * Sq * Hq * D, 0.0),
      rdk(B * Sk * Hkv * D, 0.0), rdv(B * Sk * Hkv * D, 0.0);
  std::vector<double> srow(Sk), prow(Sk), dsc(Sk);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hq; ++h) {
      const index_t hk = h / grp;
      for (index_t i = 0; i < Sq; ++i) {
        double mx = -INFINITY;
        for (index_t j = 0; j < Sk; ++j) {
          srow[j] = -INFINITY;
          if (!ok_pair(b, h, i, j)) continue;
          double s = 0;
          for (index_t d = 0; d < D; ++d) s += at(qp, tq.st, b, i, h, d) * at(kp, tk.st, b, j, hk, d);
          s *= scale;
          dsc[j] = 1;
          if (c.softcap > 0) {
            const double th = std::tanh(s / c.softcap);
            s = c.softcap * th, dsc[j] = 1 - th * th;
          }
          srow[j] = s, mx = std::max(mx, s);
        }
        double l = 0;
        for (index_t j = 0; j < Sk; ++j) l += prow[j] = srow[j] == -INFINITY ? 0.0 : std::exp(srow[j] - mx);
        const index_t ob = (b * Sq + i) * Hq * D + h * D;
        rlse[(b * Hq + h) * Sq + i] = l > 0 ? mx + std::log(l) : -INFINITY;
        if (l == 0) continue;
        for (index_t j = 0; j < Sk; ++j) prow[j] /= l;
        for (index_t j = 0; j < Sk; ++j)
          if (prow[j] != 0)
            for (index_t d = 0; d < D; ++d) ro[ob + d] += prow[j] * at(vp, tv.st, b, j, hk, d);
        double delta = 0;
        for (index_t d = 0; d < D; ++d) delta += to_d(dout[ob + d]) * ro[ob + d];
        for (index_t j = 0; j < Sk; ++j) {
          if (prow[j] == 0) continue;
          double dp = 0;
          for (index_t d = 0; d < D; ++d) dp += to_d(dout[ob + d]) * at(vp, tv.st, b, j, hk, d);
          const double ds = prow[j] * (dp - delta) * dsc[j] * scale;
          const index_t kbo = (b * Sk + j) * Hkv * D + hk * D;
          for (index_t d = 0; d < D; ++d) {
            rdq[ob + d] += ds * at(kp, tk.st, b, j, hk, d);
            rdk[kbo + d] += ds * at(qp, tq.st, b, i, h, d);
            rdv[kbo + d] += prow[j] * to_d(dout[ob + d]);
          }
        }
      }
    }

  if (bs) {  // the layout must matter: it removes pairs of the pattern and keeps others
    index_t kept = 0, removed = 0;
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < Sq; ++i)
          for (index_t j = 0; j < Sk; ++j)
            if (allowed(pat, i, j)) ++(blk.allows(b, h, i, j) ? kept : removed);
    if (kept == 0 || (removed == 0 && bs->p_full < 1.0))
      chk.fail("weak case: the layout keeps " + std::to_string(kept) + " pairs, removes " + std::to_string(removed));
  }

  // Forward.
  const T poison = from_d<T>(12345.0);
  std::vector<T> out(B * Sq * Hq * D, poison);
  std::vector<float> lse(B * Hq * Sq, 777.f);
  AttnFwdParams fp{};
  fp.q = qp, fp.k = kp, fp.v = vp, fp.out = out.data(), fp.lse = lse.data();
  fp.B = B, fp.Sq = Sq, fp.Sk = Sk, fp.Hq = Hq, fp.Hkv = Hkv, fp.D = D;
  fp.sq = tq.st, fp.sk = tk.st, fp.sv = tv.st, fp.so = so;
  fp.scale = static_cast<float>(scale), fp.softcap = c.softcap, fp.pattern = pat;
  launch_sparse_attention_fwd(dtype_of<T>(), fp, nullptr);

  auto compare = [&](const char* what, const std::vector<T>& got, const std::vector<double>& ref, double tol) {
    double mref = 1;
    for (double r : ref) mref = std::max(mref, std::fabs(r));
    double worst = 0;
    size_t worst_at = 0;
    for (size_t x = 0; x < ref.size(); ++x) {
      const double e = std::fabs(to_d(got[x]) - ref[x]);
      if (!(e <= worst)) worst = e, worst_at = x;  // NaN counts as worst
    }
    if (!(worst <= tol * mref))
      chk.fail(std::string(what) + ": max error " + std::to_string(worst) + " at " + std::to_string(worst_at) +
               " (got " + std::to_string(to_d(got[worst_at])) + ", want " + std::to_string(ref[worst_at]) +
               "), bound " + std::to_string(tol * mref));
  };
  compare("out", out, ro, tol_out<T>());
  for (size_t x = 0; x < lse.size(); ++x) {
    const double r = rlse[x];
    const bool bad = r == -INFINITY ? lse[x] != -INFINITY : !(std::fabs(lse[x] - r) <= 1e-3 * (1 + std::fabs(r)));
    if (bad) {
      chk.fail("lse at " + std::to_string(x) + ": got " + std::to_string(lse[x]) + ", want " + std::to_string(r));
      break;
    }
  }
  // Fully masked rows are exactly 0.
  for (size_t x = 0; x < lse.size(); ++x)
    if (rlse[x] == -INFINITY) {
      const index_t i = x % Sq, h = x / Sq % Hq, b = x / (Sq * Hq);
      for (index_t d = 0; d < D; ++d)
        if (to_d(out[(b * Sq + i) * Hq * D + h * D + d]) != 0.0) {
          chk.fail("fully masked row " + std::to_string(i) + " not 0");
          break;
        }
    }

  // Backward from the kernel's own out / lse (twice: bitwise repeatable).
  std::vector<T> dq[2], dk[2], dv[2];
  for (int rep = 0; rep < (twice ? 2 : 1); ++rep) {
    dq[rep].assign(B * Sq * Hq * D, poison);
    dk[rep].assign(B * Sk * Hkv * D, poison);
    dv[rep].assign(B * Sk * Hkv * D, poison);
    AttnBwdParams bp{};
    bp.grad_out = dout.data(), bp.q = qp, bp.k = kp, bp.v = vp, bp.out = out.data(), bp.lse = lse.data();
    bp.grad_q = dq[rep].data(), bp.grad_k = dk[rep].data(), bp.grad_v = dv[rep].data();
    bp.B = B, bp.Sq = Sq, bp.Sk = Sk, bp.Hq = Hq, bp.Hkv = Hkv, bp.D = D;
    bp.sdo = so, bp.sq = tq.st, bp.sk = tk.st, bp.sv = tv.st, bp.so = so, bp.sdq = so, bp.sdk = skv, bp.sdv = skv;
    bp.scale = static_cast<float>(scale), bp.softcap = c.softcap, bp.pattern = pat;
    const size_t ws_bytes = sparse_attention_bwd_workspace_bytes(bp);
    std::vector<float> ws((ws_bytes + 3) / 4 + 1, NAN);  // garbage content: the launcher owns it
    bp.workspace = ws.data();
    launch_sparse_attention_bwd(dtype_of<T>(), bp, nullptr);
  }
  compare("dq", dq[0], rdq, tol_grad<T>());
  compare("dk", dk[0], rdk, tol_grad<T>());
  compare("dv", dv[0], rdv, tol_grad<T>());
  if (twice && (std::memcmp(dq[0].data(), dq[1].data(), dq[0].size() * sizeof(T)) ||
                std::memcmp(dk[0].data(), dk[1].data(), dk[0].size() * sizeof(T)) ||
                std::memcmp(dv[0].data(), dv[1].data(), dv[0].size() * sizeof(T))))
    chk.fail("backward not bitwise repeatable");
  chk.done();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  // Types to run each case with: h = fp16, b = bf16, f = fp32 (every pattern in fp16; the other
  // types, which share all but the fragment types and conversions, on a selection), and whether the
  // backward runs twice (bitwise repeatability).
  struct Row {
    Case c;
    const char* types;
    bool twice;
  };
  //      B  Sq   Sk  Hq Hkv  D  causal  left right chunk dil global    ng softcap fused
  const Row rows[] = {
      {{1, 37, 37, 2, 1, 64, false, -1, -1, 0, 1, kNone, 0, 0.f, false}, "hbf", true},   // dense, GQA 2
      {{1, 70, 70, 1, 1, 32, true, -1, -1, 0, 1, kNone, 0, 0.f, true}, "hf", false},     // causal, fused QKV
      {{2, 45, 77, 2, 2, 32, true, -1, -1, 0, 1, kNone, 0, 0.f, false}, "h", false},     // causal, Sq < Sk, B 2
      {{1, 77, 45, 4, 1, 32, true, -1, -1, 0, 1, kNone, 0, 0.f, false}, "hb", false},    // Sq > Sk: masked rows
      {{1, 37, 37, 2, 2, 20, true, -1, -1, 0, 1, kNone, 0, 0.f, true}, "hf", false},     // D 20: scalar loads
      {{1, 90, 90, 1, 1, 80, false, 9, 5, 0, 1, kNone, 0, 0.f, false}, "hf", false},     // window (9, 5), D 80
      {{1, 50, 50, 1, 1, 96, false, 0, 0, 0, 1, kNone, 0, 0.f, false}, "h", false},      // window (0, 0), D 96
      {{1, 83, 83, 1, 1, 40, true, 16, -1, 0, 1, kNone, 0, 0.f, false}, "h", false},     // causal window, D 40
      {{1, 75, 75, 1, 1, 64, false, -1, -1, 16, 1, kNone, 0, 0.f, false}, "h", false},   // chunk 16
      {{1, 75, 60, 1, 1, 32, true, -1, -1, 32, 1, kNone, 0, 0.f, false}, "h", false},    // causal chunk, Sq > Sk
      {{1, 40, 40, 1, 1, 32, false, -1, -1, 100, 1, kNone, 0, 0.f, false}, "h", false},  // chunk > S
      {{1, 101, 101, 1, 1, 32, false, 3, 3, 0, 3, kNone, 0, 0.f, false}, "hbf", false},  // dilated, S % d != 0
      {{1, 66, 70, 1, 1, 32, true, 5, -1, 0, 2, kNone, 0, 0.f, false}, "h", false},      // causal dilated
      {{1, 70, 70, 2, 1, 32, false, 4, 4, 0, 1, kStart, 3, 0.f, false}, "hb", true},     // window + global start
      {{1, 70, 70, 1, 1, 32, true, 4, 0, 0, 1, kBothEnds, 2, 0.f, false}, "hf", false},  // causal, global ends
      {{1, 60, 72, 1, 1, 32, false, -1, -1, 16, 2, kEnd, 4, 0.f, false}, "h", false},    // chunk+dil+global
      {{1, 33, 33, 1, 1, 32, false, 2, 2, 0, 1, kAll, 0, 0.f, false}, "hf", false},      // all tokens global
      {{1, 65, 65, 1, 1, 64, false, -1, -1, 0, 1, kNone, 0, 5.f, false}, "hbf", false},  // softcap
      {{1, 67, 67, 8, 1, 32, true, 8, 8, 0, 1, kNone, 0, 0.f, false}, "h", false},       // GQA 8
      {{1, 0, 20, 1, 1, 32, false, -1, -1, 0, 1, kNone, 0, 0.f, false}, "h", false},     // Sq = 0: dk, dv 0
      {{1, 20, 0, 1, 1, 32, false, -1, -1, 0, 1, kNone, 0, 0.f, false}, "h", false},     // Sk = 0: out 0
      {{1, 40, 40, 1, 1, 128, true, -1, -1, 0, 1, kNone, 0, 0.f, false}, "h", false},    // D 128
      {{1, 35, 35, 1, 1, 256, false, 6, 6, 0, 1, kStart, 2, 0.f, false}, "h", false},    // D 256 (split dK/dV)
  };
#if defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer (races depend on neither the element type nor the head dim, and it is the
  // slow build): the first type of each row only, head dims below 96.
  const bool first_type_only = only.empty();
  const index_t max_d = only.empty() ? 95 : 256;
#else
  const bool first_type_only = false;
  const index_t max_d = 256;
#endif
  for (const Row& r : rows) {
    if (!only.empty() && describe(r.c).find(only) == std::string::npos) continue;
    if (r.c.D > max_d) continue;
    for (const char* t = r.types; *t && (t == r.types || !first_type_only); ++t) {
      if (*t == 'h') run_case<__half>(r.c, r.twice);
      if (*t == 'b') run_case<__nv_bfloat16>(r.c, r.twice);
      if (*t == 'f') run_case<float>(r.c, r.twice);
    }
  }
  // Block-sparse layouts AND-ed with the patterns (fp16 everywhere; bf16 / fp32 on a selection).
  struct BlockRow {
    Case c;
    BlockSpec bs;
    const char* types;
    bool twice;
  };
  //        B  Sq   Sk  Hq Hkv  D  causal  left right chunk dil global ng softcap fused
  //        bq   bk  per-batch per-head none full holes seed
  const BlockRow block_rows[] = {
      // dense + a per-(batch, head) table, GQA 2 (the dK/dV kernel takes a table per query head)
      {{2, 200, 200, 2, 1, 32, false, -1, -1, 0, 1, kNone, 0, 0.f, false},
       {64, 64, true, true, 0.3, 0.3, true, 1},
       "hb",
       false},
      // causal, Sq < Sk, query blocks of 128, one table for every head (stride 0), GQA 2
      {{1, 150, 260, 4, 2, 32, true, -1, -1, 0, 1, kNone, 0, 0.f, false},
       {128, 64, false, false, 0.25, 0.35, true, 2},
       "hf",
       false},
      // Sq > Sk under causal (rows masked by the pattern too), key blocks of 128
      {{1, 270, 140, 1, 1, 64, true, -1, -1, 0, 1, kNone, 0, 0.f, false},
       {64, 128, false, true, 0.3, 0.3, true, 3},
       "h",
       false},
      // window (40, 20), blocks of 128 x 128, per-batch table broadcast over the heads
      {{2, 260, 260, 1, 1, 32, false, 40, 20, 0, 1, kNone, 0, 0.f, false},
       {128, 128, true, false, 0.2, 0.4, false, 4},
       "h",
       false},
      // chunk 96 + causal
      {{1, 230, 230, 1, 1, 32, true, -1, -1, 96, 1, kNone, 0, 0.f, false},
       {64, 64, false, true, 0.25, 0.25, true, 5},
       "h",
       false},
      // dilation 2 + window: class tiles span several blocks (classified over their range)
      {{1, 220, 210, 2, 1, 32, false, 30, 30, 0, 2, kNone, 0, 0.f, false},
       {64, 64, false, true, 0.3, 0.3, false, 6},
       "hf",
       false},
      // window + global tokens at both ends, causal: global rows, global keys and all-key tiles;
      // the backward bitwise repeatable
      {{1, 200, 200, 2, 1, 32, true, 16, 0, 0, 1, kBothEnds, 5, 0.f, false},
       {64, 64, false, true, 0.3, 0.3, true, 7},
       "h",
       true},
      // dilation 3 + chunk + global tokens at the end, Sq < Sk
      {{1, 180, 200, 1, 1, 32, false, -1, -1, 64, 3, kEnd, 4, 0.f, false},
       {64, 128, false, true, 0.2, 0.3, false, 8},
       "h",
       false},
      // sparse layout: most blocks empty, whole query-block rows empty (fully masked rows), softcap
      {{1, 260, 200, 2, 2, 64, false, -1, -1, 0, 1, kNone, 0, 5.f, false},
       {64, 64, true, true, 0.75, 0.1, true, 9},
       "hb",
       false},
      // every block full: the same pairs as without a layout (aligned tiles)
      {{1, 190, 170, 1, 1, 32, false, 50, 50, 0, 1, kNone, 0, 0.f, false},
       {64, 64, false, false, 0.0, 1.0, false, 10},
       "h",
       false},
      // head dims 96 (fp32: dV then dK), 128 (fp32: key steps of 32) and 256 (fp16: key steps of 32,
      // split dK / dV)
      {{1, 140, 150, 2, 1, 96, true, -1, -1, 0, 1, kNone, 0, 0.f, false},
       {64, 64, false, true, 0.3, 0.3, true, 11},
       "hf",
       false},
      {{1, 140, 140, 1, 1, 128, false, -1, -1, 0, 1, kNone, 0, 0.f, false},
       {128, 64, false, true, 0.3, 0.3, true, 14},
       "hf",
       false},
      {{1, 140, 140, 1, 1, 256, false, -1, -1, 0, 1, kStart, 3, 0.f, false},
       {64, 128, false, true, 0.3, 0.3, true, 13},
       "h",
       false},
  };
  for (const BlockRow& r : block_rows) {
    if (!only.empty() && describe(r.c, r.bs).find(only) == std::string::npos) continue;
    if (r.c.D > max_d) continue;
    for (const char* t = r.types; *t && (t == r.types || !first_type_only); ++t) {
      if (*t == 'h') run_case<__half>(r.c, r.twice, &r.bs);
      if (*t == 'b') run_case<__nv_bfloat16>(r.c, r.twice, &r.bs);
      if (*t == 'f') run_case<float>(r.c, r.twice, &r.bs);
    }
  }
  if (only.empty()) {  // fp32 refuses D > 128 (its fragments would spill), naming D
    Check chk{"attention f32 D 256 refused"};
    AttnFwdParams fp{};
    fp.B = fp.Sq = fp.Sk = fp.Hq = fp.Hkv = 1, fp.D = 256;
    try {
      launch_sparse_attention_fwd(DType::kFloat32, fp, nullptr);
      chk.fail("no error");
    } catch (const std::invalid_argument& e) {
      if (!std::strstr(e.what(), "D = 256")) chk.fail(std::string("message: ") + e.what());
    }
    if (sparse_attention_cuda_supported(DType::kFloat32, 256) ||
        !sparse_attention_cuda_supported(DType::kFloat32, 128) ||
        !sparse_attention_cuda_supported(DType::kBFloat16, 256) ||
        sparse_attention_cuda_supported(DType::kFloat16, 257))
      chk.fail("sparse_attention_cuda_supported");
    chk.done();
  }
  std::printf("attention_emu: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}

// Runs every kernel of csrc/kvcache/quantize_kernels.cuh through the CUDA emulation
// (cuda_emu.h) on small grids and edge shapes, and compares with a scalar host reference written
// here from the formulas of shared/spec/kvcache.md (deliberately NOT using kvcache.h's helpers:
// fp16 / bf16 / fp8 roundings come from CUDA's own host conversions in cuda_fp16/bf16/fp8.h).
// Codes and stored parameters must match exactly; dequantized values within 1e-6 relative.
// The kernels are launched by the real launchers of csrc/kvcache/quantize_cuda.cu, compiled here
// unchanged against the emulation (template variant per group size and alignment, grid), on host
// buffers; each case prints the kernels they chose, and a last check asserts that the cases reached
// every variant. Exit status 0 iff every case passes.
#include "cuda_emu.h"
#include "emu_check.h"

#include <cuda_fp8.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/quantize_cuda.cu"

using namespace trous;
using namespace trous::kv;

namespace {

// ---------------------------------------------------------------- launches
std::set<std::string> g_kernels;  // every kernel the launchers ran

// Prints the kernels launched since the last call ("[k1, k2] ", nothing if none) and forgets them.
void print_launches() {
  std::string s;
  for (const trous_emu::LaunchRecord& r : trous_emu::launches()) {
    s += (s.empty() ? "" : ", ") + r.kernel;
    g_kernels.insert(r.kernel);
  }
  if (!s.empty()) std::printf("[%s] ", s.c_str());
  trous_emu::launches().clear();
}

// ---------------------------------------------------------------- element types and reference
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

float round_to(float v, ParamType t) { return t == ParamType::kFloat16 ? __half2float(__float2half_rn(v)) : v; }

float read_param(const std::vector<uint8_t>& buf, size_t i, ParamType t) {
  if (t == ParamType::kFloat32) {
    float f;
    std::memcpy(&f, buf.data() + 4 * i, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, buf.data() + 2 * i, 2);
  return __half2float(h);
}

// The smallest scale of a finite group (kvcache: a tiny or constant group never gets scale 0):
// fp16 parameters 2^-24, fp32 2^-126.
// Scales round UP to fp16 (so no element is clamped by more than half a step).
float floor_scale(float s, ParamType t) {
  const float r = t == ParamType::kFloat16 ? __half2float(__float2half_ru(s)) : s;
  return std::max(r, t == ParamType::kFloat16 ? 0x1p-24f : 0x1p-126f);
}

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0; }
bool close(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= 1e-6f * std::max(std::fabs(a), std::fabs(b)) + 1e-30f;
}

// One group (asymmetric or symmetric): codes as the low `bits` bits, params (s, z) or (s).
struct RefGroup {
  float s = 0.f, z = 0.f;
  std::vector<int> q;
};

RefGroup ref_asym(const std::vector<float>& x, int bits, ParamType pt) {
  RefGroup g;
  g.q.assign(x.size(), 0);
  bool finite = true;
  float mn = INFINITY, mx = -INFINITY;
  for (float v : x) {
    finite = finite && std::isfinite(v);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  if (!finite) {  // poisoned group: NaN parameters, codes 0
    g.s = g.z = NAN;
    return g;
  }
  const int qmax = (1 << bits) - 1;
  g.s = floor_scale((mx - mn) / (float)qmax, pt);
  g.z = round_to(mn, pt);
  const float inv = g.s > 0.f ? 1.f / g.s : 0.f;
  for (size_t i = 0; i < x.size(); ++i) {
    const float q = std::nearbyint((x[i] - g.z) * inv);
    g.q[i] = (int)std::min(std::max(q, 0.f), (float)qmax);
  }
  return g;
}

RefGroup ref_sym(const std::vector<float>& x, ParamType pt) {
  RefGroup g;
  g.q.assign(x.size(), 0);
  bool finite = true;
  float amax = 0.f;
  for (float v : x) {
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {
    g.s = NAN;
    return g;
  }
  g.s = floor_scale(amax / 127.f, pt);
  const float inv = g.s > 0.f ? 1.f / g.s : 0.f;
  for (size_t i = 0; i < x.size(); ++i) {
    const float q = std::nearbyint(x[i] * inv);
    g.q[i] = (int)std::min(std::max(q, -127.f), 127.f) & 0xff;  // int8 two's complement bits
  }
  return g;
}

// Code c of element `col` of a packed row (LSB-first within each byte).
int unpack(const uint8_t* row, int col, int bits) {
  const int per_byte = 8 / bits;
  return (row[col / per_byte] >> ((col % per_byte) * bits)) & ((1 << bits) - 1);
}

// ---------------------------------------------------------------- test bookkeeping

// An input [B, H, T, D] with arbitrary outer strides: `pad` elements after every row, heads
// interleaved per token (BTHD order) or not, optionally starting one element past an aligned base.
template <typename T>
struct Input {
  index_t B, H, Tn, D;
  RowLayout in;
  std::vector<T> buf;  // exactly the bytes the rows span (+ offset), so ASan sees any overrun
  const T* x;
  Input(index_t B_, index_t H_, index_t T_, index_t D_, index_t pad, bool bthd, int offset)
      : B(B_), H(H_), Tn(T_), D(D_) {
    const index_t rs = D + pad;
    RowStrides s;
    if (bthd) {
      s = RowStrides{T_ * H_ * rs, rs, H_ * rs};
    } else {
      s = RowStrides{H_ * T_ * rs, T_ * rs, rs};
    }
    in = RowLayout{B, H, Tn, D, s};
    const index_t n = in.rows() ? row_offset(in.rows() - 1, H, Tn, s) + D : 0;
    buf.assign((size_t)(n + offset), from_f<T>(0.f));
    x = buf.data() + offset;
  }
  T& at(index_t row, index_t c) { return const_cast<T&>(x[row_offset(row, H, Tn, in.stride) + c]); }
  float get(index_t row, index_t c) const { return to_f(x[row_offset(row, H, Tn, in.stride) + c]); }
  // Values at varying offsets and scales per row; everything representable in T.
  void fill() {
    for (index_t r = 0; r < in.rows(); ++r) {
      const float centre = 4.f * uniform(), spread = std::ldexp(1.f, (int)(r % 7) - 3);
      for (index_t c = 0; c < D; ++c) at(r, c) = from_f<T>(centre + spread * uniform());
    }
  }
  std::string shape() const {
    char b[160];
    std::snprintf(b, sizeof b, "%s [%ld,%ld,%ld,%ld] strides(%ld,%ld,%ld)%s", tname<T>(), (long)B, (long)H, (long)Tn,
                  (long)D, (long)in.stride.b, (long)in.stride.h, (long)in.stride.t, x != buf.data() ? " base+1" : "");
    return b;
  }
};

const char* pname(ParamType t) { return t == ParamType::kFloat16 ? "p16" : "p32"; }

// ---------------------------------------------------------------- per-token quantization
struct TokenCase {
  index_t B, H, T, D;
  int group, bits;
  bool symmetric;
  ParamType ptype;
  index_t pad;
  bool bthd;
  int offset;
};

template <typename T>
void test_token(const TokenCase& k) {
  Input<T> in(k.B, k.H, k.T, k.D, k.pad, k.bthd, k.offset);
  in.fill();
  const index_t rows = in.in.rows(), n_groups = k.D / k.group;
  // Edge groups: a constant group, a NaN in a group, an Inf in another (rows permitting).
  if (rows > 1)
    for (int c = 0; c < k.group; ++c) in.at(1, c) = from_f<T>(-2.75f);
  if (rows > 2) in.at(2, k.D - 3) = from_f<T>(NAN);
  if (rows > 3) in.at(3, 0) = from_f<T>(-INFINITY);

  const int row_bytes = (int)(k.D * k.bits / 8);
  const size_t psize = k.ptype == ParamType::kFloat16 ? 2 : 4, per_group = k.symmetric ? 1 : 2;
  std::vector<uint8_t> codes(rows * row_bytes, 0xcd), params(rows * n_groups * per_group * psize, 0xcd);
  TokenQuantArgs a{in.in, k.bits, k.group, k.symmetric, k.ptype};

  char name[256];
  std::snprintf(name, sizeof name, "token %s G=%d %s %s", in.shape().c_str(), k.group,
                k.symmetric ? "sym8"
                            : (k.bits == 2   ? "asym2"
                               : k.bits == 4 ? "asym4"
                                             : "asym8"),
                pname(k.ptype));
  Check chk{name};
  launch_quantize_token(dtype_of<T>(), in.x, codes.data(), params.data(), a, nullptr);
  if (rows == 0 && !trous_emu::launches().empty()) chk.fail("a kernel was launched for an empty input");
  print_launches();
  std::vector<float> ref_out(rows * k.D);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t g = 0; g < n_groups; ++g) {
      std::vector<float> xs(k.group);
      for (int c = 0; c < k.group; ++c) xs[c] = in.get(r, g * k.group + c);
      const RefGroup ref = k.symmetric ? ref_sym(xs, k.ptype) : ref_asym(xs, k.bits, k.ptype);
      const size_t gi = r * n_groups + g;
      const float s = read_param(params, gi * per_group, k.ptype);
      if (!same(s, ref.s))
        chk.fail("row " + std::to_string(r) + " group " + std::to_string(g) + " scale " + std::to_string(s) +
                 " != " + std::to_string(ref.s));
      if (!k.symmetric) {
        const float z = read_param(params, gi * 2 + 1, k.ptype);
        if (!same(z, ref.z))
          chk.fail("row " + std::to_string(r) + " group " + std::to_string(g) + " zero " + std::to_string(z) +
                   " != " + std::to_string(ref.z));
      }
      for (int c = 0; c < k.group; ++c) {
        const int col = (int)(g * k.group + c);
        const int q = unpack(codes.data() + r * row_bytes, col, k.bits);
        if (q != ref.q[c])
          chk.fail("row " + std::to_string(r) + " col " + std::to_string(col) + " (x=" + std::to_string(xs[c]) +
                   ") code " + std::to_string(q) + " != " + std::to_string(ref.q[c]));
        ref_out[r * k.D + col] =
            k.symmetric ? (float)(int8_t)(uint8_t)ref.q[c] * ref.s : std::fma((float)ref.q[c], ref.s, ref.z);
      }
    }
  }
  // Dequantize the kernel's own codes and parameters (checked equal to the reference above).
  std::vector<T> out(rows * k.D, from_f<T>(-1.f));
  launch_dequantize_token(dtype_of<T>(), codes.data(), params.data(), out.data(),
                          TokenDequantArgs{rows, k.D, k.bits, k.group, k.symmetric, k.ptype}, nullptr);
  print_launches();
  for (index_t i = 0; i < rows * k.D; ++i) {
    const float want = to_f(from_f<T>(ref_out[i])), got = to_f(out[i]);
    if (!close(got, want))
      chk.fail("dequant element " + std::to_string(i) + ": " + std::to_string(got) + " != " + std::to_string(want));
  }
  chk.done();
}

// ---------------------------------------------------------------- KIVI per-channel quantization
struct ChannelCase {
  index_t B, H, T, D;
  int group, bits;
  ParamType ptype;
  index_t pad;
  bool bthd;
  int offset;
};

template <typename T>
void test_channel(const ChannelCase& k) {
  Input<T> in(k.B, k.H, k.T, k.D, k.pad, k.bthd, k.offset);
  in.fill();
  const index_t rows = in.in.rows(), tgs = k.T / k.group;
  // A constant channel in the first token group, a NaN and an Inf in others.
  for (int t = 0; t < k.group; ++t) in.at(t, 5) = from_f<T>(1.5f);
  if (k.T > k.group) in.at(k.group, k.D - 1) = from_f<T>(NAN);
  if (rows > k.T) in.at(k.T + 1, 9) = from_f<T>(INFINITY);

  const int row_bytes = (int)(k.D * k.bits / 8);
  const size_t psize = k.ptype == ParamType::kFloat16 ? 2 : 4;
  std::vector<uint8_t> codes(rows * row_bytes, 0xcd), params(k.B * k.H * tgs * k.D * 2 * psize, 0xcd);

  char name[256];
  std::snprintf(name, sizeof name, "channel %s G=%d asym%d %s", in.shape().c_str(), k.group, k.bits, pname(k.ptype));
  Check chk{name};
  launch_quantize_channel(dtype_of<T>(), in.x, codes.data(), params.data(),
                          ChannelQuantArgs{in.in, k.bits, k.group, k.ptype}, nullptr);
  print_launches();
  std::vector<float> ref_out(rows * k.D);
  for (index_t bh = 0; bh < k.B * k.H; ++bh) {
    for (index_t tg = 0; tg < tgs; ++tg) {
      for (index_t c = 0; c < k.D; ++c) {
        const index_t row0 = bh * k.T + tg * k.group;
        std::vector<float> xs(k.group);
        for (int t = 0; t < k.group; ++t) xs[t] = in.get(row0 + t, c);
        const RefGroup ref = ref_asym(xs, k.bits, k.ptype);
        const size_t pi = ((bh * tgs + tg) * k.D + c) * 2;
        const float s = read_param(params, pi, k.ptype), z = read_param(params, pi + 1, k.ptype);
        if (!same(s, ref.s) || !same(z, ref.z))
          chk.fail("bh " + std::to_string(bh) + " token group " + std::to_string(tg) + " channel " + std::to_string(c) +
                   " params (" + std::to_string(s) + ", " + std::to_string(z) + ") != (" + std::to_string(ref.s) +
                   ", " + std::to_string(ref.z) + ")");
        for (int t = 0; t < k.group; ++t) {
          const int q = unpack(codes.data() + (row0 + t) * row_bytes, (int)c, k.bits);
          if (q != ref.q[t])
            chk.fail("row " + std::to_string(row0 + t) + " col " + std::to_string(c) + " code " + std::to_string(q) +
                     " != " + std::to_string(ref.q[t]));
          ref_out[(row0 + t) * k.D + c] = std::fma((float)ref.q[t], ref.s, ref.z);
        }
      }
    }
  }
  std::vector<T> out(rows * k.D, from_f<T>(-1.f));
  launch_dequantize_channel(dtype_of<T>(), codes.data(), params.data(), out.data(),
                            ChannelDequantArgs{rows, k.T, k.D, k.bits, k.group, k.ptype}, nullptr);
  print_launches();
  for (index_t i = 0; i < rows * k.D; ++i) {
    const float want = to_f(from_f<T>(ref_out[i])), got = to_f(out[i]);
    if (!close(got, want))
      chk.fail("dequant element " + std::to_string(i) + ": " + std::to_string(got) + " != " + std::to_string(want));
  }
  chk.done();
}

// ---------------------------------------------------------------- fp8
struct Fp8Case {
  index_t B, H, T, D;
  Fp8Format format;
  bool per_head;
  index_t pad;
  bool bthd;
  int offset;
};

template <typename T>
void test_fp8(const Fp8Case& k) {
  Input<T> in(k.B, k.H, k.T, k.D, k.pad, k.bthd, k.offset);
  in.fill();
  const index_t rows = in.in.rows();
  const float fmax = k.format == Fp8Format::kE4M3 ? 448.f : 57344.f;
  const __nv_fp8_interpretation_t interp = k.format == Fp8Format::kE4M3 ? __NV_E4M3 : __NV_E5M2;
  // Scales: amax / fmax, except head 1 whose scale is 64x too small (saturates) and head 2 whose
  // values are tiny (subnormal codes). Special values: NaN, +-Inf, -0.
  std::vector<float> scale(k.per_head ? k.H : 1, 8.f / fmax);
  if (k.per_head && k.H > 1) scale[1] /= 64.f;
  if (k.per_head && k.H > 3) scale[3] = 0.f;  // invalid: the kernels give NaN codes and values
  if (k.per_head && k.H > 2)
    for (index_t t = 0; t < k.T; ++t)
      for (index_t c = 0; c < k.D; ++c) in.at(2 * k.T + t, c) = from_f<T>(std::ldexp(in.get(2 * k.T + t, c), -14));
  in.at(0, 1) = from_f<T>(NAN);
  in.at(0, 2) = from_f<T>(INFINITY);
  in.at(0, 3) = from_f<T>(-INFINITY);
  in.at(0, 4) = from_f<T>(-0.f);
  in.at(rows - 1, k.D - 1) = from_f<T>(-1e4f);

  std::vector<uint8_t> codes(rows * k.D, 0xcd);

  char name[256];
  std::snprintf(name, sizeof name, "fp8 %s %s %s", in.shape().c_str(), k.format == Fp8Format::kE4M3 ? "e4m3" : "e5m2",
                k.per_head ? "per-head" : "per-tensor");
  Check chk{name};
  launch_quantize_fp8(dtype_of<T>(), in.x, scale.data(), codes.data(), Fp8Args{in.in, k.format, k.per_head}, nullptr);
  print_launches();
  const auto decode = [&](uint8_t c) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, interp))); };
  std::vector<float> ref_out(rows * k.D);
  for (index_t r = 0; r < rows; ++r) {
    const float s = scale[k.per_head ? (r / k.T) % k.H : 0];
    for (index_t c = 0; c < k.D; ++c) {
      const float v = in.get(r, c) / s;
      const uint8_t got = codes[r * k.D + c];
      if (!(s > 0.f && std::isfinite(s))) {
        if (got != 0x7f) chk.fail("row " + std::to_string(r) + ": invalid scale, code " + std::to_string(got));
        ref_out[r * k.D + c] = NAN;
        continue;
      }
      const uint8_t want = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, interp);
      // NaN: any NaN encoding (CUDA's host conversion drops the sign, the kernel keeps it).
      const bool ok = std::isnan(v) ? std::isnan(decode(got)) : got == want;
      if (!ok)
        chk.fail("row " + std::to_string(r) + " col " + std::to_string(c) + " x/s=" + std::to_string(v) + " code " +
                 std::to_string(got) + " != " + std::to_string(want));
      ref_out[r * k.D + c] = decode(want) * s;
      (void)fmax;
    }
  }
  std::vector<T> out(rows * k.D, from_f<T>(-1.f));
  launch_dequantize_fp8(dtype_of<T>(), codes.data(), scale.data(), out.data(), rows, k.H, k.T, k.D, k.format,
                        k.per_head, nullptr);
  print_launches();
  for (index_t i = 0; i < rows * k.D; ++i) {
    const float want = to_f(from_f<T>(ref_out[i])), got = to_f(out[i]);
    if (!close(got, want))
      chk.fail("dequant element " + std::to_string(i) + ": " + std::to_string(got) + " != " + std::to_string(want));
  }
  chk.done();
}

template <template <typename> class F, typename Case>
void for_dtype(int dtype, const Case& k) {
  if (dtype == 0) F<float>::run(k);
  if (dtype == 1) F<__half>::run(k);
  if (dtype == 2) F<__nv_bfloat16>::run(k);
}
template <typename T> struct TokenF {
  static void run(const TokenCase& k) { test_token<T>(k); }
};
template <typename T> struct ChannelF {
  static void run(const ChannelCase& k) { test_channel<T>(k); }
};
template <typename T> struct Fp8F {
  static void run(const Fp8Case& k) { test_fp8<T>(k); }
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);          // progress survives a sanitizer abort
  const std::string only = argc > 1 ? argv[1] : "";  // optional filter: token | channel | fp8
  const auto t0 = std::chrono::steady_clock::now();
  const ParamType P16 = ParamType::kFloat16, P32 = ParamType::kFloat32;

  if (only.empty() || only == "token") {
    // (D, G): G / 8 in {1, 2, 4, 8, 16, 32} -> lanes kernel; 3, 10, 12 -> serial kernel.
    const int dg[][2] = {{64, 8},    {64, 16},   {80, 16}, {96, 32}, {128, 64},
                         {128, 128}, {256, 256}, {80, 80}, {96, 24}, {96, 96}};
    // Rows (B, H, T) chosen so the work is never a multiple of the block and warps are partial.
    const index_t shapes[][3] = {{1, 2, 5}, {2, 3, 7}, {1, 2, 9}, {2, 1, 11}, {1, 4, 13}, {3, 2, 3}};
    // Layouts {pad, bthd, offset}: the first two are 16-byte aligned (VEC) for every dtype, pad 4 for
    // fp32 only, pad 3 and base+1 never.
    const int layouts[][3] = {{0, 0, 0}, {8, 1, 0}, {4, 0, 0}, {0, 0, 1}, {3, 1, 0}};
    int i = 0;
    for (const auto& d : dg) {
      for (int mode = 0; mode < 4; ++mode, ++i) {  // asym 2 / 4 / 8, symmetric int8
        const index_t* s = shapes[i % 6];
        const int* l = layouts[i % 5];
        TokenCase k{s[0], s[1],      s[2], d[0], d[1], mode == 0 ? 2 : mode == 1 ? 4 : 8, mode == 3, i % 2 ? P32 : P16,
                    l[0], l[1] != 0, l[2]};
        if (d[0] == 256) k.T = 2;  // keep LANES=32 cheap: 2 blocks
        for (int dt = 0; dt < 3; ++dt) for_dtype<TokenF>(dt, k);
      }
    }
    // Empty input: the launcher returns before launching (a zero-block grid is invalid in CUDA).
    for_dtype<TokenF>(0, TokenCase{1, 2, 0, 64, 32, 4, false, P16, 0, false, 0});
  }
  if (only.empty() || only == "channel") {
    const ChannelCase cases[] = {
        {1, 2, 64, 128, 32, 2, P16, 0, false, 0},  // KIVI default G = 32
        {2, 5, 16, 96, 4, 4, P32, 8, true, 0},     // 480 threads: 2 blocks, partial last warp
        {1, 3, 24, 80, 8, 8, P16, 4, false, 0},   {2, 2, 16, 64, 8, 4, P16, 0, false, 1},
        {1, 4, 12, 128, 6, 2, P32, 3, true, 0},   {3, 1, 8, 64, 2, 8, P32, 0, true, 0},
    };
    for (const auto& k : cases)
      for (int dt = 0; dt < 3; ++dt) for_dtype<ChannelF>(dt, k);
  }
  if (only.empty() || only == "fp8") {
    const Fp8Case cases[] = {
        {1, 3, 7, 64, Fp8Format::kE4M3, true, 0, false, 0},  {2, 3, 5, 128, Fp8Format::kE5M2, true, 8, true, 0},
        {1, 2, 9, 80, Fp8Format::kE4M3, false, 4, false, 0}, {2, 4, 3, 96, Fp8Format::kE5M2, false, 0, false, 1},
        {1, 4, 20, 64, Fp8Format::kE4M3, true, 3, true, 0},  // 640 threads: 3 blocks
    };
    for (const auto& k : cases)
      for (int dt = 0; dt < 3; ++dt) for_dtype<Fp8F>(dt, k);
  }
  if (only.empty()) {
    // The cases must reach every kernel instance the launchers can choose (group size, alignment).
    Check chk{"coverage: every kernel instance launched"};
    for (const char* t : {"float", "__half", "__nv_bfloat16"}) {
      std::vector<std::string> want = {
          std::string("quantize_token_serial<") + t + ">", std::string("dequantize_token<") + t + ">",
          std::string("dequantize_channel<") + t + ">", std::string("dequantize_fp8<") + t + ">"};
      for (const char* vec : {"true", "false"}) {
        for (int lanes : {1, 2, 4, 8, 16, 32})
          want.push_back(std::string("quantize_token_lanes<") + t + ", " + vec + ", " + std::to_string(lanes) + ">");
        want.push_back(std::string("quantize_channel<") + t + ", " + vec + ">");
        want.push_back(std::string("quantize_fp8<") + t + ", " + vec + ">");
      }
      for (const std::string& k : want)
        if (!g_kernels.count(k)) chk.fail(k + " never launched");
    }
    chk.done();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("kvcache_emu: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, secs);
  return g_failed ? 1 : 0;
}

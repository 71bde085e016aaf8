// CPU kernels of KV-cache quantization: rows split across threads with at::parallel_for; the
// per-row loops are plain arrays so the compiler vectorises them, and the hot ones are cloned for
// AVX2/FMA (x86-64-v3) with a portable default picked at load time.
#include "trous/kvcache_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace trous {
namespace kv {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TROUS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TROUS_CPU_CLONES
#endif

// Rows per parallel task: large enough to amortise scheduling, small enough to balance two cores.
constexpr int64_t kGrainElements = 1 << 16;

int64_t grain_rows(index_t D) { return std::max<int64_t>(1, kGrainElements / std::max<index_t>(D, 1)); }

TROUS_CPU_CLONES void to_float_row(const c10::Half* src, float* dst, index_t n) {
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
TROUS_CPU_CLONES void to_float_row(const c10::BFloat16* src, float* dst, index_t n) {
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

struct GroupStats {
  float mn, mx, amax;
  bool finite;
};

TROUS_CPU_CLONES GroupStats group_stats(const float* v, int n) {
  float mn = v[0], mx = v[0], amax = 0.f;
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    mn = v[i] < mn ? v[i] : mn;
    mx = v[i] > mx ? v[i] : mx;
    const float a = std::fabs(v[i]);
    amax = a > amax ? a : amax;
    bad |= !(a <= 3.402823466e38f);  // NaN or Inf
  }
  return {mn, mx, amax, bad == 0};
}

// Codes of one group, one byte per element (packed afterwards).
TROUS_CPU_CLONES void asym_codes(const float* v, int n, AsymParams p, int bits, uint8_t* q) {
  for (int i = 0; i < n; ++i) q[i] = (uint8_t)asym_code(v[i], p, bits);
}

TROUS_CPU_CLONES void sym_codes(const float* v, int n, float inv, uint8_t* q) {
  for (int i = 0; i < n; ++i) q[i] = (uint8_t)(int8_t)sym_code(v[i], inv);
}

// LSB-first packing of n one-byte codes into n * bits / 8 bytes.
TROUS_CPU_CLONES void pack_codes(const uint8_t* q, index_t n, int bits, uint8_t* dst) {
  if (bits == 8) {
    std::copy(q, q + n, dst);
  } else if (bits == 4) {
    for (index_t k = 0; k < n / 2; ++k) dst[k] = (uint8_t)(q[2 * k] | q[2 * k + 1] << 4);
  } else {
    for (index_t k = 0; k < n / 4; ++k) {
      dst[k] = (uint8_t)(q[4 * k] | q[4 * k + 1] << 2 | q[4 * k + 2] << 4 | q[4 * k + 3] << 6);
    }
  }
}

TROUS_CPU_CLONES void unpack_codes(const uint8_t* src, index_t n, int bits, uint8_t* q) {
  if (bits == 8) {
    std::copy(src, src + n, q);
  } else if (bits == 4) {
    for (index_t k = 0; k < n / 2; ++k) {
      q[2 * k] = src[k] & 0xf;
      q[2 * k + 1] = src[k] >> 4;
    }
  } else {
    for (index_t k = 0; k < n / 4; ++k) {
      q[4 * k] = src[k] & 3;
      q[4 * k + 1] = (src[k] >> 2) & 3;
      q[4 * k + 2] = (src[k] >> 4) & 3;
      q[4 * k + 3] = src[k] >> 6;
    }
  }
}

TROUS_CPU_CLONES void asym_decode_row(const uint8_t* q, index_t n, float s, float z, float* out) {
  for (index_t i = 0; i < n; ++i) out[i] = (float)q[i] * s + z;
}

template <typename T>
void store_row(const float* v, index_t n, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(v, v + n, out);
  } else {
    for (index_t i = 0; i < n; ++i) out[i] = static_cast<T>(v[i]);
  }
}

void store_param_cpu(void* params, index_t i, float v, ParamType t) {
  if (t == ParamType::kFloat16) {
    static_cast<uint16_t*>(params)[i] = float_to_half_bits(v);
  } else {
    static_cast<float*>(params)[i] = v;
  }
}

float load_param_cpu(const void* params, index_t i, ParamType t) {
  return t == ParamType::kFloat16 ? half_bits_to_float(static_cast<const uint16_t*>(params)[i])
                                  : static_cast<const float*>(params)[i];
}

// A row of the input as fp32: the row itself for fp32, else converted into `scratch`.
template <typename T>
const float* row_as_float(const T* src, index_t n, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float_row(src, scratch.data(), n);
    return scratch.data();
  }
}

template <typename F>
void dispatch_cpu(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
  }
}

template <typename T>
void quantize_token_impl(const T* x, uint8_t* codes, void* params, const TokenQuantArgs& a) {
  const index_t D = a.in.D, G = a.group, n_groups = D / G;
  const index_t code_bytes = D * a.bits / 8;
  at::parallel_for(0, a.in.rows(), grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(D);
    std::vector<uint8_t> q(G);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = row_as_float(x + row_offset(r, a.in.H, a.in.T, a.in.stride), D, scratch);
      for (index_t g = 0; g < n_groups; ++g) {
        const float* v = row + g * G;
        const GroupStats st = group_stats(v, (int)G);
        const index_t gi = r * n_groups + g;
        if (a.symmetric) {
          const float s = sym_scale(st.amax, st.finite, a.ptype);
          sym_codes(v, (int)G, sym_inv(s), q.data());
          store_param_cpu(params, gi, s, a.ptype);
        } else {
          const AsymParams p = asym_params(st.mn, st.mx, st.finite, a.bits, a.ptype);
          if (st.finite) {
            asym_codes(v, (int)G, p, a.bits, q.data());
          } else {
            std::fill(q.begin(), q.end(), 0);
          }
          store_param_cpu(params, 2 * gi, p.scale, a.ptype);
          store_param_cpu(params, 2 * gi + 1, p.zero, a.ptype);
        }
        pack_codes(q.data(), G, a.bits, codes + r * code_bytes + g * G * a.bits / 8);
      }
    }
  });
}

template <typename T>
void dequantize_token_impl(const uint8_t* codes, const void* params, T* out, const TokenDequantArgs& a) {
  const index_t D = a.D, G = a.group, n_groups = D / G;
  const index_t code_bytes = D * a.bits / 8;
  at::parallel_for(0, a.rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> q(D);
    std::vector<float> v(D);
    for (int64_t r = r0; r < r1; ++r) {
      unpack_codes(codes + r * code_bytes, D, a.bits, q.data());
      for (index_t g = 0; g < n_groups; ++g) {
        const index_t gi = r * n_groups + g;
        if (a.symmetric) {
          // int8 codes: zero point 0, decode through the signed byte.
          const float s = load_param_cpu(params, gi, a.ptype);
          for (index_t i = 0; i < G; ++i) v[g * G + i] = (float)(int8_t)q[g * G + i] * s;
        } else {
          asym_decode_row(q.data() + g * G, G, load_param_cpu(params, 2 * gi, a.ptype),
                          load_param_cpu(params, 2 * gi + 1, a.ptype), v.data() + g * G);
        }
      }
      store_row(v.data(), D, out + r * D);
    }
  });
}

template <typename T>
void quantize_channel_impl(const T* x, uint8_t* codes, void* params, const ChannelQuantArgs& a) {
  const index_t D = a.in.D, G = a.group, token_groups = a.in.T / G;
  const index_t code_bytes = D * a.bits / 8;
  // One task = one token group of one (b, h): G rows, reduced channel-wise.
  at::parallel_for(0, a.in.B * a.in.H * token_groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(G * D), mn(D), mx(D), scratch(D);
    std::vector<uint8_t> q(D);
    std::vector<AsymParams> p(D);
    std::vector<int> bad(D);
    for (int64_t task = t0; task < t1; ++task) {
      const index_t row0 = (task / token_groups) * a.in.T + (task % token_groups) * G;
      for (index_t t = 0; t < G; ++t) {
        const float* row = row_as_float(x + row_offset(row0 + t, a.in.H, a.in.T, a.in.stride), D, scratch);
        std::copy(row, row + D, tile.data() + t * D);
      }
      std::copy(tile.data(), tile.data() + D, mn.data());
      std::copy(tile.data(), tile.data() + D, mx.data());
      std::fill(bad.begin(), bad.end(), 0);
      for (index_t t = 0; t < G; ++t) {
        const float* v = tile.data() + t * D;
        for (index_t c = 0; c < D; ++c) {
          mn[c] = v[c] < mn[c] ? v[c] : mn[c];
          mx[c] = v[c] > mx[c] ? v[c] : mx[c];
          bad[c] |= !(std::fabs(v[c]) <= 3.402823466e38f);
        }
      }
      const index_t param0 = task * D * 2;
      for (index_t c = 0; c < D; ++c) {
        p[c] = asym_params(mn[c], mx[c], bad[c] == 0, a.bits, a.ptype);
        store_param_cpu(params, param0 + 2 * c, p[c].scale, a.ptype);
        store_param_cpu(params, param0 + 2 * c + 1, p[c].zero, a.ptype);
      }
      for (index_t t = 0; t < G; ++t) {
        const float* v = tile.data() + t * D;
        for (index_t c = 0; c < D; ++c) q[c] = bad[c] ? 0 : (uint8_t)asym_code(v[c], p[c], a.bits);
        pack_codes(q.data(), D, a.bits, codes + (row0 + t) * code_bytes);
      }
    }
  });
}

template <typename T>
void dequantize_channel_impl(const uint8_t* codes, const void* params, T* out, const ChannelDequantArgs& a) {
  const index_t D = a.D, token_groups = a.T / a.group;
  const index_t code_bytes = D * a.bits / 8;
  at::parallel_for(0, a.rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> q(D);
    std::vector<float> v(D);
    for (int64_t r = r0; r < r1; ++r) {
      const index_t param0 = ((r / a.T) * token_groups + (r % a.T) / a.group) * D * 2;
      unpack_codes(codes + r * code_bytes, D, a.bits, q.data());
      for (index_t c = 0; c < D; ++c) {
        v[c] = asym_decode(q[c], load_param_cpu(params, param0 + 2 * c, a.ptype),
                           load_param_cpu(params, param0 + 2 * c + 1, a.ptype));
      }
      store_row(v.data(), D, out + r * D);
    }
  });
}

template <typename T>
void quantize_fp8_impl(const T* x, const float* scale, uint8_t* codes, const Fp8Args& a) {
  const index_t D = a.in.D;
  at::parallel_for(0, a.in.rows(), grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(D);
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale[a.per_head ? (r / a.in.T) % a.in.H : 0];
      const float* row = row_as_float(x + row_offset(r, a.in.H, a.in.T, a.in.stride), D, scratch);
      for (index_t c = 0; c < D; ++c) codes[r * D + c] = float_to_fp8(row[c] / s, a.format);
    }
  });
}

template <typename T>
void dequantize_fp8_impl(const uint8_t* codes, const float* scale, T* out, index_t rows, index_t H, index_t T_len,
                         index_t D, Fp8Format format, bool per_head) {
  // All 256 codes decoded once: the per-element work becomes a table lookup and a multiply.
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = fp8_to_float((uint8_t)c, format);
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    std::vector<float> v(D);
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale[per_head ? (r / T_len) % H : 0];
      for (index_t c = 0; c < D; ++c) v[c] = table[codes[r * D + c]] * s;
      store_row(v.data(), D, out + r * D);
    }
  });
}

}  // namespace

void cpu_quantize_token(DType dtype, const void* x, uint8_t* codes, void* params, const TokenQuantArgs& a) {
  dispatch_cpu(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_token_impl(static_cast<const T*>(x), codes, params, a);
  });
}

void cpu_dequantize_token(DType dtype, const uint8_t* codes, const void* params, void* out, const TokenDequantArgs& a) {
  dispatch_cpu(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_token_impl(codes, params, static_cast<T*>(out), a);
  });
}

void cpu_quantize_channel(DType dtype, const void* x, uint8_t* codes, void* params, const ChannelQuantArgs& a) {
  dispatch_cpu(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_channel_impl(static_cast<const T*>(x), codes, params, a);
  });
}

void cpu_dequantize_channel(DType dtype, const uint8_t* codes, const void* params, void* out,
                            const ChannelDequantArgs& a) {
  dispatch_cpu(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_channel_impl(codes, params, static_cast<T*>(out), a);
  });
}

void cpu_quantize_fp8(DType dtype, const void* x, const float* scale, uint8_t* codes, const Fp8Args& a) {
  dispatch_cpu(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_fp8_impl(static_cast<const T*>(x), scale, codes, a);
  });
}

void cpu_dequantize_fp8(DType dtype, const uint8_t* codes, const float* scale, void* out, index_t rows, index_t H,
                        index_t T, index_t D, Fp8Format format, bool per_head) {
  dispatch_cpu(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    dequantize_fp8_impl(codes, scale, static_cast<Elem*>(out), rows, H, T, D, format, per_head);
  });
}

}  // namespace kv
}  // namespace trous

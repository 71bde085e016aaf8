// CPU kernel of kv_append. One task per (sequence, KV head): the tokens that the residual rule moves
// out of full precision in this call ([quantized_length(L), quantized_length(L + n)), old residual
// tokens read from the ring and new ones from k / v) are quantized first, through the bulk
// quantizers' own row kernels (append_cpu.h; per-token rows in batches of 8 that may span heads and
// sequences, copied to fp32 first), then the new tokens that stay in full precision are written to
// the ring. Reading the ring before writing it matters: a prefill longer than the ring
// wraps onto slots of old residual tokens that this call quantizes. lengths are updated last, after
// every task has read them.
#include "kvcache/append_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kvcache/cache.h"
#include "trous/simd_cpu.h"

namespace trous {
namespace kv {
namespace {

// Elements per parallel task: a decode step of a small batch stays on one thread (thread wake-up costs
// more than the work), a prefill spreads over the cores.
constexpr int64_t kGrainElements = 1 << 14;

template <typename T>
struct Side {   // K or V of one call
  const T* in;  // [batch, Hkv, n_new, D] with strides s
  BHTStrides s;
  T* ring;         // [batch, Hkv, capacity, D]
  uint8_t* codes;  // [pages, Hkv, page_size, code_bytes]
  void* params;    // group parameters, or the fp8 scale
  bool key;        // KIVI: channel-wise key groups
};

template <typename T>
class Appender {
 public:
  explicit Appender(const AppendParams& p) : p_(p), c_(p.cache), f_(c_.fmt) {
    D_ = f_.head_dim;
    H_ = c_.map.num_heads;
    cb_ = code_bytes(f_);
    tok_.in = RowLayout{1, 1, 1, D_, RowStrides{0, 0, 0}};
    tok_.bits = f_.bits;
    tok_.group = (int)f_.group;
    tok_.symmetric = f_.scheme == CacheScheme::kSymmetric;
    tok_.ptype = f_.param_type;
    tok_.limit = finite_limit(c_.act);
    chan_.in = RowLayout{1, 1, f_.group, D_, RowStrides{0, 0, 0}};
    chan_.bits = f_.bits;
    chan_.group = (int)f_.group;
    chan_.ptype = f_.param_type;
    chan_.limit = tok_.limit;
  }

  void run() {
    Side<T> k{static_cast<const T*>(p_.k),       p_.sk,       static_cast<T*>(c_.k_residual),
              static_cast<uint8_t*>(c_.k_codes), c_.k_params, f_.scheme == CacheScheme::kKivi};
    Side<T> v{static_cast<const T*>(p_.v),       p_.sv,       static_cast<T*>(c_.v_residual),
              static_cast<uint8_t*>(c_.v_codes), c_.v_params, false};
    const int64_t per_task = std::max<int64_t>(1, 2 * std::max<int64_t>(p_.n_new, 1) * D_);
    at::parallel_for(0, c_.batch * H_, std::max<int64_t>(1, kGrainElements / per_task), [&](int64_t i0, int64_t i1) {
      std::vector<float> row(D_), tile(f_.scheme == CacheScheme::kKivi ? f_.group * D_ : 0);
      Batch kb(D_), vb(D_);
      for (int64_t i = i0; i < i1; ++i) {
        const index_t b = i / H_, h = i % H_;
        append_one(k, b, h, row, tile, kb);
        append_one(v, b, h, row, tile, vb);
      }
      flush(kb, k.params);
      flush(vb, v.params);
    });
    for (index_t b = 0; b < c_.batch; ++b) c_.lengths[b] += (int32_t)p_.n_new;
  }

 private:
  // Token t of sequence b, head h, in the activation dtype: the ring for t < L (old tokens), else
  // the new input.
  const T* source(const Side<T>& s, index_t b, index_t h, index_t t, index_t L) const {
    if (t < L) return s.ring + residual_row(f_, H_, b, h, t) * D_;
    return s.in + b * s.s.b + h * s.s.h + (t - L) * s.s.t;
  }

  const float* as_float(const T* src, std::vector<float>& row) const {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      cpu::to_float_row(src, row.data(), D_);
      return row.data();
    }
  }

  // Per-token rows waiting to be quantized, up to 8 (their fp32 copies: the ring slot a row came from
  // may be rewritten before the batch is flushed).
  struct Batch {
    static constexpr int kRows = 8;
    std::vector<float> rows;
    const float* ptr[kRows];
    index_t index[kRows];
    uint8_t* dst[kRows];
    int n = 0;
    explicit Batch(index_t D) : rows(kRows * D) {}
  };

  void flush(Batch& q, void* params) const {
    if (q.n > 0) cpu_quantize_token_rows(q.ptr, q.index, q.dst, q.n, tok_, params);
    q.n = 0;
  }

  void push(Batch& q, const Side<T>& s, const T* src, index_t r) const {
    float* dst = q.rows.data() + q.n * D_;
    if constexpr (std::is_same_v<T, float>) {
      memcpy(dst, src, D_ * sizeof(float));
    } else {
      cpu::to_float_row(src, dst, D_);
    }
    q.ptr[q.n] = dst;
    q.index[q.n] = r;
    q.dst[q.n] = s.codes + r * cb_;
    if (++q.n == Batch::kRows) flush(q, s.params);
  }

  void append_one(const Side<T>& s, index_t b, index_t h, std::vector<float>& row, std::vector<float>& tile,
                  Batch& q) const {
    const index_t L = c_.lengths[b], n = p_.n_new, T_new = L + n;
    const index_t q0 = quantized_length(f_, L), q1 = quantized_length(f_, T_new);
    if (s.key) {  // KIVI keys: whole groups of G tokens, one page holds whole groups
      const index_t G = f_.group;
      for (index_t t0 = q0; t0 < q1; t0 += G) {
        for (index_t t = 0; t < G; ++t) {
          const float* x = as_float(source(s, b, h, t0 + t, L), row);
          std::copy(x, x + D_, tile.data() + t * D_);
        }
        cpu_quantize_key_group(tile.data(), chan_, s.params, key_group_row(c_.map, f_, b, h, t0) * D_,
                               s.codes + token_row(c_.map, b, h, t0) * cb_);
      }
    } else {
      for (index_t t = q0; t < q1; ++t) {
        const index_t r = token_row(c_.map, b, h, t);
        if (f_.scheme == CacheScheme::kFp8) {
          const float scale = static_cast<const float*>(s.params)[c_.fp8_scale_per_head ? h : 0];
          cpu_quantize_fp8_row(as_float(source(s, b, h, t, L), row), scale, f_.fp8_format, D_, s.codes + r * cb_);
        } else {
          push(q, s, source(s, b, h, t, L), r);
        }
      }
    }
    // The new tokens that stay in full precision (at most residual_capacity of them: distinct slots).
    for (index_t t = std::max(q1, L); t < T_new; ++t) {
      memcpy(s.ring + residual_row(f_, H_, b, h, t) * D_, source(s, b, h, t, L), D_ * sizeof(T));
    }
  }

  const AppendParams& p_;
  const CacheRef& c_;
  const CacheFormat& f_;
  index_t D_ = 0, H_ = 0, cb_ = 0;
  TokenQuantArgs tok_{};
  ChannelQuantArgs chan_{};
};

}  // namespace

void cpu_kv_append(const AppendParams& p) {
  dispatch_dtype<cpu::CpuTypes>(p.cache.act, [&](auto tag) {
    using T = decltype(tag);
    Appender<T>(p).run();
  });
}

}  // namespace kv
}  // namespace trous

// The attention pattern: which (query, key) pairs are allowed, and per tile pair whether a kernel
// skips it, runs it unmasked or applies the element mask. Torch-free; used by the CPU kernels, the
// CUDA kernels and the coverage test op alike, so every backend visits exactly the same pairs.
//
// Rules (../shared/spec/attention.md, "Composition rules"), with i' = i + shift, shift = Sk - Sq:
//   local(i, j)  = (i' - j) mod d == 0  and  -right <= (i' - j) / d <= left  (-1: unbounded)
//                  and (chunk == 0 or i' // chunk == j // chunk)
//   allowed(i, j) = (local(i, j) or global_row(i) or global_key(j)) and (not causal or j <= i')
//
// How tiles stay dense (a mask alone skips nothing):
// - Dilation: queries are grouped by class i mod d and keys by j mod d; inside one class the
//   compact indices t = i / d, u = j / d are consecutive and a dilated window is an ordinary band.
//   Query class c only meets key class (c + shift) mod d locally.
// - Global tokens: global rows are gathered into their own query tiles that visit every key, and
//   global keys into their own key span that every local query tile visits. pair_counted keeps
//   each allowed pair in exactly one place: local tiles skip global rows, and the global-key span
//   skips pairs the local band already counts.
#pragma once
#include "trous/common.h"

namespace trous {
namespace attention {

enum TileKind : uint8_t { kSkip = 0, kFull = 1, kPartial = 2 };
enum QueryKind : int8_t { kLocalRows = 0, kGlobalRows = 1 };
enum KeyKind : int8_t { kLocalKeys = 0, kGlobalKeys = 1, kAllKeys = 2 };

// A block-sparse layout (trous.BlockMask), AND-ed with the closed-form rules: per (batch, head) a table
// over (query block qb = i / bq, key block kb = j / bk), in query indices i (not aligned). A state is
// kBlockNone (no pair allowed), kBlockFull (every pair) or kBlockPartial0 + e: the pairs of element
// mask e, elems[e] (bq x bk bytes, row = i % bq). One dense table serves the query-tile-outer forward
// and the key-tile-outer backward alike: no transposed index is built per call.
enum BlockState : int32_t { kBlockNone = 0, kBlockFull = 1, kBlockPartial0 = 2 };
struct BlockLayout {
  const int32_t* table = nullptr;  // (Bm, Hm, nqb, nkb) contiguous; nullptr: no block mask
  const uint8_t* elems = nullptr;  // (P, bq, bk)
  index_t bq = 0, bk = 0, nqb = 0, nkb = 0;
  index_t stride_b = 0, stride_h = 0;  // table elements per batch / head entry; 0 where broadcast
};

struct Pattern {
  index_t Sq, Sk, shift;  // shift = Sk - Sq (bottom-right alignment)
  bool causal;
  index_t left, right;  // window in steps of dilation; -1 = unbounded
  index_t chunk;        // 0 = no chunks
  index_t dilation;     // >= 1
  // Global tokens: a flag per key position, or nullptr. Query i is a global row iff flag[i + shift].
  const uint8_t* global_flags;
  const int64_t* global_keys;  // sorted key positions j with flag[j]
  index_t n_global_keys;
  const int64_t* global_rows;  // sorted query rows i with flag[i + shift]
  index_t n_global_rows;
  BlockLayout blocks;
};

TROUS_INLINE index_t floor_div(index_t a, index_t b) {
  const index_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
TROUS_INLINE index_t floor_mod(index_t a, index_t b) { return a - floor_div(a, b) * b; }
TROUS_INLINE index_t ceil_div_signed(index_t a, index_t b) { return -floor_div(-a, b); }
TROUS_INLINE index_t min_index(index_t a, index_t b) { return a < b ? a : b; }
TROUS_INLINE index_t max_index(index_t a, index_t b) { return a > b ? a : b; }

// ---- the element predicate ----
TROUS_INLINE bool is_global_key(const Pattern& p, index_t j) {
  return p.global_flags != nullptr && p.global_flags[j] != 0;
}
TROUS_INLINE bool is_global_row(const Pattern& p, index_t i) {
  const index_t k = i + p.shift;
  return p.global_flags != nullptr && k >= 0 && k < p.Sk && p.global_flags[k] != 0;
}
TROUS_INLINE bool causal_ok(const Pattern& p, index_t i, index_t j) { return !p.causal || j <= i + p.shift; }
TROUS_INLINE bool local_ok(const Pattern& p, index_t i, index_t j) {
  const index_t diff = i + p.shift - j;
  if (p.dilation > 1 && floor_mod(diff, p.dilation) != 0) return false;
  const index_t steps = diff / p.dilation;  // exact after the check above
  if (p.left >= 0 && steps > p.left) return false;
  if (p.right >= 0 && -steps > p.right) return false;
  if (p.chunk > 0 && floor_div(i + p.shift, p.chunk) != floor_div(j, p.chunk)) return false;
  return true;
}
TROUS_INLINE bool allowed(const Pattern& p, index_t i, index_t j) {
  return causal_ok(p, i, j) && (local_ok(p, i, j) || is_global_row(p, i) || is_global_key(p, j));
}

// ---- dilation classes: [0, n) split by index mod d, tiles of T never crossing a class ----
// Members of class c: c, c + d, ...; classes c < n % d have one member more than the others.
TROUS_INLINE index_t class_size(index_t n, index_t d, index_t c) { return c < n ? (n - c + d - 1) / d : 0; }
TROUS_INLINE index_t class_tiles_total(index_t n, index_t d, index_t T) {
  const index_t base = n / d, extra = n % d;
  return extra * ceil_div(base + 1, T) + (d - extra) * ceil_div(base, T);
}
TROUS_INLINE void class_tile_locate(index_t n, index_t d, index_t T, index_t tile, index_t* cls, index_t* first,
                                    index_t* count) {
  const index_t base = n / d, extra = n % d;
  const index_t big = ceil_div(base + 1, T), small = ceil_div(base, T);
  index_t c, t, size;
  if (tile < extra * big) {
    c = tile / big;
    t = tile % big;
    size = base + 1;
  } else {
    const index_t rel = tile - extra * big;  // small > 0 here: otherwise there is no such tile
    c = extra + rel / small;
    t = rel % small;
    size = base;
  }
  *cls = c;
  *first = t * T;
  *count = min_index(T, size - t * T);
}
// The tile holding compact index u of class c.
TROUS_INLINE index_t class_tile_index(index_t n, index_t d, index_t T, index_t c, index_t u) {
  const index_t base = n / d, extra = n % d;
  const index_t big = ceil_div(base + 1, T), small = ceil_div(base, T);
  return c < extra ? c * big + u / T : extra * big + (c - extra) * small + u / T;
}

// ---- query tiles: local tiles (by class), then global-row tiles ----
struct QueryTile {
  int8_t kind;      // QueryKind
  bool all_active;  // no row of the tile is computed elsewhere (a local tile without global rows)
  index_t cls;      // local: the class (query i = cls + d * (first + t))
  index_t first;    // local: compact index of row 0; global: index into global_rows
  index_t count;    // rows in the tile (<= Tq)
};

TROUS_INLINE index_t num_local_query_tiles(const Pattern& p, index_t Tq) {
  return class_tiles_total(p.Sq, p.dilation, Tq);
}
TROUS_INLINE index_t num_query_tiles(const Pattern& p, index_t Tq) {
  return num_local_query_tiles(p, Tq) + ceil_div(p.n_global_rows, Tq);
}
TROUS_INLINE index_t query_row(const Pattern& p, const QueryTile& q, index_t t) {
  return q.kind == kLocalRows ? q.cls + p.dilation * (q.first + t) : p.global_rows[q.first + t];
}
TROUS_INLINE bool row_active(const Pattern& p, const QueryTile& q, index_t i) {
  return q.kind == kGlobalRows || !is_global_row(p, i);
}
TROUS_INLINE QueryTile query_tile(const Pattern& p, index_t Tq, index_t tile) {
  QueryTile q;
  const index_t n_local = num_local_query_tiles(p, Tq);
  if (tile < n_local) {
    q.kind = kLocalRows;
    class_tile_locate(p.Sq, p.dilation, Tq, tile, &q.cls, &q.first, &q.count);
    q.all_active = true;
    if (p.n_global_rows > 0) {
      for (index_t t = 0; t < q.count; ++t) {
        if (is_global_row(p, query_row(p, q, t))) {
          q.all_active = false;
          break;
        }
      }
    }
  } else {
    q.kind = kGlobalRows;
    q.cls = 0;
    q.first = (tile - n_local) * Tq;
    q.count = min_index(Tq, p.n_global_rows - q.first);
    q.all_active = true;
  }
  return q;
}

// ---- key spans ----
struct KeySpan {
  int8_t kind;  // KeyKind
  index_t cls;  // local: the key class (key j = cls + d * u)
  index_t first, end;
};

TROUS_INLINE index_t key_index(const Pattern& p, const KeySpan& s, index_t u) {
  return s.kind == kLocalKeys ? s.cls + p.dilation * u : (s.kind == kGlobalKeys ? p.global_keys[u] : u);
}

// A local query tile's rows in the compact coordinates of its key class: i' = key_cls + d * tau.
struct LocalRows {
  index_t key_cls, tau_a, tau_b;  // tau of the first and last row
};
TROUS_INLINE LocalRows local_rows(const Pattern& p, const QueryTile& q) {
  const index_t base = q.cls + p.shift;
  const index_t delta = floor_div(base, p.dilation);
  LocalRows r;
  r.key_cls = floor_mod(base, p.dilation);
  r.tau_a = q.first + delta;
  r.tau_b = q.first + q.count - 1 + delta;
  return r;
}

// The keys a query tile visits; at most two spans. Returns how many.
TROUS_INLINE int key_spans(const Pattern& p, const QueryTile& q, KeySpan out[2]) {
  int n = 0;
  if (q.count <= 0) return 0;
  if (q.kind == kGlobalRows) {
    index_t hi = p.Sk;
    if (p.causal) hi = min_index(hi, p.global_rows[q.first + q.count - 1] + p.shift + 1);
    if (hi > 0) out[n++] = KeySpan{kAllKeys, 0, 0, hi};
    return n;
  }
  const index_t d = p.dilation;
  const LocalRows r = local_rows(p, q);
  index_t lo = 0, hi = class_size(p.Sk, d, r.key_cls);
  if (p.left >= 0) lo = max_index(lo, r.tau_a - p.left);
  if (p.right >= 0) hi = min_index(hi, r.tau_b + p.right + 1);
  if (p.causal) hi = min_index(hi, r.tau_b + 1);
  if (p.chunk > 0) {
    const index_t j_lo = p.chunk * floor_div(r.key_cls + d * r.tau_a, p.chunk);
    const index_t j_hi = p.chunk * floor_div(r.key_cls + d * r.tau_b, p.chunk) + p.chunk - 1;
    lo = max_index(lo, ceil_div_signed(j_lo - r.key_cls, d));
    hi = min_index(hi, floor_div(j_hi - r.key_cls, d) + 1);
  }
  if (lo < hi) out[n++] = KeySpan{kLocalKeys, r.key_cls, lo, hi};
  if (p.n_global_keys > 0) out[n++] = KeySpan{kGlobalKeys, 0, 0, p.n_global_keys};
  return n;
}

// Whether the pair (i, j), met in a span of the given kind, is counted there.
TROUS_INLINE bool pair_counted(const Pattern& p, int8_t span_kind, index_t i, index_t j) {
  if (!causal_ok(p, i, j)) return false;
  if (span_kind == kAllKeys) return true;  // i is a global row: it sees every key
  if (is_global_row(p, i)) return false;   // counted by its global-row tile
  const bool local = local_ok(p, i, j);
  return span_kind == kLocalKeys ? local : !local;  // a global key inside the band is counted there
}

TROUS_INLINE TileKind combine(bool skip, bool full) { return skip ? kSkip : (full ? kFull : kPartial); }

// Causal relation of rows [ia', ib'] (aligned) and keys [ja, jb]: skip if none, full if all pairs.
TROUS_INLINE void causal_bounds(const Pattern& p, index_t ia, index_t ib, index_t ja, index_t jb, bool* skip,
                                bool* full) {
  *skip = p.causal && ja > ib;
  *full = !p.causal || jb <= ia;
}
TROUS_INLINE void chunk_bounds(const Pattern& p, index_t ia, index_t ib, index_t ja, index_t jb, bool* skip,
                               bool* full) {
  if (p.chunk <= 0) {
    *skip = false;
    *full = true;
    return;
  }
  const index_t qa = floor_div(ia, p.chunk), qb = floor_div(ib, p.chunk);
  const index_t ka = floor_div(ja, p.chunk), kb = floor_div(jb, p.chunk);
  *skip = qb < ka || kb < qa;
  *full = qa == qb && ka == kb && qa == ka;
}

// Keys u in [u0, u1) of span s against the rows of query tile q (both non-empty).
TROUS_INLINE TileKind classify(const Pattern& p, const QueryTile& q, const KeySpan& s, index_t u0, index_t u1) {
  const index_t d = p.dilation;
  const index_t ja = key_index(p, s, u0), jb = key_index(p, s, u1 - 1);
  bool c_skip, c_full;
  if (q.kind == kGlobalRows) {
    const index_t ia = p.global_rows[q.first] + p.shift, ib = p.global_rows[q.first + q.count - 1] + p.shift;
    causal_bounds(p, ia, ib, ja, jb, &c_skip, &c_full);
    return combine(c_skip, c_full);
  }
  const LocalRows r = local_rows(p, q);
  const index_t ia = r.key_cls + d * r.tau_a, ib = r.key_cls + d * r.tau_b;
  causal_bounds(p, ia, ib, ja, jb, &c_skip, &c_full);
  bool k_skip, k_full;
  chunk_bounds(p, ia, ib, ja, jb, &k_skip, &k_full);
  if (s.kind == kLocalKeys) {
    // Same class: (i' - j) / d = tau - u exactly.
    const index_t max_steps = r.tau_b - u0, min_steps = r.tau_a - (u1 - 1);
    const bool w_skip = (p.left >= 0 && min_steps > p.left) || (p.right >= 0 && max_steps < -p.right);
    const bool w_full = (p.left < 0 || max_steps <= p.left) && (p.right < 0 || min_steps >= -p.right);
    return combine(c_skip || k_skip || w_skip, c_full && k_full && w_full && q.all_active);
  }
  // Global keys, any class: counted where the band does not count them.
  const index_t max_diff = ib - ja, min_diff = ia - jb;
  const bool w_skip = (p.left >= 0 && min_diff > p.left * d) || (p.right >= 0 && max_diff < -p.right * d);
  const bool local_none = w_skip || k_skip;
  const bool w_full = (p.left < 0 || max_diff <= p.left) && (p.right < 0 || min_diff >= -p.right);
  const bool local_all = d == 1 && w_full && k_full;
  return combine(c_skip || local_all, local_none && c_full && q.all_active);
}

// ---- block-sparse layouts (BlockLayout above) ----
// The table of batch b, query head h, or nullptr without a block mask.
TROUS_INLINE const int32_t* head_blocks(const Pattern& p, index_t b, index_t h) {
  return p.blocks.table == nullptr ? nullptr : p.blocks.table + b * p.blocks.stride_b + h * p.blocks.stride_h;
}
TROUS_INLINE bool block_ok(const Pattern& p, const int32_t* tbl, index_t i, index_t j) {
  if (tbl == nullptr) return true;
  const BlockLayout& L = p.blocks;
  const int32_t s = tbl[(i / L.bq) * L.nkb + j / L.bk];
  if (s < kBlockPartial0) return s == kBlockFull;
  return L.elems[((s - kBlockPartial0) * L.bq + i % L.bq) * L.bk + j % L.bk] != 0;
}
// Over the blocks that rows [ia, ib] and keys [ja, jb] touch: skip if none allows a pair, full if
// all are full. (A superset of a dilated or global tile's blocks: still exact, maybe less skipping.)
TROUS_INLINE TileKind classify_block_range(const Pattern& p, const int32_t* tbl, index_t ia, index_t ib, index_t ja,
                                           index_t jb) {
  const BlockLayout& L = p.blocks;
  bool any = false, all_full = true;
  for (index_t qb = ia / L.bq; qb <= ib / L.bq; ++qb) {
    const int32_t* row = tbl + qb * L.nkb;
    for (index_t kb = ja / L.bk; kb <= jb / L.bk; ++kb) {
      any = any || row[kb] != kBlockNone;
      all_full = all_full && row[kb] == kBlockFull;
    }
  }
  return combine(!any, all_full);
}
// The block layout's part of the tile of query tile q and keys [u0, u1) of span s (kFull without one).
TROUS_INLINE TileKind classify_blocks(const Pattern& p, const int32_t* tbl, const QueryTile& q, const KeySpan& s,
                                      index_t u0, index_t u1) {
  if (tbl == nullptr) return kFull;
  return classify_block_range(p, tbl, query_row(p, q, 0), query_row(p, q, q.count - 1), key_index(p, s, u0),
                              key_index(p, s, u1 - 1));
}
// Both parts: skip if either skips, full if both are full (then no element mask at all).
TROUS_INLINE TileKind tile_kind(const Pattern& p, const int32_t* tbl, const QueryTile& q, const KeySpan& s, index_t u0,
                                index_t u1) {
  const TileKind k = classify(p, q, s, u0, u1);
  if (k == kSkip || tbl == nullptr) return k;
  const TileKind b = classify_blocks(p, tbl, q, s, u0, u1);
  return b == kSkip ? kSkip : (k == kFull && b == kFull ? kFull : kPartial);
}
// The element mask of a partial tile, both parts.
TROUS_INLINE bool pair_allowed(const Pattern& p, const int32_t* tbl, int8_t span_kind, index_t i, index_t j) {
  return pair_counted(p, span_kind, i, j) && block_ok(p, tbl, i, j);
}
// Where the next key tile of a span starts after u0: at a multiple of T in key indices when the span's
// keys are consecutive and a block mask is given (T divides the key block: a tile never straddles two
// key blocks), else u0 + T.
TROUS_INLINE index_t next_key_tile(const Pattern& p, const KeySpan& s, index_t u0, index_t T) {
  const bool consecutive = s.kind == kAllKeys || (s.kind == kLocalKeys && p.dilation == 1);
  const index_t next = p.blocks.table != nullptr && consecutive ? (u0 / T + 1) * T : u0 + T;
  return min_index(next, s.end);
}

// ---- the transposed view, for key-tile-outer backward passes ----
// Key tiles: local class tiles, then global-key tiles, then (only with global rows) all-key tiles.
TROUS_INLINE index_t num_local_key_tiles(const Pattern& p, index_t Tk) {
  return class_tiles_total(p.Sk, p.dilation, Tk);
}
TROUS_INLINE index_t num_key_tiles(const Pattern& p, index_t Tk) {
  return num_local_key_tiles(p, Tk) + ceil_div(p.n_global_keys, Tk) + (p.n_global_rows > 0 ? ceil_div(p.Sk, Tk) : 0);
}
TROUS_INLINE KeySpan key_tile(const Pattern& p, index_t Tk, index_t tile) {
  const index_t n_local = num_local_key_tiles(p, Tk);
  const index_t n_global = ceil_div(p.n_global_keys, Tk);
  if (tile < n_local) {
    index_t cls, first, count;
    class_tile_locate(p.Sk, p.dilation, Tk, tile, &cls, &first, &count);
    return KeySpan{kLocalKeys, cls, first, first + count};
  }
  if (tile < n_local + n_global) {
    const index_t first = (tile - n_local) * Tk;
    return KeySpan{kGlobalKeys, 0, first, min_index(p.n_global_keys, first + Tk)};
  }
  const index_t first = (tile - n_local - n_global) * Tk;
  return KeySpan{kAllKeys, 0, first, min_index(p.Sk, first + Tk)};
}

// Query tiles [*begin, *end) that may count pairs with the keys of key tile s; classify each.
TROUS_INLINE void query_tile_range(const Pattern& p, index_t Tq, const KeySpan& s, index_t* begin, index_t* end) {
  const index_t n_local = num_local_query_tiles(p, Tq);
  *begin = *end = 0;
  if (s.end <= s.first) return;
  if (s.kind == kGlobalKeys) {
    *end = n_local;
    return;
  }
  if (s.kind == kAllKeys) {
    *begin = n_local;
    *end = num_query_tiles(p, Tq);
    return;
  }
  // Local keys of class r meet query class c = (r - shift) mod d, whose row t sits at tau = t + delta.
  const index_t d = p.dilation;
  const index_t c = floor_mod(s.cls - p.shift, d);
  const index_t delta = floor_div(c + p.shift, d);
  const index_t ua = s.first, ub = s.end - 1;
  index_t lo = 0, hi = class_size(p.Sq, d, c);  // in t
  if (p.right >= 0) lo = max_index(lo, ua - p.right - delta);
  if (p.left >= 0) hi = min_index(hi, ub + p.left - delta + 1);
  if (p.causal) lo = max_index(lo, ua - delta);
  if (p.chunk > 0) {
    const index_t ja = s.cls + d * ua, jb = s.cls + d * ub;
    const index_t i_lo = p.chunk * floor_div(ja, p.chunk);
    const index_t i_hi = p.chunk * floor_div(jb, p.chunk) + p.chunk - 1;
    // i' = s.cls + d * tau
    lo = max_index(lo, ceil_div_signed(i_lo - s.cls, d) - delta);
    hi = min_index(hi, floor_div(i_hi - s.cls, d) - delta + 1);
  }
  if (lo >= hi) return;
  *begin = class_tile_index(p.Sq, d, Tq, c, lo);
  *end = class_tile_index(p.Sq, d, Tq, c, hi - 1) + 1;
}

}  // namespace attention
}  // namespace trous

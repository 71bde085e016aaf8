// attention_pattern_coverage: the tile walk of pattern.h replayed on the host, pair by pair, so the
// tests can check that every allowed pair is counted exactly once, that skipped tiles hold none and
// full tiles only allowed ones, in the forward (query-tile-outer) and the transposed walk alike.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/pattern_ops.h"

namespace trous {
namespace attention {
namespace {

constexpr const char* kOp = "attention_pattern_coverage";

// counted[i][j] += 1 for each pair a walk counts; visited[i][j] += 1 for each pair of a non-skip tile.
struct Tally {
  int32_t* counted;
  int32_t* visited;
  index_t Sk;
  void tile(const Pattern& p, const QueryTile& q, const KeySpan& s, index_t u0, index_t u1) const {
    const TileKind kind = classify(p, q, s, u0, u1);
    if (kind == kSkip) return;
    for (index_t t = 0; t < q.count; ++t) {
      const index_t i = query_row(p, q, t);
      for (index_t u = u0; u < u1; ++u) {
        const index_t j = key_index(p, s, u);
        visited[i * Sk + j] += 1;
        const bool counted_here = kind == kFull ? true : (row_active(p, q, i) && pair_counted(p, s.kind, i, j));
        counted[i * Sk + j] += counted_here ? 1 : 0;
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> coverage(int64_t Sq, int64_t Sk, const std::optional<at::Tensor>& global_flags,
                                            bool causal, int64_t left, int64_t right, int64_t chunk, int64_t dilation,
                                            int64_t tile_q, int64_t tile_k, bool transposed) {
  TORCH_CHECK_VALUE(Sq >= 0 && Sk >= 0, kOp, ": Sq and Sk must be >= 0, got ", Sq, " and ", Sk);
  TORCH_CHECK_VALUE(tile_q >= 1 && tile_k >= 1, kOp, ": tile_q and tile_k must be >= 1, got ", tile_q, " and ", tile_k);
  check_pattern_args(kOp, c10::SymInt(Sk), global_flags, left, right, chunk, dilation);
  if (global_flags.has_value())
    TORCH_CHECK(global_flags->device().is_cpu(), kOp, ": global_tokens must be on the CPU, got ",
                global_flags->device());
  const PatternHolder h = build_pattern(Sq, Sk, global_flags, causal, left, right, chunk, dilation);
  const Pattern& p = h.p;
  at::Tensor counted = at::zeros({Sq, Sk}, at::kInt), visited = at::zeros({Sq, Sk}, at::kInt);
  const Tally tally{counted.data_ptr<int32_t>(), visited.data_ptr<int32_t>(), Sk};
  if (!transposed) {
    for (index_t qt = 0; qt < num_query_tiles(p, tile_q); ++qt) {
      const QueryTile q = query_tile(p, tile_q, qt);
      KeySpan spans[2];
      const int n = key_spans(p, q, spans);
      for (int s = 0; s < n; ++s)
        for (index_t u0 = spans[s].first; u0 < spans[s].end; u0 += tile_k)
          tally.tile(p, q, spans[s], u0, min_index(u0 + tile_k, spans[s].end));
    }
  } else {
    for (index_t kt = 0; kt < num_key_tiles(p, tile_k); ++kt) {
      const KeySpan s = key_tile(p, tile_k, kt);
      index_t begin, end;
      query_tile_range(p, tile_q, s, &begin, &end);
      for (index_t qt = begin; qt < end; ++qt) tally.tile(p, query_tile(p, tile_q, qt), s, s.first, s.end);
    }
  }
  return {counted, visited};
}

}  // namespace
}  // namespace attention
}  // namespace trous

TORCH_LIBRARY_FRAGMENT(trous, m) {
  m.def(
      "attention_pattern_coverage(int Sq, int Sk, Tensor? global_flags, bool causal, int left, int right, int chunk, "
      "int dilation, int tile_q, int tile_k, bool transposed) -> (Tensor counted, Tensor visited)");
}

// A host-side test op: no tensor inputs but the optional flags, so it is registered for every key.
TORCH_LIBRARY_IMPL(trous, CompositeExplicitAutograd, m) {
  m.impl("attention_pattern_coverage", &trous::attention::coverage);
}

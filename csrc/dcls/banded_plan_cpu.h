// The tap plans shared by the banded DCLS CPU kernels (cpu/dcls_banded.cpp: one sample's row in
// vector lanes; cpu/dcls_banded_lanes.cpp: sixteen samples in the lanes of one vector).
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "dcls/banded.h"

namespace trous {
namespace dcls {

// Taps of every destination row, in increasing source-row order, cut into source-row blocks: the
// taps of row r in block b are [seg[r (blocks + 1) + b], seg[r (blocks + 1) + b + 1]).
template <typename Acc>
struct Plan {
  int rows = 0, blocks = 1, block_rows = 1;
  // Tap = (source element for output 0 relative to the sample's plane, weight); 32-bit offsets
  // keep the plan small (it is re-read for every sample and chunk; the op layer bounds planes).
  std::vector<int32_t> off;
  std::vector<Acc> w;
  std::vector<index_t> seg;

  // Source blocks of block_bytes / bytes_per_source_row rows (at least one).
  Plan(int rows_, int source_rows, index_t bytes_per_source_row, index_t block_bytes) : rows(rows_) {
    const index_t fit = block_bytes / (bytes_per_source_row > 0 ? bytes_per_source_row : 1);
    block_rows = (int)(fit < 1 ? 1 : (fit > source_rows ? source_rows : fit));
    if (block_rows < 1) block_rows = 1;
    blocks = (source_rows + block_rows - 1) / block_rows;
    if (blocks < 1) blocks = 1;
    seg.assign((size_t)rows * (blocks + 1), 0);
  }
  // Row r's taps are added with non-decreasing source rows between begin_row and end_row.
  void begin_row(int r) { cur_row = r, cur_block = 0, seg[(size_t)r * (blocks + 1)] = (index_t)off.size(); }
  void add(int source_row, index_t offset, Acc weight) {
    TORCH_INTERNAL_ASSERT(offset >= 0 && offset < ((index_t)1 << 31));
    const int b = source_row / block_rows;
    while (cur_block < b) seg[(size_t)cur_row * (blocks + 1) + ++cur_block] = (index_t)off.size();
    off.push_back(offset);
    w.push_back(weight);
  }
  void end_row() {
    while (cur_block < blocks) seg[(size_t)cur_row * (blocks + 1) + ++cur_block] = (index_t)off.size();
  }
  index_t begin(int r, int b) const { return seg[(size_t)r * (blocks + 1) + b]; }
  index_t end(int r, int b) const { return seg[(size_t)r * (blocks + 1) + b + 1]; }

 private:
  int cur_row = 0, cur_block = 0;
};

// Where each sample's source plane comes from: rows of len elements placed at lead + t * step of
// padded rows (see sample_plane).
struct SourceLayout {
  index_t rows;
  int len, lead, step;
  index_t padded_len;
};

// The batch-lane kernels (cpu/dcls_banded_lanes.cpp) take fp32 stride-1 convolutions of at least
// kLanesMinBatch samples on CPUs with AVX-512.
bool lanes_apply(const BandedGeom& g);

// Block sizes the lanes sweep wants: source rows per block = block_bytes / bytes_per_source_row.
index_t lanes_bytes_per_source_row(int dks);
index_t lanes_block_bytes();

// A source repacked for the lanes kernels: element (n, r, t) of src [N, rows, len] at
// data[(((n / 16) rows + r) padded_len + lead + t step) 16 + n % 16], zeros elsewhere.
struct LanePlanes {
  const float* data;
  SourceLayout lay;
  index_t N;
};

// Packs into per-thread buffer `slot` (0 or 1), which the next pack into that slot overwrites.
LanePlanes lanes_pack(const float* src, index_t N, const SourceLayout& lay, int slot);

// run_plan for stride 1 with 16 samples per vector: dst[n, r, t] = init[r] (0 if null) +
// sum over row r's taps (off, w) of w src_plane(n)[off + t].
void lanes_run_plan(const Plan<float>& plan, const LanePlanes& src, float* dst, int len, const float* init);

// grad_K of a stride-1 convolution (every entry written, zero outside the bands) from packed
// grad_out (plain or spread rows: its lead is honoured) and packed padded x.
void lanes_backward_kernel(const LanePlanes& gy, const LanePlanes& x, const int32_t* band, float* gK,
                           const BandedGeom& g);

}  // namespace dcls
}  // namespace trous

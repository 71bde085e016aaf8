// Bookkeeping shared by the tests/emu/<family>_emu.cpp programs: one Check per test case, the
// pass / fail counters printed in the closing line, and a small deterministic generator.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "cuda_emu.h"

inline int g_passed = 0, g_failed = 0;

// One test case. Its name is printed (and flushed) before its kernels run, so the line a sanitizer
// or emulation abort leaves unfinished names the case; the emulation also prints it with its errors.
struct Check {
  std::string name;
  int errors = 0;
  explicit Check(std::string n) : name(std::move(n)) {
    trous_emu::context() = name;
    std::printf("%s: ", name.c_str());
    std::fflush(stdout);
  }
  void fail(const std::string& what) {
    if (errors++ < 5) std::printf("%s  MISMATCH %s\n", errors == 1 ? "\n" : "", what.c_str());
  }
  void done() {
    if (errors) {
      ++g_failed;
      std::printf("FAIL %s (%d mismatches)\n", name.c_str(), errors);
    } else {
      ++g_passed;
      std::printf("ok\n");
    }
  }
};

inline uint64_t g_rng = 0x9e3779b97f4a7c15ull;

// xorshift64*, uniform on [-1, 1) with 24-bit resolution (exact in float).
inline double uniform() {
  g_rng ^= g_rng >> 12, g_rng ^= g_rng << 25, g_rng ^= g_rng >> 27;
  return (double)((g_rng * 0x2545f4914f6cdd1dull) >> 40) / (double)(1 << 23) - 1.0;
}

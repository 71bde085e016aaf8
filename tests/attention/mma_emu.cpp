// The warp-level mma helpers of the attention kernels (csrc/attention/mma_kernels.cuh) alone, under
// the CUDA emulation (their plain twins): per element type and warp, A (16 x 16) from row-major
// shared memory times B loaded both ways (load_b_nk from B transposed, load_b_kn from B row-major),
// and the product of an A fragment made from accumulators (a_from_acc, the P / dS path), each
// batched over 2, 4 and 8 n-tiles, against a float64 host product of the same (rounded) operands.
// Every warp of a 4-warp block works on its own tiles, so the per-warp scratch is exercised.
// Exit status 0 iff all pass.
#include "cuda_emu.h"
#include "emu_check.h"

#include <cmath>
#include <string>
#include <vector>

#include "attention/mma_kernels.cuh"

using namespace trous;
using namespace trous::attention;

namespace {

constexpr int kWarps = 4, kLd = 8 * 8 + 8;  // shared row stride in elements (16-byte rows)

// Per warp w: A (16 x 16) at a + w * 16 * kLd; B^T (N8 rows n, 16 cols k) at bt + w * N8 * kLd; B
// (16 rows k, N8 cols n) at bk + w * 16 * kLd. Outputs per warp (16 x N8, row-major): c1 = A B (nk),
// c2 = A B (kn), c3 = round(c1[:, :16]) B (kn, from the accumulators).
template <typename T, int N>
__global__ void mma_kernel(const T* a, const T* bt, const T* bk, float* c1, float* c2, float* c3) {
  constexpr int N8 = 8 * N;
  __shared__ T sa[kWarps * 16 * kLd], sbt[kWarps * N8 * kLd], sbk[kWarps * 16 * kLd];
  for (int x = threadIdx.x; x < kWarps * 16 * kLd; x += blockDim.x) sa[x] = a[x], sbk[x] = bk[x];
  for (int x = threadIdx.x; x < kWarps * N8 * kLd; x += blockDim.x) sbt[x] = bt[x];
  __syncthreads();
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  mma::FragA<T> fa;
  mma::load_a(fa, sa + w * 16 * kLd, kLd);
  float acc1[N][4] = {}, acc2[N][4] = {}, acc3[N][4] = {};
  mma::FragB<T> b[N];
  for (int p = 0; p < N / 2; ++p) mma::load_b_nk(b + 2 * p, sbt + w * N8 * kLd + p * 16 * kLd, kLd);
  mma::mma_n<N>(acc1, fa, b);
  for (int p = 0; p < N / 2; ++p) mma::load_b_kn(b + 2 * p, sbk + w * 16 * kLd + p * 16, kLd);
  mma::mma_n<N>(acc2, fa, b);
  mma::FragA<T> fp;
  mma::a_from_acc(fp, acc1[0], acc1[1]);
  mma::mma_n<N>(acc3, fp, b);
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < 4; ++e) {
      const int at = w * 16 * N8 + (g + (e >> 1) * 8) * N8 + n * 8 + 2 * t + (e & 1);
      c1[at] = acc1[n][e], c2[at] = acc2[n][e], c3[at] = acc3[n][e];
    }
}

template <typename T> T from_f(float v);
template <> float from_f(float v) { return v; }
template <> __half from_f(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }

template <typename T, int N>
void run() {
  constexpr int N8 = 8 * N;
  Check chk{std::string("mma ") + tname<T>() + " n-tiles " + std::to_string(N)};
  std::vector<T> a(kWarps * 16 * kLd), bt(kWarps * N8 * kLd), bk(kWarps * 16 * kLd);
  for (auto& v : a) v = from_f<T>((float)uniform());
  for (auto& v : bt) v = from_f<T>((float)uniform());
  for (auto& v : bk) v = from_f<T>((float)uniform());
  std::vector<float> c1(kWarps * 16 * N8, NAN), c2 = c1, c3 = c1;
  trous_emu::launch(mma_kernel<T, N>, dim3(1), dim3(32 * kWarps), a.data(), bt.data(), bk.data(), c1.data(), c2.data(),
                    c3.data());
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-4;
  for (int w = 0; w < kWarps; ++w)
    for (int i = 0; i < 16; ++i)
      for (int n = 0; n < N8; ++n) {
        double r1 = 0, r2 = 0, r3 = 0;
        for (int k = 0; k < 16; ++k) {
          const double av = to_float(a[w * 16 * kLd + i * kLd + k]);
          r1 += av * to_float(bt[w * N8 * kLd + n * kLd + k]);
          r2 += av * to_float(bk[w * 16 * kLd + k * kLd + n]);
          // P = A B^T columns 0..15, rounded to T as a_from_acc does
          const float pk = c1[w * 16 * N8 + i * N8 + k];
          r3 += (double)to_float(from_f<T>(pk)) * to_float(bk[w * 16 * kLd + k * kLd + n]);
        }
        const int at = w * 16 * N8 + i * N8 + n;
        if (!(std::fabs(c1[at] - r1) <= tol * 16) || !(std::fabs(c2[at] - r2) <= tol * 16) ||
            !(std::fabs(c3[at] - r3) <= tol * 64)) {
          chk.fail("warp " + std::to_string(w) + " (" + std::to_string(i) + ", " + std::to_string(n) +
                   "): " + std::to_string(c1[at]) + " / " + std::to_string(r1) + ", " + std::to_string(c2[at]) + " / " +
                   std::to_string(r2) + ", " + std::to_string(c3[at]) + " / " + std::to_string(r3));
        }
      }
  chk.done();
}

template <typename T>
void run_all() {
  run<T, 2>();
  run<T, 4>();
  run<T, 8>();
}

}  // namespace

int main() {
  run_all<__half>();
  run_all<__nv_bfloat16>();
  run_all<float>();
  std::printf("mma_emu: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}

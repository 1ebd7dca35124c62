// The low-bit kernels for AVX2 + FMA (x86-64-v3: Haswell and later, Zen): 8 floats a vector.
//
// Written with 256-bit intrinsics: the generic 64-byte vector code this replaces was split by GCC into halves
// that went through the stack (a broadcast scale was 16 scalar stores, then wide loads that could not be
// forwarded), about 1.8 ns a weight on a Zen 3 (docs/benchmarks.md, "Kernels per ISA").
#if !defined(__AVX2__) || !defined(__FMA__)
#error "lowbit_avx2.cpp is built with -march=x86-64-v3 (AVX2 and FMA)"
#endif
#include <immintrin.h>

#include "lowbit_kernel.h"

namespace {

struct Avx2 {
  using F = __m256;
  static constexpr int L = 8;
  static constexpr int kChains = 8;  // fma latency 4 x 2 ports; 8 sums + a block's 4 weight vectors fit 16 registers
  static constexpr int kRegisters = 16;

  static constexpr bool kNibbleTable = false;  // 8 lanes: two permutes and a blend a vector, more than they save
  static F zero() { return _mm256_setzero_ps(); }
  static F splat(float s) { return _mm256_set1_ps(s); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void nibbles(const uint8_t* p, F* out) {
    const __m256i low = _mm256_set1_epi32(15);
    for (int h = 0; h < 2; ++h) {  // bytes 0-7 hold weights 0-7 and 16-23; bytes 8-15, 8-15 and 24-31
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
      out[h] = _mm256_cvtepi32_ps(_mm256_and_si256(u, low));
      out[2 + h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4));
    }
  }
  template <int N>
  static void int8s(const uint8_t* p, F* out) {
    for (int c = 0; c < N / 8; ++c)
      out[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * c))));
  }
};

}  // namespace

SPECPASS_LOWBIT_DEFINE(Avx2, "avx2")

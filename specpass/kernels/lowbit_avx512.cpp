// The low-bit kernels for AVX-512 (x86-64-v4: Skylake-X and later, Zen 4): 16 floats a vector.
#if !defined(__AVX512F__)
#error "lowbit_avx512.cpp is built with -march=x86-64-v4 (AVX-512)"
#endif
#include <immintrin.h>

#include "lowbit_kernel.h"

namespace {

struct Avx512 {
  using F = __m512;
  static constexpr int L = 16;
  static constexpr int kChains = 8;  // fma latency 4 x 2 ports; 32 registers hold them with room to spare
  static constexpr int kRegisters = 32;

  static F zero() { return _mm512_setzero_ps(); }
  static F splat(float s) { return _mm512_set1_ps(s); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static void nibbles(const uint8_t* p, F* out) {  // byte i holds weight i (low nibble) and i + 16 (high)
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(15)));
    out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4));
  }
  static constexpr bool kNibbleTable = true;
  static F iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static void pick_nibbles(const uint8_t* p, F table, F* out) {  // vpermps reads an index's low 4 bits only
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[0] = _mm512_permutexvar_ps(u, table);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table);
  }
  template <int N>
  static void int8s(const uint8_t* p, F* out) {
    for (int c = 0; c < N / 16; ++c)
      out[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c))));
  }
};

}  // namespace

SPECPASS_LOWBIT_DEFINE(Avx512, "avx512")

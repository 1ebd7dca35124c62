// The low-bit kernels for any CPU: 4-float vectors of the compiler's vector extension (SSE2 on the x86-64
// baseline, NEON on aarch64, scalar code elsewhere). The fallback where neither AVX2 nor AVX-512 runs, and the
// reference the ISA paths are tested beside.
#include <cstring>

#include "lowbit_kernel.h"

namespace {

struct Generic {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  static constexpr int L = 4;
  static constexpr int kChains = 4;
  static constexpr int kRegisters = 16;

  static constexpr bool kNibbleTable = false;  // 4 floats a vector: no room for a 16-entry table
  static F zero() { return F{}; }
  static F splat(float s) { return F{s, s, s, s}; }
  static F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static F add(F a, F b) { return a + b; }
  static F fma(F a, F b, F c) { return a * b + c; }  // contracted or not: the same weights (lowbit.h)
  static float hsum(F v) { return (v[0] + v[1]) + (v[2] + v[3]); }
  static void nibbles(const uint8_t* p, F* out) {  // byte i holds weight i (low nibble) and i + 16 (high)
    for (int c = 0; c < 4; ++c) {
      const I u = {p[4 * c], p[4 * c + 1], p[4 * c + 2], p[4 * c + 3]};
      out[c] = __builtin_convertvector(u & 15, F);
      out[4 + c] = __builtin_convertvector(u >> 4, F);
    }
  }
  template <int N>
  static void int8s(const uint8_t* p, F* out) {
    const int8_t* s = reinterpret_cast<const int8_t*>(p);
    for (int c = 0; c < N / 4; ++c) out[c] = __builtin_convertvector((I{s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]}), F);
  }
};

}  // namespace

SPECPASS_LOWBIT_DEFINE(Generic, "generic")

// The low-bit kernels, written once over a vector type V that each ISA file defines with its own intrinsics:
//
//   F, L                 a vector of L floats
//   kChains              independent sums to keep in flight: the fma latency times the fma ports
//   kRegisters           vector registers: sums beyond what they hold beside a block's weights would spill
//   zero(), splat(f), load(p), store(p, v), add(a, b), hsum(v)
//   fma(a, b, c)         a * b + c
//   nibbles(p, out)      16 bytes -> a 4-bit block's 32 codes as floats: the low nibbles, then the high ones
//   kNibbleTable         whether a vector holds 16 floats and any of them can be picked per lane; then also
//   iota()               0, 1, ..., 15
//   pick_nibbles(p, t, out)  16 bytes -> t[code] for the block's 32 codes, in nibbles' order
//   int8s<N>(p, out)     N signed bytes -> N floats
//
// so that the algorithm is tested wherever any ISA runs, and an ISA file is only its loads, widenings and sums.
// lowbit.h says why the weights rebuilt here are exactly the fp32 ones.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lowbit.h"

#define SPECPASS_UNROLL _Pragma("GCC unroll 16")

namespace specpass_lowbit {

// How far ahead of a block its codes are prefetched (its scales and shifts: half as far, they are fewer bytes).
constexpr int64_t kPrefetchBytes = 8192;

template <class V>
struct Kernels {
  using F = typename V::F;
  static constexpr int L = V::L;

  // Block `id` (row * nb + b) rebuilt into w[BLOCK / L]. e is the index of the next exception, next its block id
  // (INT64_MAX past the last): one comparison a block.
  template <int BITS, int BLOCK, bool SHIFT>
  static inline void weights(const Blocks& B, int64_t id, int64_t& e, int64_t& next, F* w) {
    constexpr int C = BLOCK / L;
    if (__builtin_expect(id == next, 0)) {
      SPECPASS_UNROLL for (int c = 0; c < C; ++c) w[c] = V::load(B.exc_values + e * BLOCK + c * L);
      next = ++e < B.n_exc ? B.exc_ids[e] : INT64_MAX;
      return;
    }
    constexpr int kBytes = BITS == 4 ? BLOCK / 2 : BLOCK;
    // the streams ahead, far enough to cover a read from memory (the hardware's prefetchers left 15% of a Zen 3's
    // bandwidth unused; 512 bytes ahead, the low-bit calls of a default-model decode step took about 30% longer
    // than 8 KB ahead on a 2-core Xeon: docs/benchmarks.md); a prefetch past the end never faults
    __builtin_prefetch(B.q + id * kBytes + kPrefetchBytes);
    __builtin_prefetch(B.scale + id + kPrefetchBytes / 8);
    if constexpr (SHIFT) __builtin_prefetch(B.shift + id + kPrefetchBytes / 8);
    const F s = V::splat(B.scale[id]);
    const F m = V::splat(SHIFT ? B.shift[id] : -0.f);  // x + -0.0 is x, -0.0 included
    if constexpr (BITS == 4 && V::kNibbleTable) {
      // the block's 16 possible weights rebuilt as below, then each code picks its own: one fma a block instead
      // of a conversion and an fma a vector (7 vector operations a Q4_1 block instead of 9 with AVX-512)
      const F codes = SHIFT ? V::iota() : V::add(V::iota(), V::splat(-8.f));
      V::pick_nibbles(B.q + id * kBytes, V::fma(codes, s, m), w);
      return;
    }
    if constexpr (BITS == 4) {
      V::nibbles(B.q + id * kBytes, w);
    } else {
      V::template int8s<BLOCK>(B.q + id * kBytes, w);
    }
    SPECPASS_UNROLL for (int c = 0; c < C; ++c) {
      F q = w[c];
      if constexpr (BITS == 4 && !SHIFT) q = V::add(q, V::splat(-8.f));  // symmetric 4-bit codes are stored + 8
      w[c] = V::fma(q, s, m);
    }
  }

  // The exception cursor (e, next) for the first block of row n0.
  static inline int64_t start(const Blocks& B, int64_t n0, int64_t& next) {
    const int64_t e = B.first_exception(n0 * B.nb);
    next = e < B.n_exc ? B.exc_ids[e] : INT64_MAX;
    return e;
  }

  template <int BITS, int BLOCK, bool SHIFT>
  static void dequantize(const Blocks& blocks, int64_t n0, int64_t n1, float* out) {
    constexpr int C = BLOCK / L;
    const Blocks B = blocks;  // a local copy: its pointers stay in registers
    int64_t next, e = start(B, n0, next);
    for (int64_t n = n0; n < n1; ++n) {
      float* row = out + (n - n0) * B.K;
      for (int64_t b = 0; b < B.nb; ++b) {
        F w[C];
        weights<BITS, BLOCK, SHIFT>(B, n * B.nb + b, e, next, w);
        SPECPASS_UNROLL for (int c = 0; c < C; ++c) V::store(row + b * BLOCK + c * L, w[c]);
      }
    }
  }

  // M tokens against rows [n0, n1): each block is rebuilt once and multiplied into every token's sums. One token
  // takes two rows at a time (two streams of blocks in flight, x read once for both).
  template <int BITS, int BLOCK, bool SHIFT, int M>
  __attribute__((noinline)) static void matvec(const Blocks& blocks, const float* x, float* y, int64_t n0, int64_t n1) {
    const Blocks B = blocks;  // a local copy: its pointers stay in registers
    int64_t next, e = start(B, n0, next);
    int64_t n = n0;
    // two rows share x's vectors: worth it where the registers hold both rows' weights, x and a sum a row
    // (2.4 vs 2.7 ns a Q4_1 block on one Zen 3 core: docs/benchmarks.md, "Kernels per ISA")
    if constexpr (M == 1 && V::kRegisters >= 3 + 2 * (BLOCK / L) + 2) {
      for (; n + 2 <= n1; n += 2) rows<BITS, BLOCK, SHIFT, M, 2>(B, x, y, n, e, next);
    }
    for (; n < n1; ++n) rows<BITS, BLOCK, SHIFT, M, 1>(B, x, y, n, e, next);
  }

  // Sums a row and token keeps: enough to hide the fma latency, no more than the registers hold beside a block's
  // weights (C vectors), x's vectors when R rows share them, the scale, the shift and a constant; a power of 2.
  template <int M, int R, int C>
  static constexpr int sums() {
    const int by_latency = V::kChains / (M * R);
    const int by_registers = (V::kRegisters - 3 - C * (R > 1 ? 2 : 1)) / (M * R);
    int a = 1;
    while (2 * a <= by_latency && 2 * a <= by_registers) a *= 2;
    return a;
  }

  // Rows n .. n + R - 1 against M tokens; (e, next) is row n's exception cursor, left at row n + R's. Each row and
  // token keeps A sums; U blocks a step, so that every sum is used once a step.
  template <int BITS, int BLOCK, bool SHIFT, int M, int R>
  static inline void rows(const Blocks& B, const float* x, float* y, int64_t n, int64_t& e, int64_t& next) {
    constexpr int C = BLOCK / L;
    constexpr int A = sums<M, R, C>();
    constexpr int U = A / C > 1 ? A / C : 1;
    const int64_t nb = B.nb, K = B.K;
    int64_t er[R], nr[R];
    er[0] = e, nr[0] = next;
    SPECPASS_UNROLL for (int r = 1; r < R; ++r) er[r] = start(B, n + r, nr[r]);
    F acc[R][M][A];
    SPECPASS_UNROLL for (int r = 0; r < R; ++r) SPECPASS_UNROLL for (int t = 0; t < M; ++t)
      SPECPASS_UNROLL for (int a = 0; a < A; ++a) acc[r][t][a] = V::zero();
    int64_t b = 0;
    for (; b + U <= nb; b += U) {
      SPECPASS_UNROLL for (int u = 0; u < U; ++u) SPECPASS_UNROLL for (int r = 0; r < R; ++r) {
        F w[C];
        weights<BITS, BLOCK, SHIFT>(B, (n + r) * nb + b + u, er[r], nr[r], w);
        const float* xb = x + (b + u) * BLOCK;
        SPECPASS_UNROLL for (int c = 0; c < C; ++c) SPECPASS_UNROLL for (int t = 0; t < M; ++t) {
          F& sum = acc[r][t][(u * C + c) % A];
          sum = V::fma(w[c], V::load(xb + t * K + c * L), sum);
        }
      }
    }
    for (; b < nb; ++b) {
      SPECPASS_UNROLL for (int r = 0; r < R; ++r) {
        F w[C];
        weights<BITS, BLOCK, SHIFT>(B, (n + r) * nb + b, er[r], nr[r], w);
        SPECPASS_UNROLL for (int c = 0; c < C; ++c) SPECPASS_UNROLL for (int t = 0; t < M; ++t) {
          F& sum = acc[r][t][c % A];
          sum = V::fma(w[c], V::load(x + t * K + b * BLOCK + c * L), sum);
        }
      }
    }
    SPECPASS_UNROLL for (int r = 0; r < R; ++r) SPECPASS_UNROLL for (int t = 0; t < M; ++t) {
      F total = acc[r][t][0];
      SPECPASS_UNROLL for (int a = 1; a < A; ++a) total = V::add(total, acc[r][t][a]);
      y[t * B.N + n + r] = V::hsum(total);
    }
    e = er[R - 1], next = nr[R - 1];
  }

  // fn(bits, block, shift) with each as a compile-time constant.
  template <class Fn>
  static void by_format(const Blocks& B, Fn&& fn) {
    using std::integral_constant;
    using Four = integral_constant<int, 4>;
    using Eight = integral_constant<int, 8>;
    using B16 = integral_constant<int, 16>;
    using B32 = integral_constant<int, 32>;
    const bool shift = B.shift != nullptr;
    if (B.bits == 4) {
      shift ? fn(Four{}, B32{}, std::true_type{}) : fn(Four{}, B32{}, std::false_type{});
    } else if (B.block == 32) {
      shift ? fn(Eight{}, B32{}, std::true_type{}) : fn(Eight{}, B32{}, std::false_type{});
    } else {
      shift ? fn(Eight{}, B16{}, std::true_type{}) : fn(Eight{}, B16{}, std::false_type{});
    }
  }

  static void dequantize_any(const Blocks& B, int64_t n0, int64_t n1, float* out) {
    by_format(B, [&](auto bits, auto block, auto shift) {
      dequantize<decltype(bits)::value, decltype(block)::value, decltype(shift)::value>(B, n0, n1, out);
    });
  }

  template <int M>
  static void matvec_m(const Blocks& B, const float* x, float* y, int64_t n0, int64_t n1) {
    by_format(B, [&](auto bits, auto block, auto shift) {
      matvec<decltype(bits)::value, decltype(block)::value, decltype(shift)::value, M>(B, x, y, n0, n1);
    });
  }

  static void matvec_any(const Blocks& B, int M, const float* x, float* y, int64_t n0, int64_t n1) {
    static_assert(kMaxTokens == 8, "one case a token count");
    switch (M) {
      case 1: return matvec_m<1>(B, x, y, n0, n1);
      case 2: return matvec_m<2>(B, x, y, n0, n1);
      case 3: return matvec_m<3>(B, x, y, n0, n1);
      case 4: return matvec_m<4>(B, x, y, n0, n1);
      case 5: return matvec_m<5>(B, x, y, n0, n1);
      case 6: return matvec_m<6>(B, x, y, n0, n1);
      case 7: return matvec_m<7>(B, x, y, n0, n1);
      default: return matvec_m<8>(B, x, y, n0, n1);
    }
  }
};

}  // namespace specpass_lowbit

// The three functions lowbit.h declares, for the vector type V of the including ISA file.
#define SPECPASS_LOWBIT_DEFINE(V, NAME)                                                                   \
  namespace specpass_lowbit {                                                                             \
  const char* const kIsa = NAME;                                                                          \
  void dequantize(const Blocks& w, int64_t n0, int64_t n1, float* out) {                                  \
    Kernels<V>::dequantize_any(w, n0, n1, out);                                                           \
  }                                                                                                       \
  void matvec(const Blocks& w, int M, const float* x, float* y, int64_t n0, int64_t n1) {                 \
    Kernels<V>::matvec_any(w, M, x, y, n0, n1);                                                           \
  }                                                                                                       \
  }

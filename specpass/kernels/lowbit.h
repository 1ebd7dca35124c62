// The contract between lowbit.cpp (the operators: checks, threads, prefill tiles) and the one ISA file built
// with it (lowbit_generic.cpp, lowbit_avx2.cpp or lowbit_avx512.cpp: ggml's layout, one file per ISA family,
// each compiled with its own -march into its own library). Nothing here depends on ATen, so the ISA files
// compile in a second.
//
// A weight matrix of N rows and K columns is stored as blocks of BLOCK weights: w = q * scale + shift. q is int8
// (8-bit storage: Q8_0, Q5_x, Q6_K) or two 4-bit codes a byte (Q4_0, Q4_1, Q4_K): byte i of a 32-weight block
// holds weight i in its low nibble and weight i + 16 in its high nibble, as in GGUF; without a shift tensor
// (symmetric blocks, Q4_0) a nibble is the code + 8. Blocks that no format reproduces are kept as fp32 values
// ("exceptions") and read from there.
//
// Every kernel multiplies by exactly the fp32 weights the blocks stand for: each weight is rebuilt as
// fma(q, scale, shift) before it is used. specpass packs a block only where q * scale + shift gives the weight
// bit for bit and, when the shift is not zero, q * scale is exact, so one rounding (fma) or two (mul, add) give
// the same value. Only the order of a dot product's additions differs from a BLAS kernel's.
#pragma once

#include <algorithm>
#include <cstdint>

namespace specpass_lowbit {

struct Blocks {
  const uint8_t* q;        // N rows of K / 2 (4-bit) or K (8-bit) bytes
  const float* scale;      // N x K / block
  const float* shift;      // N x K / block, or nullptr: no shift (every shift is -0.0 or 0.0)
  const int64_t* exc_ids;  // sorted flat block ids (row * nb + block) kept as fp32 values
  const float* exc_values; // n_exc x block
  int64_t n_exc, N, K, block, bits, nb;

  // The first exception at or after flat block id `id`.
  int64_t first_exception(int64_t id) const { return std::lower_bound(exc_ids, exc_ids + n_exc, id) - exc_ids; }
};

// The most tokens one matvec call multiplies while reading the weights once.
constexpr int kMaxTokens = 8;

// Implemented by the ISA file linked into this library.
extern const char* const kIsa;
// Rows [n0, n1) of the weight matrix rebuilt into out (K floats a row).
void dequantize(const Blocks& w, int64_t n0, int64_t n1, float* out);
// y[t * N + n] = x[t] . w[n] for M <= kMaxTokens tokens (x: M rows of K) and rows n in [n0, n1).
void matvec(const Blocks& w, int M, const float* x, float* y, int64_t n0, int64_t n1);

}  // namespace specpass_lowbit

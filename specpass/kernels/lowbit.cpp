// Linear layers and embeddings whose weights are stored as quantization blocks: w = scale * q + shift.
//
// The kernels multiply by exactly the fp32 weights the blocks stand for: each weight is rebuilt as
// q * scale + shift before it is used. specpass packs a block only where that expression gives the weight bit
// for bit and, when the shift is not zero, scale * q is exact, so the value is the same whether the compiler
// contracts it into one fused multiply-add or not. Only the order of the dot product's additions differs from
// a BLAS kernel's, as between any two kernels.
//
// q is int8 (8-bit storage: Q8_0, Q5_x, Q6_K) or two 4-bit codes a byte (Q4_0, Q4_1, Q4_K): byte i of a
// 32-weight block holds weight i in its low nibble and weight i + 16 in its high nibble, as in GGUF; without a
// shift tensor (symmetric blocks, Q4_0) a nibble is the code + 8. Blocks
// that no format reproduces are kept as fp32 values ("exceptions") and read from there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline f16v load_f(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(f16v v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// 16 bytes widened to 16 int32 lanes (GCC 12 converts a byte vector one element at a time).
template <bool SIGNED>
inline i16v widen(const uint8_t* p) {
  i16v r;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512i v = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  std::memcpy(&r, &v, sizeof r);
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b8 = _mm_srli_si128(b, 8);
  const __m256i lo = SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  const __m256i hi = SIGNED ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
#else
  for (int i = 0; i < 16; ++i) r[i] = SIGNED ? static_cast<int8_t>(p[i]) : p[i];
#endif
  return r;
}

// A block's codes as floats, 16 a vector.
template <int BITS, int BLOCK>
inline void codes(const uint8_t* blk, f16v* out) {
  if constexpr (BITS == 4) {  // BLOCK == 32
    const i16v u = widen<false>(blk);
    out[0] = __builtin_convertvector(u & 15, f16v);
    out[1] = __builtin_convertvector(u >> 4, f16v);
  } else {
    for (int c = 0; c < BLOCK / 16; ++c) out[c] = __builtin_convertvector(widen<true>(blk + 16 * c), f16v);
  }
}

struct Blocks {
  const uint8_t* q;
  const float* scale;
  const float* shift;      // nullptr: no shift (every shift is -0.0 or 0.0)
  const int64_t* exc_ids;  // sorted flat block ids (row * blocks_per_row + block) kept as fp32 values
  const float* exc_values;
  int64_t n_exc, N, K, block, bits, nb, block_bytes;

  Blocks(const at::Tensor& q_, const at::Tensor& scale_, const at::Tensor& shift_, const at::Tensor& exc_ids_,
         const at::Tensor& exc_values_, int64_t block_, int64_t bits_)
      : block(block_), bits(bits_) {
    TORCH_CHECK(bits == 4 || bits == 8, "lowbit: bits must be 4 or 8, got ", bits);
    TORCH_CHECK(block == 32 || (bits == 8 && block == 16), "lowbit: unsupported block ", block, " for ", bits, " bits");
    TORCH_CHECK(q_.dim() == 2 && q_.is_contiguous() && q_.element_size() == 1, "lowbit: q must be 2-D, contiguous bytes");
    N = q_.size(0);
    K = bits == 4 ? q_.size(1) * 2 : q_.size(1);
    nb = K / block;
    block_bytes = bits == 4 ? block / 2 : block;
    TORCH_CHECK(K % block == 0, "lowbit: K=", K, " is not a multiple of the block ", block);
    TORCH_CHECK(scale_.scalar_type() == at::kFloat && scale_.is_contiguous() && scale_.numel() == N * nb,
                "lowbit: scale must be contiguous fp32, one per block");
    TORCH_CHECK(shift_.numel() == 0 || (shift_.scalar_type() == at::kFloat && shift_.is_contiguous() &&
                                        shift_.numel() == N * nb),
                "lowbit: shift must be empty or contiguous fp32, one per block");
    TORCH_CHECK(exc_ids_.scalar_type() == at::kLong && exc_ids_.is_contiguous() && exc_values_.is_contiguous() &&
                    exc_values_.scalar_type() == at::kFloat && exc_values_.numel() == exc_ids_.numel() * block,
                "lowbit: exceptions must be int64 block ids with fp32 values, one block each");
    q = reinterpret_cast<const uint8_t*>(q_.data_ptr());
    scale = scale_.data_ptr<float>();
    shift = shift_.numel() ? shift_.data_ptr<float>() : nullptr;
    n_exc = exc_ids_.numel();
    exc_ids = n_exc ? exc_ids_.data_ptr<int64_t>() : nullptr;
    exc_values = n_exc ? exc_values_.data_ptr<float>() : nullptr;
  }

  // The first exception at or after flat block id `id`.
  int64_t first_exception(int64_t id) const { return std::lower_bound(exc_ids, exc_ids + n_exc, id) - exc_ids; }

  // Block b of row n, rebuilt exactly, into out[0 .. block / 16); e walks the row's exceptions.
  template <int BITS, int BLOCK>
  inline void weights(int64_t n, int64_t b, int64_t& e, f16v* out) const {
    const int64_t id = n * nb + b;
    if (e < n_exc && exc_ids[e] == id) {
      for (int c = 0; c < BLOCK / 16; ++c) out[c] = load_f(exc_values + e * BLOCK + 16 * c);
      ++e;
      return;
    }
    codes<BITS, BLOCK>(q + id * block_bytes, out);
    const float s = scale[id], m = shift ? shift[id] : -0.f;  // x + -0.f is x, -0.f included
    for (int c = 0; c < BLOCK / 16; ++c) {
      if (BITS == 4 && !shift) out[c] -= 8.f;  // symmetric 4-bit codes (Q4_0) are stored + 8
      out[c] = out[c] * s + m;
    }
  }

  template <int BITS, int BLOCK>
  void dequantize_rows(int64_t n0, int64_t n1, float* out) const {
    int64_t e = first_exception(n0 * nb);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        f16v w[BLOCK / 16];
        weights<BITS, BLOCK>(n, b, e, w);
        std::memcpy(out + (n - n0) * K + b * BLOCK, w, sizeof w);
      }
  }

  // Rows [n0, n1) of the weight matrix into out (K floats a row).
  void dequantize(int64_t n0, int64_t n1, float* out) const {
    if (bits == 4) dequantize_rows<4, 32>(n0, n1, out);
    else if (block == 32) dequantize_rows<8, 32>(n0, n1, out);
    else dequantize_rows<8, 16>(n0, n1, out);
  }

  // y[t * N + n] = x[t] . w[n] for M tokens and rows n in [n0, n1): the weights are read once for all M.
  template <int BITS, int BLOCK, int M>
  void matvec(const float* x, float* y, int64_t n0, int64_t n1) const {
    int64_t e = first_exception(n0 * nb);
    for (int64_t n = n0; n < n1; ++n) {
      f16v acc[M][BLOCK / 16] = {};
      for (int64_t b = 0; b < nb; ++b) {
        f16v w[BLOCK / 16];
        weights<BITS, BLOCK>(n, b, e, w);
        for (int c = 0; c < BLOCK / 16; ++c)
          for (int t = 0; t < M; ++t) acc[t][c] += w[c] * load_f(x + t * K + b * BLOCK + 16 * c);
      }
      for (int t = 0; t < M; ++t) {
        f16v total = acc[t][0];
        for (int c = 1; c < BLOCK / 16; ++c) total += acc[t][c];
        y[t * N + n] = hsum(total);
      }
    }
  }

  template <int BITS, int BLOCK>
  void matvec_tokens(int M, const float* x, float* y, int64_t n0, int64_t n1) const {
    switch (M) {
      case 1: return matvec<BITS, BLOCK, 1>(x, y, n0, n1);
      case 2: return matvec<BITS, BLOCK, 2>(x, y, n0, n1);
      case 3: return matvec<BITS, BLOCK, 3>(x, y, n0, n1);
      default: return matvec<BITS, BLOCK, 4>(x, y, n0, n1);
    }
  }

  void matvec(int M, const float* x, float* y, int64_t n0, int64_t n1) const {
    if (bits == 4) matvec_tokens<4, 32>(M, x, y, n0, n1);
    else if (block == 32) matvec_tokens<8, 32>(M, x, y, n0, n1);
    else matvec_tokens<8, 16>(M, x, y, n0, n1);
  }
};

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& exc_ids,
                      const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w(q, scale, shift, exc_ids, exc_values, block, bits);
  at::Tensor out = at::empty({w.N, w.K}, scale.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) { w.dequantize(n0, n1, op + n0 * w.K); });
  return out;
}

at::Tensor embedding(const at::Tensor& ids_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& exc_ids, const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w(q, scale, shift, exc_ids, exc_values, block, bits);
  const at::Tensor ids = ids_in.reshape(-1).to(at::kLong).contiguous();
  auto out_shape = ids_in.sizes().vec();
  out_shape.push_back(w.K);
  at::Tensor out = at::empty({ids.numel(), w.K}, scale.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < w.N, "lowbit_embedding: token id ", ip[i], " out of range [0, ", w.N, ")");
    w.dequantize(ip[i], ip[i] + 1, op + i * w.K);
  }
  return out.reshape(out_shape);
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift,
                  const at::Tensor& exc_ids, const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w(q, scale, shift, exc_ids, exc_values, block, bits);
  const int64_t K = w.K, N = w.N;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == K, "lowbit: x must be fp32 with ", K, " columns");
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (T > 16) {
    // Prefill: each thread rebuilds 64 weight rows at a time into a buffer that stays in cache and multiplies
    // them with the BLAS kernel (x @ tile^T); the whole fp32 matrix never exists.
    constexpr int64_t tile = 64;
    at::parallel_for(0, (N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(tile * K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * tile, n1 = std::min(N, n0 + tile);
        w.dequantize(n0, n1, buf.data());
        const at::Tensor wt = at::from_blob(buf.data(), {n1 - n0, K}, x.options());
        y.slice(1, n0, n1).copy_(at::mm(x, wt.t()));
      }
    });
    return y.reshape(out_shape);
  }
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t t = 0; t < T; t += 4)  // tokens in groups of 4: each group reads the weights once
      w.matvec(static_cast<int>(std::min<int64_t>(4, T - t)), xp + t * K, yp + t * N, n0, n1);
  });
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(specpass, CPU, m) {
  m.impl("lowbit_linear", &linear);
  m.impl("lowbit_embedding", &embedding);
  m.impl("lowbit_dequantize", &dequantize);
}

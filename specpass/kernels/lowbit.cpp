// The operators torch.ops.specpass.lowbit_{linear,embedding,dequantize,isa}: argument checks, threads and the
// prefill path, over the inner loops of the ISA file this library was built with (lowbit.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "lowbit.h"

namespace {

using specpass_lowbit::Blocks;

Blocks view(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& exc_ids,
            const at::Tensor& exc_values, int64_t block, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(block == 32 || (bits == 8 && block == 16), "lowbit: unsupported block ", block, " for ", bits, " bits");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.element_size() == 1, "lowbit: q must be 2-D, contiguous bytes");
  Blocks w{};
  w.bits = bits;
  w.block = block;
  w.N = q.size(0);
  w.K = bits == 4 ? q.size(1) * 2 : q.size(1);
  TORCH_CHECK(w.K % block == 0, "lowbit: K=", w.K, " is not a multiple of the block ", block);
  w.nb = w.K / block;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.N * w.nb,
              "lowbit: scale must be contiguous fp32, one per block");
  TORCH_CHECK(shift.numel() == 0 || (shift.scalar_type() == at::kFloat && shift.is_contiguous() &&
                                     shift.numel() == w.N * w.nb),
              "lowbit: shift must be empty or contiguous fp32, one per block");
  TORCH_CHECK(exc_ids.scalar_type() == at::kLong && exc_ids.is_contiguous() && exc_values.is_contiguous() &&
                  exc_values.scalar_type() == at::kFloat && exc_values.numel() == exc_ids.numel() * block,
              "lowbit: exceptions must be int64 block ids with fp32 values, one block each");
  w.q = reinterpret_cast<const uint8_t*>(q.data_ptr());
  w.scale = scale.data_ptr<float>();
  w.shift = shift.numel() ? shift.data_ptr<float>() : nullptr;
  w.n_exc = exc_ids.numel();
  w.exc_ids = w.n_exc ? exc_ids.data_ptr<int64_t>() : nullptr;
  w.exc_values = w.n_exc ? exc_values.data_ptr<float>() : nullptr;
  return w;
}

// Microseconds every lowbit_linear call waits before it returns: a test hook (lowbit_test_delay) that makes the
// kernel slow on purpose, so that the measured choice of the fp32 path can be shown.
std::atomic<int64_t> test_delay_us{0};

void wait_test_delay() {
  const int64_t us = test_delay_us.load(std::memory_order_relaxed);
  if (us <= 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  while (std::chrono::steady_clock::now() < until) {
  }
}

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& exc_ids,
                      const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w = view(q, scale, shift, exc_ids, exc_values, block, bits);
  at::Tensor out = at::empty({w.N, w.K}, scale.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) { specpass_lowbit::dequantize(w, n0, n1, op + n0 * w.K); });
  return out;
}

at::Tensor embedding(const at::Tensor& ids_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& exc_ids, const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w = view(q, scale, shift, exc_ids, exc_values, block, bits);
  const at::Tensor ids = ids_in.reshape(-1).to(at::kLong).contiguous();
  auto out_shape = ids_in.sizes().vec();
  out_shape.push_back(w.K);
  at::Tensor out = at::empty({ids.numel(), w.K}, scale.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < w.N, "lowbit_embedding: token id ", ip[i], " out of range [0, ", w.N, ")");
    specpass_lowbit::dequantize(w, ip[i], ip[i] + 1, op + i * w.K);
  }
  return out.reshape(out_shape);
}

// Blocks whose fp32 weights multiply faster than the kernel on this CPU (kernels/choice.py measures it when an
// engine is loaded): q's data pointer -> the weights rebuilt once, and for which calls to use them. The entry holds
// q itself, so the pointer cannot be reused by another tensor while it is registered.
struct Dense {
  at::Tensor q, weight;
  bool few_tokens, prefill;
  bool stationary;  // a few tokens as W @ x.T, else as linear: the order kernels/choice.py found faster here
};
std::mutex dense_mutex;
std::unordered_map<const void*, Dense> dense_weights;
std::atomic<bool> any_dense{false};

// More tokens than this are a prefill: rebuilt weight tiles multiplied by the BLAS kernel.
constexpr int64_t kPrefillTokens = 2 * specpass_lowbit::kMaxTokens;

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& shift,
                  const at::Tensor& exc_ids, const at::Tensor& exc_values, int64_t block, int64_t bits) {
  const Blocks w = view(q, scale, shift, exc_ids, exc_values, block, bits);
  const int64_t K = w.K, N = w.N;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == K, "lowbit: x must be fp32 with ", K, " columns");
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t T = x.size(0);
  if (any_dense.load(std::memory_order_relaxed)) {
    at::Tensor weight;
    bool stationary = true;
    {
      std::lock_guard<std::mutex> lock(dense_mutex);
      const auto it = dense_weights.find(q.data_ptr());
      if (it != dense_weights.end() && (T > kPrefillTokens ? it->second.prefill : it->second.few_tokens))
        weight = it->second.weight, stationary = it->second.stationary;
    }
    if (weight.defined()) {
      // contiguous, as the shape function promises: compiled callers index the result by its contiguous strides
      if (T > kPrefillTokens || !stationary) return at::linear(x, weight).contiguous().reshape(out_shape);
      // weight-stationary with a zero column, as passes/linear_operand_order.py computes fp32 layers
      const at::Tensor cols = at::cat({x, x.new_zeros({1, K})}).t();
      return at::mm(weight, cols).narrow(1, 0, T).t().contiguous().reshape(out_shape);
    }
  }
  at::Tensor y = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (T > kPrefillTokens) {
    // Each thread rebuilds 64 weight rows at a time into a buffer that stays in cache and multiplies them with the
    // BLAS kernel straight into y's columns; the whole fp32 matrix never exists.
    constexpr int64_t tile = 64;
    at::parallel_for(0, (N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(tile * K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * tile, n1 = std::min(N, n0 + tile);
        specpass_lowbit::dequantize(w, n0, n1, buf.data());
        at::Tensor out = y.slice(1, n0, n1);
        at::mm_out(out, x, at::from_blob(buf.data(), {n1 - n0, K}, x.options()).t());
      }
    });
  } else {
    // Rows split between threads, at least ~16k weights each (a thread's start costs microseconds); each thread
    // reads its rows once for up to kMaxTokens tokens.
    const int64_t grain = std::max<int64_t>(8, (1 << 14) / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t t = 0; t < T; t += specpass_lowbit::kMaxTokens) {
        const int m = static_cast<int>(std::min<int64_t>(specpass_lowbit::kMaxTokens, T - t));
        specpass_lowbit::matvec(w, m, xp + t * K, yp + t * N, n0, n1);
      }
    });
  }
  wait_test_delay();
  return y.reshape(out_shape);
}

std::string isa() { return specpass_lowbit::kIsa; }

void use_dense(const at::Tensor& q, const at::Tensor& weight, bool few_tokens, bool prefill, bool stationary) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.size(0) == q.size(0),
              "lowbit_use_dense: the weight must be the fp32 matrix of these blocks");
  std::lock_guard<std::mutex> lock(dense_mutex);
  if (few_tokens || prefill) {
    dense_weights[q.data_ptr()] = Dense{q, weight.contiguous(), few_tokens, prefill, stationary};
  } else {
    dense_weights.erase(q.data_ptr());
  }
  any_dense.store(!dense_weights.empty());
}

void test_delay(int64_t us) { test_delay_us.store(us); }

}  // namespace

TORCH_LIBRARY_IMPL(specpass, CPU, m) {
  m.impl("lowbit_linear", &linear);
  m.impl("lowbit_embedding", &embedding);
  m.impl("lowbit_dequantize", &dequantize);
}

// Defined here, not in Python: they exist only where a build of this file is loaded.
TORCH_LIBRARY_FRAGMENT(specpass, m) {
  m.def("lowbit_isa() -> str", &isa);
  m.def("lowbit_test_delay(int us) -> ()", &test_delay);
  m.def("lowbit_use_dense(Tensor q, Tensor weight, bool few_tokens, bool prefill, bool stationary=True) -> ()",
        &use_dense);
}

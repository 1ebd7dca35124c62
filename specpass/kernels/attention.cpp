// torch.ops.specpass.attention: softmax(q k^T * scale + mask) v for the few query rows of a decode or verify step
// (passes/fused_attention.py puts it where SDPA was).
//
// Written out as two batched matmuls around a softmax (passes/inline_attention.py), a layer's attention took about
// 30 us at a hundred cached tokens on a 2-core Xeon, for a few us of arithmetic: BLAS starts its threads for each
// tiny product and the softmax is a third parallel region. Here it is one parallel region. The keys are split
// between the threads (flash-decoding: Dao et al., 2023), so that one key/value head keeps both cores busy: each
// part keeps its rows' maximum score, sum of exponentials and unnormalized output, and the parts are merged as
// flash attention's online softmax merges blocks (Dao et al., 2022).
//
// The vector code is ATen's (at::vec, exp from Sleef), compiled for the ISA of the library it is built into: the
// build sets CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2 beside the matching -march. Only the order of the
// additions differs from the matmuls'. With many query rows a head (a token tree) the matmuls' blocking wins, and
// the operator calls them itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// More query rows a head than this, and the matmuls are faster (2-core Xeon: 9 rows of 64 features at 256 keys
// 35 vs 43 us; 12 rows of 256 at 512 keys 72 vs 69 us).
constexpr int64_t kMaxRows = 10;
// Keys a thread's part holds at least: below it, the merge and the threads' start cost more than they save.
constexpr int64_t kMinKeys = 32;

float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  for (; i + Vec::size() <= n; i += Vec::size()) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out[0..n) += p * v[0..n)
void axpy(float p, const float* v, float* out, int64_t n) {
  const Vec vp(p);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    at::vec::fmadd(vp, Vec::loadu(v + i), Vec::loadu(out + i)).store(out + i);
  for (; i < n; ++i) out[i] += p * v[i];
}

// One row against keys [w0, w1): the scores' maximum and sum of exponentials, and the unnormalized output.
struct Part {
  float max, sum;
};

Part row_part(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, const float* mask, int64_t ms,
              float scale, int64_t D, int64_t Dv, int64_t w0, int64_t w1, float* s, float* out) {
  const int64_t n = w1 - w0;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w = w0 + i;
    s[i] = dot(q, k + w * ks, D) * scale + mask[w * ms];
    top = std::max(top, s[i]);
  }
  if (top == -std::numeric_limits<float>::infinity()) {  // every key here is masked
    std::fill(out, out + Dv, 0.f);
    return {top, 0.f};
  }
  const Vec vtop(top);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(s + i) - vtop).exp();
    e.store(s + i);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - top);
    sum += s[i];
  }
  // out = sum_j s[j] * v[w0 + j]: four vectors of features at a time summed in registers over the keys
  constexpr int64_t L = Vec::size();
  int64_t d = 0;
  for (; d + 4 * L <= Dv; d += 4 * L) {
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = v + (w0 + j) * vs + d;
      const Vec p(s[j]);
      a0 = at::vec::fmadd(p, Vec::loadu(vr), a0);
      a1 = at::vec::fmadd(p, Vec::loadu(vr + L), a1);
      a2 = at::vec::fmadd(p, Vec::loadu(vr + 2 * L), a2);
      a3 = at::vec::fmadd(p, Vec::loadu(vr + 3 * L), a3);
    }
    a0.store(out + d), a1.store(out + d + L), a2.store(out + d + 2 * L), a3.store(out + d + 3 * L);
  }
  for (; d + L <= Dv; d += L) {
    Vec a(0.f);
    for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(s[j]), Vec::loadu(v + (w0 + j) * vs + d), a);
    a.store(out + d);
  }
  for (; d < Dv; ++d) {
    float a = 0.f;
    for (int64_t j = 0; j < n; ++j) a += s[j] * v[(w0 + j) * vs + d];
    out[d] = a;
  }
  return {top, sum};
}

at::Tensor attention_matmuls(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                             double scale) {
  return at::matmul(at::softmax(at::matmul(q * scale, k.transpose(-2, -1)) + mask, -1), v);
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& mask_in,
                     double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && mask_in.dim() == 4,
              "specpass::attention: q, k, v and mask must be 4-D (batch, heads, rows, features)");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
                  v_in.scalar_type() == at::kFloat && mask_in.scalar_type() == at::kFloat,
              "specpass::attention: fp32 tensors only");
  const int64_t B = q_in.size(0), H = q_in.size(1), R = q_in.size(2), D = q_in.size(3);
  const int64_t W = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D && v_in.size(0) == B &&
                  v_in.size(1) == H && v_in.size(2) == W,
              "specpass::attention: k and v must be (batch, heads, keys, features) like q");
  TORCH_CHECK((mask_in.size(0) == B || mask_in.size(0) == 1) && (mask_in.size(1) == H || mask_in.size(1) == 1) &&
                  mask_in.size(2) == R && mask_in.size(3) == W,
              "specpass::attention: the mask must be (batch or 1, heads or 1, rows, keys)");
  if (R > kMaxRows || W == 0) return attention_matmuls(q_in, k_in, v_in, mask_in, scale);
  // rows of features contiguous (a cache slice already is); batch, head and key strides are free
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor& mask = mask_in;
  at::Tensor out = at::empty({B, H, R, Dv}, q.options());

  // Each (batch, head) is split into P parts of the keys, so that every thread gets as many parts.
  const int64_t threads = at::get_num_threads();
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(threads / std::gcd(B * H, threads), W / kMinKeys));
  const int64_t chunk = (W + P - 1) / P;
  // per part and row: its maximum and sum, then Dv unnormalized outputs
  std::vector<float> parts(B * H * P * R * (2 + Dv));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), mh = mask.size(1) == 1 ? 0 : mask.stride(1);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * P, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(chunk);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * P), h = (i / P) % H, p = i % P;
      const int64_t w0 = p * chunk, w1 = std::min(W, w0 + chunk);
      const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t r = 0; r < R; ++r) {
        float* rec = parts.data() + (i * R + r) * (2 + Dv);
        const Part part = row_part(qp + ((b * H + h) * R + r) * D, kh, k.stride(2), vh, v.stride(2),
                                   mp + b * mb + h * mh + r * mask.stride(2), mask.stride(3), sc, D, Dv, w0,
                                   std::max(w0, w1), s.data(), rec + 2);
        rec[0] = part.max;
        rec[1] = part.sum;
      }
    }
  });
  // merge the parts of each row: rescale each to the row's maximum
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t r = 0; r < R; ++r) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < P; ++p) top = std::max(top, parts[((bh * P + p) * R + r) * (2 + Dv)]);
      float* o = op + (bh * R + r) * Dv;
      std::fill(o, o + Dv, 0.f);
      float sum = 0.f;
      for (int64_t p = 0; p < P; ++p) {
        const float* rec = parts.data() + ((bh * P + p) * R + r) * (2 + Dv);
        if (rec[1] == 0.f) continue;  // a part whose keys are all masked
        const float f = P == 1 ? 1.f : std::exp(rec[0] - top);
        sum += rec[1] * f;
        axpy(f, rec + 2, o, Dv);
      }
      const float inv = 1.f / sum;  // a row with every key masked: 0 / 0, NaN, as SDPA gives
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specpass, CPU, m) { m.impl("attention", &attention); }

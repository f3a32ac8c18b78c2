// Exact softmax attention for one CPU core, forward and backward, as XLA FFI handlers; the products go
// through the BLAS sgemm of cpu_blas.h. See model/cpu_attention.py for why and for the contract.
//
// Layouts are the model's own: q and dq [B, T, H, D], k, v, dk, dv [B, S, KV, D] (query head h reads
// key/value head h / (H / KV)), out [B, T, H, D]; the probabilities saved for the backward pass are
// probs [B, H, T, S]; mask [MB, T, S] (MB = 1 or B; nonzero = attend) when has_mask. The strided head
// slices are handed to BLAS with their row strides, so no head-major copy is ever made. In causal
// mode query rows run in blocks of `block` and each block stops at its last row's key: the key blocks
// above the diagonal are neither computed nor read (their probabilities are stored as zeros).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_blas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskedScore = -1e30f;  // the additive bias of a masked key, as model/layers.MASKED_SCORE

// exp(x) for x <= 0, written so that the compiler vectorizes the loops calling it (std::exp is a libm call
// per element): Cephes' expf polynomial on r = x - n ln 2, |r| <= ln 2 / 2, times 2^n built in the exponent
// bits. Relative error ~1e-7; below -87.3 (masked scores among them) the result is exactly 0.
inline float exp_nonpositive(float x) {
  const float y = std::max(x, -88.0f);  // keeps n in int range (masked scores are -1e30); the result is 0 then
  const float u = y * 1.44269504088896341f + 0.5f;
  int n = static_cast<int>(u);  // floor(u): truncation, one lower for negative non-integers
  n -= (static_cast<float>(n) > u) ? 1 : 0;
  const float r = y - static_cast<float>(n) * 0.693359375f + static_cast<float>(n) * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (n + 127) << 23;  // n >= -127 here; 2^-127 is only used where the result is 0 anyway
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : p * scale;
}

struct Dims {
  int64_t b, t, s, h, kv, d;
};

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "flaxpod cpu_attention: " + what);
}

// What both handlers check before touching memory: the sgemm is set, the shapes agree, block > 0.
ffi::Error CheckCall(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                     const ffi::Buffer<ffi::U8>& mask, bool has_mask, int64_t block, Dims* dims) {
  if (flaxpod_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "flaxpod cpu_attention: no sgemm set");
  if (block < 1) return Invalid("block must be positive");
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return Invalid("q, k and v must be 4-D");
  *dims = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != dims->b || kd[3] != dims->d || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3])
    return Invalid("k and v must be [B, S, KV, D] with q's B and D");
  if (dims->kv == 0 || dims->h % dims->kv != 0) return Invalid("query heads must be a multiple of key/value heads");
  if (has_mask && (md.size() != 3 || (md[0] != 1 && md[0] != dims->b) || md[1] != dims->t || md[2] != dims->s))
    return Invalid("mask must be [1 or B, T, S]");
  const int64_t most = 1 << 30;
  if (dims->h * dims->d > most || dims->kv * dims->d > most || dims->s > most || dims->t > most)
    return Invalid("a dimension exceeds BLAS's 32-bit range");
  return ffi::Error::Success();
}

// One (batch row, query head)'s pointers and strides.
struct Head {
  const float *q, *k, *v;
  int64_t q_ld, kv_ld;
};

Head HeadOf(const Dims& n, const float* q, const float* k, const float* v, int64_t b, int64_t h) {
  const int64_t kvh = h / (n.h / n.kv);
  return Head{q + (b * n.t * n.h + h) * n.d, k + (b * n.s * n.kv + kvh) * n.d, v + (b * n.s * n.kv + kvh) * n.d,
              n.h * n.d, n.kv * n.d};
}

// Keys the rows [t0, t0 + rows) can see: up to the last row's position when causal, else all.
int64_t KeysOf(const Dims& n, bool causal, int64_t t0, int64_t rows) { return causal ? std::min(t0 + rows, n.s) : n.s; }

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs,
                   bool causal, bool has_mask, int64_t block) {
  Dims n;
  if (auto error = CheckCall(q, k, v, mask, has_mask, block, &n); error.failure()) return error;
  const float scale = 1.0f / std::sqrt(static_cast<float>(n.d));
  const uint8_t* allowed = mask.typed_data();
  for (int64_t b = 0; b < n.b; ++b) {
    const uint8_t* mask_b = has_mask ? allowed + (mask.dimensions()[0] == 1 ? 0 : b) * n.t * n.s : nullptr;
    for (int64_t h = 0; h < n.h; ++h) {
      const Head hd = HeadOf(n, q.typed_data(), k.typed_data(), v.typed_data(), b, h);
      float* p_bh = probs->typed_data() + (b * n.h + h) * n.t * n.s;
      float* out_bh = out->typed_data() + (b * n.t * n.h + h) * n.d;
      for (int64_t t0 = 0; t0 < n.t; t0 += block) {
        const int64_t rows = std::min(block, n.t - t0), keys = KeysOf(n, causal, t0, rows);
        float* p = p_bh + t0 * n.s;
        row_major_gemm(false, true, rows, keys, n.d, scale, hd.q + t0 * hd.q_ld, hd.q_ld, hd.k, hd.kv_ld, 0.0f, p, n.s);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = p + i * n.s;
          const int64_t t = t0 + i;
          if (causal)
            for (int64_t j = t + 1; j < keys; ++j) row[j] += kMaskedScore;
          if (mask_b != nullptr)
            for (int64_t j = 0; j < keys; ++j) row[j] += mask_b[t * n.s + j] ? 0.0f : kMaskedScore;
          float top = row[0];
          for (int64_t j = 1; j < keys; ++j) top = std::max(top, row[j]);
          float sum = 0.0f;
          for (int64_t j = 0; j < keys; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
          }
          const float inverse = 1.0f / sum;
          for (int64_t j = 0; j < keys; ++j) row[j] *= inverse;
          std::fill(row + keys, row + n.s, 0.0f);
        }
        row_major_gemm(false, false, rows, n.d, keys, 1.0f, p, n.s, hd.v, hd.kv_ld, 0.0f, out_bh + t0 * hd.q_ld, hd.q_ld);
      }
    }
  }
  return ffi::Error::Success();
}

// dS = P * (dP - rowsum(dO * O)), dP = dO V^T; dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> probs,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool causal, bool has_mask, int64_t block) {
  Dims n;
  if (auto error = CheckCall(q, k, v, mask, has_mask, block, &n); error.failure()) return error;
  const float scale = 1.0f / std::sqrt(static_cast<float>(n.d));
  std::fill(dk->typed_data(), dk->typed_data() + n.b * n.s * n.kv * n.d, 0.0f);  // accumulated over heads and blocks
  std::fill(dv->typed_data(), dv->typed_data() + n.b * n.s * n.kv * n.d, 0.0f);
  std::vector<float> ds(static_cast<size_t>(std::min(block, n.t) * n.s));
  for (int64_t b = 0; b < n.b; ++b) {
    for (int64_t h = 0; h < n.h; ++h) {
      const Head hd = HeadOf(n, q.typed_data(), k.typed_data(), v.typed_data(), b, h);
      const int64_t kv_offset = hd.k - k.typed_data();  // the same offset in dk and dv
      const int64_t q_offset = hd.q - q.typed_data();   // the same offset in out, d_out and dq
      const float* p_bh = probs.typed_data() + (b * n.h + h) * n.t * n.s;
      for (int64_t t0 = 0; t0 < n.t; t0 += block) {
        const int64_t rows = std::min(block, n.t - t0), keys = KeysOf(n, causal, t0, rows);
        const float* p = p_bh + t0 * n.s;
        const float* d_o = d_out.typed_data() + q_offset + t0 * hd.q_ld;
        const float* o = out.typed_data() + q_offset + t0 * hd.q_ld;
        row_major_gemm(false, true, rows, keys, n.d, 1.0f, d_o, hd.q_ld, hd.v, hd.kv_ld, 0.0f, ds.data(), n.s);
        for (int64_t i = 0; i < rows; ++i) {
          float delta = 0.0f;
          for (int64_t c = 0; c < n.d; ++c) delta += d_o[i * hd.q_ld + c] * o[i * hd.q_ld + c];
          float* row = ds.data() + i * n.s;
          const float* p_row = p + i * n.s;
          for (int64_t j = 0; j < keys; ++j) row[j] = p_row[j] * (row[j] - delta);
        }
        row_major_gemm(false, false, rows, n.d, keys, scale, ds.data(), n.s, hd.k, hd.kv_ld, 0.0f,
                       dq->typed_data() + q_offset + t0 * hd.q_ld, hd.q_ld);
        row_major_gemm(true, false, keys, n.d, rows, scale, ds.data(), n.s, hd.q + t0 * hd.q_ld, hd.q_ld, 1.0f,
                       dk->typed_data() + kv_offset, hd.kv_ld);
        row_major_gemm(true, false, keys, n.d, rows, 1.0f, p, n.s, d_o, hd.q_ld, 1.0f, dv->typed_data() + kv_offset,
                       hd.kv_ld);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxpodAttentionForwardF32, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxpodAttentionBackwardF32, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<int64_t>("block"));

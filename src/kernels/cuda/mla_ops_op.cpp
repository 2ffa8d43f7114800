// CUDA MLA ops: the argument checks shared with the CPU reference (kernels/mla_checks.h, tensors
// on the CUDA device of the op's output), the CUDA limits, then the launchers in mla_ops.cu.
#include "core/cuda_check.h"
#include "kernels/cuda/mla_ops.h"
#include "kernels/cuda/mla_ops_launch.h"
#include "kernels/mla_checks.h"

namespace moelora::cuda {

using namespace detail;

namespace {

cudaStream_t raw(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

// The CUDA device of `t` (every tensor of the op must be on it).
Device gpu_of(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  MOELORA_CHECK(t.device().is_cuda(), "{}: expected a CUDA tensor, found {}", what, t.describe());
  return t.device();
}

MlaLoraArgs lora_args(const Tensor& token_slot, const Tensor& A, const Tensor& B,
                      const Tensor& ranks, const MlaLoraOpDims& d, int heads, int nope, int rope,
                      int vd, const char* op) {
  MOELORA_CHECK(d.lora.r <= kMlaMaxLoraRank, "cuda {}: LoRA r_max {} > {} is not supported", op,
                d.lora.r, kMlaMaxLoraRank);
  MlaLoraArgs a{};
  a.token_slot = token_slot.data<int32_t>();
  a.A = A.data();
  a.B = B.data();
  a.ranks = ranks.data<int32_t>();
  a.m = d.m;
  a.L = d.L;
  a.r_max = d.lora.r;
  a.heads = heads;
  a.nope = nope;
  a.rope = rope;
  a.vd = vd;
  return a;
}

}  // namespace

void mla_rope(Tensor& x, int head_stride, int rope_offset, int rope_dim, const Tensor& positions,
              double theta, bool interleaved, const Stream& stream, const Tensor& inv_freq,
              float cos_sin_scale) {
  const bool xb = check_mla_rope(x, head_stride, rope_offset, rope_dim, positions, theta,
                                 gpu_of(x, "mla_rope x"), inv_freq, cos_sin_scale);
  MOELORA_CUDA_CHECK(launch_mla_rope(x.data(), xb, x.size(0), x.size(1), head_stride, rope_offset,
                                     rope_dim, positions.data<int32_t>(), float(theta),
                                     inv_freq.defined() ? inv_freq.data<float>() : nullptr,
                                     cos_sin_scale, interleaved, raw(stream)));
}

void mla_cache_write(const Tensor& kv, const Tensor& slot_mapping, Tensor& cache,
                     const Stream& stream) {
  const MlaCacheDims c =
      check_mla_cache_write(kv, slot_mapping, cache, gpu_of(cache, "MLA cache"));
  MOELORA_CUDA_CHECK(launch_mla_cache_write(kv.data(), kv.dtype() == DType::bf16,
                                            slot_mapping.data<int32_t>(), cache.data(), c.bf16,
                                            kv.size(0), c.row, raw(stream)));
}

void mla_absorb_q(const Tensor& q, const Tensor& w_kv_b, int heads, int nope, int rope, int vd,
                  Tensor& q_latent, const Stream& stream) {
  const int64_t L = check_mla_absorb_q(q, w_kv_b, heads, nope, rope, vd, q_latent,
                                       gpu_of(q_latent, "mla_absorb_q q_latent"));
  MOELORA_CUDA_CHECK(launch_mla_absorb_q(q.data(), q.dtype() == DType::bf16, w_kv_b.data(),
                                         q_latent.data<float>(), q.size(0), heads, nope, rope, vd,
                                         L, raw(stream)));
}

void mla_paged_attention(const Tensor& q_latent, const Tensor& cache, const Tensor& block_table,
                         const Tensor& token_seq, const Tensor& token_pos, int heads, float scale,
                         Tensor& latent, const Stream& stream) {
  const MlaAttentionDims d =
      check_mla_paged_attention(q_latent, cache, block_table, token_seq, token_pos, heads, latent,
                                gpu_of(latent, "mla_attention latent"));
  MOELORA_CHECK(d.cache.row <= kMlaMaxRow,
                "cuda mla_paged_attention: cache rows of {} (L + rope) > {} are not supported",
                d.cache.row, kMlaMaxRow);
  MlaAttentionArgs a{};
  a.q_latent = q_latent.data<float>();
  a.cache = cache.data();
  a.cache_bf16 = d.cache.bf16;
  a.block_table = block_table.data<int32_t>();
  a.token_seq = token_seq.data<int32_t>();
  a.token_pos = token_pos.data<int32_t>();
  a.latent = latent.data<float>();
  a.m = d.m;
  a.heads = heads;
  a.L = int(d.L);
  a.row = int(d.cache.row);
  a.page_size = int(d.cache.page);
  a.max_pages = int(d.max_pages);
  a.scale = scale;
  MOELORA_CUDA_CHECK(launch_mla_paged_attention(a, raw(stream)));
}

void mla_absorb_v(const Tensor& latent, const Tensor& w_kv_b, int heads, int nope, int vd,
                  Tensor& out, const Stream& stream) {
  const int64_t L =
      check_mla_absorb_v(latent, w_kv_b, heads, nope, vd, out, gpu_of(out, "mla_absorb_v out"));
  MOELORA_CUDA_CHECK(launch_mla_absorb_v(latent.data<float>(), w_kv_b.data(), out.data(),
                                         out.dtype() == DType::bf16, latent.size(0), heads, nope,
                                         vd, L, raw(stream)));
}

void mla_lora_absorb_q(const Tensor& q, const Tensor& token_slot, const Tensor& A,
                       const Tensor& B, const Tensor& ranks, int heads, int nope, int rope,
                       int vd, Tensor& q_latent, const Stream& stream) {
  const MlaLoraOpDims d =
      check_mla_lora_absorb_q(q, token_slot, A, B, ranks, heads, nope, rope, vd, q_latent,
                              gpu_of(q_latent, "mla_lora_absorb_q q_latent"));
  const MlaLoraArgs a =
      lora_args(token_slot, A, B, ranks, d, heads, nope, rope, vd, "mla_lora_absorb_q");
  MOELORA_CUDA_CHECK(launch_mla_lora_absorb_q(a, q.data(), q.dtype() == DType::bf16,
                                              q_latent.data<float>(), raw(stream)));
}

void mla_lora_absorb_v(const Tensor& latent, const Tensor& token_slot, const Tensor& A,
                       const Tensor& B, const Tensor& ranks, int heads, int nope, int vd,
                       Tensor& out, const Stream& stream) {
  const MlaLoraOpDims d =
      check_mla_lora_absorb_v(latent, token_slot, A, B, ranks, heads, nope, vd, out,
                              gpu_of(out, "mla_lora_absorb_v out"));
  const MlaLoraArgs a =
      lora_args(token_slot, A, B, ranks, d, heads, nope, 0, vd, "mla_lora_absorb_v");
  MOELORA_CUDA_CHECK(
      launch_mla_lora_absorb_v(a, latent.data<float>(), out.data<float>(), raw(stream)));
}

void mla_gather_latent(const Tensor& cache, const Tensor& block_table, int seq, int64_t len,
                       Tensor& out, const Stream& stream) {
  const MlaCacheDims c = check_mla_gather_latent(cache, block_table, seq, len, out,
                                                 gpu_of(out, "mla_gather_latent out"));
  const int32_t* row = block_table.data<int32_t>() + int64_t(seq) * block_table.size(1);
  MOELORA_CUDA_CHECK(launch_mla_gather_latent(cache.data(), c.bf16, row, int(c.page), len, c.row,
                                              out.data<float>(), raw(stream)));
}

void mla_expanded_attention(const Tensor& q, const Tensor& kv_b_out, const Tensor& latent,
                            const Tensor& token_pos, int heads, int nope, int rope, int vd,
                            float scale, Tensor& out, const Stream& stream) {
  const MlaExpandedDims d =
      check_mla_expanded_attention(q, kv_b_out, latent, token_pos, heads, nope, rope, vd, out,
                                   gpu_of(out, "mla_expanded_attention out"));
  MOELORA_CHECK(nope + rope <= kMlaMaxHeadDim && vd <= kMlaMaxHeadDim,
                "cuda mla_expanded_attention: head dims nope + rope = {} and vd = {} must be <= "
                "{}",
                nope + rope, vd, kMlaMaxHeadDim);
  MlaExpandedArgs a{};
  a.q = q.data<float>();
  a.kv_b_out = kv_b_out.data<float>();
  a.latent = latent.data<float>();
  a.token_pos = token_pos.data<int32_t>();
  a.out = out.data<float>();
  a.n = d.n;
  a.row = d.row;
  a.L = d.L;
  a.heads = heads;
  a.nope = nope;
  a.rope = rope;
  a.vd = vd;
  a.scale = scale;
  MOELORA_CUDA_CHECK(launch_mla_expanded_attention(a, raw(stream)));
}

}  // namespace moelora::cuda

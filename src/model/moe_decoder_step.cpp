// MoeDecoder: validation and per-token tables of one forward step, and the buffers every step
// reuses.
#include <algorithm>

#include "model/moe_decoder_impl.h"

#ifdef MOELORA_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace moelora {
namespace {

// Host i32 staging for the step tables: pinned on CUDA (the upload is then a true async DMA).
Tensor host_staging(int64_t n, Device model_device) {
#ifdef MOELORA_WITH_CUDA
  if (model_device.is_cuda()) {
    void* p = nullptr;
    MOELORA_CUDA_CHECK(cudaHostAlloc(&p, size_t(n) * sizeof(int32_t), cudaHostAllocDefault));
    return Tensor::wrap(p, {n}, DType::i32, Device::cpu(),
                        std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); }));
  }
#else
  (void)model_device;
#endif
  return Tensor::empty({n}, DType::i32);
}

}  // namespace

void MoeDecoder::reserve_workspace() {
  const HfModelConfig& c = config_;
  const int64_t T = options_.max_step_tokens, H = c.hidden_size, D = c.head_dim;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  const Device d = device_;
  for (StepBuffer* b : {&ws_.h, &ws_.xn, &ws_.delta}) b->get(T, H, DType::f32, d);
  ws_.xb.get(T, H, DType::bf16, d);
  ws_.qkv.get(T, nq + 2 * nkv, DType::f32, d);
  ws_.q.get(T, nq, DType::f32, d);
  ws_.attn.get(T, nq, DType::f32, d);
  for (StepBuffer* b : {&ws_.k, &ws_.v}) b->get(T, nkv, DType::f32, d);
  for (StepBuffer* b : {&ws_.last_h, &ws_.last_n}) b->get(T, H, DType::f32, d);
  if (num_moe_layers_ > 0) {
    ws_.router_logits.get(T, c.moe_shape().num_experts, DType::f32, d);
    ws_.moe_y.get(T, H, DType::bf16, d);
  }
  if (num_moe_layers_ < c.num_hidden_layers) {
    ws_.gate_up.get(T, 2 * c.intermediate_size, DType::f32, d);
    ws_.act.get(T, c.intermediate_size, DType::f32, d);
  }
  if (options_.lora_slots > 0) {
    ws_.attn_b.get(T, nq, DType::bf16, d);
    if (num_moe_layers_ < c.num_hidden_layers)
      ws_.act_b.get(T, c.intermediate_size, DType::bf16, d);
    ws_.lora_u.get(T, 3 * int64_t(options_.lora_r_max), DType::f32, d);  // qkv: 3 slices
  }
  // ws_.out (logits: V columns per row) grows on the first step, to what steps really use.
}

StepDims MoeDecoder::validate_step(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                   LoraBatchState& lb) {
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!batch.empty(), "forward: empty batch");
  const KvCacheConfig& kc = cache.config();
  MOELORA_CHECK(kc.num_layers == c.num_hidden_layers && kc.num_kv_heads == c.num_key_value_heads &&
                    kc.head_dim == c.head_dim,
                "forward: KV cache has {} layers x {} KV heads x {} dims, the model needs "
                "{} x {} x {}",
                kc.num_layers, kc.num_kv_heads, kc.head_dim, c.num_hidden_layers,
                c.num_key_value_heads, c.head_dim);
  MOELORA_CHECK(kc.device == device_,
                "forward: KV cache on {}, the model on {} (build the cache from "
                "Model::kv_cache_config)",
                kc.device.str(), device_.str());
  // Validate everything before the cache changes.
  StepDims d;
  std::vector<int> seen;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqInput& s = batch[b];
    MOELORA_CHECK(!s.tokens.empty(), "forward: sequence {} (batch entry {}) has no tokens", s.seq,
                  b);
    for (int32_t tok : s.tokens)
      MOELORA_CHECK(tok >= 0 && tok < c.vocab_size,
                    "forward: sequence {}: token id {} is outside the vocabulary [0, {})", s.seq,
                    tok, c.vocab_size);
    MOELORA_CHECK(std::find(seen.begin(), seen.end(), s.seq) == seen.end(),
                  "forward: sequence {} appears twice in one step", s.seq);
    seen.push_back(s.seq);
    const int64_t new_len = cache.length(s.seq) + int64_t(s.tokens.size());
    if (!cache.can_reserve(s.seq, new_len)) cache.reserve(s.seq, new_len);  // throws the reason
    if (s.adapter_slot >= 0) {
      check_slot(s.adapter_slot);
      MOELORA_CHECK(adapter_loaded(s.adapter_slot),
                    "forward: sequence {} asks for adapter slot {}, which holds no adapter", s.seq,
                    s.adapter_slot);
      lb.any = true;
    } else {
      MOELORA_CHECK(s.adapter_slot == -1,
                    "forward: sequence {}: adapter slot {} (expected -1 or a slot)", s.seq,
                    s.adapter_slot);
    }
    d.m += int64_t(s.tokens.size());
  }
  d.s = int64_t(batch.size());
  d.p = 1;
  for (const SeqInput& s : batch) {
    cache.reserve(s.seq, cache.length(s.seq) + int64_t(s.tokens.size()));
    d.p = std::max<int64_t>(d.p, int64_t(cache.pages(s.seq).size()));
  }
  return d;
}

void MoeDecoder::build_tables(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                              const StepDims& d, int64_t rows, int64_t pages, Tensor dst,
                              StepTables& t, LoraBatchState& lb) {
  // One packed i32 table: ids, positions, token_seq, slots, token_slot [R each], last_row
  // [Sr], block_table [Sr, P]; built in host staging, uploaded in one copy on CUDA. Padded
  // (rows > M: decode steps only, one token per sequence) rows are their own sequences.
  const int64_t R = rows, Sr = rows > d.m ? rows : d.s, P = pages;
  const int64_t n = 5 * R + Sr + Sr * P;
  if (upload_pending_) stream_.synchronize();  // a failed step may have left a copy in flight
  if (!staging_.defined() || staging_.numel() < n)
    staging_ = host_staging(std::max<int64_t>(n, 4096), device_);
  int32_t* base = staging_.data<int32_t>();
  int32_t *ids = base, *pos = ids + R, *seq = pos + R, *slots = seq + R, *tslot = slots + R;
  int32_t *last = tslot + R, *bt = last + Sr;
  int64_t m = 0;
  for (int64_t b = 0; b < d.s; ++b) {
    const SeqInput& s = batch[size_t(b)];
    const std::vector<int32_t>& pg = cache.pages(s.seq);
    for (int64_t j = 0; j < P; ++j) bt[b * P + j] = j < int64_t(pg.size()) ? pg[size_t(j)] : -1;
    const int64_t start = cache.length(s.seq);
    for (size_t i = 0; i < s.tokens.size(); ++i, ++m) {
      ids[m] = s.tokens[i];
      pos[m] = int32_t(start + int64_t(i));
      seq[m] = int32_t(b);
      slots[m] = cache.slot(s.seq, start + int64_t(i));
      tslot[m] = s.adapter_slot;
    }
    last[b] = int32_t(m - 1);
  }
  for (int64_t r = d.m; r < R; ++r) {
    ids[r] = 0, pos[r] = 0, seq[r] = int32_t(r), slots[r] = -1, tslot[r] = -1;
    last[r] = int32_t(r);
    bt[r * P] = 0;
    for (int64_t j = 1; j < P; ++j) bt[r * P + j] = -1;
  }
  Tensor packed = staging_.narrow(0, 0, n);
  if (device_.is_cuda()) {
    Tensor dev = dst.narrow(0, 0, n);
    dev.copy_from(packed, &stream_);
    upload_pending_ = true;
    packed = dev;
  }
  t.ids = packed.narrow(0, 0, R);
  t.positions = packed.narrow(0, R, R);
  t.token_seq = packed.narrow(0, 2 * R, R);
  t.slots = packed.narrow(0, 3 * R, R);
  lb.token_slot = packed.narrow(0, 4 * R, R);
  t.last_row = packed.narrow(0, 5 * R, Sr);
  t.block_table = packed.narrow(0, 5 * R + Sr, Sr * P).view({Sr, P});
}

}  // namespace moelora

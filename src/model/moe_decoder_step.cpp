// MoeDecoder: validation and per-token tables of one forward step.
#include <algorithm>

#include "model/moe_decoder_impl.h"

namespace moelora {

void MoeDecoder::prepare_step(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                              StepTables& t, LoraBatchState& lb,
                              std::vector<int64_t>& last_row) const {
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!batch.empty(), "forward: empty batch");
  const KvCacheConfig& kc = cache.config();
  MOELORA_CHECK(kc.num_layers == c.num_hidden_layers && kc.num_kv_heads == c.num_key_value_heads &&
                    kc.head_dim == c.head_dim,
                "forward: KV cache has {} layers x {} KV heads x {} dims, the model needs "
                "{} x {} x {}",
                kc.num_layers, kc.num_kv_heads, kc.head_dim, c.num_hidden_layers,
                c.num_key_value_heads, c.head_dim);
  // Validate everything before the cache changes.
  int64_t M = 0;
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
    M += int64_t(s.tokens.size());
  }
  const int64_t S = int64_t(batch.size());
  int64_t max_pages = 1;
  for (const SeqInput& s : batch) {
    cache.reserve(s.seq, cache.length(s.seq) + int64_t(s.tokens.size()));
    max_pages = std::max<int64_t>(max_pages, int64_t(cache.pages(s.seq).size()));
  }
  t.ids = Tensor::empty({M}, DType::i32);
  t.positions = Tensor::empty({M}, DType::i32);
  t.token_seq = Tensor::empty({M}, DType::i32);
  t.slots = Tensor::empty({M}, DType::i32);
  t.block_table = Tensor::empty({S, max_pages}, DType::i32);
  lb.token_slot = Tensor::empty({M}, DType::i32);
  last_row.assign(size_t(S), 0);
  int64_t m = 0;
  int32_t* bt = t.block_table.data<int32_t>();
  for (int64_t b = 0; b < S; ++b) {
    const SeqInput& s = batch[size_t(b)];
    const std::vector<int32_t>& pages = cache.pages(s.seq);
    for (int64_t j = 0; j < max_pages; ++j)
      bt[b * max_pages + j] = j < int64_t(pages.size()) ? pages[size_t(j)] : -1;
    const int64_t start = cache.length(s.seq);
    for (size_t i = 0; i < s.tokens.size(); ++i, ++m) {
      t.ids.data<int32_t>()[m] = s.tokens[i];
      t.positions.data<int32_t>()[m] = int32_t(start + int64_t(i));
      t.token_seq.data<int32_t>()[m] = int32_t(b);
      t.slots.data<int32_t>()[m] = cache.slot(s.seq, start + int64_t(i));
      lb.token_slot.data<int32_t>()[m] = s.adapter_slot;
    }
    last_row[size_t(b)] = m - 1;
  }
}

}  // namespace moelora

#include "moelora/model/kv_cache.h"

#include <atomic>

namespace moelora {

namespace {
std::atomic<uint64_t> g_next_cache_id{1};
}  // namespace

PagedKvCache::PagedKvCache(const KvCacheConfig& c) : config_(c), id_(g_next_cache_id++) {
  MOELORA_CHECK(c.num_layers > 0 && c.num_kv_heads > 0 && c.head_dim > 0,
                "KV cache: num_layers, num_kv_heads and head_dim must be > 0, found {}, {}, {}",
                c.num_layers, c.num_kv_heads, c.head_dim);
  MOELORA_CHECK(c.page_size > 0, "KV cache: page_size must be > 0, found {}", c.page_size);
  MOELORA_CHECK(c.num_pages > 0 && c.num_pages <= INT32_MAX / c.page_size,
                "KV cache: num_pages must be in 1..{}, found {}", INT32_MAX / c.page_size,
                c.num_pages);
  MOELORA_CHECK(c.max_seq_len > 0, "KV cache: max_seq_len must be > 0, found {}", c.max_seq_len);
  MOELORA_CHECK(c.max_seqs > 0, "KV cache: max_seqs must be > 0, found {}", c.max_seqs);
  MOELORA_CHECK(c.dtype == DType::f32 || c.dtype == DType::bf16,
                "KV cache: dtype must be f32 or bf16, found {}", dtype_name(c.dtype));
  for (int l = 0; l < c.num_layers; ++l) {
    k_.push_back(
        Tensor::zeros({c.num_pages, c.page_size, c.num_kv_heads, c.head_dim}, c.dtype, c.device));
    if (!c.key_only)
      v_.push_back(
          Tensor::zeros({c.num_pages, c.page_size, c.num_kv_heads, c.head_dim}, c.dtype, c.device));
  }
  // Stack: page 0 is handed out first.
  for (int64_t p = c.num_pages - 1; p >= 0; --p) free_.push_back(int32_t(p));
  seqs_.resize(size_t(c.max_seqs));
}

const PagedKvCache::Seq& PagedKvCache::seq_ref(int seq) const {
  MOELORA_CHECK(seq >= 0 && seq < int(seqs_.size()) && seqs_[size_t(seq)].alive,
                "KV cache: sequence {} does not exist", seq);
  return seqs_[size_t(seq)];
}

int PagedKvCache::add_sequence() {
  for (size_t i = 0; i < seqs_.size(); ++i)
    if (!seqs_[i].alive) {
      seqs_[i] = Seq{true, 0, {}};
      return int(i);
    }
  MOELORA_THROW("KV cache: {} sequences are alive, the configured maximum", seqs_.size());
}

bool PagedKvCache::can_reserve(int seq, int64_t new_len) const {
  const Seq& s = seq_ref(seq);
  if (new_len > config_.max_seq_len) return false;
  const int64_t extra = pages_needed(new_len) - int64_t(s.pages.size());
  return extra <= free_pages();
}

void PagedKvCache::reserve(int seq, int64_t new_len) {
  const Seq& s = seq_ref(seq);
  MOELORA_CHECK(new_len <= config_.max_seq_len,
                "KV cache: sequence of {} tokens exceeds the model's context of {} "
                "(max_position_embeddings)",
                new_len, config_.max_seq_len);
  const int64_t extra = pages_needed(new_len) - int64_t(s.pages.size());
  MOELORA_CHECK(extra <= free_pages(),
                "KV cache budget exhausted: {} tokens need {} more page(s) of {} tokens, {} of {} "
                "are free",
                new_len, extra, config_.page_size, free_pages(), config_.num_pages);
  Seq& w = seqs_[size_t(seq)];
  for (int64_t i = 0; i < extra; ++i) {
    w.pages.push_back(free_.back());
    free_.pop_back();
  }
}

void PagedKvCache::free_sequence(int seq) {
  const Seq& s = seq_ref(seq);
  for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) free_.push_back(*it);
  seqs_[size_t(seq)] = Seq{};
}

int64_t PagedKvCache::length(int seq) const {
  return seq_ref(seq).length;
}

void PagedKvCache::advance(int seq, int64_t n) {
  const Seq& s = seq_ref(seq);
  MOELORA_CHECK(n >= 0 && s.length + n <= int64_t(s.pages.size()) * config_.page_size,
                "KV cache: sequence {} advanced by {} past its reservation ({} of {} tokens)", seq,
                n, s.length, int64_t(s.pages.size()) * config_.page_size);
  seqs_[size_t(seq)].length += n;
}

const std::vector<int32_t>& PagedKvCache::pages(int seq) const {
  return seq_ref(seq).pages;
}

int32_t PagedKvCache::slot(int seq, int64_t pos) const {
  const Seq& s = seq_ref(seq);
  MOELORA_CHECK(pos >= 0 && pos < int64_t(s.pages.size()) * config_.page_size,
                "KV cache: position {} of sequence {} is not reserved ({} tokens)", pos, seq,
                int64_t(s.pages.size()) * config_.page_size);
  return s.pages[size_t(pos / config_.page_size)] * config_.page_size +
         int32_t(pos % config_.page_size);
}

}  // namespace moelora

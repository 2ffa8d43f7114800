// Paged KV cache: a fixed budget of pages of `page_size` tokens per layer, and per sequence a
// page table. It lives in model/ (not engine/) because the model's attention reads and writes
// it while the engine only decides which sequences get pages: the layers only point down, so
// the type both use sits in the lower layer.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/core/tensor.h"

namespace moelora {

struct KvCacheConfig {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 16;         // tokens per page
  int64_t num_pages = 0;      // the budget, shared by all sequences
  int64_t max_seq_len = 0;    // longest sequence allowed (the model's max_position_embeddings)
  int max_seqs = 256;         // sequences alive at once
  DType dtype = DType::bf16;  // f32 or bf16
  Device device = Device::cpu();
  // Only k() pages (MLA caches one latent row per token, there is no separate V).
  bool key_only = false;
};

class PagedKvCache {
 public:
  explicit PagedKvCache(const KvCacheConfig& config);

  const KvCacheConfig& config() const { return config_; }
  // Unique in the process, never reused: what a captured decode graph (which holds this cache's
  // buffer addresses) is bound to.
  uint64_t id() const { return id_; }
  // A new, empty sequence; returns its id (reused after free_sequence). Throws when max_seqs
  // sequences are alive.
  int add_sequence();
  // Makes room for `new_len` tokens in total (allocating pages as needed). Throws, allocating
  // nothing, when new_len exceeds max_seq_len or the free pages do not suffice (the message
  // gives both numbers).
  void reserve(int seq, int64_t new_len);
  // Whether reserve(seq, new_len) would succeed.
  bool can_reserve(int seq, int64_t new_len) const;
  // Returns the sequence's pages to the budget.
  void free_sequence(int seq);

  // Tokens whose K/V are in the cache.
  int64_t length(int seq) const;
  // Advances the length after a step wrote `n` tokens (must stay within the reservation).
  void advance(int seq, int64_t n);
  const std::vector<int32_t>& pages(int seq) const;
  // Cache slot (page * page_size + offset) of position `pos` of `seq` (reserved).
  int32_t slot(int seq, int64_t pos) const;

  int64_t free_pages() const { return int64_t(free_.size()); }
  int64_t pages_needed(int64_t tokens) const {
    return (tokens + config_.page_size - 1) / config_.page_size;
  }
  // [num_pages, page_size, kv_heads, head_dim] per layer.
  Tensor& k(int layer) { return k_.at(size_t(layer)); }
  Tensor& v(int layer) { return v_.at(size_t(layer)); }  // not with key_only

 private:
  struct Seq {
    bool alive = false;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  const Seq& seq_ref(int seq) const;

  KvCacheConfig config_;
  uint64_t id_ = 0;
  std::vector<Tensor> k_, v_;
  std::vector<int32_t> free_;  // free page ids (a stack)
  std::vector<Seq> seqs_;
};

}  // namespace moelora

// CUDA graphs for decode steps (the fast decode path, issue 5; internal). A model keeps one
// DecodeGraphs: a graph per (batch bucket, block-table width bucket, LoRA on/off, KV cache),
// captured the first time a decode step meets that key and replayed after (graphs of one KV
// cache are kept at a time). The step's tables
// live in a device buffer owned by the graph's entry (fixed address): a step writes them with
// one upload before the replay. Adapter slots, token -> slot maps and routing are device data,
// so a different adapter mix, or a new adapter in a slot, needs no re-capture.
//
// What invalidates a graph: one of the model's step buffers reallocated since the capture (the
// workspace's `moves` count: a longer prefill grew one), or set_decode_options. The entry is
// then captured again on its next use.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <tuple>
#include <vector>

#include "moelora/core/graph.h"
#include "moelora/core/tensor.h"
#include "moelora/model/model.h"

namespace moelora {

class DecodeGraphs {
 public:
  struct Key {
    int64_t rows = 0;    // the batch bucket: sequences padded up to it
    int64_t pages = 0;   // block-table width (a power of two)
    bool lora = false;   // the graph runs the LoRA kernels
    uint64_t cache = 0;  // PagedKvCache::id(): a graph is bound to one cache's buffers
    bool operator<(const Key& o) const {
      return std::tie(rows, pages, lora, cache) < std::tie(o.rows, o.pages, o.lora, o.cache);
    }
  };
  struct Entry {
    CudaGraph graph;
    Tensor tables;       // i32 on the device, the step tables the graph reads
    uint64_t moves = 0;  // the workspace's buffer reallocations at capture
    // Captured, and no step buffer moved since (`moves`: the workspace's count now).
    bool current(uint64_t moves_now) const { return graph.valid() && moves == moves_now; }
  };

  // Drops every graph; `enabled` with the bucket bound (max_batch, at most max_tokens).
  void configure(bool enabled, int64_t max_batch, int64_t max_tokens);
  bool enabled() const { return !buckets_.empty(); }
  // The bucket a decode batch of `seqs` sequences pads to; 0: more than the largest (eager).
  int64_t bucket(int64_t seqs) const;
  // The block-table width a step needing `pages` pages per row pads to.
  static int64_t page_bucket(int64_t pages);
  // The entry for `key`, with its table buffer of `table_elems` i32 on `device` (new: no
  // graph yet).
  Entry& entry(const Key& key, int64_t table_elems, Device device);
  // One decode step through `e`: a replay when its graph is current (`moves`: the workspace's
  // count now), else `step` run eagerly (this step's results; it also sizes every lazily grown
  // buffer and loads every kernel), `stream` synchronized, and the same work captured for the
  // next steps (capturing enqueues nothing, so the eager results stand). Counted in `stats`.
  static void run(Entry& e, uint64_t moves, const Stream& stream, const std::function<void()>& step,
                  Model::DecodeStats& stats);
  const std::vector<int64_t>& buckets() const { return buckets_; }
  size_t size() const { return graphs_.size(); }

 private:
  std::vector<int64_t> buckets_;
  std::map<Key, Entry> graphs_;
  uint64_t cache_ = 0;  // the cache the graphs are bound to
};

}  // namespace moelora

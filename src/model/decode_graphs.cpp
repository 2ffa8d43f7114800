#include "model/decode_graphs.h"

#include <algorithm>

namespace moelora {

void DecodeGraphs::configure(bool enabled, int64_t max_batch, int64_t max_tokens) {
  graphs_.clear();
  buckets_.clear();
  if (!enabled) return;
  MOELORA_CHECK(max_batch >= 1, "DecodeOptions: max_batch must be >= 1, found {}", max_batch);
  const int64_t top = std::min(max_batch, max_tokens);
  for (int64_t b : {1, 2, 4, 8})
    if (b < top) buckets_.push_back(b);
  for (int64_t b = 16; b < top; b += 16) buckets_.push_back(b);
  buckets_.push_back(top);
}

int64_t DecodeGraphs::bucket(int64_t seqs) const {
  const auto it = std::lower_bound(buckets_.begin(), buckets_.end(), seqs);
  return it == buckets_.end() ? 0 : *it;
}

int64_t DecodeGraphs::page_bucket(int64_t pages) {
  int64_t p = 8;
  while (p < pages) p *= 2;
  return p;
}

DecodeGraphs::Entry& DecodeGraphs::entry(const Key& key, int64_t table_elems, Device device) {
  // Graphs of one cache at a time: a model moved to another cache drops the old one's (they
  // hold its buffers' addresses and device memory of their own).
  if (key.cache != cache_) {
    graphs_.clear();
    cache_ = key.cache;
  }
  Entry& e = graphs_[key];
  if (!e.tables.defined() || e.tables.numel() != table_elems)
    e.tables = Tensor::empty({table_elems}, DType::i32, device);
  return e;
}

void DecodeGraphs::run(Entry& e, uint64_t moves, const Stream& stream,
                       const std::function<void()>& step, Model::DecodeStats& stats) {
  if (e.current(moves)) {
    e.graph.replay(stream);
    ++stats.replayed;
    return;
  }
  step();
  stream.synchronize();
  e.graph = CudaGraph::capture(stream, step);
  e.moves = moves;
  ++stats.captured;
}

}  // namespace moelora

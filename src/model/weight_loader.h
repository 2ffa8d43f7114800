// Checkpoint access for the model loaders (internal): every tensor taken is checked (present,
// expected shape, float dtype) and recorded, so that a key no model module claimed is an error
// instead of a silently ignored weight.
#pragma once

#include <functional>
#include <set>
#include <string>

#include "moelora/io/checkpoint.h"

namespace moelora {

class WeightLoader {
 public:
  // `progress` (optional) is told each tensor as it is first taken: (taken, total, name).
  using Progress = std::function<void(int64_t, int64_t, const std::string&)>;
  explicit WeightLoader(const std::string& dir, Progress progress = nullptr);

  bool has(const std::string& name) const { return ck_.contains(name); }
  // The tensor as bf16 with exactly `shape` (bf16 on disk: a zero-copy view; f32 / f16:
  // converted). Errors name the checkpoint directory and the tensor, expected vs found.
  Tensor bf16(const std::string& name, const Shape& shape);
  // Copies tensor `name` ([rows, cols] after the same checks) into rows of `dst` starting at
  // element offset `at` (dst bf16, contiguous).
  void copy_into(const std::string& name, const Shape& shape, Tensor& dst, int64_t at);
  // Throws listing the checkpoint keys that were never taken.
  void check_all_used() const;
  const std::string& dir() const { return ck_.dir(); }

 private:
  Checkpoint ck_;
  std::set<std::string> used_;
  Progress progress_;
  int64_t total_ = 0;
};

}  // namespace moelora

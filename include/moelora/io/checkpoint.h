// A Hugging Face checkpoint directory: model.safetensors, or shards listed by
// model.safetensors.index.json. Every file is memory-mapped once; tensors are zero-copy views.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moelora/io/safetensors.h"

namespace moelora {

class Checkpoint {
 public:
  // Prefers the index when both exist. Errors name the file: an index naming a missing shard,
  // a tensor the index places in a shard that lacks it, no safetensors at all.
  static Checkpoint open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  // Sorted.
  std::vector<std::string> names() const;
  // The file holding `name`; throws naming the checkpoint when absent.
  const SafetensorsFile& file_of(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;
  Tensor tensor(const std::string& name) const;
  Tensor tensor(const std::string& name, DType dtype, const Shape& shape) const;
  size_t num_files() const { return files_.size(); }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace moelora

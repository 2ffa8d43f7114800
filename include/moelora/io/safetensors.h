// safetensors files: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data
// (offsets relative to the first byte after the header).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moelora/core/tensor.h"

namespace moelora {

struct SafetensorsEntry {
  std::string dtype;  // as in the file: "BF16", "F32", "I32", "F8_E4M3", ...
  Shape shape;
  size_t begin = 0, end = 0;  // byte offsets into the data section
};

// A memory-mapped safetensors file. Every entry is validated on open: known dtype, offsets in
// range and non-overlapping, size = numel x dtype size. Errors name the file and the tensor.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;
  const SafetensorsEntry& entry(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A host tensor viewing the mapped bytes (zero copy; keeps the mapping alive). Throws for
  // dtypes moelora has no DType for (e.g. F64, I8) — use raw() for those.
  Tensor tensor(const std::string& name) const;
  // The tensor, checked against an expected dtype and shape (error names file and tensor).
  Tensor tensor(const std::string& name, DType dtype, const Shape& shape) const;
  const uint8_t* raw(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<void> mapping_;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Size in bytes of one element of a safetensors dtype string; 0 when unknown.
size_t safetensors_dtype_size(const std::string& dtype);
// The moelora DType of a safetensors dtype string; throws when there is none.
DType safetensors_dtype(const std::string& dtype);

// Writes host tensors (contiguous) as a safetensors file.
void save_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace moelora

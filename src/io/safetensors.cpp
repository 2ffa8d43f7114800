#include "moelora/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

namespace moelora {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the format's own limit is 100 MB

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && size) munmap(addr, size);
  }
};

std::string dtype_string(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::f8_e4m3: return "F8_E4M3";
    case DType::u8: return "U8";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
  }
  return "?";
}

}  // namespace

size_t safetensors_dtype_size(const std::string& d) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4},    {"F16", 2},     {"BF16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I64", 8}, {"I32", 4},    {"I16", 2},     {"I8", 1},   {"U64", 8},     {"U32", 4},
      {"U16", 2}, {"U8", 1},     {"BOOL", 1}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

DType safetensors_dtype(const std::string& d) {
  if (d == "F32") return DType::f32;
  if (d == "F16") return DType::f16;
  if (d == "BF16") return DType::bf16;
  if (d == "F8_E4M3") return DType::f8_e4m3;
  if (d == "U8") return DType::u8;
  if (d == "I32") return DType::i32;
  if (d == "I64") return DType::i64;
  MOELORA_THROW("safetensors dtype {} has no moelora dtype", d);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  MOELORA_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    MOELORA_THROW("{}: cannot stat: {}", path, std::strerror(errno));
  }
  const size_t file_size = size_t(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    MOELORA_THROW("{}: truncated safetensors file: {} bytes, the 8-byte header length is missing",
                  path, file_size);
  }
  auto map = std::make_shared<Mapping>();
  map->addr = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MOELORA_CHECK(map->addr != MAP_FAILED, "{}: mmap failed: {}", path, std::strerror(errno));
  map->size = file_size;
  mapping_ = map;
  const auto* bytes = static_cast<const uint8_t*>(map->addr);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  MOELORA_CHECK(header_len <= kMaxHeaderBytes && header_len <= file_size - 8,
                "{}: header length {} does not fit a file of {} bytes", path, header_len,
                file_size);
  data_ = bytes + 8 + header_len;
  const size_t data_size = file_size - 8 - header_len;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    MOELORA_THROW("{}: header is not valid JSON: {}", path, e.what());
  }
  MOELORA_CHECK(header.is_object(), "{}: header must be a JSON object", path);

  std::vector<std::pair<size_t, std::string>> by_offset;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      MOELORA_CHECK(value.is_object(), "{}: __metadata__ must be an object", path);
      for (const auto& [k, v] : value.items()) {
        MOELORA_CHECK(v.is_string(), "{}: __metadata__ value '{}' must be a string", path, k);
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    MOELORA_CHECK(value.is_object() && value.contains("dtype") && value.contains("shape") &&
                      value.contains("data_offsets"),
                  "{}: tensor '{}' needs dtype, shape and data_offsets", path, name);
    SafetensorsEntry e;
    try {
      e.dtype = value["dtype"].get<std::string>();
      e.shape = value["shape"].get<Shape>();
      const auto offsets = value["data_offsets"].get<std::vector<uint64_t>>();
      MOELORA_CHECK(offsets.size() == 2, "{}: tensor '{}': data_offsets must have 2 entries",
                    path, name);
      e.begin = offsets[0];
      e.end = offsets[1];
    } catch (const nlohmann::json::exception& ex) {
      MOELORA_THROW("{}: tensor '{}': malformed entry: {}", path, name, ex.what());
    }
    const size_t elem = safetensors_dtype_size(e.dtype);
    MOELORA_CHECK(elem != 0, "{}: tensor '{}': unknown dtype '{}'", path, name, e.dtype);
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      MOELORA_CHECK(d >= 0, "{}: tensor '{}': negative dimension in shape {}", path, name,
                    shape_str(e.shape));
      numel *= uint64_t(d);
    }
    MOELORA_CHECK(e.begin <= e.end && e.end <= data_size,
                  "{}: tensor '{}': data_offsets [{}, {}] out of range (data section has {} "
                  "bytes; file truncated?)",
                  path, name, e.begin, e.end, data_size);
    MOELORA_CHECK(e.end - e.begin == numel * elem,
                  "{}: tensor '{}': {} {} needs {} bytes, data_offsets span {}", path, name,
                  e.dtype, shape_str(e.shape), numel * elem, e.end - e.begin);
    by_offset.emplace_back(e.begin, name);
    entries_.emplace(name, std::move(e));
  }
  std::sort(by_offset.begin(), by_offset.end());
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto& prev = entries_.at(by_offset[i - 1].second);
    const auto& cur = entries_.at(by_offset[i].second);
    MOELORA_CHECK(cur.begin >= prev.end || prev.begin == prev.end || cur.begin == cur.end,
                  "{}: tensors '{}' and '{}' overlap", path, by_offset[i - 1].second,
                  by_offset[i].second);
  }
}

SafetensorsFile::~SafetensorsFile() = default;

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : entries_) out.push_back(name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  MOELORA_CHECK(it != entries_.end(), "{}: no tensor named '{}'", path_, name);
  return it->second;
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const {
  return data_ + entry(name).begin;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  DType dt;
  try {
    dt = safetensors_dtype(e.dtype);
  } catch (const Error&) {
    MOELORA_THROW("{}: tensor '{}' has dtype {}, which moelora cannot hold", path_, name, e.dtype);
  }
  const uint8_t* p = data_ + e.begin;
  // The format packs tensors back to back, so one may start at an offset its dtype cannot be
  // loaded from (an F32 after an odd-sized F8). Such a tensor is copied to aligned memory;
  // aligned ones are zero-copy views of the mapping.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(dt) != 0) {
    Tensor t = Tensor::empty(e.shape, dt);
    std::memcpy(t.data(), p, e.end - e.begin);
    return t;
  }
  return Tensor::wrap(const_cast<uint8_t*>(p), e.shape, dt, Device::cpu(), mapping_);
}

Tensor SafetensorsFile::tensor(const std::string& name, DType dtype, const Shape& shape) const {
  const SafetensorsEntry& e = entry(name);
  MOELORA_CHECK(e.dtype == dtype_string(dtype), "{}: tensor '{}': expected dtype {}, found {}",
                path_, name, dtype_string(dtype), e.dtype);
  MOELORA_CHECK(e.shape == shape, "{}: tensor '{}': expected shape {}, found {}", path_, name,
                shape_str(shape), shape_str(e.shape));
  return tensor(name);
}

void save_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MOELORA_CHECK(t.device().is_cpu() && t.is_contiguous(),
                  "save_safetensors {}: tensor '{}' must be a contiguous host tensor, found {}",
                  path, name, t.describe());
    header[name] = {{"dtype", dtype_string(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  while (text.size() % 8) text += ' ';  // align the data section
  std::ofstream out(path, std::ios::binary);
  MOELORA_CHECK(out.good(), "save_safetensors: cannot write {}", path);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), std::streamsize(text.size()));
  for (const auto& [name, t] : tensors)
    out.write(static_cast<const char*>(t.data()), std::streamsize(t.nbytes()));
  MOELORA_CHECK(out.good(), "save_safetensors: write to {} failed", path);
}

}  // namespace moelora

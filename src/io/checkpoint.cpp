#include "moelora/io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moelora/core/error.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kSingle = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open", path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", path.string(), e.what());
  }
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  const fs::path root(dir);
  const fs::path index = root / kIndex;
  if (fs::exists(index)) {
    const json idx = read_json(index);
    MOELORA_CHECK(idx.is_object(), "{}: expected a JSON object, found {}", index.string(),
                  idx.type_name());
    const auto wm = idx.find("weight_map");
    MOELORA_CHECK(wm != idx.end() && wm->is_object() && !wm->empty(),
                  "{}: expected a non-empty \"weight_map\" object", index.string());
    std::map<std::string, size_t> shard_of_file;
    for (const auto& [name, file] : wm->items()) {
      MOELORA_CHECK(file.is_string(), "{}: weight_map[\"{}\"]: expected a file name, found {}",
                    index.string(), name, file.dump());
      const std::string shard = file.get<std::string>();
      // Shards live beside the index; a path escaping the directory is not a shard.
      MOELORA_CHECK(!shard.empty() && fs::path(shard).filename().string() == shard,
                    "{}: weight_map[\"{}\"]: expected a file name in the same directory, "
                    "found \"{}\"",
                    index.string(), name, shard);
      auto it = shard_of_file.find(shard);
      if (it == shard_of_file.end()) {
        const fs::path shard_path = root / shard;
        MOELORA_CHECK(fs::is_regular_file(shard_path),
                      "{}: weight_map names shard \"{}\" (for tensor '{}'), but {} does not exist",
                      index.string(), shard, name, shard_path.string());
        c.files_.push_back(std::make_shared<SafetensorsFile>(shard_path.string()));
        it = shard_of_file.emplace(shard, c.files_.size() - 1).first;
      }
      const SafetensorsFile& f = *c.files_[it->second];
      MOELORA_CHECK(f.contains(name), "{}: weight_map places tensor '{}' in {}, which lacks it",
                    index.string(), name, f.path());
      c.where_.emplace(name, it->second);
    }
    return c;
  }
  const fs::path single = root / kSingle;
  MOELORA_CHECK(fs::is_regular_file(single), "{}: no {} or {} found (not a safetensors checkpoint)",
                dir, kSingle, kIndex);
  c.files_.push_back(std::make_shared<SafetensorsFile>(single.string()));
  for (const std::string& name : c.files_[0]->names()) c.where_.emplace(name, 0);
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, i] : where_) out.push_back(name);
  return out;
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  const auto it = where_.find(name);
  MOELORA_CHECK(it != where_.end(), "{}: checkpoint has no tensor '{}'", dir_, name);
  return *files_[it->second];
}

const SafetensorsEntry& Checkpoint::entry(const std::string& name) const {
  return file_of(name).entry(name);
}

Tensor Checkpoint::tensor(const std::string& name) const {
  return file_of(name).tensor(name);
}

Tensor Checkpoint::tensor(const std::string& name, DType dtype, const Shape& shape) const {
  return file_of(name).tensor(name, dtype, shape);
}

}  // namespace moelora

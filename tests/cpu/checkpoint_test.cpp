#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moelora/io/checkpoint.h"
#include "test_util.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A fresh empty directory per test, removed afterwards.
class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() /
              ("moelora_ckpt_" + std::to_string(::getpid()) + "_" + tag)) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_index(const fs::path& dir, const json& weight_map) {
  std::ofstream(dir / "model.safetensors.index.json")
      << json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2);
}

struct TwoShards {
  Tensor a, b, c;
};

// Shard 1: a, b; shard 2: c.
TwoShards write_two_shards(const fs::path& dir, std::mt19937_64& rng) {
  TwoShards t{test::random_tensor({4, 6}, DType::bf16, rng),
              test::random_tensor({3}, DType::f32, rng), test::random_ints({2, 5}, rng, -9, 9)};
  save_safetensors((dir / "model-00001-of-00002.safetensors").string(),
                   {{"model.a.weight", t.a}, {"model.b.bias", t.b}});
  save_safetensors((dir / "model-00002-of-00002.safetensors").string(), {{"model.c", t.c}});
  return t;
}

const json kTwoShardMap = {{"model.a.weight", "model-00001-of-00002.safetensors"},
                           {"model.b.bias", "model-00001-of-00002.safetensors"},
                           {"model.c", "model-00002-of-00002.safetensors"}};

TEST(Checkpoint, SingleFile) {
  TempDir dir("single");
  std::mt19937_64 rng(test::fresh_seed());
  Tensor a = test::random_tensor({5, 7}, DType::bf16, rng);
  save_safetensors((dir.path() / "model.safetensors").string(), {{"x.weight", a}});
  const Checkpoint ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck.num_files(), 1u);
  EXPECT_TRUE(ck.contains("x.weight"));
  EXPECT_FALSE(ck.contains("y"));
  EXPECT_EQ(ck.names(), std::vector<std::string>{"x.weight"});
  EXPECT_EQ(test::to_floats(ck.tensor("x.weight")), test::to_floats(a));
  EXPECT_EQ(ck.entry("x.weight").dtype, "BF16");
  test::expect_error([&] { ck.tensor("y"); }, "checkpoint has no tensor 'y'");
}

TEST(Checkpoint, TwoShardsViaIndex) {
  TempDir dir("sharded");
  std::mt19937_64 rng(test::fresh_seed());
  const TwoShards t = write_two_shards(dir.path(), rng);
  write_index(dir.path(), kTwoShardMap);
  const Checkpoint ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck.num_files(), 2u);  // each shard opened once
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"model.a.weight", "model.b.bias", "model.c"}));
  EXPECT_EQ(test::to_floats(ck.tensor("model.a.weight", DType::bf16, {4, 6})),
            test::to_floats(t.a));
  EXPECT_EQ(test::to_floats(ck.tensor("model.b.bias")), test::to_floats(t.b));
  EXPECT_EQ(test::to_ints(ck.tensor("model.c")), test::to_ints(t.c));
  EXPECT_NE(ck.file_of("model.c").path().find("model-00002-of-00002"), std::string::npos);
  // Shape checks go through SafetensorsFile and name the tensor.
  test::expect_error([&] { ck.tensor("model.a.weight", DType::bf16, {6, 4}); }, "model.a.weight");
}

TEST(Checkpoint, NoSafetensors) {
  TempDir dir("empty");
  test::expect_error([&] { Checkpoint::open(dir.str()); },
                     dir.str() + ": no model.safetensors or model.safetensors.index.json");
}

TEST(Checkpoint, IndexNamesMissingShard) {
  TempDir dir("missing_shard");
  std::mt19937_64 rng(test::fresh_seed());
  write_two_shards(dir.path(), rng);
  json map = kTwoShardMap;
  map["model.d"] = "model-00003-of-00003.safetensors";
  write_index(dir.path(), map);
  test::expect_error([&] { Checkpoint::open(dir.str()); },
                     "names shard \"model-00003-of-00003.safetensors\" (for tensor 'model.d')");
  test::expect_error([&] { Checkpoint::open(dir.str()); }, "model.safetensors.index.json");
}

TEST(Checkpoint, IndexPlacesTensorInWrongShard) {
  TempDir dir("wrong_shard");
  std::mt19937_64 rng(test::fresh_seed());
  write_two_shards(dir.path(), rng);
  json map = kTwoShardMap;
  map["model.c"] = "model-00001-of-00002.safetensors";
  write_index(dir.path(), map);
  test::expect_error([&] { Checkpoint::open(dir.str()); },
                     "places tensor 'model.c' in " +
                         (dir.path() / "model-00001-of-00002.safetensors").string() +
                         ", which lacks it");
}

TEST(Checkpoint, MalformedIndex) {
  TempDir dir("bad_index");
  std::mt19937_64 rng(test::fresh_seed());
  write_two_shards(dir.path(), rng);
  const fs::path index = dir.path() / "model.safetensors.index.json";

  std::ofstream(index) << "{\"weight_map\": ";
  test::expect_error([&] { Checkpoint::open(dir.str()); }, index.string() + ": not valid JSON");

  std::ofstream(index) << R"({"metadata": {}})";
  test::expect_error([&] { Checkpoint::open(dir.str()); }, "non-empty \"weight_map\"");

  std::ofstream(index) << R"({"weight_map": {}})";
  test::expect_error([&] { Checkpoint::open(dir.str()); }, "non-empty \"weight_map\"");

  std::ofstream(index) << R"({"weight_map": {"model.c": 2}})";
  test::expect_error([&] { Checkpoint::open(dir.str()); },
                     "weight_map[\"model.c\"]: expected a file name, found 2");

  std::ofstream(index) << R"({"weight_map": {"model.c": "../model-00002-of-00002.safetensors"}})";
  test::expect_error([&] { Checkpoint::open(dir.str()); }, "in the same directory");
}

TEST(Checkpoint, CorruptShardNamesFile) {
  TempDir dir("corrupt");
  std::mt19937_64 rng(test::fresh_seed());
  write_two_shards(dir.path(), rng);
  write_index(dir.path(), kTwoShardMap);
  const fs::path shard = dir.path() / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 4);  // truncated data section
  test::expect_error([&] { Checkpoint::open(dir.str()); }, "model-00002-of-00002.safetensors");
}

}  // namespace
}  // namespace moelora

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "moelora/io/safetensors.h"
#include "test_util.h"

namespace moelora {
namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("moelora_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
  out << header;
  out << std::string(data_bytes, '\0');
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, RoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  Tensor a = test::random_tensor({3, 5}, DType::bf16, rng);
  Tensor b = test::random_ints({7}, rng, -100, 100);
  const std::string path = temp_path("rt.safetensors");
  save_safetensors(path, {{"a", a}, {"b", b}}, {{"format", "pt"}});
  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(test::to_floats(f.tensor("a", DType::bf16, {3, 5})), test::to_floats(a));
  EXPECT_EQ(test::to_ints(f.tensor("b")), test::to_ints(b));
  std::filesystem::remove(path);
}

// Tensors are packed back to back: an F32 after a 3-byte U8 starts misaligned and must still
// read correctly (copied to aligned memory rather than loaded through a misaligned pointer).
TEST(Safetensors, MisalignedTensorIsCopiedAligned) {
  std::mt19937_64 rng(test::fresh_seed());
  Tensor odd = Tensor::zeros({3}, DType::u8);
  Tensor f = test::random_tensor({5}, DType::f32, rng);
  const std::string path = temp_path("misaligned.safetensors");
  save_safetensors(path, {{"a_odd", odd}, {"b_f32", f}});
  SafetensorsFile file(path);
  const Tensor t = file.tensor("b_f32");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 4, 0u);
  EXPECT_EQ(test::to_floats(t), test::to_floats(f));
  std::filesystem::remove(path);
}

TEST(Safetensors, MalformedFilesNameTheProblem) {
  const std::string p = temp_path("bad.safetensors");
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, "out of range"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", 16, "needs 16 bytes"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       16, "overlap"},
      {R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype"},
      {R"({"w":{"dtype":"F32","shape":[2]}})", 8, "needs dtype, shape and data_offsets"},
      {R"({"w": [1, 2)", 8, "not valid JSON"},
  };
  for (const auto& c : cases) {
    write_raw(p, c.header, c.data);
    const std::string err = error_of(p);
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.header << " -> " << err;
    EXPECT_NE(err.find(p), std::string::npos) << "error should name the file: " << err;
  }
  {  // header length larger than the file
    std::ofstream out(p, std::ios::binary);
    const uint64_t n = 1000;
    for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
    out << "{}";
  }
  EXPECT_NE(error_of(p).find("does not fit"), std::string::npos);
  {  // shorter than the length prefix
    std::ofstream out(p, std::ios::binary);
    out << "abc";
  }
  EXPECT_NE(error_of(p).find("truncated"), std::string::npos);
  EXPECT_NE(error_of(temp_path("missing.safetensors")).find("cannot open"), std::string::npos);
  std::filesystem::remove(p);
}

TEST(Safetensors, TruncatedDataAndExpectations) {
  const std::string path = temp_path("trunc.safetensors");
  Tensor a = Tensor::zeros({64}, DType::f32);
  save_safetensors(path, {{"a", a}});
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 10);
  EXPECT_NE(error_of(path).find("out of range"), std::string::npos);
  save_safetensors(path, {{"a", a}});
  SafetensorsFile f(path);
  EXPECT_THROW(f.tensor("b"), Error);
  try {
    f.tensor("a", DType::bf16, {64});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected dtype BF16, found F32"), std::string::npos);
  }
  EXPECT_THROW(f.tensor("a", DType::f32, {8, 8}), Error);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora

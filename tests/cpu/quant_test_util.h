// Helpers shared by the quantized-format tests (tests/cpu/quant_*_test.cpp).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moelora/core/error.h"
#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"

namespace moelora::quant_test {

inline std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("moelora_quant_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// The message of the moelora::Error `fn` throws; fails the test when it throws nothing.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.message();
  }
  ADD_FAILURE() << "expected a moelora::Error";
  return "";
}

// Expects `fn` to throw a moelora::Error whose message contains every one of `parts`.
#define EXPECT_QUANT_ERROR(fn, ...)                                                               \
  do {                                                                                            \
    const std::string msg_ = ::moelora::quant_test::error_of(fn);                                 \
    for (const std::string& part_ : std::vector<std::string>{__VA_ARGS__})                        \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "missing '" << part_ << "' in: " << msg_; \
  } while (0)

// A contiguous host copy (so tests can corrupt tensors without touching the original).
inline Tensor clone(const Tensor& t) {
  Tensor c = Tensor::empty(t.shape(), t.dtype());
  std::memcpy(c.data(), t.data(), t.nbytes());
  return c;
}

// Writes `tensors`, then removes the last `cut` bytes of the file (0: leave it whole).
inline void write_file(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       size_t cut = 0) {
  save_safetensors(path, tensors, {{"format", "pt"}});
  if (cut) std::filesystem::resize_file(path, std::filesystem::file_size(path) - cut);
}

// Host tensors of raw values.
inline Tensor i32_tensor(const std::vector<int32_t>& v, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::i32);
  std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}
inline Tensor u8_tensor(const std::vector<uint8_t>& v, const Shape& shape, DType dt = DType::u8) {
  Tensor t = Tensor::empty(shape, dt);
  std::memcpy(t.data(), v.data(), v.size());
  return t;
}
inline Tensor f16_tensor(const std::vector<float>& v, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::f16);
  for (size_t i = 0; i < v.size(); ++i) t.data<f16_t>()[i] = float_to_f16(v[i]);
  return t;
}
inline Tensor f32_tensor(const std::vector<float>& v, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::f32);
  std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}
inline std::vector<float> values(const Tensor& t) {
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

}  // namespace moelora::quant_test

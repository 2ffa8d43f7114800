// Helpers shared by the CPU and GPU tests.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moelora/core/tensor.h"

namespace moelora::test {

// Deterministic per-test RNG seeded from `seed` (tests pass a fresh seed per run where the
// issue asks for fresh inputs: see fresh_seed()).
uint64_t fresh_seed();

// Host tensors with values uniform in [lo, hi) (bf16 values rounded from f32).
Tensor random_tensor(const Shape& shape, DType dtype, std::mt19937_64& rng, float lo = -1.0f,
                     float hi = 1.0f);
// Host tensor of ints uniform in [lo, hi].
Tensor random_ints(const Shape& shape, std::mt19937_64& rng, int lo, int hi);

// Any float-typed host or device tensor to a host f32 vector (contiguous order).
std::vector<float> to_floats(const Tensor& t);
std::vector<int32_t> to_ints(const Tensor& t);
// Host tensor from values.
Tensor from_floats(const std::vector<float>& v, const Shape& shape, DType dtype);
Tensor from_ints(const std::vector<int32_t>& v, const Shape& shape);

struct Diff {
  double max_abs = 0;     // max |a - b|
  double rel_l2 = 0;      // ||a - b|| / ||b||
  int64_t nonfinite = 0;  // entries of `a` that are NaN/inf
  int64_t worst = -1;     // index of max_abs
};
Diff diff(const std::vector<float>& actual, const std::vector<float>& expected);

// Expects actual ≈ expected: no NaN/inf in actual, rel_l2 <= rel_tol and every element within
// abs_tol + rel_tol * |expected| scaled by the tensor's max magnitude.
::testing::AssertionResult allclose(const std::vector<float>& actual,
                                    const std::vector<float>& expected, double rel_tol,
                                    double abs_tol = 0.0);

// Expects `f` to throw moelora::Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moelora::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
  }
}

// Path of a committed fixture file (tests/fixtures/<name>); env MOELORA_FIXTURES overrides the
// directory (the device runs carry the tree to another path).
std::string fixture_path(const std::string& name);

}  // namespace moelora::test

// Skips a GPU test when no CUDA device is usable (CI has none).
#define MOELORA_REQUIRE_GPU()                                      \
  do {                                                             \
    if (!::moelora::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

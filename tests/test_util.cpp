#include "test_util.h"

#include <chrono>
#include <cmath>
#include <cstdlib>

namespace moelora::test {

uint64_t fresh_seed() {
  const uint64_t s = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  ::testing::Test::RecordProperty("seed", std::to_string(s));
  return s;
}

Tensor random_tensor(const Shape& shape, DType dtype, std::mt19937_64& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  Tensor t = Tensor::empty(shape, dtype);
  const int64_t n = t.numel();
  switch (dtype) {
    case DType::f32: {
      float* p = t.data<float>();
      for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
      break;
    }
    case DType::bf16: {
      bf16_t* p = t.data<bf16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(dist(rng));
      break;
    }
    case DType::f16: {
      f16_t* p = t.data<f16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_f16(dist(rng));
      break;
    }
    default:
      MOELORA_THROW("random_tensor: unsupported dtype {}", dtype_name(dtype));
  }
  return t;
}

Tensor random_ints(const Shape& shape, std::mt19937_64& rng, int lo, int hi) {
  std::uniform_int_distribution<int> dist(lo, hi);
  Tensor t = Tensor::empty(shape, DType::i32);
  int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

std::vector<float> to_floats(const Tensor& t0) {
  const Tensor t = t0.device().is_cpu() ? t0 : t0.to(Device::cpu());
  MOELORA_CHECK(t.is_contiguous(), "to_floats: contiguous tensor expected, found {}", t.describe());
  std::vector<float> v(size_t(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    switch (t.dtype()) {
      case DType::f32: v[i] = static_cast<const float*>(t.data())[i]; break;
      case DType::bf16: v[i] = bf16_to_float(static_cast<const bf16_t*>(t.data())[i]); break;
      case DType::f16: v[i] = f16_to_float(static_cast<const f16_t*>(t.data())[i]); break;
      case DType::f8_e4m3: v[i] = f8e4m3_to_float(static_cast<const f8e4m3_t*>(t.data())[i]); break;
      default: MOELORA_THROW("to_floats: unsupported dtype {}", dtype_name(t.dtype()));
    }
  }
  return v;
}

std::vector<int32_t> to_ints(const Tensor& t0) {
  const Tensor t = t0.device().is_cpu() ? t0 : t0.to(Device::cpu());
  check_dtype(t, DType::i32, "to_ints");
  const int32_t* p = t.data<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}

Tensor from_floats(const std::vector<float>& v, const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  MOELORA_CHECK(size_t(t.numel()) == v.size(), "from_floats: {} values for shape {}", v.size(),
                shape_str(shape));
  for (size_t i = 0; i < v.size(); ++i) {
    switch (dtype) {
      case DType::f32: t.data<float>()[i] = v[i]; break;
      case DType::bf16: t.data<bf16_t>()[i] = float_to_bf16(v[i]); break;
      case DType::f16: t.data<f16_t>()[i] = float_to_f16(v[i]); break;
      default: MOELORA_THROW("from_floats: unsupported dtype {}", dtype_name(dtype));
    }
  }
  return t;
}

Tensor from_ints(const std::vector<int32_t>& v, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::i32);
  MOELORA_CHECK(size_t(t.numel()) == v.size(), "from_ints: {} values for shape {}", v.size(),
                shape_str(shape));
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

Diff diff(const std::vector<float>& a, const std::vector<float>& b) {
  Diff d;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(a[i])) {
      d.nonfinite++;
      continue;
    }
    const double e = double(a[i]) - double(b[i]);
    num += e * e;
    den += double(b[i]) * b[i];
    if (std::fabs(e) > d.max_abs) {
      d.max_abs = std::fabs(e);
      d.worst = int64_t(i);
    }
  }
  d.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

::testing::AssertionResult allclose(const std::vector<float>& actual,
                                    const std::vector<float>& expected, double rel_tol,
                                    double abs_tol) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != expected " << expected.size();
  const Diff d = diff(actual, expected);
  double scale = 0;
  for (float e : expected) scale = std::max(scale, double(std::fabs(e)));
  const double elem_tol = abs_tol + rel_tol * std::max(scale, 1e-30);
  if (d.nonfinite > 0)
    return ::testing::AssertionFailure() << d.nonfinite << " non-finite values (unwritten?)";
  if (d.rel_l2 > rel_tol || d.max_abs > elem_tol) {
    return ::testing::AssertionFailure()
           << "rel_l2=" << d.rel_l2 << " (tol " << rel_tol << "), max_abs=" << d.max_abs
           << " (tol " << elem_tol << ") at index " << d.worst << ": actual "
           << actual[size_t(d.worst)] << " expected " << expected[size_t(d.worst)];
  }
  return ::testing::AssertionSuccess();
}

std::string fixture_path(const std::string& name) {
  if (const char* dir = std::getenv("MOELORA_FIXTURES")) return std::string(dir) + "/" + name;
  return std::string(MOELORA_FIXTURE_DIR) + "/" + name;
}

}  // namespace moelora::test

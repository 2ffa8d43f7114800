#include <cmath>

#include "moelora/core/tensor.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(Tensor, NarrowAndViewShareStorage) {
  Tensor t = Tensor::zeros({4, 3}, DType::f32);
  Tensor rows = t.narrow(0, 1, 2);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_TRUE(rows.is_contiguous());
  rows.data<float>()[0] = 5.0f;
  EXPECT_EQ(t.data<float>()[3], 5.0f);
  Tensor cols = t.narrow(1, 1, 1);
  EXPECT_FALSE(cols.is_contiguous());
  EXPECT_EQ(t.view({-1}).shape(), (Shape{12}));
  EXPECT_THROW(t.view({5, -1}), Error);
  EXPECT_THROW(t.narrow(0, 3, 2), Error);
}

TEST(Tensor, DtypeMismatchNamesBoth) {
  Tensor t = Tensor::zeros({2}, DType::bf16);
  try {
    t.data<float>();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected f32, found bf16"), std::string::npos) << e.what();
  }
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f).bits, 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

TEST(DType, E4m3EdgeValues) {
  EXPECT_EQ(f8e4m3_to_float(f8e4m3_t{0x7e}), 448.0f);
  EXPECT_TRUE(std::isnan(f8e4m3_to_float(f8e4m3_t{0x7f})));
  EXPECT_EQ(f8e4m3_to_float(f8e4m3_t{0x01}), std::ldexp(1.0f, -9));
  EXPECT_EQ(float_to_f8e4m3(1000.0f).bits, 0x7e);  // saturates
  EXPECT_EQ(float_to_f8e4m3(-448.0f).bits, 0xfe);
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) continue;
    const float f = f8e4m3_to_float(f8e4m3_t{uint8_t(b)});
    EXPECT_EQ(f8e4m3_to_float(float_to_f8e4m3(f)), f) << b;
  }
}

TEST(DType, F16RoundTrip) {
  for (int b = 0; b < 65536; ++b) {
    const f16_t h{uint16_t(b)};
    const float f = f16_to_float(h);
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_f16(f).bits, h.bits) << b;
  }
}

}  // namespace
}  // namespace moelora

#include "moelora/core/dtype.h"

#include <cmath>

namespace moelora {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::f8_e4m3: return "f8_e4m3";
    case DType::u8: return "u8";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}

float f16_to_float(f16_t v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t man = v.bits & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(float(man), -24);
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = std::ldexp(float(man | 0x400u), int(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

f16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return f16_t{uint16_t(sign | 0x7e00u)};
  if (a >= 65520.0f) return f16_t{uint16_t(sign | 0x7c00u)};
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: multiples of 2^-24, round to nearest even
    const float q = std::nearbyint(std::ldexp(a, 24));
    return f16_t{uint16_t(sign | uint16_t(q))};
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(std::ldexp(m, 11));  // 11 significant bits
  if (q >= 2048.0f) {
    q /= 2;
    e += 1;
  }
  const uint32_t exp = uint32_t(e - 1 + 15);
  return f16_t{uint16_t(sign | (exp << 10) | (uint32_t(q) & 0x3ffu))};
}

float f8e4m3_to_float(f8e4m3_t v) {
  const bool neg = v.bits & 0x80u;
  const uint32_t exp = (v.bits >> 3) & 0xfu;
  const uint32_t man = v.bits & 0x7u;
  float mag;
  if (exp == 15 && man == 7) return NAN;
  if (exp == 0) {
    mag = std::ldexp(float(man), -9);
  } else {
    mag = std::ldexp(float(8 + man), int(exp) - 10);
  }
  return neg ? -mag : mag;
}

f8e4m3_t float_to_f8e4m3(float f) {
  if (std::isnan(f)) return f8e4m3_t{0x7f};
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return f8e4m3_t{uint8_t(sign | 0x7e)};
  if (a < std::ldexp(1.0f, -6)) {  // subnormal: multiples of 2^-9
    const float q = std::nearbyint(std::ldexp(a, 9));
    return f8e4m3_t{uint8_t(sign | uint8_t(q))};  // q == 8 rolls into the smallest normal
  }
  int e;
  const float m = std::frexp(a, &e);
  float q = std::nearbyint(std::ldexp(m, 4));  // 4 significant bits
  if (q >= 16.0f) {
    q /= 2;
    e += 1;
  }
  const int exp = e - 1 + 7;
  if (exp > 15 || (exp == 15 && (uint32_t(q) & 7u) == 7u)) return f8e4m3_t{uint8_t(sign | 0x7e)};
  return f8e4m3_t{uint8_t(sign | (exp << 3) | (uint32_t(q) & 7u))};
}

}  // namespace moelora

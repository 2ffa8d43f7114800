// Element types and host-side conversions for the narrow floating-point formats.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace moelora {

enum class DType : uint8_t { f32, f16, bf16, f8_e4m3, u8, i32, i64 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f8_e4m3: return 1;
    case DType::u8: return 1;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

std::string_view dtype_name(DType t);

// Host storage types. Bit layouts match CUDA's __nv_bfloat16 / __half / __nv_fp8_e4m3.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
struct f8e4m3_t { uint8_t bits; };

inline float bf16_to_float(bf16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

// Rounds a float to the nearest bf16 value and back (what storing in bf16 does).
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

float f16_to_float(f16_t v);
f16_t float_to_f16(float f);
// e4m3fn: bias 7, no infinities, max 448, NaN = S.1111.111. Saturates to ±448 when encoding.
float f8e4m3_to_float(f8e4m3_t v);
f8e4m3_t float_to_f8e4m3(float f);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<f16_t>() { return DType::f16; }
template <> constexpr DType dtype_of<bf16_t>() { return DType::bf16; }
template <> constexpr DType dtype_of<f8e4m3_t>() { return DType::f8_e4m3; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }

}  // namespace moelora

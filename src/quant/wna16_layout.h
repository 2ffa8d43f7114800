// The packed int4 / int8 expert layout of cuda_wna16 (shared by the CPU packer in
// experts_wna16.cpp and the CUDA kernel in kernels/cuda/sm90_moe_gemm_wna16.cuh; no CUDA
// includes). The full description is at the top of experts_wna16.cpp.
#pragma once

#include <cstdint>

namespace moelora::quant::wna16 {

// A tile is 16 weight rows x kTileK(bits) input channels = 512 bytes: 32 lanes x 16 bytes,
// lane l's 16 bytes being exactly its A fragments of mma.m16n8k16 for those 16 rows.
inline constexpr int kTileRows = 16;
inline constexpr int kTileWords = 128;  // 32-bit words per tile
inline constexpr int kTileBytes = 512;
constexpr int tile_k(int bits) { return bits == 4 ? 64 : 32; }

// Packed (padded) sizes of a logical [n, k] matrix; never use them as logical sizes.
constexpr int64_t padded_n(int64_t n) { return (n + kTileRows - 1) / kTileRows * kTileRows; }
constexpr int64_t padded_k(int64_t k, int bits) {
  return (k + tile_k(bits) - 1) / tile_k(bits) * tile_k(bits);
}

// Within tile word w = lane * 4 + j (lane l: row r = l / 4, column c = 2 * (l % 4)):
// int4: j is the 16-channel step; nibble i holds (row r + kInt4Row[i], channel 16j + c +
//       kInt4Col[i]), so (w >> 4p) & 0x000f000f holds the bf16 pair of A register p.
// int8: j = 2 * step + half; byte i holds (row r + kInt8Row[i], channel 16 * step + c +
//       8 * half + kInt8Col[i]), bytes {0,1} being A register 2*half, {2,3} register 2*half+1.
inline constexpr int kInt4Row[8] = {0, 8, 0, 8, 0, 8, 0, 8};
inline constexpr int kInt4Col[8] = {0, 0, 8, 8, 1, 1, 9, 9};
inline constexpr int kInt8Row[4] = {0, 0, 8, 8};
inline constexpr int kInt8Col[4] = {0, 1, 0, 1};

}  // namespace moelora::quant::wna16

// The launch every expert GEMM kernel shares (bf16, wna16, fp8, nvfp4; internal, nvcc only):
// the dynamic shared memory opt-in once per device, and the grid of row tiles x alignment
// blocks with programmatic dependent launch.
#pragma once

#include <algorithm>
#include <bitset>
#include <cstddef>
#include <mutex>

#include <cuda_runtime.h>

#include "kernels/cuda/moe_lora_inline_launch.h"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {

// Raises kKernel's dynamic shared memory limit once per device (not on every call, so that a
// graph capture sees only the launch).
template <auto kKernel>
cudaError_t allow_smem(int bytes) {
  static std::mutex mu;
  static std::bitset<64> devices;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const std::lock_guard<std::mutex> lock(mu);
  if (devices.test(size_t(device & 63))) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) devices.set(size_t(device & 63));
  return e;
}

// Launches kKernel(p) over max_blocks alignment blocks and the row tiles of p.n output rows,
// kRows weight rows per CTA (fused activation, p.act_out set: kRows / 2 gate plus the matching
// kRows / 2 up rows of n / 2 intermediate columns). p.row_tiles_fastest puts the row tiles on
// x (every CTA of a block dispatched together, the worst case's empty blocks last), else the
// blocks. With p.pdl the kernel may be scheduled while its predecessor drains (it waits with
// griddepcontrol.wait before reading anything the predecessor writes).
// Params with inline LoRA (p.inline_lora.parts > 0, moe_lora_inline_launch.h): kKernel must be the
// instantiation that carries LoRA CTAs; they are prepended on the block axis (lora_blocks
// entries covering max_blocks * parts units) and the shared memory raised to what they need.
template <auto kKernel, int kRows, class Params>
cudaError_t launch_expert_gemm(Params p, int max_blocks, int threads, int smem_bytes,
                               cudaStream_t stream) {
  const int tiles = p.act_out ? (p.n / 2 + kRows / 2 - 1) / (kRows / 2) : (p.n + kRows - 1) / kRows;
  int axis = max_blocks;  // entries on the block axis
  if constexpr (requires { p.inline_lora; }) {
    if (p.inline_lora.parts > 0) {
      const int64_t units = moe_lora_inline_units(p.inline_lora, max_blocks);
      const int64_t lb = (units + tiles - 1) / tiles;
      if (units > 0x7fffffff || (p.row_tiles_fastest && lb + max_blocks > 65535) ||
          threads > 32 * kInlineMaxWarps || p.block_m > kInlineMaxBlockM)
        return cudaErrorInvalidValue;
      p.lora_units = int(units);
      p.lora_blocks = int(lb);
      axis += int(lb);
      // One size per instantiation (allow_smem raises the limit once).
      smem_bytes = std::max(smem_bytes, moe_lora_inline_smem(threads, kInlineMaxBlockM));
    }
  }
  if (cudaError_t e = allow_smem<kKernel>(smem_bytes); e != cudaSuccess) return e;
  const dim3 grid = p.row_tiles_fastest ? dim3(tiles, axis) : dim3(axis, tiles);
  if (!p.pdl) {
    kKernel<<<grid, threads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
  return launch_pdl(kKernel, grid, dim3(threads), size_t(smem_bytes), stream, p);
}

}  // namespace moelora::cuda::detail

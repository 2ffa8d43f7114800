// Device code for token alignment: one CTA groups every slot by its group id into
// block_m-padded segments, slots ascending within a group (a stable counting sort).
//
// Warps own contiguous slot ranges. Pass 1: each warp counts its slots per group in its own
// shared-memory row (u16 [W][G]; __match_any_sync aggregates equal ids, so no atomics).
// Pass 2: per group, exclusive prefix over the warp rows and the padded group sizes; a block
// scan gives each group's padded offset. Pass 3: each warp walks its range again and places
// every slot at offset + (earlier warps' count) + (rank among equal ids in this chunk).
// Each group's owner thread then writes its padding and block entries.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

// Exclusive scan of one int per thread over the block; returns the exclusive prefix and the
// block total in `total`. Every thread of the block must call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int& total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += o;
    }
    warp_sums[lane] = s;  // inclusive over warps
  }
  __syncthreads();
  total = warp_sums[nwarps - 1];
  const int result = incl - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads();  // warp_sums may be reused by a later call
  return result;
}

// Aligns n slots whose group ids come from gid(s) (any value outside [0, G) is skipped).
// Runs on the whole block; `smem` holds align_smem_bytes(G, W) bytes.
template <class GidFn>
__device__ void align_block(GidFn gid, const AlignOut& o, void* smem) {
  const int G = o.num_groups, n = o.num_slots, bm = o.block_m, W = o.row_warps;
  int32_t* offsets = static_cast<int32_t*>(smem);
  int32_t* counts = offsets + G + 1;
  uint16_t* rows = reinterpret_cast<uint16_t*>(counts + G);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5;

  for (int i = tid; i < W * G; i += nthreads) rows[i] = 0;
  __syncthreads();

  const int chunks = (n + 31) >> 5;
  const int per_warp = (chunks + W - 1) / W;
  const int c_begin = warp * per_warp, c_end = min(chunks, c_begin + per_warp);
  auto group_of = [&](int s) {
    if (s >= n) return -1;
    const int g = gid(s);
    return (g >= 0 && g < G) ? g : -1;
  };

  if (warp < W) {  // pass 1: per-warp counts
    uint16_t* row = rows + warp * G;
    for (int c = c_begin; c < c_end; ++c) {
      const int g = group_of(c * 32 + lane);
      const unsigned peers = __match_any_sync(0xffffffffu, g);
      if (g >= 0 && lane == __ffs(peers) - 1) row[g] += uint16_t(__popc(peers));
      __syncwarp();
    }
  }
  __syncthreads();

  // pass 2: counts, per-warp exclusive prefixes, padded offsets
  const int per_thread = (G + nthreads - 1) / nthreads;
  const int g_begin = min(G, tid * per_thread), g_end = min(G, g_begin + per_thread);
  int local = 0;
  for (int g = g_begin; g < g_end; ++g) {
    int run = 0;
    for (int w = 0; w < W; ++w) {
      const int c = rows[w * G + g];
      rows[w * G + g] = uint16_t(run);
      run += c;
    }
    counts[g] = run;
    local += (run + bm - 1) / bm * bm;
  }
  int total;
  int start = block_exclusive_scan(local, total);
  for (int g = g_begin; g < g_end; ++g) {
    offsets[g] = start;
    start += (counts[g] + bm - 1) / bm * bm;
  }
  if (tid == 0) offsets[G] = total;
  __syncthreads();

  if (warp < W) {  // pass 3: place slots, ascending within each group
    uint16_t* row = rows + warp * G;
    const unsigned lt = (1u << lane) - 1u;
    for (int c = c_begin; c < c_end; ++c) {
      const int s = c * 32 + lane;
      const int g = group_of(s);
      const unsigned peers = __match_any_sync(0xffffffffu, g);
      if (g >= 0) o.sorted_slots[offsets[g] + row[g] + __popc(peers & lt)] = s;
      __syncwarp();
      if (g >= 0 && lane == __ffs(peers) - 1) row[g] += uint16_t(__popc(peers));
      __syncwarp();
    }
  }

  for (int g = tid; g <= G; g += nthreads) o.group_offsets[g] = offsets[g];
  if (tid == 0) o.num_padded[0] = total;
  // Each group's owner writes its blocks and padding (stores only, no searches).
  for (int g = g_begin; g < g_end; ++g) {
    const int off = offsets[g], c = counts[g], end = offsets[g + 1];
    for (int p = off + c; p < end; ++p) o.sorted_slots[p] = n;
    for (int b = off / bm; b < end / bm; ++b) o.block_group[b] = g;
  }
  for (int b = total / bm + tid; b < o.fill_blocks; b += nthreads) o.block_group[b] = -1;
}

}  // namespace moelora::cuda::detail

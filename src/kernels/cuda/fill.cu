// Device code and launcher for the counter-based uniform fill (no framework types here: fmt's
// consteval format strings do not survive nvcc, so the Tensor op lives in fill_op.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/fill_launch.h"

namespace moelora::cuda {
namespace {

template <class T>
__device__ T from_float(float f);
template <>
__device__ float from_float<float>(float f) { return f; }
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <>
__device__ __half from_float<__half>(float f) { return __float2half_rn(f); }
template <>
__device__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float f) { return __nv_fp8_e4m3(f); }

// Same hash as moelora::random_byte_at (host).
__global__ void fill_random_bits_kernel(uint8_t* out, int64_t n, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = (seed ^ 0xD1B54A32D192ED03ull) * 0x9E3779B97F4A7C15ull + uint64_t(i);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    out[i] = uint8_t((z ^ (z >> 31)) >> 24);
  }
}

// Same hash as moelora::uniform_at (host), so CPU and GPU fills agree.
__device__ float uniform_at_dev(uint64_t seed, uint64_t i, float lo, float hi) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = float(z >> 40) * (1.0f / 16777216.0f);
  return lo + (hi - lo) * u;
}

template <class T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(uniform_at_dev(seed, uint64_t(i), lo, hi));
}

template <class T>
cudaError_t launch(T* out, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 132 * 16);
  fill_uniform_kernel<T><<<unsigned(blocks), threads, 0, s>>>(out, n, seed, lo, hi);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fill_uniform(void* out, FillType type, int64_t n, uint64_t seed, float lo,
                                float hi, cudaStream_t stream) {
  switch (type) {
    case FillType::f32: return launch(static_cast<float*>(out), n, seed, lo, hi, stream);
    case FillType::bf16: return launch(static_cast<__nv_bfloat16*>(out), n, seed, lo, hi, stream);
    case FillType::f16: return launch(static_cast<__half*>(out), n, seed, lo, hi, stream);
    case FillType::f8_e4m3:
      return launch(static_cast<__nv_fp8_e4m3*>(out), n, seed, lo, hi, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_fill_random_bits(void* out, int64_t num_bytes, uint64_t seed,
                                    cudaStream_t stream) {
  if (num_bytes == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((num_bytes + threads - 1) / threads, 132 * 16);
  fill_random_bits_kernel<<<unsigned(blocks), threads, 0, stream>>>(static_cast<uint8_t*>(out),
                                                                    num_bytes, seed);
  return cudaGetLastError();
}

}  // namespace moelora::cuda

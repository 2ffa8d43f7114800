// Dense projections on cuBLAS (internal; CUDA builds only). The models' q/k/v, o, dense MLP
// and lm_head GEMMs run at every batch size from 1 to a few hundred tokens: below ~8 rows a
// GEMV streams the weights at copy bandwidth, above it tensor-core tiling decides the speed,
// and that is cuBLAS's job, not ours (the expert GEMMs are ours because of the routing).
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace moelora::cuda {

// y [m, n] = x [m, k] . w [n, k]^T with x and w bf16, f32 accumulation (reduced-precision
// split-K reductions disallowed), y f32 or bf16; all row-major and contiguous, on the current
// device. One cuBLAS handle per (thread, device), created on first use with a fixed workspace,
// so later calls allocate nothing and can be captured in a CUDA graph (warm up once before
// capturing). Throws moelora::Error naming the cuBLAS status on failure.
void cublas_linear_bf16(const void* x, const void* w, void* y, bool y_bf16, int64_t m, int64_t n,
                        int64_t k, cudaStream_t stream);

// The same product for f32 x and f32 y, faithful to f32 inputs: x is split into bf16 hi + lo
// (x - hi rounded again; together ~2^-16 relative), stacked as one [2m, k] input of one GEMM
// (one pass over the weights: at decode sizes the GEMM is bandwidth-bound), and
// y = hi . w^T + lo . w^T summed by a small kernel. hi / lo and the two halves of the product
// live in per-(thread, device) scratch that grows on demand (a cudaMalloc only when a larger
// m than ever before arrives: warm up before graph capture).
void cublas_linear_f32(const float* x, const void* w, float* y, int64_t m, int64_t n, int64_t k,
                       cudaStream_t stream);

}  // namespace moelora::cuda

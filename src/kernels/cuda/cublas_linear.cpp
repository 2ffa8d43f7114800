#include "kernels/cuda/cublas_linear.h"

#include <cublas_v2.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

#include "core/cuda_check.h"
#include "kernels/cuda/dense_ops_launch.h"

namespace moelora::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

#define MOELORA_CUBLAS_CHECK(expr)                                                  \
  do {                                                                              \
    const cublasStatus_t moelora_st_ = (expr);                                      \
    if (moelora_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      MOELORA_THROW("cuBLAS error {} ({}) in {}", cublasGetStatusName(moelora_st_), \
                    cublasGetStatusString(moelora_st_), #expr);                     \
  } while (0)

struct Handle {
  cublasHandle_t h = nullptr;
  void* workspace = nullptr;
  void* split = nullptr;  // bf16 [2m, k]: hi rows then lo rows, for cublas_linear_f32
  int64_t split_elems = 0;
  float* halves = nullptr;  // f32 [2m, n]: hi . w^T rows then lo . w^T rows
  int64_t halves_elems = 0;
  // Outgrown scratch buffers, never freed: a captured CUDA graph (a decode step) may still
  // use the address it was captured with. They total less than twice the largest.
  std::vector<void*> retired;
};

// Grows `buf` to hold `elems` elements of `elem_bytes` (doubling; a cudaMalloc only when a
// larger size than ever before arrives: never inside a graph capture, since the models run a
// step eagerly before capturing it).
template <class T>
void grow(Handle& hd, T*& buf, int64_t& cap, int64_t elems, size_t elem_bytes) {
  if (cap >= elems) return;
  if (buf) hd.retired.push_back(buf);
  buf = nullptr;
  const int64_t n = std::max(elems, 2 * cap);
  void* p = nullptr;
  MOELORA_CUDA_CHECK(cudaMalloc(&p, size_t(n) * elem_bytes));
  buf = static_cast<T*>(p);
  cap = n;
}

// Handles are kept for the life of the process on purpose: destroying them from thread-exit
// or static destructors can run after the CUDA context is gone.
Handle& handle_for_current_device() {
  thread_local std::unordered_map<int, Handle> handles;
  int dev = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&dev));
  Handle& hd = handles[dev];
  if (hd.h == nullptr) {
    MOELORA_CUBLAS_CHECK(cublasCreate(&hd.h));
    MOELORA_CUBLAS_CHECK(cublasSetMathMode(hd.h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    MOELORA_CUDA_CHECK(cudaMalloc(&hd.workspace, kWorkspaceBytes));
  }
  return hd;
}

void gemm(Handle& hd, const void* x, const void* w, void* y, cudaDataType_t y_type, float beta,
          int64_t m, int64_t n, int64_t k) {
  const float alpha = 1.f;
  // Column-major view: y^T [n, m] = w [k, n]^T . x^T [k, m].
  MOELORA_CUBLAS_CHECK(cublasGemmEx(hd.h, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &alpha,
                                    w, CUDA_R_16BF, int(k), x, CUDA_R_16BF, int(k), &beta, y,
                                    y_type, int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

Handle& bind(int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  MOELORA_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX,
                "cuBLAS linear: [{}, {}] x [{}, {}]^T exceeds 32-bit dimensions", m, k, n, k);
  Handle& hd = handle_for_current_device();
  // cublasSetStream resets the workspace to cuBLAS's own pool: set ours after it.
  MOELORA_CUBLAS_CHECK(cublasSetStream(hd.h, stream));
  MOELORA_CUBLAS_CHECK(cublasSetWorkspace(hd.h, hd.workspace, kWorkspaceBytes));
  return hd;
}

}  // namespace

void cublas_linear_f32(const float* x, const void* w, float* y, int64_t m, int64_t n, int64_t k,
                       cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  Handle& hd = bind(2 * m, n, k, stream);
  grow(hd, hd.split, hd.split_elems, 2 * m * k, 2);
  grow(hd, hd.halves, hd.halves_elems, 2 * m * n, 4);
  // hi and lo stacked as one [2m, k] input: one GEMM, one pass over the weights (two GEMMs
  // read them twice), then y = hi . w^T + lo . w^T.
  char* hi = static_cast<char*>(hd.split);
  MOELORA_CUDA_CHECK(launch_split_bf16(x, hi, hi + size_t(m * k) * 2, m * k, stream));
  gemm(hd, hi, w, hd.halves, CUDA_R_32F, 0.f, 2 * m, n, k);
  MOELORA_CUDA_CHECK(launch_add_f32(hd.halves, hd.halves + m * n, y, m * n, stream));
}

void cublas_linear_bf16(const void* x, const void* w, void* y, bool y_bf16, int64_t m, int64_t n,
                        int64_t k, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  Handle& hd = bind(m, n, k, stream);
  gemm(hd, x, w, y, y_bf16 ? CUDA_R_16BF : CUDA_R_32F, 0.f, m, n, k);
}

}  // namespace moelora::cuda

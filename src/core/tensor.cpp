#include "moelora/core/tensor.h"

#include <cstring>

#include "moelora/core/allocator.h"
#include "moelora/core/stream.h"

#ifdef MOELORA_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace moelora {
namespace {

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int i = int(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void check_shape_valid(const Shape& shape) {
  for (int64_t d : shape)
    MOELORA_CHECK(d >= 0, "tensor shape {} has a negative dimension", shape_str(shape));
}

#ifdef MOELORA_WITH_CUDA
cudaMemcpyKind copy_kind(Device dst, Device src) {
  if (dst.is_cpu() && src.is_cpu()) return cudaMemcpyHostToHost;
  if (dst.is_cpu()) return cudaMemcpyDeviceToHost;
  if (src.is_cpu()) return cudaMemcpyHostToDevice;
  return cudaMemcpyDeviceToDevice;
}
#endif

}  // namespace

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

float float_at(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::f32: return static_cast<const float*>(t.data())[i];
    case DType::bf16: return bf16_to_float(static_cast<const bf16_t*>(t.data())[i]);
    case DType::f16: return f16_to_float(static_cast<const f16_t*>(t.data())[i]);
    case DType::f8_e4m3: return f8e4m3_to_float(static_cast<const f8e4m3_t*>(t.data())[i]);
    default: MOELORA_THROW("float_at: {} is not a float tensor", t.describe());
  }
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  check_shape_valid(shape);
  Tensor t;
  t.dtype_ = dtype;
  t.device_ = device;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.defined_ = true;
  const size_t bytes = t.nbytes();
  void* p = device_allocate(bytes, device);
  t.storage_ = std::shared_ptr<void>(p, [bytes, device](void* q) { device_free(q, bytes, device); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.fill_bytes(0);
  return t;
}

Tensor Tensor::wrap(void* data, Shape shape, DType dtype, Device device,
                    std::shared_ptr<void> owner) {
  check_shape_valid(shape);
  Tensor t;
  t.storage_ = std::move(owner);
  t.dtype_ = dtype;
  t.device_ = device;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.data_ = data;
  t.defined_ = true;
  return t;
}

int64_t Tensor::size(int d) const {
  const int n = dim();
  if (d < 0) d += n;
  MOELORA_CHECK(d >= 0 && d < n, "dimension {} out of range for a {}-d tensor", d, n);
  return shape_[d];
}

int64_t Tensor::stride(int d) const {
  const int n = dim();
  if (d < 0) d += n;
  MOELORA_CHECK(d >= 0 && d < n, "dimension {} out of range for a {}-d tensor", d, n);
  return strides_[d];
}

int64_t Tensor::numel() const { return shape_numel(shape_); }

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int i = dim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

Tensor Tensor::narrow(int d, int64_t start, int64_t length) const {
  MOELORA_CHECK(defined_, "narrow on an undefined tensor");
  if (d < 0) d += dim();
  MOELORA_CHECK(d >= 0 && d < dim(), "narrow: dimension {} out of range for {}", d, describe());
  MOELORA_CHECK(start >= 0 && length >= 0 && start + length <= shape_[d],
                "narrow: [{}, {}) out of range for dimension {} of {}", start, start + length, d,
                describe());
  Tensor t = *this;
  t.shape_[d] = length;
  t.data_ = static_cast<char*>(data_) + start * strides_[d] * int64_t(dtype_size(dtype_));
  return t;
}

Tensor Tensor::view(Shape shape) const {
  MOELORA_CHECK(is_contiguous(), "view needs a contiguous tensor, found {}", describe());
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MOELORA_CHECK(infer < 0, "view: more than one -1 in {}", shape_str(shape));
      infer = int(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MOELORA_CHECK(known > 0 && numel() % known == 0, "view: cannot infer {} from {}",
                  shape_str(shape), describe());
    shape[infer] = numel() / known;
  }
  MOELORA_CHECK(shape_numel(shape) == numel(), "view: {} has {} elements, {} has {}",
                shape_str(shape), shape_numel(shape), describe(), numel());
  Tensor t = *this;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::to(Device device, const Stream* stream) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this, stream);
  return t;
}

void Tensor::copy_from(const Tensor& src, const Stream* stream) {
  MOELORA_CHECK(src.dtype_ == dtype_ && src.shape_ == shape_,
                "copy_from: destination {} and source {} differ", describe(), src.describe());
  MOELORA_CHECK(is_contiguous() && src.is_contiguous(),
                "copy_from needs contiguous tensors: {} <- {}", describe(), src.describe());
  const size_t bytes = nbytes();
  if (bytes == 0) return;
  if (device_.is_cpu() && src.device_.is_cpu()) {
    std::memcpy(data_, src.data_, bytes);
    return;
  }
#ifdef MOELORA_WITH_CUDA
  const cudaMemcpyKind kind = copy_kind(device_, src.device_);
  if (stream) {
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(data_, src.data_, bytes, kind,
                                       static_cast<cudaStream_t>(stream->handle())));
  } else {
    // cudaMemcpy from pageable memory may return before the DMA lands, and the legacy stream
    // is not ordered with non-blocking streams: synchronize so "complete on return" holds.
    MOELORA_CUDA_CHECK(cudaMemcpy(data_, src.data_, bytes, kind));
    MOELORA_CUDA_CHECK(cudaDeviceSynchronize());
  }
#else
  (void)stream;
  MOELORA_THROW("copy to/from {} needs CUDA, but moelora was built without it",
                device_.is_cpu() ? src.device_.str() : device_.str());
#endif
}

void Tensor::fill_bytes(uint8_t value, const Stream* stream) {
  MOELORA_CHECK(is_contiguous(), "fill_bytes needs a contiguous tensor, found {}", describe());
  if (nbytes() == 0) return;
  if (device_.is_cpu()) {
    std::memset(data_, value, nbytes());
    return;
  }
#ifdef MOELORA_WITH_CUDA
  if (stream) {
    MOELORA_CUDA_CHECK(
        cudaMemsetAsync(data_, value, nbytes(), static_cast<cudaStream_t>(stream->handle())));
  } else {
    MOELORA_CUDA_CHECK(cudaMemset(data_, value, nbytes()));
    MOELORA_CUDA_CHECK(cudaDeviceSynchronize());  // complete on return, as copy_from
  }
#else
  (void)stream;
#endif
}

std::string Tensor::describe() const {
  if (!defined_) return "<undefined tensor>";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_str(shape_), device_.str());
}

void check_dtype(const Tensor& t, DType expected, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: tensor is undefined", what);
  MOELORA_CHECK(t.dtype() == expected, "{}: expected dtype {}, found {}", what,
                dtype_name(expected), t.describe());
}

void check_shape(const Tensor& t, const Shape& expected, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: tensor is undefined", what);
  MOELORA_CHECK(t.shape() == expected, "{}: expected shape {}, found {}", what,
                shape_str(expected), t.describe());
}

void check_device(const Tensor& t, Device expected, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: tensor is undefined", what);
  MOELORA_CHECK(t.device() == expected, "{}: expected a tensor on {}, found {}", what,
                expected.str(), t.describe());
}

void check_contiguous(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: tensor is undefined", what);
  MOELORA_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor, found {} with strides {}",
                what, t.describe(), shape_str(t.strides()));
}

}  // namespace moelora

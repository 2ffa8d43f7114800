// Tensor: a typed, strided view of host or device memory with shared RAII ownership.
// Copies of a Tensor share storage (like a shared_ptr); views (narrow, view) too.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "moelora/core/device.h"
#include "moelora/core/dtype.h"
#include "moelora/core/error.h"

namespace moelora {

class Stream;
using Shape = std::vector<int64_t>;

class Tensor {
 public:
  Tensor() = default;  // undefined tensor

  // Uninitialized contiguous storage.
  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu());
  // A view of memory someone else owns; `owner` (optional) is kept alive with the tensor.
  static Tensor wrap(void* data, Shape shape, DType dtype, Device device = Device::cpu(),
                     std::shared_ptr<void> owner = nullptr);

  bool defined() const { return defined_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int dim() const { return int(shape_.size()); }
  // Size of dimension `d`; negative counts from the back.
  int64_t size(int d) const;
  int64_t stride(int d) const;
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;

  void* data() const { return data_; }
  template <class T>
  T* data() const {
    MOELORA_CHECK(dtype_of<T>() == dtype_, "tensor dtype: expected {}, found {}",
                  dtype_name(dtype_of<T>()), dtype_name(dtype_));
    return static_cast<T*>(data_);
  }

  // A view of [start, start+length) along `dim`.
  Tensor narrow(int dim, int64_t start, int64_t length) const;
  // The first `rows` rows (dim 0) — how workspaces sized for a maximum are used per call.
  Tensor first_rows(int64_t rows) const { return narrow(0, 0, rows); }
  // A contiguous tensor with a new shape (same numel); one dimension may be -1.
  Tensor view(Shape shape) const;

  // A contiguous copy on `device`. With a stream the copy is asynchronous on it; without,
  // it is complete on return.
  Tensor to(Device device, const Stream* stream = nullptr) const;
  // Copies `src` (same dtype and shape, both contiguous) into this tensor.
  void copy_from(const Tensor& src, const Stream* stream = nullptr);
  // Fills every byte (e.g. 0xFF poisons float outputs with NaN). Without a stream, complete
  // on return.
  void fill_bytes(uint8_t value, const Stream* stream = nullptr);

  // "bf16[4, 8] cuda:0"
  std::string describe() const;

 private:
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  Shape shape_;
  Shape strides_;  // in elements
  DType dtype_ = DType::f32;
  Device device_;
  bool defined_ = false;
};

std::string shape_str(const Shape& shape);

// Element i (in contiguous order) of a host f32/bf16/f16/f8_e4m3 tensor, as float.
float float_at(const Tensor& t, int64_t i);

// Argument checks for ops: they throw moelora::Error naming `what`, expected vs found.
void check_dtype(const Tensor& t, DType expected, const char* what);
void check_shape(const Tensor& t, const Shape& expected, const char* what);
void check_device(const Tensor& t, Device expected, const char* what);
void check_contiguous(const Tensor& t, const char* what);

}  // namespace moelora

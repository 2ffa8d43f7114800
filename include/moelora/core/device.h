// Where a tensor lives and where work runs.
#pragma once

#include <string>

namespace moelora {

struct Device {
  enum class Kind : uint8_t { cpu, cuda };
  Kind kind = Kind::cpu;
  int index = 0;

  static Device cpu() { return {Kind::cpu, 0}; }
  static Device cuda(int index = 0) { return {Kind::cuda, index}; }
  bool is_cpu() const { return kind == Kind::cpu; }
  bool is_cuda() const { return kind == Kind::cuda; }
  bool operator==(const Device&) const = default;
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
};

// True when the library was built with CUDA and at least one device is usable.
bool cuda_available();
// True when the library was built with the CUDA backend at all.
bool built_with_cuda();

}  // namespace moelora

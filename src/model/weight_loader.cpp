#include "model/weight_loader.h"

#include <cstring>
#include <vector>

namespace moelora {

WeightLoader::WeightLoader(const std::string& dir, Progress progress)
    : ck_(Checkpoint::open(dir)), progress_(std::move(progress)),
      total_(int64_t(ck_.names().size())) {}

Tensor WeightLoader::bf16(const std::string& name, const Shape& shape) {
  MOELORA_CHECK(ck_.contains(name), "checkpoint {}: missing tensor '{}' (expected {} bf16)",
                ck_.dir(), name, shape_str(shape));
  const SafetensorsEntry& e = ck_.entry(name);
  MOELORA_CHECK(e.shape == shape, "checkpoint {}: tensor '{}' has shape {}, expected {}", ck_.dir(),
                name, shape_str(e.shape), shape_str(shape));
  MOELORA_CHECK(e.dtype == "BF16" || e.dtype == "F32" || e.dtype == "F16",
                "checkpoint {}: tensor '{}' has dtype {}, expected BF16 (or F32 / F16)", ck_.dir(),
                name, e.dtype);
  if (used_.insert(name).second && progress_) progress_(int64_t(used_.size()), total_, name);
  Tensor t = ck_.tensor(name);
  if (t.dtype() == DType::bf16) return t;
  Tensor out = Tensor::empty(shape, DType::bf16);
  bf16_t* o = out.data<bf16_t>();
  for (int64_t i = 0; i < t.numel(); ++i) o[i] = float_to_bf16(float_at(t, i));
  return out;
}

void WeightLoader::copy_into(const std::string& name, const Shape& shape, Tensor& dst, int64_t at) {
  Tensor t = bf16(name, shape);
  MOELORA_CHECK(at >= 0 && at + t.numel() <= dst.numel(),
                "copy_into: tensor '{}' does not fit at {} of {}", name, at, dst.describe());
  std::memcpy(dst.data<bf16_t>() + at, t.data<bf16_t>(), size_t(t.numel()) * sizeof(bf16_t));
}

void WeightLoader::check_all_used() const {
  std::vector<std::string> unused;
  for (const std::string& n : ck_.names())
    if (!used_.count(n)) unused.push_back(n);
  if (unused.empty()) return;
  std::string list;
  for (size_t i = 0; i < unused.size() && i < 8; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
  if (unused.size() > 8) list += fmt::format(" and {} more", unused.size() - 8);
  MOELORA_THROW(
      "checkpoint {}: {} tensor(s) are not used by the model (unexpected keys: {}); "
      "refusing to drop weights silently",
      ck_.dir(), unused.size(), list);
}

}  // namespace moelora

#include <algorithm>
#include <mutex>

#include "moe/builtin_backends.h"
#include "moelora/moe/backend.h"

namespace moelora {
namespace {

struct Entry {
  MoeBackendInfo info;
  MoeBackendFactory factory;
};

struct Registry {
  std::mutex mutex;
  std::vector<Entry> entries;
};

Registry& storage() {
  static Registry r;
  return r;
}

// Built-ins register on first use (explicitly, so static linking cannot drop them).
std::vector<Entry> entries() {
  static std::once_flag once;
  std::call_once(once, [] { register_builtin_moe_backends(); });
  std::lock_guard<std::mutex> lock(storage().mutex);
  return storage().entries;
}

std::string names_of(const std::vector<Entry>& all) {
  std::string s;
  for (const auto& e : all) s += (s.empty() ? "" : ", ") + e.info.name;
  return s;
}

}  // namespace

void MoeBackend::gemm1_lora(const Tensor&, int, const MoeAlignment&, const ExpertMatrices&,
                            const MoeLoraInline&, Tensor&, const Stream&) {
  MOELORA_THROW("MoE backend '{}' does not run inline LoRA (runs_inline_lora() is false)", name());
}

void MoeBackend::gemm2_lora(const Tensor&, const MoeAlignment&, const ExpertMatrices&,
                            const Tensor&, const MoeLoraInline&, Tensor&, const Stream&) {
  MOELORA_THROW("MoE backend '{}' does not run inline LoRA (runs_inline_lora() is false)", name());
}

void register_moe_backend(MoeBackendInfo info, MoeBackendFactory factory) {
  Registry& reg = storage();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (const auto& e : reg.entries)
    MOELORA_CHECK(e.info.name != info.name, "MoE backend '{}' registered twice", info.name);
  reg.entries.push_back({std::move(info), std::move(factory)});
}

std::vector<MoeBackendInfo> moe_backends() {
  std::vector<MoeBackendInfo> out;
  for (const auto& e : entries()) out.push_back(e.info);
  return out;
}

std::unique_ptr<MoeBackend> make_moe_backend(std::string_view name, const MoeProblem& p) {
  const auto all = entries();
  for (const auto& e : all) {
    if (e.info.name != name) continue;
    MOELORA_CHECK(e.info.device_kind == p.device.kind,
                  "MoE backend '{}' runs on {}, but the problem is on {}", name,
                  e.info.device_kind == Device::Kind::cpu ? "cpu" : "cuda", p.device.str());
    auto backend = e.factory(p.device);
    std::string why;
    MOELORA_CHECK(backend->supports(p, &why), "MoE backend '{}' cannot run shape '{}': {}", name,
                  p.shape.name, why);
    backend->prepare(p);
    return backend;
  }
  MOELORA_THROW("unknown MoE backend '{}'; known: {}", name, names_of(all));
}

std::unique_ptr<MoeBackend> pick_moe_backend(const MoeProblem& p) {
  auto all = entries();
  std::stable_sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) {
    return a.info.priority > b.info.priority;
  });
  std::string reasons;
  for (const auto& e : all) {
    if (e.info.device_kind != p.device.kind) continue;
    auto backend = e.factory(p.device);
    std::string why;
    if (backend->supports(p, &why)) {
      backend->prepare(p);
      return backend;
    }
    reasons += fmt::format("; {}: {}", e.info.name, why);
  }
  MOELORA_THROW("no MoE backend on {} can run shape '{}' (H={}, I={}, E={}, top_k={}){}",
                p.device.str(), p.shape.name, p.shape.hidden, p.shape.inter, p.shape.num_experts,
                p.shape.top_k,
                reasons.empty() ? std::string("; none registered for this device") : reasons);
}

}  // namespace moelora

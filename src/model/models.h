// The architectures Model::load can build (internal).
#pragma once

#include <memory>
#include <string>

#include "moelora/model/model.h"

namespace moelora {

std::unique_ptr<Model> make_qwen3_moe(const std::string& dir, const HfModelConfig& config,
                                      const ModelOptions& options);
std::unique_ptr<Model> make_mixtral(const std::string& dir, const HfModelConfig& config,
                                    const ModelOptions& options);
// deepseek_v2, deepseek_v3, kimi_k2 (MLA; src/model/deepseek*.cpp).
std::unique_ptr<Model> make_deepseek(const std::string& dir, const HfModelConfig& config,
                                     const ModelOptions& options);

}  // namespace moelora

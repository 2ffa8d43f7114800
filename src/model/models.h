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

}  // namespace moelora

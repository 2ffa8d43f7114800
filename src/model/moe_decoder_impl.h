// The MoeDecoder class behind make_moe_decoder (internal; split over moe_decoder.cpp: load and
// forward, moe_decoder_step.cpp: step tables, moe_decoder_lora.cpp: adapters).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/moe_decoder.h"
#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {

struct DecoderLayer {
  Tensor input_norm, post_norm;
  Tensor qkv;  // [nq + 2 nkv, H]: q rows, then k, then v
  Tensor o_proj, q_norm, k_norm;
  bool moe = false;
  Tensor router;       // [E, H]
  MoeWeights experts;  // w13 [E, 2I, H], w2 [E, H, I]
  Tensor mlp_gate_up;  // dense layers: [2 * intermediate, H] (gate rows first)
  Tensor mlp_down;     // [H, intermediate]
  // LoRA (when ModelOptions::lora_slots > 0).
  std::unique_ptr<DenseLoraPool> qkv_lora, o_lora, gate_up_lora, down_lora;
  std::unique_ptr<MoeLoraPool> lora_pool;
  std::unique_ptr<MoeLoraHooks> lora_hooks;
};

// Per-token tables of one step.
struct StepTables {
  Tensor ids, positions, token_seq, slots;  // i32 [M]
  Tensor block_table;                       // i32 [S, max_pages]
};

struct LoraBatchState {
  bool any = false;   // some token has an adapter
  Tensor token_slot;  // i32 [M], -1 = base
};

class MoeDecoder final : public Model {
 public:
  MoeDecoder(const std::string& dir, const HfModelConfig& config, const ModelOptions& options,
             const MoeDecoderFamily& family);

  const HfModelConfig& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }
  KvCacheConfig kv_cache_config(int64_t num_pages, int page_size, DType dtype) const override;
  StepResult forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                     bool all_logits) override;
  void load_adapter(int slot, const PeftAdapter& adapter) override;
  void unload_adapter(int slot) override;
  bool adapter_loaded(int slot) const override {
    return slot >= 0 && slot < int(adapter_loaded_.size()) && adapter_loaded_[size_t(slot)];
  }
  int num_adapter_slots() const override { return int(adapter_loaded_.size()); }

 private:
  void check_slot(int slot) const;
  // Validates the batch (before the cache changes), reserves pages, builds the tables.
  void prepare_step(const std::vector<SeqInput>& batch, PagedKvCache& cache, StepTables& t,
                    LoraBatchState& lb, std::vector<int64_t>& last_row) const;
  void attention(DecoderLayer& L, int layer, const Tensor& xn, const Tensor& xb,
                 const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache, Tensor& out);
  void mlp(DecoderLayer& L, const Tensor& xn, const Tensor& xb, const LoraBatchState& lb,
           Tensor& out, Tensor& router_margin, int margin_col);

  HfModelConfig config_;
  ModelOptions options_;
  MoeDecoderFamily family_;
  Stream stream_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<DecoderLayer> layers_;
  std::unique_ptr<MoeRunner> runner_;
  std::vector<bool> adapter_loaded_;
};

}  // namespace moelora

// DeepSeek-V2 / V3 / Kimi-K2 with multi-head latent attention (internal; see deepseek.cpp).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/step_output.h"
#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/model/model.h"
#include "moelora/moe/runner.h"

namespace moelora {

struct MlaLayer {
  Tensor input_norm, post_norm;
  Tensor q_proj;                        // [heads * (nope + rope), H] when q_lora_rank is null
  Tensor q_a_proj, q_a_norm, q_b_proj;  // when q_lora_rank is set
  Tensor kv_a_proj, kv_a_norm, kv_b_proj, o_proj;
  bool moe = false;
  Tensor router;       // [E, H]
  MoeWeights experts;  // routed (+ shared) experts, correction_bias (f32 [E]) for noaux_tc
  Tensor mlp_gate_up;  // dense layers: [2 * intermediate, H]
  Tensor mlp_down;
  std::unique_ptr<MoeLoraPool> lora_pool;
  std::unique_ptr<MoeLoraHooks> lora_hooks;
  // Attention LoRA by projection name (q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa /
  // kv_b_proj / o_proj); kv_b_proj's is applied through the absorbed-path correction.
  std::map<std::string, std::unique_ptr<DenseLoraPool>> attn_lora;
};

// The buffers every step reuses (sized for max_step_tokens at load; see StepBuffer).
struct MlaWorkspace {
  // Reallocations of the buffers below: a decode graph captured before one may hold a freed
  // address and is captured again (decode_graphs.h). The eager path's step tables count apart
  // (graphs keep their own).
  uint64_t moves = 0, tables_moves = 0;
  MlaWorkspace() = default;
  MlaWorkspace(const MlaWorkspace&) = delete;
  MlaWorkspace& operator=(const MlaWorkspace&) = delete;
  StepBuffer h{moves}, xn{moves}, delta{moves}, xb{moves};          // residual stream f32, its norm, a layer's output; bf16 xn
  StepBuffer q{moves}, qa{moves}, kv{moves}, attn{moves};           // f32 projections: q, q_a (q_lora_rank), kv_a, attention
  StepBuffer q_lat{moves}, lat{moves};                // absorbed path: f32 [M, heads x (L + rope)], [M, heads x L]
  StepBuffer e_lat{moves}, e_ckv{moves}, e_kvb{moves};       // expanded path: gathered rows, their kv part, kv_b_proj
  StepBuffer lora_x{moves}, lora_u{moves};            // dense LoRA: bf16 input, f32 shrink output
  StepBuffer router_logits{moves}, moe_y{moves};      // f32 [M, E], bf16 [M, H]
  StepBuffer gate_up{moves}, act{moves};              // dense MLP layers
  StepBuffer last_h{moves}, last_n{moves};            // f32 [S, H]: last rows, normed
  StepBuffer out{moves};                       // f32 logits + router margins (what is downloaded)
  StepBuffer tables{tables_moves};                    // i32 device copy of the packed step tables
};

// Which attention path a step takes: automatic = expanded K/V for prefill chunks (a sequence
// with more than one new token), absorbed for decode tokens; or one path for everything (tests
// check that both agree with transformers).
enum class MlaPath : uint8_t { automatic, absorbed, expanded };

class DeepseekModel final : public Model {
 public:
  DeepseekModel(const std::string& dir, const HfModelConfig& config, const ModelOptions& options);

  const HfModelConfig& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }
  // The MLA cache: one latent row [kv_lora_rank + qk_rope_head_dim] per token and layer.
  KvCacheConfig kv_cache_config(int64_t num_pages, int page_size, DType dtype) const override;
  StepResult forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                     bool all_logits) override;
  void load_adapter(int slot, const PeftAdapter& adapter) override;
  void unload_adapter(int slot) override;
  bool adapter_loaded(int slot) const override {
    return slot >= 0 && slot < int(adapter_loaded_.size()) && adapter_loaded_[size_t(slot)];
  }
  int num_adapter_slots() const override { return int(adapter_loaded_.size()); }
  void set_attention_path(MlaPath path) { path_ = path; }

 private:
  // Per-step tables shared by the layers: i32 tensors on the model's device (views of one
  // packed upload), and what the host knows of each sequence.
  struct StepCtx {
    Tensor ids, positions, token_seq, slots, block_table, token_slot, last_row;
    bool lora = false;
    struct Segment {
      int64_t row0 = 0, n = 0;  // the sequence's new tokens: rows [row0, row0 + n)
      int64_t start = 0;        // cached positions before this step
      int adapter_slot = -1;
      bool expand = false;      // the expanded attention path (else absorbed)
      Tensor kv_b_slot;         // expanded with an adapter: i32 [start + n] = adapter_slot
    };
    std::vector<Segment> segments;  // in batch order (block_table row = index)
  };
  void check_slot(int slot) const;
  // A host tensor as the model keeps it: itself on the CPU, a device copy on CUDA.
  Tensor place(const Tensor& host) const;
  void reserve_workspace();
  // Validates the batch (before the cache changes), reserves pages, builds the tables.
  void prepare_step(const std::vector<SeqInput>& batch, PagedKvCache& cache, StepCtx& s);
  void add_lora(MlaLayer& Ly, const char* name, const Tensor& x, const Tensor& token_slot,
                bool lora, Tensor& y);
  void attention(MlaLayer& Ly, int layer, const Tensor& xn, const StepCtx& s, PagedKvCache& cache,
                 Tensor& out);
  // Attention of rows [row0, row0 + n) (q roped, the step's latent rows already cached) into
  // out f32 [n, heads * v_head_dim]: any tokens of any sequences on the absorbed path, one
  // sequence's on the expanded path.
  void absorbed_rows(MlaLayer& Ly, int layer, const Tensor& q, const StepCtx& s, int64_t row0,
                     PagedKvCache& cache, Tensor& out);
  void expanded_rows(MlaLayer& Ly, int layer, const Tensor& q, const StepCtx& s, size_t seg,
                     PagedKvCache& cache, Tensor& out);
  void mlp(MlaLayer& Ly, const Tensor& xn, const StepCtx& s, Tensor& out, Tensor& router_margin,
           int margin_col);

  HfModelConfig config_;
  ModelOptions options_;
  Device device_;
  Stream stream_;
  bool rope_interleave_ = true;
  MlaPath path_ = MlaPath::automatic;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<MlaLayer> layers_;
  std::unique_ptr<MoeRunner> runner_;
  std::vector<bool> adapter_loaded_;
  int num_moe_layers_ = 0;
  MlaWorkspace ws_;
  ResultDownload download_;  // logits + margins to the host (pinned staging on CUDA)
  Tensor staging_;  // host i32 step tables (pageable: reusable once the upload call returns)
};

}  // namespace moelora

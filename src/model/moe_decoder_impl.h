// The MoeDecoder class behind make_moe_decoder (internal; split over moe_decoder.cpp: load and
// forward, moe_decoder_step.cpp: step tables and buffers, moe_decoder_lora.cpp: adapters).
//
// One code path for both backends: every tensor of the model (weights, LoRA pools, per-step
// buffers, step tables, the KV cache it asks for) lives on ModelOptions::device, and the
// dense ops dispatch on where their tensors live (model/ops.h). On CUDA a step does one
// host->device copy (the packed step tables, from pinned memory) and one device->host copy
// (logits and router margins), with no sync in between.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/decode_graphs.h"
#include "model/moe_decoder.h"
#include "model/rope.h"
#include "model/step_output.h"
#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {

class WeightLoader;

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

// Per-token tables of one step, on the model's device (views of one packed i32 upload).
struct StepTables {
  Tensor ids, positions, token_seq, slots;  // i32 [M]
  Tensor last_row;                          // i32 [S]: each sequence's last new token
  Tensor block_table;                       // i32 [S, max_pages]
};

struct LoraBatchState {
  bool any = false;   // some token has an adapter
  Tensor token_slot;  // i32 [M], -1 = base
};

// A step's sizes once validated: M new tokens of S sequences, P pages per block-table row.
struct StepDims {
  int64_t m = 0, s = 0, p = 0;
};

struct StepWorkspace {
  // Reallocations of the buffers below: a decode graph captured before one may hold a freed
  // address and is captured again (decode_graphs.h). The eager path's step tables count apart
  // (graphs keep their own).
  uint64_t moves = 0, tables_moves = 0;
  StepWorkspace() = default;
  StepWorkspace(const StepWorkspace&) = delete;
  StepWorkspace& operator=(const StepWorkspace&) = delete;
  // Residual stream f32, its norm, a layer's output; the bf16 norm.
  StepBuffer h{moves}, xn{moves}, delta{moves}, xb{moves};
  // Attention (attn_b: the bf16 input of o_proj's LoRA).
  StepBuffer qkv{moves}, q{moves}, k{moves}, v{moves}, attn{moves}, attn_b{moves};
  StepBuffer router_logits{moves}, moe_y{moves};        // f32 [M, E], bf16 [M, H]
  StepBuffer gate_up{moves}, act{moves}, act_b{moves};  // dense MLP layers
  StepBuffer lora_u{moves};                 // dense LoRA shrink output f32 [M, slices * r_max]
  StepBuffer last_h{moves}, last_n{moves};  // f32 [S, H]: last rows, normed
  StepBuffer out{moves};                    // f32 logits + router margins (what is downloaded)
  StepBuffer tables{tables_moves};          // i32 device copy of the packed step tables
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
  void set_decode_options(const DecodeOptions& options) override;

 private:
  void check_slot(int slot) const;
  // A host tensor as the model keeps it: itself on the CPU, a device copy on CUDA.
  Tensor place(const Tensor& host) const;
  // One layer's routed experts from the checkpoint (host tensors, checked against the shape).
  // The one place expert weights are read: quantized formats plug in here.
  MoeWeights load_experts(WeightLoader& wl, int layer) const;
  // Sizes the per-step buffers for max_step_tokens.
  void reserve_workspace();
  // Validates the batch (before the cache changes) and reserves its pages.
  StepDims validate_step(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                         LoraBatchState& lb);
  // Builds the step tables for `rows` token rows (= sequences when padded), `pages` block-
  // table columns, and uploads them into `dst` (i32, on CUDA; the CPU uses the staging).
  // Rows past the batch's are padding: token 0 at position 0 of its own sequence, reading
  // page 0 and writing no KV (slot -1), base model.
  void build_tables(const std::vector<SeqInput>& batch, PagedKvCache& cache, const StepDims& d,
                    int64_t rows, int64_t pages, Tensor dst, StepTables& t, LoraBatchState& lb);
  // Enqueues a whole step (embedding .. logits) on stream_: run eagerly or captured.
  void run_step(const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache,
                StepOutput& result);
  // The fast path: the step from its graph (captured on first use).
  StepResult forward_graph(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                           const StepDims& d, int64_t bucket, LoraBatchState& lb);
  bool overlap_lora() const { return decode_options_.path == DecodePath::fast && side_.handle(); }
  // The dense LoRA shrink output for `rows` tokens of `pool` (f32 [rows, slices x r_max]).
  Tensor lora_u(const DenseLoraPool& pool, int64_t rows);
  // y += the LoRA delta of each token's slot; a no-op without a pool or adapter tokens.
  void add_lora(const DenseLoraPool* pool, const Tensor& xb, const LoraBatchState& lb, Tensor& y);
  // Adds the attention block's output to the residual stream h (`out` is scratch).
  void attention(DecoderLayer& L, int layer, const Tensor& xn, const Tensor& xb,
                 const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache, Tensor& out,
                 Tensor& h);
  void mlp(DecoderLayer& L, const Tensor& xn, const Tensor& xb, const LoraBatchState& lb,
           Tensor& out, Tensor& router_margin, int margin_col);

  HfModelConfig config_;
  ModelOptions options_;
  MoeDecoderFamily family_;
  Device device_;
  Stream stream_;
  Tensor embed_, final_norm_, lm_head_;
  RopeTable rope_;  // YaRN's frequency table and cos / sin factor (model/rope.h)
  std::vector<DecoderLayer> layers_;
  int num_moe_layers_ = 0;
  std::unique_ptr<MoeRunner> runner_;
  std::vector<bool> adapter_loaded_;
  StepWorkspace ws_;
  ResultDownload download_;  // logits + margins to the host (pinned staging on CUDA)
  Tensor staging_;           // host i32 tables (pinned on CUDA)
  DecodeGraphs graphs_;      // the fast path's decode graphs
  Stream side_;              // CUDA: the fast path's dense LoRA shrinks
  Event fork_, join_;
  bool upload_pending_ = false;  // staging_ may still be read by an enqueued copy
};

}  // namespace moelora

// DeepSeek-V2 / V3 / Kimi-K2 with multi-head latent attention (internal; see deepseek.cpp).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/decode_graphs.h"
#include "model/rope.h"
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
  // address and is captured again (decode_graphs.h). Decode graphs read none of the eager
  // step tables nor the expanded (prefill) path's buffers, which grow with the context of the
  // prefill chunks seen: those count apart, so a longer prompt does not invalidate them.
  uint64_t moves = 0, tables_moves = 0, expanded_moves = 0;
  MlaWorkspace() = default;
  MlaWorkspace(const MlaWorkspace&) = delete;
  MlaWorkspace& operator=(const MlaWorkspace&) = delete;
  // Residual stream f32, its norm, a layer's output; the bf16 norm.
  StepBuffer h{moves}, xn{moves}, delta{moves}, xb{moves};
  // f32 projections: q, q_a (q_lora_rank), kv_a, attention.
  StepBuffer q{moves}, qa{moves}, kv{moves}, attn{moves};
  // Absorbed path: f32 [M, heads x (L + rope)], [M, heads x L].
  StepBuffer q_lat{moves}, lat{moves};
  StepBuffer lora_x{moves}, lora_u{moves};  // dense LoRA (hooks): bf16 input, f32 shrink output
  // The fast path's side stream: the bf16 LoRA input, the shrink outputs of q / q_a / q_b /
  // o_proj and of kv_a_proj_with_mqa (live at the same time).
  StepBuffer side_x{moves}, side_u{moves}, side_u_kv{moves};
  StepBuffer router_logits{moves}, moe_y{moves};  // f32 [M, E], bf16 [M, H]
  StepBuffer gate_up{moves}, act{moves};          // dense MLP layers
  StepBuffer last_h{moves}, last_n{moves};        // f32 [S, H]: last rows, normed
  StepBuffer out{moves};  // f32 logits + router margins (what is downloaded)
  // Expanded path: gathered latent rows, their kv part, kv_b_proj's output, its LoRA buffers.
  StepBuffer e_lat{expanded_moves}, e_ckv{expanded_moves}, e_kvb{expanded_moves};
  StepBuffer e_lora_x{expanded_moves}, e_lora_u{expanded_moves};
  StepBuffer tables{tables_moves};  // i32 device copy of the packed step tables (eager steps)
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
  // DecodePath::fast on CUDA: decode steps (every sequence one new token on the absorbed
  // path, last-token logits, at most max_batch sequences) replay a CUDA graph per batch
  // bucket, and the attention LoRA shrinks run on a side stream (see deepseek_fast.cpp).
  void set_decode_options(const DecodeOptions& options) override;

 private:
  // Per-step tables shared by the layers: i32 tensors on the model's device (views of one
  // packed upload), and what the host knows of each sequence.
  struct StepCtx {
    Tensor ids, positions, token_seq, slots, block_table, token_slot, last_row;
    bool lora = false;
    int64_t m = 0, p = 0;  // new tokens, block-table width the sequences need
    struct Segment {
      int64_t row0 = 0, n = 0;  // the sequence's new tokens: rows [row0, row0 + n)
      int64_t start = 0;        // cached positions before this step
      int adapter_slot = -1;
      bool expand = false;  // the expanded attention path (else absorbed)
      Tensor kv_b_slot;     // expanded with an adapter: i32 [start + n] = adapter_slot
    };
    std::vector<Segment> segments;  // in batch order (block_table row = index)
    // Every row on the absorbed path (decode steps): the fast path may overlap its LoRA.
    bool all_absorbed() const {
      for (const Segment& g : segments)
        if (g.expand) return false;
      return true;
    }
  };
  void check_slot(int slot) const;
  // A host tensor as the model keeps it: itself on the CPU, a device copy on CUDA.
  Tensor place(const Tensor& host) const;
  void reserve_workspace();
  // Validates the batch (before the cache changes), reserves its pages, fills the segments.
  void validate_step(const std::vector<SeqInput>& batch, PagedKvCache& cache, StepCtx& s);
  // Builds the step tables for `rows` token rows and `pages` block-table columns into `dst`
  // (i32 on the model's device). Rows past the batch's (decode steps padded to a graph's
  // bucket) are padding: token 0 at position 0 of their own sequence, reading page 0, writing
  // no latent row (slot -1), base model; they get segments of their own.
  void build_tables(const std::vector<SeqInput>& batch, PagedKvCache& cache, int64_t rows,
                    int64_t pages, Tensor dst, StepCtx& s);
  // Enqueues a whole step (embedding .. logits) on stream_: run eagerly or captured.
  void run_step(const StepCtx& s, PagedKvCache& cache, StepOutput& result);
  // The fast path: the step from its graph (captured on first use).
  StepResult forward_graph(const std::vector<SeqInput>& batch, PagedKvCache& cache, StepCtx& s,
                           int64_t bucket);
  bool overlap_lora() const { return decode_options_.path == DecodePath::fast && side_.handle(); }
  // y (f32) += the LoRA of `name` through the bf16 input / shrink output buffers given.
  void add_lora(MlaLayer& Ly, const char* name, const Tensor& x, const Tensor& token_slot,
                bool lora, Tensor& y, StepBuffer& x_buf, StepBuffer& u_buf);
  void attention(MlaLayer& Ly, int layer, const Tensor& xn, const StepCtx& s, PagedKvCache& cache,
                 Tensor& out);
  // The fast path's attention with LoRA (every row absorbed): the same ops and results as
  // attention(), with the LoRA shrinks and the q side of kv_b_proj's correction on side_.
  void attention_overlapped(MlaLayer& Ly, int layer, const Tensor& xn, const StepCtx& s,
                            PagedKvCache& cache, Tensor& out);
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
  RopeTable rope_;           // YaRN's frequency table and cos / sin factor (model/rope.h)
  float attn_scale_ = 1.0f;  // the attention softmax scale (model/rope.h)
  MlaPath path_ = MlaPath::automatic;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<MlaLayer> layers_;
  std::unique_ptr<MoeRunner> runner_;
  std::vector<bool> adapter_loaded_;
  int num_moe_layers_ = 0;
  MlaWorkspace ws_;
  ResultDownload download_;  // logits + margins to the host (pinned staging on CUDA)
  Tensor staging_;       // host i32 step tables (pageable: reusable once the upload call returns)
  DecodeGraphs graphs_;  // the fast path's decode graphs
  // CUDA, fast path: the side stream of the LoRA shrinks, and its fork / join events (one per
  // hand-over in a layer: kEvents), created before any capture.
  Stream side_;
  std::vector<Event> events_;
};

}  // namespace moelora

// Whole models: load a Hugging Face model directory and run batched forward steps over a paged
// KV cache, with per-request LoRA (attention, dense MLP, experts). One file per architecture
// (src/model/<model_type>.cpp; Qwen3-MoE and Mixtral share moe_decoder.cpp); Model::load picks
// it from config.json's model_type.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/io/hf_config.h"
#include "moelora/model/kv_cache.h"

namespace moelora {

class PeftAdapter;

// How a model runs decode steps (EngineConfig::decode_path, read once by the Engine; or
// Model::set_decode_path).
//   hooks: every step eager, LoRA through the MoE runner's hooks and the dense LoRA kernels
//          on the model's stream (the path every step took before issue 5).
//   fast:  on CUDA, decode steps (one new token per sequence, last-token logits) of up to
//          DecodeOptions::max_batch sequences replay a CUDA graph captured once per batch
//          bucket (batch padded up to it), block-table width and LoRA on/off, and the dense
//          LoRA shrinks (q/k/v, o_proj) run on a side stream beside the base projections.
//          Prefill and larger steps run as on `hooks`. On the CPU there are no graphs or
//          side streams: `fast` runs as `hooks`.
enum class DecodePath { hooks, fast };
const char* decode_path_name(DecodePath path);
// "hooks" or "fast"; anything else is an error naming the accepted values.
DecodePath parse_decode_path(const std::string& name);

// Which MoE LoRA variant the fast path's hooks use (MoeLoraHooksOptions): `best` is the one
// measured fastest for the experts' weight format (decode_hook_options, src/model/moe_block.h);
// the others force one (benchmarks and tests): staged hooks, overlap (deltas on a side stream),
// direct (as overlap, each delta one kernel straight from the routing) or inline (deltas in
// extra CTAs of the expert GEMM grids; backends that run it, the staged hooks elsewhere).
enum class MoeLoraVariant { best, staged, overlap, direct, inline_ctas };
const char* moe_lora_variant_name(MoeLoraVariant v);
// "best", "staged", "overlap", "direct" or "inline"; anything else is an error naming them.
MoeLoraVariant parse_moe_lora_variant(const std::string& name);

struct DecodeOptions {
  DecodePath path = DecodePath::hooks;
  // fast only: the MoE LoRA variant (hooks always runs the staged one).
  MoeLoraVariant moe_lora = MoeLoraVariant::best;
  // The largest decode batch the fast path captures graphs for (buckets 1, 2, 4, 8, then
  // multiples of 16 up to this, and at most ModelOptions::max_step_tokens); larger batches
  // run eagerly.
  int64_t max_batch = 256;
  // fast only: capture decode steps into CUDA graphs (false: the fast path's kernels and side
  // streams, run eagerly; what tests compare graph replay against).
  bool graphs = true;
  // fast only: the priority of the side streams (dense LoRA shrinks, MoE LoRA hooks).
  StreamPriority side_stream_priority = StreamPriority::normal;
};

struct ModelOptions {
  // Where the weights, the LoRA pools, the KV cache (kv_cache_config) and every activation of
  // a step live: the CPU or a CUDA device, for every supported model_type (Model::runs_on
  // says whether this build can).
  Device device = Device::cpu();
  // Tokens per step the per-step buffers are sized for at load (and rows per MoE runner call:
  // longer steps run the experts in chunks and grow the other buffers once).
  int64_t max_step_tokens = 256;
  // MoeRunner backend name; "" picks by capability: cuda_bf16 on a GPU, reference on the CPU.
  std::string moe_backend;
  // LoRA: adapter slots held at once and the largest rank they may have (lora_slots 0 = none).
  int lora_slots = 0;
  int lora_r_max = 16;
  // Called as each checkpoint tensor is loaded: (loaded, total, tensor name). For progress
  // displays (moelora generate draws a bar on a terminal); optional.
  std::function<void(int64_t, int64_t, const std::string&)> load_progress;
};

// One sequence's part of a forward step. Its new tokens take positions
// cache.length(seq) .. cache.length(seq) + tokens.size() - 1 (prefill: the whole prompt;
// decode: one token); the step reserves the pages they need and advances the cache length.
struct SeqInput {
  int seq = -1;                 // PagedKvCache sequence id
  std::vector<int32_t> tokens;  // at least one
  int adapter_slot = -1;        // -1: base model
};

// Host tensors whatever the model's device (one device->host copy per step on CUDA).
struct StepResult {
  Tensor last_logits;  // f32 [S, V]: the last new token of each sequence, in batch order
  Tensor all_logits;   // f32 [M, V]: every new token in batch order (only when asked)
  // f32 [M, MoE layers]: per new token and MoE layer (in layer order), the gap between its
  // k-th and (k+1)-th router logit. Near 0, bf16-level differences may route the token to
  // another expert: conformance checks use it to tell such tokens apart. Computed on the
  // model's device (one small kernel per MoE layer on CUDA, no host round trip) and
  // downloaded with the logits.
  Tensor router_margin;
};

class Model {
 public:
  virtual ~Model() = default;

  // Reads <dir>/config.json and the safetensors weights. Unknown or unimplemented model_type:
  // an error listing the supported ones. Missing, misshapen or unused tensors: an error naming
  // the tensor.
  static std::unique_ptr<Model> load(const std::string& dir, const ModelOptions& options = {});
  static std::vector<std::string> supported_model_types();
  // Whether the model in `dir` (its config.json's model_type) can run on `device` in this
  // build: any supported model on the CPU; on CUDA when moelora was built with it.
  static bool runs_on(const std::string& dir, Device device);

  virtual const HfModelConfig& config() const = 0;
  virtual const ModelOptions& options() const = 0;
  // A cache configuration matching the model (layers, KV heads, head size, context length).
  virtual KvCacheConfig kv_cache_config(int64_t num_pages, int page_size,
                                        DType dtype = DType::bf16) const = 0;

  // One batched step (prefill chunks and decode tokens may mix). Throws before touching the
  // cache for bad input (empty token list, token id outside the vocabulary, unknown sequence,
  // an adapter slot that is not loaded, no room in the cache).
  virtual StepResult forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                             bool all_logits = false) = 0;

  // A PEFT adapter into `slot`: attention q/k/v/o, dense MLP layers and the experts
  // (per-expert or fused 3D layout), any rank <= lora_r_max per module (rank_pattern /
  // alpha_pattern / rsLoRA honoured). A module matching no module of the model or a rank over
  // lora_r_max is an error naming it (the slot stays empty); embedding / lm_head LoRA is not
  // applied and printed as a WARNING to stderr: nothing is silently dropped.
  virtual void load_adapter(int slot, const PeftAdapter& adapter) = 0;
  // Loading or unloading an adapter needs no graph re-capture: the graphs read the slots'
  // device buffers, which keep their addresses.
  virtual void unload_adapter(int slot) = 0;
  virtual bool adapter_loaded(int slot) const = 0;
  virtual int num_adapter_slots() const = 0;

  // Selects the decode path (see DecodePath). Drops any captured graphs. A model family
  // without a fast path refuses DecodePath::fast with an error naming it.
  virtual void set_decode_options(const DecodeOptions& options);
  virtual const DecodeOptions& decode_options() const { return decode_options_; }
  // How the steps since set_decode_options ran: replayed from a graph, captured (run eagerly,
  // then captured), or eager (hooks path, prefill, larger than every bucket, CPU).
  struct DecodeStats {
    int64_t replayed = 0, captured = 0, eager = 0;
  };
  virtual DecodeStats decode_stats() const { return decode_stats_; }

 protected:
  DecodeOptions decode_options_;
  DecodeStats decode_stats_;
};

}  // namespace moelora

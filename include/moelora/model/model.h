// Whole models: load a Hugging Face model directory and run batched forward steps over a paged
// KV cache, with per-request LoRA (attention, dense MLP, experts). One file per architecture
// (src/model/<model_type>.cpp; Qwen3-MoE and Mixtral share moe_decoder.cpp); Model::load picks
// it from config.json's model_type.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/io/hf_config.h"
#include "moelora/model/kv_cache.h"

namespace moelora {

class PeftAdapter;

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
  virtual void unload_adapter(int slot) = 0;
  virtual bool adapter_loaded(int slot) const = 0;
  virtual int num_adapter_slots() const = 0;
};

}  // namespace moelora

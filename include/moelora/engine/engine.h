// The generation loop over a Model: admits requests (KV pages reserved up front), runs one
// batched prefill step, then batched decode steps over sequences of different lengths until
// each stops (stop token, max_new_tokens or the model's context). Greedy or seeded
// temperature / top-k / top-p sampling per request.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moelora/model/model.h"

namespace moelora {

// How the next token is chosen from a step's logits. temperature <= 0: greedy (argmax).
// Otherwise softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all)
// and then to the smallest set whose probability reaches top_p (1 = all), renormalized, and
// drawn with a counter-based generator seeded by (seed, step): the same request gives the same
// tokens whatever else runs in its batch.
struct SamplingParams {
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, at least one
  int max_new_tokens = 16;
  int adapter_slot = -1;                // -1: base model
  std::vector<int32_t> stop_token_ids;  // generation ends after emitting one of these
  SamplingParams sampling;              // default: greedy
};

struct GenerationResult {
  bool ok = false;
  std::string error;            // why the request was refused (ok == false)
  std::vector<int32_t> tokens;  // generated tokens (a stop token included)
  std::string finish_reason;    // "stop", "length" (max_new_tokens), "context"
  // When EngineConfig::record_logits: the logits each generated token was chosen from
  // (f32 [tokens.size(), V]), and the prompt's logits at every position ([prompt, V]).
  Tensor step_logits;
  Tensor prompt_logits;
  // With record_logits: StepResult::router_margin rows ([MoE layers] each) of every position
  // fed to the model (the prompt, then each generated token fed back), in position order.
  std::vector<std::vector<float>> router_margin;
  // Wall time of the batch's prefill step, and summed over the decode steps this request
  // took part in (the steps are shared by the whole batch).
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// The KV cache is built from Model::kv_cache_config, so it lives on the model's device
// (ModelOptions::device); the engine itself only handles host-side token ids and logits.
struct EngineConfig {
  int page_size = 16;
  int64_t num_pages = 256;  // KV budget shared by the batch
  DType kv_dtype = DType::bf16;
  bool record_logits = false;
  // The decode path (model.h's DecodePath), handed to the model once when the engine is
  // built: `hooks` (eager steps) or `fast` (CUDA-graph decode steps and overlapped dense
  // LoRA shrinks on CUDA; as `hooks` on the CPU).
  DecodePath decode_path = DecodePath::hooks;
};

class Engine {
 public:
  // `model` must outlive the engine.
  Engine(Model& model, const EngineConfig& config);

  // Runs the requests as one batch. A request that cannot run (empty prompt, prompt longer
  // than the context, KV budget exhausted, adapter slot without an adapter, token id outside
  // the vocabulary) gets ok == false and its error; the others proceed.
  std::vector<GenerationResult> generate(const std::vector<GenerationRequest>& requests);

  PagedKvCache& cache() { return cache_; }

 private:
  Model& model_;
  EngineConfig config_;
  PagedKvCache cache_;
};

// Greedy: the index of the largest logit (the lowest index on ties). logits f32 [V].
int32_t sample_greedy(const float* logits, int64_t vocab);

// The token for generation step `step` (0 = the token after the prompt) under `params`
// (greedy when temperature <= 0). Deterministic in (params, step, logits). Throws on invalid
// parameters (top_p outside (0, 1], negative top_k, non-finite temperature).
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params,
                     int64_t step);
// Checks `params`; returns "" or why they are invalid.
std::string check_sampling(const SamplingParams& params);

}  // namespace moelora

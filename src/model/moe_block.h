// The routed-expert part of a decoder layer, shared by the model families (internal).
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "model/decode_graphs.h"
#include "model/ops.h"
#include "moelora/io/hf_config.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/model/model.h"
#include "moelora/moe/runner.h"

namespace moelora {

// The model's MoeRunner: its MoE shape and router from config.json, buffers for
// max_step_tokens, the experts' weight format, the backend ModelOptions names ("" = by
// capability).
inline std::unique_ptr<MoeRunner> make_model_runner(const HfModelConfig& c,
                                                    const ModelOptions& options, Device device,
                                                    WeightFormat format) {
  MoeRunnerConfig rc;
  rc.shape = c.moe_shape();
  rc.router = c.router();
  rc.device = device;
  rc.max_tokens = options.max_step_tokens;
  rc.format = format;
  rc.backend = options.moe_backend;
  return std::make_unique<MoeRunner>(rc);
}

// The MoE LoRA hooks' settings on a decode path, per expert weight format: the variant that
// measured fastest in `bench moe --path hooks|fast|overlap|direct|inline` (H100, 2026-11-23,
// BENCHMARKS.md "MoE LoRA variants"). fp8 block-scale: the direct kernels at batches 1-8 and
// 65-128, deltas beside the GEMMs added in the activation / reduction (overlap) in between (the
// inline variant won only at r16x1 from batch 16 in the layer and lost in the whole model,
// session 5); int4 (wna16): the staged hooks
// everywhere (overlap slower); formats not measured yet keep the staged hooks. On the hooks path:
// the default options, so that path stays byte for byte what it was. DecodeOptions::moe_lora other
// than `best` forces a variant up to max_batch tokens.
inline MoeLoraHooksOptions decode_hook_options(const DecodeOptions& d, WeightFormat format,
                                               Device device) {
  MoeLoraHooksOptions o;
  if (d.path != DecodePath::fast || !device.is_cuda()) return o;
  o.side_stream_priority = d.side_stream_priority;
  switch (d.moe_lora) {
    case MoeLoraVariant::best:
      if (format == WeightFormat::fp8_block) {
        // Whole-model decode, r16x1 / none (H100, session 8, bench/NOTES.md): the direct
        // kernels (clusters of 4 at one token, a plain CTA per pair from 2) at batches 1-8
        // (0.924 vs 0.902 overlap at 4) and 65-128 (0.900 vs 0.887 at 128); overlap at 9-64
        // (0.904 vs 0.892 at 16, 0.912 vs 0.900 at 64).
        o.overlap_max_tokens = 128;
        o.direct_max_tokens = 128;
        o.direct_gap_min = 9;
        o.direct_gap_max = 64;
        o.direct_cluster_size = 0;
        o.direct_strict = false;
      }
      break;
    case MoeLoraVariant::overlap:
      o.overlap_max_tokens = d.max_batch;
      break;
    case MoeLoraVariant::direct:
      o.direct_max_tokens = d.max_batch;
      break;
    case MoeLoraVariant::inline_ctas:
      o.inline_max_tokens = d.max_batch;
      break;
    case MoeLoraVariant::staged:
      break;
  }
  return o;
}

// The part of Model::set_decode_options every family shares: checks the options, re-creates
// each MoE layer's LoRA hooks for the path and format (decode_hook_options) and configures the
// graphs. Returns whether the fast path's side stream is needed (fast, on CUDA).
template <class Layer>
bool apply_decode_options(const DecodeOptions& options, std::vector<Layer>& layers,
                          const ModelOptions& model_options, Device device, DecodeGraphs& graphs) {
  MOELORA_CHECK(options.max_batch >= 1, "DecodeOptions: max_batch must be >= 1, found {}",
                options.max_batch);
  for (Layer& L : layers)
    if (L.lora_pool)
      L.lora_hooks = MoeLoraHooks::create(*L.lora_pool, model_options.max_step_tokens,
                                          decode_hook_options(options, L.experts.format, device));
  const bool fast = options.path == DecodePath::fast && device.is_cuda();
  graphs.configure(fast && options.graphs, options.max_batch, model_options.max_step_tokens);
  return fast;
}

// Runs `runner` over the M rows of xb (bf16 [M, H]) with their router logits (f32 [M, E]) in
// chunks of at most `chunk` tokens (the runner's buffers are sized for that), binding each
// chunk's slice of token_slot when `hooks` is set (null: no LoRA); then out (f32 [M, H]) = y
// (the bf16 [M, H] layer output), widened on the tensors' device.
inline void run_moe_chunked(MoeRunner& runner, const MoeWeights& w, MoeLoraHooks* hooks,
                            const Tensor& token_slot, const Tensor& xb, const Tensor& logits,
                            int64_t chunk, Tensor& y, Tensor& out, const Stream& stream) {
  const int64_t M = xb.size(0);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t n = std::min(chunk, M - c0);
    MoeInputs in;
    in.x = xb.narrow(0, c0, n);
    in.router_logits = logits.narrow(0, c0, n);
    Tensor yc = y.narrow(0, c0, n);
    if (hooks) hooks->bind(LoraBatch{token_slot.narrow(0, c0, n)});
    runner.run(in, w, hooks, yc, stream);
  }
  ops::cast(y, out, stream);
}

}  // namespace moelora

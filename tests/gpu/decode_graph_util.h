// Shared by the fast-decode-path GPU tests (decode_graph_gpu_test.cpp,
// deepseek_graph_gpu_test.cpp): a model with four adapters on a decode path, a runner holding
// its cache and sequences, greedy choice, bit comparison.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "moelora/engine/engine.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"

namespace moelora::test {

// `model_dir` on CUDA with 4 LoRA slots (r_max 64, steps of up to 64 tokens) holding
// `adapter_dirs`, on decode path `path`.
inline std::unique_ptr<Model> load_decode_model(const std::string& model_dir,
                                                const std::vector<std::string>& adapter_dirs,
                                                DecodePath path, int64_t max_batch = 256,
                                                bool graphs = true,
                                                MoeLoraVariant moe_lora = MoeLoraVariant::best) {
  ModelOptions o;
  o.device = Device::cuda();
  o.lora_slots = 4;
  o.lora_r_max = 64;
  o.max_step_tokens = 64;
  auto m = Model::load(model_dir, o);
  for (size_t s = 0; s < adapter_dirs.size(); ++s)
    m->load_adapter(int(s), PeftAdapter::load(adapter_dirs[s]));
  DecodeOptions d;
  d.path = path;
  d.max_batch = max_batch;
  d.graphs = graphs;
  d.moe_lora = moe_lora;
  m->set_decode_options(d);
  return m;
}

// One model, its (KV or latent) cache and its sequences: sequence i runs adapter slots[i] and
// starts with a prompt of 3 + i % 7 tokens.
struct DecodeRunner {
  std::unique_ptr<Model> model;
  std::unique_ptr<PagedKvCache> cache;
  std::vector<SeqInput> seqs;

  DecodeRunner(std::unique_ptr<Model> m, const std::vector<int>& slots) : model(std::move(m)) {
    KvCacheConfig kc = model->kv_cache_config(1024, 16, DType::bf16);
    kc.max_seqs = 64;
    cache = std::make_unique<PagedKvCache>(kc);
    for (size_t i = 0; i < slots.size(); ++i) {
      SeqInput s;
      s.seq = cache->add_sequence();
      s.adapter_slot = slots[i];
      for (size_t t = 0; t < 3 + i % 7; ++t) s.tokens.push_back(int32_t((37 * i + 11 * t) % 500));
      seqs.push_back(s);
    }
  }
  // The prompts (next == nullptr) or one token per sequence.
  StepResult step(const std::vector<int32_t>* next) {
    if (next)
      for (size_t i = 0; i < seqs.size(); ++i) seqs[i].tokens = {(*next)[i]};
    return model->forward(seqs, *cache);
  }
};

inline std::vector<int32_t> greedy(const StepResult& r) {
  std::vector<int32_t> out;
  const int64_t V = r.last_logits.size(1);
  for (int64_t i = 0; i < r.last_logits.size(0); ++i)
    out.push_back(sample_greedy(r.last_logits.data<float>() + i * V, V));
  return out;
}

inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace moelora::test

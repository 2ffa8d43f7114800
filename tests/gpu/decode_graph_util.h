// Shared by the fast-decode-path GPU tests (decode_graph_gpu_test.cpp,
// deepseek_graph_gpu_test.cpp): a model with four adapters on a decode path, a runner holding
// its cache and sequences, greedy choice, bit comparison.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "moelora/engine/engine.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"
#include "test_util.h"

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
// starts with a prompt of prompt_extra + 3 + i % 7 tokens.
struct DecodeRunner {
  std::unique_ptr<Model> model;
  std::unique_ptr<PagedKvCache> cache;
  std::vector<SeqInput> seqs;

  DecodeRunner(std::unique_ptr<Model> m, const std::vector<int>& slots, int prompt_extra = 0)
      : model(std::move(m)) {
    KvCacheConfig kc = model->kv_cache_config(1024, 16, DType::bf16);
    kc.max_seqs = 64;
    cache = std::make_unique<PagedKvCache>(kc);
    for (size_t i = 0; i < slots.size(); ++i) {
      SeqInput s;
      s.seq = cache->add_sequence();
      s.adapter_slot = slots[i];
      for (size_t t = 0; t < 3 + i % 7 + size_t(prompt_extra); ++t)
        s.tokens.push_back(int32_t((37 * i + 11 * t) % 500));
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

inline float min_margin(const StepResult& r) {
  float m = INFINITY;
  for (float v : test::to_floats(r.router_margin)) m = std::min(m, v);
  return m;
}

// Runs `steps` decode steps (after the prefill) on `ref` and `fast`, the tokens chosen from
// `ref`: every step's logits (and router margins) bit-identical (exact) or within 2e-2.
// Inexact mode excuses at most `max_excused` steps whose `ref` run had a router near-tie
// (bf16-level differences may route a token differently there).
inline void compare_paths(DecodeRunner& ref, DecodeRunner& fast, int steps, bool exact,
                          const std::string& what, int max_excused = 0) {
  StepResult rh = ref.step(nullptr), rf = fast.step(nullptr);  // prefill: eager on both
  int excused = 0;
  for (int s = 0; s <= steps; ++s) {
    SCOPED_TRACE(fmt::format("{}: step {}", what, s));
    ASSERT_EQ(rf.last_logits.shape(), rh.last_logits.shape());
    ASSERT_EQ(rf.router_margin.shape(), rh.router_margin.shape());
    if (exact) {
      ASSERT_TRUE(same_bits(rf.last_logits, rh.last_logits));
      ASSERT_TRUE(same_bits(rf.router_margin, rh.router_margin));
    } else {
      const auto close =
          test::allclose(test::to_floats(rf.last_logits), test::to_floats(rh.last_logits), 2e-2);
      if (!close) {
        ASSERT_GT(max_excused, 0) << close.message();
        ASSERT_LT(min_margin(rh), 1e-2f) << close.message();
        ASSERT_LE(++excused, max_excused) << close.message();
      }
    }
    if (s == steps) break;
    const std::vector<int32_t> next = greedy(rh);
    rh = ref.step(&next);
    rf = fast.step(&next);
  }
}

// Loads `swap` into `slot` of both models, then `steps` steps (tokens from `ref`, starting
// from token 7 everywhere) give the same bits on both.
inline void expect_same_after_swap(DecodeRunner& ref, DecodeRunner& fast, int slot,
                                   const PeftAdapter& swap, int steps) {
  ref.model->load_adapter(slot, swap);
  fast.model->load_adapter(slot, swap);
  std::vector<int32_t> next(ref.seqs.size(), 7);
  StepResult rh = ref.step(&next), rf = fast.step(&next);
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE(fmt::format("after the swap, step {}", s));
    ASSERT_TRUE(same_bits(rf.last_logits, rh.last_logits));
    next = greedy(rh);
    rh = ref.step(&next);
    rf = fast.step(&next);
  }
}

// `steps` decode steps of the same tokens on `with` (adapters per `slots`) and `without` (all
// base): every base row's logits bit-identical. Returns whether any adapter row differed.
inline bool expect_base_rows_match(DecodeRunner& with, DecodeRunner& without,
                                   const std::vector<int>& slots, int steps) {
  StepResult rw = with.step(nullptr), rb = without.step(nullptr);
  const int64_t V = rw.last_logits.size(1);
  bool adapters_differ = false;
  for (int s = 0; s < steps; ++s) {
    std::vector<int32_t> next = greedy(rb);
    for (size_t i = 0; i < slots.size(); ++i) {
      const int cmp = std::memcmp(rw.last_logits.data<float>() + int64_t(i) * V,
                                  rb.last_logits.data<float>() + int64_t(i) * V, size_t(V) * 4);
      if (slots[i] >= 0) {
        adapters_differ = adapters_differ || cmp != 0;
        continue;
      }
      SCOPED_TRACE(fmt::format("step {} row {}", s, i));
      EXPECT_EQ(cmp, 0);
      if (cmp != 0) return adapters_differ;
    }
    rw = with.step(&next);
    rb = without.step(&next);
  }
  return adapters_differ;
}

}  // namespace moelora::test

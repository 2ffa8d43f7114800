#include "moelora/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace moelora {

Engine::Engine(Model& model, const EngineConfig& config)
    : model_(model),
      config_(config),
      cache_(model.kv_cache_config(config.num_pages, config.page_size, config.kv_dtype)) {
  DecodeOptions d = model_.decode_options();
  d.path = config_.decode_path;
  model_.set_decode_options(d);
}

namespace {

struct Active {
  size_t request = 0;
  int seq = -1;
  bool done = false;
  std::vector<float> step_logits;
};

// Why `r` cannot run, or "" when it can (the KV reservation is checked by the caller).
std::string refuse_reason(const GenerationRequest& r, const Model& m) {
  const HfModelConfig& c = m.config();
  if (r.prompt.empty()) return "empty prompt";
  for (int32_t t : r.prompt)
    if (t < 0 || t >= c.vocab_size)
      return fmt::format("prompt token id {} is outside the vocabulary [0, {})", t, c.vocab_size);
  if (r.max_new_tokens < 1)
    return fmt::format("max_new_tokens must be >= 1, found {}", r.max_new_tokens);
  if (std::string why = check_sampling(r.sampling); !why.empty()) return why;
  if (int64_t(r.prompt.size()) >= c.max_position_embeddings)
    return fmt::format(
        "prompt of {} tokens does not fit the model's context of {} "
        "(max_position_embeddings) with room to generate",
        r.prompt.size(), c.max_position_embeddings);
  if (r.adapter_slot != -1 && !m.adapter_loaded(r.adapter_slot))
    return fmt::format("adapter slot {} holds no adapter", r.adapter_slot);
  return "";
}

}  // namespace

std::vector<GenerationResult> Engine::generate(const std::vector<GenerationRequest>& requests) {
  const int64_t V = model_.config().vocab_size;
  const int64_t max_pos = model_.config().max_position_embeddings;
  std::vector<GenerationResult> results(requests.size());
  std::vector<Active> active;
  try {
    // Admission: every request gets its whole KV reservation now, so no decode step can run
    // out of pages half way.
    for (size_t i = 0; i < requests.size(); ++i) {
      const GenerationRequest& r = requests[i];
      std::string why = refuse_reason(r, model_);
      if (why.empty()) {
        const int seq = cache_.add_sequence();
        // The last generated token is never fed back: prompt + max_new - 1 positions.
        const int64_t need =
            std::min<int64_t>(int64_t(r.prompt.size()) + r.max_new_tokens - 1, max_pos);
        try {
          cache_.reserve(seq, need);
          active.push_back(Active{i, seq, false, {}});
        } catch (const Error& e) {
          cache_.free_sequence(seq);
          why = e.message();
        }
      }
      if (!why.empty()) results[i].error = why;
    }

    std::vector<SeqInput> step;
    // Active sequences are in step order; each fed its prompt (prefill) or one token.
    auto consume = [&](const StepResult& s) {
      size_t row = 0;
      int64_t mrow = 0;
      for (Active& a : active) {
        if (a.done) continue;
        const float* lg = s.last_logits.data<float>() + int64_t(row++) * V;
        const GenerationRequest& r = requests[a.request];
        GenerationResult& out = results[a.request];
        const int64_t fed = out.tokens.empty() ? int64_t(r.prompt.size()) : 1;
        if (config_.record_logits) {
          const int64_t cols = s.router_margin.size(1);
          for (int64_t p = mrow; p < mrow + fed; ++p) {
            const float* m = s.router_margin.data<float>() + p * cols;
            out.router_margin.emplace_back(m, m + cols);
          }
        }
        mrow += fed;
        const int32_t tok = sample_token(lg, V, r.sampling, int64_t(out.tokens.size()));
        out.tokens.push_back(tok);
        if (config_.record_logits) a.step_logits.insert(a.step_logits.end(), lg, lg + V);
        if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), tok) !=
            r.stop_token_ids.end()) {
          out.finish_reason = "stop";
        } else if (int64_t(out.tokens.size()) >= r.max_new_tokens) {
          out.finish_reason = "length";
        } else if (cache_.length(a.seq) + 1 > max_pos) {
          out.finish_reason = "context";
        }
        a.done = !out.finish_reason.empty();
      }
    };

    // Prefill: every admitted prompt in one step.
    if (!active.empty()) {
      for (const Active& a : active)
        step.push_back(
            SeqInput{a.seq, requests[a.request].prompt, requests[a.request].adapter_slot});
      const auto t0 = std::chrono::steady_clock::now();
      StepResult s = model_.forward(step, cache_, config_.record_logits);
      const double dt =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const Active& a : active) results[a.request].prefill_seconds = dt;
      if (config_.record_logits) {
        int64_t row = 0;
        for (const Active& a : active) {
          const int64_t n = int64_t(requests[a.request].prompt.size());
          Tensor t = Tensor::empty({n, V}, DType::f32);
          std::memcpy(t.data<float>(), s.all_logits.data<float>() + row * V,
                      size_t(n * V) * sizeof(float));
          results[a.request].prompt_logits = t;
          row += n;
        }
      }
      consume(s);
    }
    // Decode: one token per unfinished sequence per step.
    for (;;) {
      step.clear();
      for (const Active& a : active)
        if (!a.done)
          step.push_back(SeqInput{
              a.seq, {results[a.request].tokens.back()}, requests[a.request].adapter_slot});
      if (step.empty()) break;
      const auto t0 = std::chrono::steady_clock::now();
      StepResult s = model_.forward(step, cache_, false);
      const double dt =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const Active& a : active)
        if (!a.done) results[a.request].decode_seconds += dt;
      consume(s);
    }
  } catch (...) {
    for (const Active& a : active) cache_.free_sequence(a.seq);
    throw;
  }
  for (Active& a : active) {
    GenerationResult& out = results[a.request];
    out.ok = true;
    if (config_.record_logits) {
      out.step_logits = Tensor::empty({int64_t(out.tokens.size()), V}, DType::f32);
      std::memcpy(out.step_logits.data<float>(), a.step_logits.data(),
                  a.step_logits.size() * sizeof(float));
    }
    cache_.free_sequence(a.seq);
  }
  return results;
}

}  // namespace moelora

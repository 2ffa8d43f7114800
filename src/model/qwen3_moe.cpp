// Qwen3-MoE (model_type qwen3_moe), as transformers' Qwen3MoeForCausalLM:
//   h = embed(ids)
//   per layer: h += o_proj(attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n)))
//              with n = input_layernorm(h); then
//              h += moe(post_attention_layernorm(h))   (dense SiLU MLP on mlp_only layers)
//   logits = lm_head(norm(h))
// CPU backend: the residual stream and attention in f32, the MoE block through MoeRunner
// (bf16 input / output, as its contract says), KV cache f32 or bf16.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "kernels/cpu/dense_ops.h"
#include "model/models.h"
#include "model/weight_loader.h"
#include "moelora/core/stream.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

struct Layer {
  Tensor input_norm, post_norm;
  Tensor q_proj, k_proj, v_proj, o_proj, q_norm, k_norm;
  bool moe = false;
  Tensor router;       // [E, H]
  MoeWeights experts;  // w13 [E, 2I, H], w2 [E, H, I]
  Tensor mlp_gate_up;  // dense layers: [2 * intermediate, H] (gate rows first)
  Tensor mlp_down;     // [H, intermediate]
  std::unique_ptr<MoeLoraPool> lora_pool;
  std::unique_ptr<MoeLoraHooks> lora_hooks;
};

// Settings of config.json that HfModelConfig does not carry and that this model must refuse
// rather than ignore.
void check_unsupported_settings(const std::string& dir, const HfModelConfig& c) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  auto flag = [&](const char* key) {
    auto it = j.find(key);
    return it != j.end() && it->is_boolean() && it->get<bool>();
  };
  MOELORA_CHECK(!flag("use_sliding_window"),
                "{}: use_sliding_window=true is not supported by "
                "the qwen3_moe model yet",
                path);
  MOELORA_CHECK(!flag("attention_bias"),
                "{}: attention_bias=true is not supported by the "
                "qwen3_moe model (Qwen3 has no attention biases)",
                path);
  auto act = j.find("hidden_act");
  MOELORA_CHECK(act == j.end() || act->is_null() || *act == "silu",
                "{}: hidden_act {} is not supported (expected \"silu\")", path,
                act == j.end() ? "" : act->dump());
  MOELORA_CHECK(c.rope_type == "default",
                "{}: rope_type '{}' is not supported yet (only "
                "\"default\" RoPE)",
                path, c.rope_type);
  MOELORA_CHECK(!c.has_quantization_config,
                "{}: quantized checkpoints (quant_method '{}') are "
                "not supported by the model loader yet",
                path, c.quant_method);
  MOELORA_CHECK(c.max_position_embeddings > 0, "{}: max_position_embeddings must be > 0", path);
}

class Qwen3MoeModel final : public Model {
 public:
  Qwen3MoeModel(const std::string& dir, const HfModelConfig& config, const ModelOptions& options)
      : config_(config), options_(options), stream_(Stream::create(Device::cpu())) {
    check_unsupported_settings(dir, config_);
    MOELORA_CHECK(options_.max_step_tokens > 0, "ModelOptions: max_step_tokens must be > 0");
    const HfModelConfig& c = config_;
    const int64_t H = c.hidden_size, D = c.head_dim, V = c.vocab_size;
    const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
    WeightLoader wl(dir);
    embed_ = wl.bf16("model.embed_tokens.weight", {V, H});
    final_norm_ = wl.bf16("model.norm.weight", {H});
    if (c.tie_word_embeddings) {
      lm_head_ = embed_;
      if (wl.has("lm_head.weight")) wl.bf16("lm_head.weight", {V, H});  // tied: same values
    } else {
      lm_head_ = wl.bf16("lm_head.weight", {V, H});
    }
    const MoeShape shape = c.moe_shape();
    const int64_t E = shape.num_experts, I = shape.inter;
    bool any_moe = false;
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = fmt::format("model.layers.{}.", l);
      Layer L;
      L.input_norm = wl.bf16(p + "input_layernorm.weight", {H});
      L.post_norm = wl.bf16(p + "post_attention_layernorm.weight", {H});
      L.q_proj = wl.bf16(p + "self_attn.q_proj.weight", {nq, H});
      L.k_proj = wl.bf16(p + "self_attn.k_proj.weight", {nkv, H});
      L.v_proj = wl.bf16(p + "self_attn.v_proj.weight", {nkv, H});
      L.o_proj = wl.bf16(p + "self_attn.o_proj.weight", {H, nq});
      L.q_norm = wl.bf16(p + "self_attn.q_norm.weight", {D});
      L.k_norm = wl.bf16(p + "self_attn.k_norm.weight", {D});
      L.moe = c.is_moe_layer(l);
      if (L.moe) {
        any_moe = true;
        L.router = wl.bf16(p + "mlp.gate.weight", {E, H});
        L.experts.format = WeightFormat::bf16;
        Tensor w13, w2;
        const std::string fused = p + "mlp.experts.gate_up_proj";
        if (wl.has(fused)) {
          // transformers 5's in-memory layout saved as is: gate_up [E, 2I, H], down [E, H, I].
          w13 = wl.bf16(fused, {E, 2 * I, H});
          w2 = wl.bf16(p + "mlp.experts.down_proj", {E, H, I});
        } else {
          // Hub checkpoints (and save_pretrained of transformers 5.17): one Linear per expert.
          w13 = Tensor::empty({E, 2 * I, H}, DType::bf16);
          w2 = Tensor::empty({E, H, I}, DType::bf16);
          for (int64_t e = 0; e < E; ++e) {
            const std::string ep = fmt::format("{}mlp.experts.{}.", p, e);
            wl.copy_into(ep + "gate_proj.weight", {I, H}, w13, e * 2 * I * H);
            wl.copy_into(ep + "up_proj.weight", {I, H}, w13, (e * 2 + 1) * I * H);
            wl.copy_into(ep + "down_proj.weight", {H, I}, w2, e * H * I);
          }
        }
        L.experts.w13 = ExpertMatrices(w13);
        L.experts.w2 = ExpertMatrices(w2);
        L.experts.validate(shape);
        if (options_.lora_slots > 0) {
          L.lora_pool = std::make_unique<MoeLoraPool>(shape, options_.lora_slots,
                                                      options_.lora_r_max, Device::cpu());
          L.lora_hooks = MoeLoraHooks::create(*L.lora_pool, options_.max_step_tokens);
        }
      } else {
        const int64_t Id = c.intermediate_size;
        MOELORA_CHECK(Id > 0,
                      "{}/config.json: layer {} is a dense MLP layer but "
                      "intermediate_size is {}",
                      dir, l, Id);
        L.mlp_gate_up = Tensor::empty({2 * Id, H}, DType::bf16);
        wl.copy_into(p + "mlp.gate_proj.weight", {Id, H}, L.mlp_gate_up, 0);
        wl.copy_into(p + "mlp.up_proj.weight", {Id, H}, L.mlp_gate_up, Id * H);
        L.mlp_down = wl.bf16(p + "mlp.down_proj.weight", {H, Id});
      }
      layers_.push_back(std::move(L));
    }
    wl.check_all_used();
    if (any_moe) {
      MoeRunnerConfig rc;
      rc.shape = shape;
      rc.router = c.router();
      rc.device = Device::cpu();
      rc.max_tokens = options_.max_step_tokens;
      rc.format = WeightFormat::bf16;
      rc.backend = options_.moe_backend;
      runner_ = std::make_unique<MoeRunner>(rc);
    }
    adapter_loaded_.assign(size_t(std::max(options_.lora_slots, 0)), false);
  }

  const HfModelConfig& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }

  KvCacheConfig kv_cache_config(int64_t num_pages, int page_size, DType dtype) const override {
    KvCacheConfig k;
    k.num_layers = config_.num_hidden_layers;
    k.num_kv_heads = config_.num_key_value_heads;
    k.head_dim = config_.head_dim;
    k.page_size = page_size;
    k.num_pages = num_pages;
    k.max_seq_len = config_.max_position_embeddings;
    k.dtype = dtype;
    k.device = Device::cpu();
    return k;
  }

  StepResult forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                     bool all_logits) override;

  void load_adapter(int slot, const PeftAdapter& adapter) override;
  void unload_adapter(int slot) override {
    check_slot(slot);
    for (Layer& L : layers_)
      if (L.lora_pool) L.lora_pool->unload(slot);
    adapter_loaded_[size_t(slot)] = false;
  }
  bool adapter_loaded(int slot) const override {
    return slot >= 0 && slot < int(adapter_loaded_.size()) && adapter_loaded_[size_t(slot)];
  }
  int num_adapter_slots() const override { return int(adapter_loaded_.size()); }

 private:
  void check_slot(int slot) const {
    MOELORA_CHECK(slot >= 0 && slot < int(adapter_loaded_.size()),
                  "adapter slot {} is outside the model's {} LoRA slot(s) (ModelOptions::"
                  "lora_slots)",
                  slot, adapter_loaded_.size());
  }
  void attention(Layer& L, int layer, const Tensor& xn, const Tensor& positions,
                 const Tensor& slot_mapping, const Tensor& block_table, const Tensor& token_seq,
                 PagedKvCache& cache, Tensor& out);
  void mlp(Layer& L, const Tensor& xn, const Tensor& token_slot, bool lora, Tensor& out,
           Tensor& router_margin, int margin_col);

  HfModelConfig config_;
  ModelOptions options_;
  Stream stream_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::unique_ptr<MoeRunner> runner_;
  std::vector<bool> adapter_loaded_;
};

void Qwen3MoeModel::attention(Layer& L, int layer, const Tensor& xn, const Tensor& positions,
                              const Tensor& slot_mapping, const Tensor& block_table,
                              const Tensor& token_seq, PagedKvCache& cache, Tensor& out) {
  const HfModelConfig& c = config_;
  const int64_t M = xn.size(0), D = c.head_dim;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  Tensor q = Tensor::empty({M, nq}, DType::f32), k = Tensor::empty({M, nkv}, DType::f32);
  Tensor v = Tensor::empty({M, nkv}, DType::f32), a = Tensor::empty({M, nq}, DType::f32);
  cpu::linear(xn, L.q_proj, q, stream_);
  cpu::linear(xn, L.k_proj, k, stream_);
  cpu::linear(xn, L.v_proj, v, stream_);
  const float eps = float(c.rms_norm_eps);
  cpu::rms_norm(q, L.q_norm, eps, q, stream_);  // per head: weight [D]
  cpu::rms_norm(k, L.k_norm, eps, k, stream_);
  cpu::rope(q, int(D), positions, c.rope_theta, stream_);
  cpu::rope(k, int(D), positions, c.rope_theta, stream_);
  cpu::kv_cache_write(k, v, slot_mapping, cache.k(layer), cache.v(layer), stream_);
  const float scale = 1.0f / std::sqrt(float(D));
  cpu::paged_attention(q, cache.k(layer), cache.v(layer), block_table, token_seq, positions, scale,
                       a, stream_);
  cpu::linear(a, L.o_proj, out, stream_);
}

void Qwen3MoeModel::mlp(Layer& L, const Tensor& xn, const Tensor& token_slot, bool lora,
                        Tensor& out, Tensor& router_margin, int margin_col) {
  const int64_t M = xn.size(0), H = config_.hidden_size;
  if (!L.moe) {
    const int64_t Id = L.mlp_down.size(1);
    Tensor gu = Tensor::empty({M, 2 * Id}, DType::f32), act = Tensor::empty({M, Id}, DType::f32);
    cpu::linear(xn, L.mlp_gate_up, gu, stream_);
    cpu::silu_mul(gu, act, stream_);
    cpu::linear(act, L.mlp_down, out, stream_);
    return;
  }
  // The router reads the f32 normed activations (as transformers' f32 forward does); the
  // experts read the bf16 copy the MoE runner's contract asks for.
  const int64_t E = L.router.size(0);
  Tensor logits = Tensor::empty({M, E}, DType::f32), xb = Tensor::empty({M, H}, DType::bf16);
  Tensor y = Tensor::empty({M, H}, DType::bf16);
  cpu::linear(xn, L.router, logits, stream_);
  // How close each token's expert choice is to a tie (k-th vs (k+1)-th logit): bf16-level
  // differences can flip a choice that close, which conformance checks need to know.
  const int k = config_.num_experts_per_tok;
  if (k < E) {
    std::vector<float> r(static_cast<size_t>(E));
    float* margin = router_margin.data<float>();
    const int64_t cols = router_margin.size(1);
    for (int64_t t = 0; t < M; ++t) {
      std::copy_n(logits.data<float>() + t * E, E, r.begin());
      std::nth_element(r.begin(), r.begin() + k, r.end(), std::greater<float>());
      const float kth = *std::min_element(r.begin(), r.begin() + k);
      margin[t * cols + margin_col] = kth - r[size_t(k)];
    }
  }
  {
    const float* s = xn.data<float>();
    bf16_t* d = xb.data<bf16_t>();
    for (int64_t i = 0; i < M * H; ++i) d[i] = float_to_bf16(s[i]);
  }
  MoeHooks* hooks = nullptr;
  if (lora) {
    MOELORA_CHECK(L.lora_hooks != nullptr,
                  "qwen3_moe: LoRA requested but the model was loaded "
                  "without LoRA slots");
    hooks = L.lora_hooks.get();
  }
  const int64_t chunk = options_.max_step_tokens;
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t n = std::min(chunk, M - c0);
    MoeInputs in;
    in.x = xb.narrow(0, c0, n);
    in.router_logits = logits.narrow(0, c0, n);
    Tensor yc = y.narrow(0, c0, n);
    if (hooks) L.lora_hooks->bind(LoraBatch{token_slot.narrow(0, c0, n)});
    runner_->run(in, L.experts, hooks, yc, stream_);
  }
  // out (f32) = y
  const bf16_t* s = y.data<bf16_t>();
  float* d = out.data<float>();
  for (int64_t i = 0; i < M * H; ++i) d[i] = bf16_to_float(s[i]);
}

StepResult Qwen3MoeModel::forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                  bool all_logits) {
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!batch.empty(), "forward: empty batch");
  const KvCacheConfig& kc = cache.config();
  MOELORA_CHECK(kc.num_layers == c.num_hidden_layers && kc.num_kv_heads == c.num_key_value_heads &&
                    kc.head_dim == c.head_dim,
                "forward: KV cache has {} layers x {} KV heads x {} dims, the model needs "
                "{} x {} x {}",
                kc.num_layers, kc.num_kv_heads, kc.head_dim, c.num_hidden_layers,
                c.num_key_value_heads, c.head_dim);
  // Validate everything before the cache changes.
  int64_t M = 0;
  bool lora = false;
  std::vector<int> seen;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqInput& s = batch[b];
    MOELORA_CHECK(!s.tokens.empty(), "forward: sequence {} (batch entry {}) has no tokens", s.seq,
                  b);
    for (int32_t t : s.tokens)
      MOELORA_CHECK(t >= 0 && t < c.vocab_size,
                    "forward: sequence {}: token id {} is outside the "
                    "vocabulary [0, {})",
                    s.seq, t, c.vocab_size);
    MOELORA_CHECK(std::find(seen.begin(), seen.end(), s.seq) == seen.end(),
                  "forward: sequence {} appears twice in one step", s.seq);
    seen.push_back(s.seq);
    const int64_t new_len = cache.length(s.seq) + int64_t(s.tokens.size());
    if (!cache.can_reserve(s.seq, new_len)) cache.reserve(s.seq, new_len);  // throws the reason
    if (s.adapter_slot >= 0) {
      check_slot(s.adapter_slot);
      MOELORA_CHECK(adapter_loaded(s.adapter_slot),
                    "forward: sequence {} asks for adapter slot "
                    "{}, which holds no adapter",
                    s.seq, s.adapter_slot);
      lora = true;
    } else {
      MOELORA_CHECK(s.adapter_slot == -1,
                    "forward: sequence {}: adapter slot {} (expected -1 or "
                    "a slot)",
                    s.seq, s.adapter_slot);
    }
    M += int64_t(s.tokens.size());
  }
  const int64_t S = int64_t(batch.size());
  int64_t max_pages = 1;
  for (const SeqInput& s : batch) {
    cache.reserve(s.seq, cache.length(s.seq) + int64_t(s.tokens.size()));
    max_pages = std::max<int64_t>(max_pages, int64_t(cache.pages(s.seq).size()));
  }

  Tensor ids = Tensor::empty({M}, DType::i32), positions = Tensor::empty({M}, DType::i32);
  Tensor token_seq = Tensor::empty({M}, DType::i32), slots = Tensor::empty({M}, DType::i32);
  Tensor token_slot = Tensor::empty({M}, DType::i32);
  Tensor block_table = Tensor::empty({S, max_pages}, DType::i32);
  std::vector<int64_t> last_row(static_cast<size_t>(S));
  {
    int64_t m = 0;
    int32_t* bt = block_table.data<int32_t>();
    for (int64_t b = 0; b < S; ++b) {
      const SeqInput& s = batch[size_t(b)];
      const std::vector<int32_t>& pages = cache.pages(s.seq);
      for (int64_t j = 0; j < max_pages; ++j)
        bt[b * max_pages + j] = j < int64_t(pages.size()) ? pages[size_t(j)] : -1;
      const int64_t start = cache.length(s.seq);
      for (size_t i = 0; i < s.tokens.size(); ++i, ++m) {
        ids.data<int32_t>()[m] = s.tokens[i];
        positions.data<int32_t>()[m] = int32_t(start + int64_t(i));
        token_seq.data<int32_t>()[m] = int32_t(b);
        slots.data<int32_t>()[m] = cache.slot(s.seq, start + int64_t(i));
        token_slot.data<int32_t>()[m] = s.adapter_slot;
      }
      last_row[size_t(b)] = m - 1;
    }
  }

  const int64_t H = c.hidden_size, V = c.vocab_size;
  const float eps = float(c.rms_norm_eps);
  Tensor h = Tensor::empty({M, H}, DType::f32), xn = Tensor::empty({M, H}, DType::f32);
  Tensor delta = Tensor::empty({M, H}, DType::f32);
  cpu::embedding(ids, embed_, h, stream_);
  StepResult r;
  int num_moe = 0;
  for (const Layer& L : layers_) num_moe += L.moe ? 1 : 0;
  r.router_margin = Tensor::empty({M, num_moe}, DType::f32);
  std::fill_n(r.router_margin.data<float>(), M * num_moe, INFINITY);
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    Layer& L = layers_[size_t(l)];
    cpu::rms_norm(h, L.input_norm, eps, xn, stream_);
    attention(L, l, xn, positions, slots, block_table, token_seq, cache, delta);
    cpu::residual_add(h, delta, stream_);
    cpu::rms_norm(h, L.post_norm, eps, xn, stream_);
    mlp(L, xn, token_slot, lora, delta, r.router_margin, L.moe ? moe_index++ : -1);
    cpu::residual_add(h, delta, stream_);
  }
  for (const SeqInput& s : batch) cache.advance(s.seq, int64_t(s.tokens.size()));

  r.last_logits = Tensor::empty({S, V}, DType::f32);
  if (all_logits) {
    cpu::rms_norm(h, final_norm_, eps, xn, stream_);
    r.all_logits = Tensor::empty({M, V}, DType::f32);
    cpu::linear(xn, lm_head_, r.all_logits, stream_);
    for (int64_t b = 0; b < S; ++b)
      std::copy_n(r.all_logits.data<float>() + last_row[size_t(b)] * V, V,
                  r.last_logits.data<float>() + b * V);
  } else {
    Tensor hl = Tensor::empty({S, H}, DType::f32), nl = Tensor::empty({S, H}, DType::f32);
    for (int64_t b = 0; b < S; ++b)
      std::copy_n(h.data<float>() + last_row[size_t(b)] * H, H, hl.data<float>() + b * H);
    cpu::rms_norm(hl, final_norm_, eps, nl, stream_);
    cpu::linear(nl, lm_head_, r.last_logits, stream_);
  }
  return r;
}

// "model.layers.<L>.mlp.experts" when `module` lies under a MoE layer's experts, else "".
std::string experts_prefix_of(const std::string& module, const HfModelConfig& c) {
  const std::string head = "model.layers.";
  if (module.rfind(head, 0) != 0) return "";
  size_t i = head.size(), j = i;
  while (j < module.size() && std::isdigit(static_cast<unsigned char>(module[j]))) ++j;
  if (j == i || j - i > 6) return "";
  const int layer = std::stoi(module.substr(i, j - i));
  const std::string prefix = module.substr(0, j) + ".mlp.experts";
  if (layer >= c.num_hidden_layers || !c.is_moe_layer(layer)) return "";
  if (module.compare(0, prefix.size(), prefix) != 0) return "";
  if (module.size() != prefix.size() && module[prefix.size()] != '.') return "";
  return prefix;
}

void Qwen3MoeModel::load_adapter(int slot, const PeftAdapter& adapter) {
  check_slot(slot);
  const HfModelConfig& c = config_;
  // Every module must be expert LoRA: the rest would be silently ignored otherwise.
  for (const auto& [name, mod] : adapter.modules()) {
    (void)mod;
    MOELORA_CHECK(!experts_prefix_of(name, c).empty(),
                  "adapter {}: module '{}' is not supported by the qwen3_moe model yet: only "
                  "LoRA on MoE experts (model.layers.L.mlp.experts) is applied; attention "
                  "projections and dense MLP layers are a TODO (issue 4). Refusing to drop it.",
                  adapter.dir(), name);
  }
  MOELORA_CHECK(adapter.unsupported_keys().empty(),
                "adapter {}: {} key(s) cannot be applied (e.g. '{}'); refusing to drop them",
                adapter.dir(), adapter.unsupported_keys().size(),
                adapter.unsupported_keys().empty() ? "" : adapter.unsupported_keys()[0]);
  const MoeShape shape = c.moe_shape();
  // Build every layer's weights first so a bad layer leaves the slot untouched.
  std::vector<MoeLoraWeights> per_layer(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!layers_[l].moe) continue;
    per_layer[l] = moe_lora_from_peft(adapter, fmt::format("model.layers.{}.mlp.experts", l),
                                      shape.num_experts, shape.hidden, shape.inter);
  }
  for (size_t l = 0; l < layers_.size(); ++l)
    if (layers_[l].moe) layers_[l].lora_pool->load(slot, per_layer[l]);
  adapter_loaded_[size_t(slot)] = true;
}

}  // namespace

std::unique_ptr<Model> make_qwen3_moe(const std::string& dir, const HfModelConfig& config,
                                      const ModelOptions& options) {
  return std::make_unique<Qwen3MoeModel>(dir, config, options);
}

}  // namespace moelora

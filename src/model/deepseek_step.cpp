// DeepSeek model: the MLP / MoE block, the batched forward step and adapter loading.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>

#include "kernels/cpu/dense_ops.h"
#include "model/deepseek.h"
#include "model/moe_block.h"
#include "model/models.h"
#include "moelora/lora/peft_adapter.h"

namespace moelora {
namespace {

// The gap between the n-th and (n+1)-th largest of v (INFINITY when v has <= n values).
float gap_at(std::vector<double> v, int n) {
  if (int(v.size()) <= n) return INFINITY;
  std::sort(v.begin(), v.end(), std::greater<double>());
  return float(v[size_t(n) - 1] - v[size_t(n)]);
}

}  // namespace

// How close each token's routing is to a tie, in the router's selection scores (V2: the router
// logits, whose order softmax keeps; V3: sigmoid + correction bias): the smaller of the gap
// between the topk_group-th and next group score and the gap between the k-th and (k+1)-th
// eligible expert.
void DeepseekModel::router_margins(const Tensor& logits, const MlaLayer& Ly, Tensor& margin,
                                   int col) const {
  const RouterConfig rc = config_.router();
  const int64_t M = logits.size(0), E = rc.num_experts, cols = margin.size(1);
  const int per_group = int(E / rc.n_group);
  std::vector<double> s(static_cast<size_t>(E), 0.0);
  for (int64_t t = 0; t < M; ++t) {
    const float* l = logits.data<float>() + t * E;
    if (rc.scoring == ScoringFunc::softmax) {
      // Softmax keeps the order of the logits (and of each group's max): gaps in logits.
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] = l[e];
    } else {
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(l[e])));
    }
    if (rc.use_correction_bias)
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] += Ly.experts.correction_bias.data<float>()[e];
    float m = INFINITY;
    std::vector<double> eligible = s;
    if (rc.n_group > 1) {
      std::vector<double> gs(static_cast<size_t>(rc.n_group));
      for (int g = 0; g < rc.n_group; ++g) {
        std::vector<double> in(s.begin() + g * per_group, s.begin() + (g + 1) * per_group);
        std::sort(in.begin(), in.end(), std::greater<double>());
        gs[size_t(g)] = rc.group_score == GroupScore::max ? in[0] : in[0] + in[1];
      }
      m = std::min(m, gap_at(gs, rc.topk_group));
      std::vector<int> order(static_cast<size_t>(rc.n_group));
      for (int g = 0; g < rc.n_group; ++g) order[size_t(g)] = g;
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return gs[size_t(a)] > gs[size_t(b)]; });
      eligible.clear();
      for (int r = 0; r < rc.topk_group; ++r)
        for (int i = 0; i < per_group; ++i)
          eligible.push_back(s[size_t(order[size_t(r)] * per_group + i)]);
    }
    m = std::min(m, gap_at(eligible, rc.top_k));
    margin.data<float>()[t * cols + col] = m;
  }
}

void DeepseekModel::mlp(MlaLayer& Ly, const Tensor& xn, const StepCtx& s, Tensor& out,
                        Tensor& router_margin, int margin_col) {
  const int64_t M = xn.size(0), H = config_.hidden_size;
  if (!Ly.moe) {
    const int64_t Id = Ly.mlp_down.size(1);
    Tensor gu = Tensor::empty({M, 2 * Id}, DType::f32), act = Tensor::empty({M, Id}, DType::f32);
    cpu::linear(xn, Ly.mlp_gate_up, gu, stream_);
    cpu::silu_mul(gu, act, stream_);
    cpu::linear(act, Ly.mlp_down, out, stream_);
    return;
  }
  // The router reads the f32 normed activations (transformers' gate runs in f32); the experts
  // read the bf16 copy MoeRunner's contract asks for.
  const int64_t E = Ly.router.size(0);
  Tensor logits = Tensor::empty({M, E}, DType::f32), xb = Tensor::empty({M, H}, DType::bf16);
  Tensor y = Tensor::empty({M, H}, DType::bf16);
  cpu::linear(xn, Ly.router, logits, stream_);
  router_margins(logits, Ly, router_margin, margin_col);
  {
    const float* src = xn.data<float>();
    bf16_t* d = xb.data<bf16_t>();
    for (int64_t i = 0; i < M * H; ++i) d[i] = float_to_bf16(src[i]);
  }
  MoeLoraHooks* hooks = nullptr;
  if (s.lora) {
    MOELORA_CHECK(Ly.lora_hooks != nullptr,
                  "{}: LoRA requested but the model was loaded without LoRA slots",
                  config_.model_type);
    hooks = Ly.lora_hooks.get();
  }
  run_moe_chunked(*runner_, Ly.experts, hooks, s.token_slot, xb, logits, options_.max_step_tokens,
                  y, out, stream_);
}

StepResult DeepseekModel::forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                  bool all_logits) {
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!batch.empty(), "forward: empty batch");
  const KvCacheConfig& kc = cache.config();
  const int row = c.kv_lora_rank + c.qk_rope_head_dim;
  MOELORA_CHECK(kc.num_layers == c.num_hidden_layers && kc.num_kv_heads == 1 &&
                    kc.head_dim == row,
                "forward: KV cache has {} layers x {} heads x {} dims, the MLA model needs {} x 1 "
                "x {} (kv_lora_rank + qk_rope_head_dim; use the model's kv_cache_config)",
                kc.num_layers, kc.num_kv_heads, kc.head_dim, c.num_hidden_layers, row);
  // Validate everything before the cache changes.
  int64_t M = 0;
  StepCtx s;
  std::vector<int> seen;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqInput& in = batch[b];
    MOELORA_CHECK(!in.tokens.empty(), "forward: sequence {} (batch entry {}) has no tokens",
                  in.seq, b);
    for (int32_t t : in.tokens)
      MOELORA_CHECK(t >= 0 && t < c.vocab_size,
                    "forward: sequence {}: token id {} is outside the vocabulary [0, {})", in.seq,
                    t, c.vocab_size);
    MOELORA_CHECK(std::find(seen.begin(), seen.end(), in.seq) == seen.end(),
                  "forward: sequence {} appears twice in one step", in.seq);
    seen.push_back(in.seq);
    const int64_t new_len = cache.length(in.seq) + int64_t(in.tokens.size());
    if (!cache.can_reserve(in.seq, new_len)) cache.reserve(in.seq, new_len);  // throws why
    if (in.adapter_slot >= 0) {
      check_slot(in.adapter_slot);
      MOELORA_CHECK(adapter_loaded(in.adapter_slot),
                    "forward: sequence {} asks for adapter slot {}, which holds no adapter",
                    in.seq, in.adapter_slot);
      s.lora = true;
    } else {
      MOELORA_CHECK(in.adapter_slot == -1,
                    "forward: sequence {}: adapter slot {} (expected -1 or a slot)", in.seq,
                    in.adapter_slot);
    }
    M += int64_t(in.tokens.size());
  }
  const int64_t S = int64_t(batch.size());
  int64_t max_pages = 1;
  for (const SeqInput& in : batch) {
    cache.reserve(in.seq, cache.length(in.seq) + int64_t(in.tokens.size()));
    max_pages = std::max<int64_t>(max_pages, int64_t(cache.pages(in.seq).size()));
  }
  Tensor ids = Tensor::empty({M}, DType::i32);
  s.positions = Tensor::empty({M}, DType::i32);
  s.token_seq = Tensor::empty({M}, DType::i32);
  s.slots = Tensor::empty({M}, DType::i32);
  s.token_slot = Tensor::empty({M}, DType::i32);
  s.block_table = Tensor::empty({S, max_pages}, DType::i32);
  std::vector<int64_t> last_row(static_cast<size_t>(S));
  {
    int64_t m = 0;
    int32_t* bt = s.block_table.data<int32_t>();
    for (int64_t b = 0; b < S; ++b) {
      const SeqInput& in = batch[size_t(b)];
      const std::vector<int32_t>& pages = cache.pages(in.seq);
      for (int64_t j = 0; j < max_pages; ++j)
        bt[b * max_pages + j] = j < int64_t(pages.size()) ? pages[size_t(j)] : -1;
      const int64_t start = cache.length(in.seq);
      for (size_t i = 0; i < in.tokens.size(); ++i, ++m) {
        ids.data<int32_t>()[m] = in.tokens[i];
        s.positions.data<int32_t>()[m] = int32_t(start + int64_t(i));
        s.token_seq.data<int32_t>()[m] = int32_t(b);
        s.slots.data<int32_t>()[m] = cache.slot(in.seq, start + int64_t(i));
        s.token_slot.data<int32_t>()[m] = in.adapter_slot;
      }
      last_row[size_t(b)] = m - 1;
      s.segments.push_back({m - int64_t(in.tokens.size()), int64_t(in.tokens.size()),
                            in.adapter_slot});
    }
  }

  const int64_t H = c.hidden_size, V = c.vocab_size;
  const float eps = float(c.rms_norm_eps);
  Tensor h = Tensor::empty({M, H}, DType::f32), xn = Tensor::empty({M, H}, DType::f32);
  Tensor delta = Tensor::empty({M, H}, DType::f32);
  cpu::embedding(ids, embed_, h, stream_);
  StepResult r;
  int num_moe = 0;
  for (const MlaLayer& Ly : layers_) num_moe += Ly.moe ? 1 : 0;
  r.router_margin = Tensor::empty({M, num_moe}, DType::f32);
  std::fill_n(r.router_margin.data<float>(), M * num_moe, INFINITY);
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    MlaLayer& Ly = layers_[size_t(l)];
    cpu::rms_norm(h, Ly.input_norm, eps, xn, stream_);
    attention(Ly, l, xn, s, cache, delta);
    cpu::residual_add(h, delta, stream_);
    cpu::rms_norm(h, Ly.post_norm, eps, xn, stream_);
    mlp(Ly, xn, s, delta, r.router_margin, Ly.moe ? moe_index++ : -1);
    cpu::residual_add(h, delta, stream_);
  }
  for (const SeqInput& in : batch) cache.advance(in.seq, int64_t(in.tokens.size()));

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

namespace {

// Layer index and the rest of `module` after "model.layers.<L>.", or -1.
int layer_of(const std::string& module, std::string& rest) {
  const std::string head = "model.layers.";
  if (module.rfind(head, 0) != 0) return -1;
  size_t j = head.size();
  while (j < module.size() && std::isdigit(static_cast<unsigned char>(module[j]))) ++j;
  if (j == head.size() || j - head.size() > 6 || j >= module.size() || module[j] != '.') return -1;
  rest = module.substr(j + 1);
  return std::stoi(module.substr(head.size(), j - head.size()));
}

}  // namespace

void DeepseekModel::load_adapter(int slot, const PeftAdapter& adapter) {
  check_slot(slot);
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!layers_.empty() && (!layers_[0].attn_lora.empty()),
                "{}: adapters need LoRA slots (ModelOptions::lora_slots)", c.model_type);
  // Sort every module into expert LoRA (handled per layer below) or attention LoRA; anything
  // else would be silently ignored, so it is an error.
  std::vector<std::map<std::string, DenseLoraSlice>> attn(layers_.size());
  for (const auto& [name, mod] : adapter.modules()) {
    std::string rest;
    const int l = layer_of(name, rest);
    const bool in_range = l >= 0 && l < int(layers_.size());
    if (in_range && layers_[size_t(l)].moe &&
        (rest == "mlp.experts" || rest.rfind("mlp.experts.", 0) == 0))
      continue;
    const std::string proj = rest.rfind("self_attn.", 0) == 0 ? rest.substr(10) : "";
    MOELORA_CHECK(in_range && !proj.empty() && layers_[size_t(l)].attn_lora.count(proj),
                  "adapter {}: module '{}' is not supported by the {} model: LoRA applies to "
                  "routed experts (model.layers.L.mlp.experts) and the attention projections "
                  "(self_attn.{}); dense MLP layers and shared experts are a TODO. Refusing to "
                  "drop it.",
                  adapter.dir(), name, c.model_type,
                  c.q_lora_rank > 0 ? "q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj"
                                    : "q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj");
    DenseLoraSlice sl;
    sl.a = mod.a;
    sl.b = mod.b;
    sl.scale = mod.scaling;
    attn[size_t(l)][proj] = sl;
  }
  MOELORA_CHECK(adapter.unsupported_keys().empty(),
                "adapter {}: {} key(s) cannot be applied (e.g. '{}'); refusing to drop them",
                adapter.dir(), adapter.unsupported_keys().size(),
                adapter.unsupported_keys().empty() ? "" : adapter.unsupported_keys()[0]);
  const MoeShape shape = c.moe_shape();
  // Build every layer's expert LoRA first so a bad layer leaves the slot untouched.
  std::vector<MoeLoraWeights> experts(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l)
    if (layers_[l].moe)
      experts[l] = moe_lora_from_peft(adapter, fmt::format("model.layers.{}.mlp.experts", l),
                                      shape.num_experts, shape.hidden, shape.inter);
  try {
    for (size_t l = 0; l < layers_.size(); ++l) {
      MlaLayer& Ly = layers_[l];
      for (auto& [proj, pool] : Ly.attn_lora) {
        auto it = attn[l].find(proj);
        pool->load(slot, {it == attn[l].end() ? DenseLoraSlice{} : it->second});
      }
      if (Ly.moe) Ly.lora_pool->load(slot, experts[l]);
    }
  } catch (...) {
    unload_adapter(slot);  // a shape error half way: leave the slot empty, not mixed
    throw;
  }
  adapter_loaded_[size_t(slot)] = true;
}

std::unique_ptr<Model> make_deepseek(const std::string& dir, const HfModelConfig& config,
                                     const ModelOptions& options) {
  return std::make_unique<DeepseekModel>(dir, config, options);
}

}  // namespace moelora
